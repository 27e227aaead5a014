"""``heft``: Heterogeneous Earliest Finish Time (Topcuoglu, Hariri & Wu, IEEE TPDS 2002), memory-constrained.

1. Upward rank: ``rank(i) = w̄(i) + max_{j ∈ succ(i)} (c̄(i, j) + rank(j))``, with ``w̄`` the op's mean
   forward+backward time over the devices and ``c̄`` the edge's transfer time averaged over device pairs.
2. Ops in decreasing rank (a topological order; ties by op index) each go to the device giving the earliest
   finish time, using the insertion policy: the op may start in an idle gap between ops already scheduled on a
   device if the gap after its inputs arrive is long enough.

Constraints added for training graphs: an op whose colocation group is already placed goes to that device;
otherwise only devices with room for the whole group's memory are candidates, and when none has room the group
goes where most memory is left (the simulator then reports OOM). Deterministic (``seed`` unused).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import finish, groups_of, op_time_s
from placer.baselines.baechi import mean_transfer_s, transfer_matrix_s

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def upward_rank(graph: "OpGraph", time_s: np.ndarray, edge_s: np.ndarray) -> np.ndarray:
    """HEFT's upward rank per op (``edge_s``: mean transfer time per edge)."""
    w = time_s.mean(axis=1)
    rank = w.copy()
    src, dst = graph.edge_index
    order = np.argsort(-src, kind="stable")  # sources descending: successors are final before their parents
    for e in order:
        s, t = int(src[e]), int(dst[e])
        rank[s] = max(rank[s], w[s] + edge_s[e] + rank[t])
    return rank


def _earliest_slot(starts: list[float], ends: list[float], ready_s: float, dur_s: float) -> tuple[float, int]:
    """Earliest start ≥ ``ready_s`` of a ``dur_s`` gap in a device's sorted busy intervals, and the insert index."""
    # intervals never overlap, so ends are sorted too: skip every interval that ends before the inputs arrive
    first = bisect.bisect_right(ends, ready_s)
    prev_end = ends[first - 1] if first else 0.0
    for k in range(first, len(starts)):
        s = max(prev_end, ready_s)
        if s + dur_s <= starts[k]:
            return s, k
        prev_end = ends[k]
    return max(prev_end, ready_s), len(starts)


@register("heft")
def place_heft(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """HEFT with insertion, colocation and memory constraints."""
    groups = groups_of(graph, cluster)
    n, d = graph.n, cluster.num_devices
    t = op_time_s(graph, cluster)
    lat, inv_bw = transfer_matrix_s(cluster)
    rank = upward_rank(graph, t, mean_transfer_s(cluster, graph.edge_bytes))
    order = np.lexsort((np.arange(n), -rank))
    src, dst = graph.edge_index
    in_edges: list[list[int]] = [[] for _ in range(n)]
    for e in range(src.size):
        in_edges[int(dst[e])].append(e)
    gid = groups.group_of_op
    dev_of_group = np.full(groups.num, -1, dtype=np.int64)
    free = np.array([dev.memory_bytes for dev in cluster.devices], dtype=np.int64)
    starts: list[list[float]] = [[] for _ in range(d)]
    ends: list[list[float]] = [[] for _ in range(d)]
    finish_s = np.zeros(n)
    dev_of_op = np.full(n, -1, dtype=np.int64)
    for op in order.tolist():
        ready = np.zeros(d)
        for e in in_edges[op]:
            p = int(src[e])
            s = dev_of_op[p]
            ready = np.maximum(ready, finish_s[p] + lat[s] + graph.edge_bytes[e] * inv_bw[s])
        g = gid[op]
        if dev_of_group[g] >= 0:
            cands = [int(dev_of_group[g])]
        else:
            cands = [k for k in range(d) if free[k] >= groups.mem_bytes[g]] or [int(np.argmax(free))]
        best: tuple[float, int, float, int] | None = None
        for k in cands:
            start, pos = _earliest_slot(starts[k], ends[k], float(ready[k]), float(t[op, k]))
            eft = start + float(t[op, k])
            if best is None or eft < best[0]:
                best = (eft, k, start, pos)
        assert best is not None
        eft, k, start, pos = best
        starts[k].insert(pos, start)
        ends[k].insert(pos, eft)
        finish_s[op] = eft
        dev_of_op[op] = k
        if dev_of_group[g] < 0:
            dev_of_group[g] = k
            free[k] -= groups.mem_bytes[g]
    return finish(graph, cluster, groups, dev_of_group)
