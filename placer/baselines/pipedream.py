"""``pipedream-dp``: contiguous pipeline stages by dynamic programming (Narayanan et al., "PipeDream: Generalized
Pipeline Parallelism for DNN Training", SOSP 2019, §3.1 partitioning algorithm).

Colocation groups in topological order (of their first ops) are cut into contiguous stages, one stage per
device, each device used at most once in a fixed order. PipeDream's recurrence without data-parallel
replication::

    A[k][j] = min( A[k-1][j],                                   # device k left empty
                   min_{i<j} max(A[k-1][i], T_k(i..j), C(i)) )   # groups i..j-1 on device k

``T_k(i..j)``: forward+backward time of those groups on device ``k`` (∞ when their memory exceeds the device's);
``C(i)``: time to send the bytes crossing cut ``i`` forward and their gradients back (``2 × bytes``) over the mean
link into device ``k``, plus latency. The objective is the slowest stage, i.e. pipelined throughput. The DP runs
for two device orders (cluster order, and fastest device first) and keeps the better. Stages go to the
accelerators only when the cluster also has a host CPU (PipeDream's workers are GPUs); a CPU-only cluster uses
all its devices. When no split fits memory
the DP is rerun without the memory limit and that placement is returned (the simulator reports the OOM).
Deterministic (``seed`` unused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import Groups, accelerators, finish, groups_of
from placer.baselines.baechi import transfer_matrix_s

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def cut_bytes(groups: Groups) -> np.ndarray:
    """``cut[i]``: bytes over edges between groups ``< i`` and ``≥ i`` (``i`` in ``0..G``)."""
    diff = np.zeros(groups.num + 2, dtype=np.int64)
    np.add.at(diff, groups.src + 1, groups.edge_bytes)
    np.add.at(diff, groups.dst + 1, -groups.edge_bytes)
    return np.cumsum(diff)[: groups.num + 1]


def stage_dp(groups: Groups, cluster: "Cluster", order: list[int], *, use_memory: bool) -> tuple[float, np.ndarray]:
    """Best bottleneck time and device per group for devices used in ``order``."""
    g_num, d_num = groups.num, len(order)
    lat, inv_bw = transfer_matrix_s(cluster)
    cut = cut_bytes(groups).astype(np.float64)
    mem = np.concatenate([[0], np.cumsum(groups.mem_bytes)]).astype(np.float64)
    inf = np.inf
    best = np.full((d_num + 1, g_num + 1), inf)
    best[0, 0] = 0.0
    choice = np.full((d_num + 1, g_num + 1), -1, dtype=np.int64)
    for k, dev in enumerate(order, start=1):
        pre = np.concatenate([[0.0], np.cumsum(groups.time_s[:, dev])])
        others = [o for o in order if o != dev]
        in_lat = float(lat[others, dev].mean()) if others else 0.0
        in_inv_bw = float(inv_bw[others, dev].mean()) if others else 0.0
        comm = np.where(cut > 0, in_lat + 2.0 * cut * in_inv_bw, 0.0)
        cap = cluster.devices[dev].memory_bytes if use_memory else inf
        best[k] = best[k - 1]  # device left empty
        for j in range(1, g_num + 1):
            i = np.arange(j)
            cost = np.maximum(np.maximum(best[k - 1, :j], pre[j] - pre[:j]), comm[:j])
            cost = np.where(mem[j] - mem[:j] > cap, inf, cost)
            m = int(np.argmin(cost))
            if cost[m] < best[k, j]:
                best[k, j] = cost[m]
                choice[k, j] = i[m]
    dev_of_group = np.zeros(g_num, dtype=np.int64)
    j = g_num
    for k in range(d_num, 0, -1):
        i = choice[k, j]
        if i < 0 or not np.isfinite(best[k, j]):
            continue  # device order[k-1] left empty
        dev_of_group[i:j] = order[k - 1]
        j = int(i)
    return float(best[d_num, g_num]), dev_of_group


@register("pipedream-dp")
def place_pipedream(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """PipeDream's stage-partitioning DP (no replication), memory per stage."""
    groups = groups_of(graph, cluster)
    if groups.num == 0:
        return finish(graph, cluster, groups, np.zeros(0, dtype=np.int64))
    devs = accelerators(cluster)
    orders = [devs]
    fastest = [devs[int(x)] for x in np.argsort(-groups.throughput(devs), kind="stable")]
    if fastest != orders[0]:
        orders.append(fastest)
    for use_memory in (True, False):
        results = [stage_dp(groups, cluster, o, use_memory=use_memory) for o in orders]
        obj, dev = min(results, key=lambda r: r[0])
        if np.isfinite(obj):
            return finish(graph, cluster, groups, dev)
    raise ValueError(f"pipedream-dp: no finite stage split for graph {graph.name!r}")  # unreachable: times finite
