"""``random`` and ``round-robin``: the naive references every learned placer should beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import finish, groups_of

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


@register("random")
def place_random(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Each colocation group (in topological order) on a device drawn uniformly from those whose remaining
    memory holds it, from ``numpy.random.default_rng(seed)``. When no device has room the draw is over all
    devices, and the simulator reports the OOM."""
    rng = np.random.default_rng(seed)
    groups = groups_of(graph, cluster, need_costs=False)
    free = np.array([d.memory_bytes for d in cluster.devices], dtype=np.int64)
    dev = np.zeros(groups.num, dtype=np.int64)
    for g in range(groups.num):
        ok = np.flatnonzero(free >= groups.mem_bytes[g])
        pool = ok if ok.size else np.arange(cluster.num_devices)
        dev[g] = pool[rng.integers(pool.size)]
        free[dev[g]] -= groups.mem_bytes[g]
    return finish(graph, cluster, groups, dev)


@register("round-robin")
def place_round_robin(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Colocation group ``k`` (in topological order of first ops) on device ``k mod D``. Ignores memory and
    costs; deterministic (``seed`` unused)."""
    groups = groups_of(graph, cluster, need_costs=False)
    return finish(graph, cluster, groups, np.arange(groups.num, dtype=np.int64) % cluster.num_devices)
