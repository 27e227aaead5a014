"""Placement policies and their training algorithms, registered by name.

Policies (:data:`policies.registry.POLICIES`): ``seq2seq`` (ColocRL), ``gnn`` (Placeto/GDP-style GraphSAGE),
``hierarchical`` (grouper + placer, Mirhoseini et al. 2018).
Algorithms (:data:`policies.registry.ALGOS`): ``reinforce`` (ColocRL's REINFORCE), ``ppo`` (sb3-contrib's MaskablePPO
over the GNN).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from placer.core.discover import import_submodules
from policies.base import MemoryMask, PlacementPolicy, PolicyInput, PolicySample, imitate
from policies.registry import ALGOS, POLICIES, Algorithm, register_algo, register_policy

# every module but these registers a policy or an algorithm: a new one is a new file (docs/architecture.md)
import_submodules(__name__, __path__, skip=("base", "registry"))

if TYPE_CHECKING:
    from envs.placement_env import PlacementEnv
    from envs.problem import PlacementProblem

__all__ = ["ALGOS", "POLICIES", "MemoryMask", "PlacementPolicy", "PolicyInput", "PolicySample", "imitate",
           "make_algo", "make_policy", "register_algo", "register_policy"]


def make_policy(name: str, problem: PlacementProblem, **hparams: Any) -> PlacementPolicy:
    """Policy ``name`` sized for ``problem`` (one-line ``ValueError`` for an unknown name)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
    return factory(problem, **hparams)


def make_algo(name: str, policy: PlacementPolicy, env: "PlacementEnv", config: Any = None, **hparams: Any
              ) -> Algorithm:
    """Algorithm ``name`` for ``policy`` on ``env`` with ``config`` (its config dataclass; ``None``: the defaults)
    and ``hparams`` replacing fields of it. An unknown name, a config of another algorithm or a hyper-parameter
    the algorithm does not have is a one-line ``ValueError``."""
    try:
        spec = ALGOS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGOS))}") from None
    config = spec.config_class() if config is None else config
    if not isinstance(config, spec.config_class):
        raise ValueError(f"algorithm {name!r} takes a {spec.config_class.__name__}, not a {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(spec.config_class)}
    unknown = sorted(set(hparams) - names)
    if unknown:
        raise ValueError(f"algorithm {name!r} has no hyper-parameter {', '.join(unknown)} (it takes "
                         f"{', '.join(sorted(names))})")
    return spec.factory(policy, env, dataclasses.replace(config, **hparams))
