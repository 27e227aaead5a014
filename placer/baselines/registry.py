"""The baseline registry: :data:`BASELINES` maps a method name to its ``place`` function; each method module adds
itself with ``@register(name)`` when :mod:`placer.baselines` imports it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


class PlaceFn(Protocol):
    def __call__(self, graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement": ...


BASELINES: dict[str, PlaceFn] = {}


def register(name: str) -> Callable[[PlaceFn], PlaceFn]:
    """Decorator adding a placement method to :data:`BASELINES` under ``name``."""

    def deco(fn: PlaceFn) -> PlaceFn:
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} registered twice")
        BASELINES[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(BASELINES)
