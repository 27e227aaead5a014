"""Placement policies and their training algorithms, registered by name.

Policies (:data:`policies.base.POLICIES`): ``seq2seq`` (ColocRL), ``gnn`` (Placeto/GDP-style GraphSAGE),
``hierarchical`` (grouper + placer, Mirhoseini et al. 2018).
Algorithms (:data:`policies.base.ALGOS`): ``reinforce`` (ColocRL's REINFORCE), ``ppo`` (sb3-contrib's MaskablePPO
over the GNN).
"""

from policies.base import (ALGOS, POLICIES, MemoryMask, PlacementPolicy, PolicyInput, PolicySample, imitate,
                           make_algo, make_policy, register_algo, register_policy)
from policies import gnn, hierarchical, ppo, reinforce, seq2seq  # noqa: E402,F401 -- register themselves

__all__ = ["ALGOS", "POLICIES", "MemoryMask", "PlacementPolicy", "PolicyInput", "PolicySample", "imitate",
           "make_algo", "make_policy", "register_algo", "register_policy"]
