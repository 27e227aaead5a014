"""The policy and algorithm registries: :data:`POLICIES` and :data:`ALGOS`, filled by ``@register_policy`` /
``@register_algo`` when :mod:`policies` imports its modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from policies.base import PlacementPolicy

PolicyFactory = Callable[..., PlacementPolicy]
"""``factory(problem, **hyperparameters) -> PlacementPolicy``."""
POLICIES: dict[str, PolicyFactory] = {}


def register_policy(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    def deco(fn: PolicyFactory) -> PolicyFactory:
        POLICIES[name] = fn
        return fn

    return deco


class Algorithm(Protocol):
    """A training algorithm: one :meth:`update` samples placements, scores them with the env, improves the policy.

    ``update()`` returns per-update statistics (:class:`policies.reinforce.UpdateStats`-like: ``rewards``,
    ``step_times_s``, ``placements``, ``results`` of the placements it evaluated, and scalar losses); the
    trainer only needs those fields. ``state_dict()`` / ``load_state_dict()`` cover everything needed to resume
    (optimizer, baseline, RNG).
    """

    policy: PlacementPolicy

    def update(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class AlgoSpec:
    factory: Callable[..., Algorithm]
    """``factory(policy, env, config) -> Algorithm``."""
    config_class: type
    """A ``@dataclass(kw_only=True)`` of the algorithm's hyperparameters."""


ALGOS: dict[str, AlgoSpec] = {}


def register_algo(name: str, config_class: type) -> Callable[[Callable[..., Algorithm]], Callable[..., Algorithm]]:
    def deco(fn: Callable[..., Algorithm]) -> Callable[..., Algorithm]:
        ALGOS[name] = AlgoSpec(fn, config_class)
        return fn

    return deco
