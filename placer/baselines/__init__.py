"""Placement baselines, one module per method, registered by name.

Every method has one signature, ``place(graph, cluster, *, seed) -> Placement``: it uses only the graph (costs,
sizes, colocation groups) and the cluster (devices, links), never the simulator, and returns a placement that
``Placement.validate`` accepts (all ops of a colocation group on one device). When memory cannot be satisfied a
method still returns its best placement; the simulator reports the OOM (see each module's docstring).

Methods: ``single`` (``single-cpu``, ``single-gpu``, and ``single:<kind or device name>`` through :func:`place`),
``scotch``, ``mincut``, ``metis``, ``expert``, ``m-topo``, ``m-etf``, ``m-sct``, ``heft``, ``pipedream-dp``,
``random``, ``round-robin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.cluster import Cluster
    from placer.placement import Placement


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


def place(method: str, graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Run baseline ``method`` (a registered name, or ``single:<device kind or name>``)."""
    if method.startswith("single:"):
        return place_single(graph, cluster, method.split(":", 1)[1])
    fn = BASELINES.get(method)
    if fn is None:
        raise ValueError(f"unknown placement method {method!r}; known: {', '.join(sorted(BASELINES))}, single:<kind>")
    return fn(graph, cluster, seed=seed)


def names() -> list[str]:
    """Registered method names, sorted."""
    return sorted(BASELINES)


# The modules register themselves on import (after ``register`` exists, hence at the bottom).
from placer.baselines import baechi, expert, heft, metis, pipedream, scotch, simple, single  # noqa: E402,F401
from placer.baselines.single import place_single, single_methods  # noqa: E402

__all__ = ["BASELINES", "PlaceFn", "names", "place", "place_single", "register", "single_methods"]
