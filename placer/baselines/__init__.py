"""Placement baselines, one module per method, registered by name.

Every method has one signature, ``place(graph, cluster, *, seed) -> Placement``: it uses only the graph (costs,
sizes, colocation groups) and the cluster (devices, links), never the simulator, and returns a placement that
``Placement.validate`` accepts (all ops of a colocation group on one device). When memory cannot be satisfied a
method still returns its best placement; the simulator reports the OOM (see each module's docstring).

Methods: ``single`` (``single-cpu``, ``single-gpu``, and ``single:<kind or device name>`` through :func:`place`),
``scotch``, ``mincut``, ``metis``, ``expert``, ``m-topo``, ``m-etf``, ``m-sct``, ``heft``, ``pipedream-dp``,
``hetero-dp``, ``even-layers``, ``even-layers-weighted``, ``deepspeed-parameters``, ``deepspeed-uniform``,
``expert-parallel`` (MoE graphs only), ``random``, ``round-robin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from placer.baselines.registry import BASELINES, PlaceFn, names, register
from placer.baselines.single import place_single, single_methods
from placer.core.discover import import_submodules

# every public module but the registry registers one or more methods: a new method is a new file
import_submodules(__name__, __path__, skip=("registry",))

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def place(method: str, graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Run baseline ``method`` (a registered name, or ``single:<device kind or name>``)."""
    if method.startswith("single:"):
        return place_single(graph, cluster, method.split(":", 1)[1])
    fn = BASELINES.get(method)
    if fn is None:
        raise ValueError(f"unknown placement method {method!r}; known: {', '.join(sorted(BASELINES))}, single:<kind>")
    return fn(graph, cluster, seed=seed)



__all__ = ["BASELINES", "PlaceFn", "names", "place", "place_single", "register", "single_methods"]
