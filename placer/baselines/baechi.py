"""Baechi's memory-constrained placers ``m-topo``, ``m-etf`` and ``m-sct``.

Jeon et al., "Baechi: Fast Device Placement of Machine Learning Graphs", SoCC 2020. All three respect device
memory while placing (an op's colocation group reserves :func:`~placer.costmodel.costs.op_memory_bytes` of its
device when its first op is placed) and treat an op's forward+backward time as one task, as Baechi places the
forward graph and colocates each backward op with its forward op.

- ``m-topo``: colocation groups in topological order fill device 0, then 1, ... each up to its balanced share of
  the total compute (share ∝ the device's throughput on this graph) and up to its memory.
- ``m-etf``: earliest-time-first list scheduling (Hwang et al., SIAM J. Comput. 1989): repeatedly schedule the
  (ready op, device) pair with the earliest possible start, counting the transfer time of every input from
  another device over the cluster's link (latency + bytes / bandwidth); ties go to the op with the longer
  remaining path, then to the earlier finish (the faster device). Devices without room for the op's group are skipped.
- ``m-sct``: ETF with the small-communication-time heuristic of Hanen & Munier (1995) that Baechi adapts: each op
  has at most one *favourite child*, which should run on the parent's device. Simplification (documented, not
  Baechi's code): Baechi picks favourite children by solving the SCT linear program; we pick them greedily by
  descending transfer time of the edge (each op at most one favourite child and one favourite parent), and in
  the ETF choice a favourite child's start on its parent's device is credited with the transfer time it saves.

Targets: Baechi places onto the GPUs of a machine, so when a cluster has a host CPU plus accelerators the CPU is
not a target (as in ColocRL's MinCut); a CPU-only cluster uses all its devices. ETF's earliest-*start* rule was
made for identical processors: offered an idle host CPU ten times slower than the GPUs, it would start ops there
just because it is free, which is not what Baechi does on its GPU servers.

When no device has room for a group, all three put it where the most memory is left (``m-topo``: the last
device) and carry on; the simulator then reports the OOM rather than the method shrinking anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import Groups, accelerators, finish, groups_of, op_time_s

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def transfer_matrix_s(cluster: "Cluster") -> tuple[np.ndarray, np.ndarray]:
    """``(latency_s, 1/bandwidth)`` with zero diagonal, so ``lat + bytes * inv_bw`` is a transfer's time."""
    d = cluster.num_devices
    off = ~np.eye(d, dtype=bool)
    lat = np.where(off, cluster.latency_s, 0.0)
    inv_bw = np.where(off, 1.0 / np.where(off, cluster.bandwidth_Bps, 1.0), 0.0)
    return lat, inv_bw


def mean_transfer_s(cluster: "Cluster", nbytes: np.ndarray) -> np.ndarray:
    """Transfer time of ``nbytes`` averaged over all ordered device pairs (0 on a one-device cluster)."""
    d = cluster.num_devices
    if d == 1:
        return np.zeros_like(np.asarray(nbytes, dtype=np.float64))
    lat, inv_bw = transfer_matrix_s(cluster)
    pairs = d * (d - 1)
    return lat.sum() / pairs + np.asarray(nbytes, dtype=np.float64) * inv_bw.sum() / pairs


def bottom_level_s(graph: "OpGraph", time_s: np.ndarray) -> np.ndarray:
    """Longest path (mean op time, no transfers) from each op to a sink, inclusive."""
    mean = time_s.mean(axis=1) if time_s.size else np.zeros(graph.n)
    bl = mean.copy()
    succs = graph.successors()
    for i in range(graph.n - 1, -1, -1):
        if succs[i].size:
            bl[i] = mean[i] + bl[succs[i]].max()
    return bl


def _fallback_device(free: np.ndarray, allowed: np.ndarray) -> int:
    return int(np.argmax(np.where(allowed, free, np.iinfo(np.int64).min)))


def _favourite_parents(graph: "OpGraph", cluster: "Cluster") -> tuple[np.ndarray, np.ndarray]:
    """SCT's favourite child relation: each op's favourite parent (-1: none) and the transfer time saved when they
    share a device; edges taken greedily by saving, one favourite child per parent."""
    n = graph.n
    src, dst = graph.edge_index
    fav_parent = np.full(n, -1, dtype=np.int64)
    fav_saving_s = np.zeros(n)
    if src.size:
        saving = mean_transfer_s(cluster, graph.edge_bytes)
        has_child = np.zeros(n, dtype=bool)
        for e in np.argsort(-saving, kind="stable"):
            p, c = int(src[e]), int(dst[e])
            if saving[e] > 0 and not has_child[p] and fav_parent[c] < 0:
                has_child[p] = True
                fav_parent[c] = p
                fav_saving_s[c] = saving[e]
    return fav_parent, fav_saving_s


def _candidates(ready_ops: list[int], gid: np.ndarray, dev_of_group: np.ndarray, allowed: np.ndarray,
                free: np.ndarray, mem_bytes: np.ndarray) -> np.ndarray:
    """``(R, D)`` devices each ready op may go to: its group's device once chosen, else the allowed devices
    with room for the group (the one with most room when none has)."""
    mask = np.zeros((len(ready_ops), allowed.size), dtype=bool)
    for k, op in enumerate(ready_ops):
        g = gid[op]
        if dev_of_group[g] >= 0:
            mask[k, dev_of_group[g]] = True
        else:
            ok = allowed & (free >= mem_bytes[g])
            if ok.any():
                mask[k] = ok
            else:
                mask[k, _fallback_device(free, allowed)] = True
    return mask


def list_schedule(graph: "OpGraph", cluster: "Cluster", groups: Groups, *, favourite: bool) -> np.ndarray:
    """ETF list scheduling with memory constraints (``favourite=True`` adds the SCT preference); returns the
    device per group."""
    n, d = graph.n, cluster.num_devices
    allowed = np.zeros(d, dtype=bool)
    allowed[accelerators(cluster)] = True
    t = op_time_s(graph, cluster)
    lat, inv_bw = transfer_matrix_s(cluster)
    gid = groups.group_of_op
    dev_of_group = np.full(groups.num, -1, dtype=np.int64)
    free = np.array([dev.memory_bytes for dev in cluster.devices], dtype=np.int64)
    dev_free_s = np.zeros(d)
    finish_s = np.zeros(n)
    dev_of_op = np.full(n, -1, dtype=np.int64)
    src, dst = graph.edge_index
    in_edges = [[] for _ in range(n)]
    for e in range(src.size):
        in_edges[int(dst[e])].append(e)
    succs = graph.successors()
    indeg = np.bincount(dst, minlength=n)
    blevel = bottom_level_s(graph, t)

    fav_parent, fav_saving_s = _favourite_parents(graph, cluster) if favourite else (np.full(n, -1), np.zeros(n))

    def data_ready(op: int) -> np.ndarray:
        ready = np.zeros(d)
        for e in in_edges[op]:
            p = int(src[e])
            s = dev_of_op[p]
            ready = np.maximum(ready, finish_s[p] + lat[s] + graph.edge_bytes[e] * inv_bw[s])
        return ready

    ready_ops: list[int] = [i for i in range(n) if indeg[i] == 0]
    dr: dict[int, np.ndarray] = {i: np.zeros(d) for i in ready_ops}
    big = np.inf
    for _ in range(n):
        r = np.array(ready_ops, dtype=np.int64)
        est = np.maximum(np.stack([dr[i] for i in ready_ops]), dev_free_s[None, :])
        mask = _candidates(ready_ops, gid, dev_of_group, allowed, free, groups.mem_bytes)
        key = np.where(mask, est, big)
        if favourite:
            for k, op in enumerate(ready_ops):
                p = fav_parent[op]
                if p >= 0 and mask[k, dev_of_op[p]]:
                    key[k, dev_of_op[p]] -= fav_saving_s[op]
        # earliest (credited) start; ties: longer remaining path, then earlier finish (the faster device of
        # a heterogeneous cluster), then lower op index and lower device
        flat_key = key.reshape(-1)
        tie = np.repeat(-blevel[r], d)
        fin = (est + t[r]).reshape(-1)
        best = int(np.lexsort((np.arange(flat_key.size), fin, tie, flat_key))[0])
        k, dev = divmod(best, d)
        op = int(r[k])
        start = est[k, dev]
        finish_s[op] = start + t[op, dev]
        dev_free_s[dev] = finish_s[op]
        dev_of_op[op] = dev
        g = gid[op]
        if dev_of_group[g] < 0:
            dev_of_group[g] = dev
            free[dev] -= groups.mem_bytes[g]
        ready_ops.pop(k)
        del dr[op]
        for s in succs[op].tolist():
            indeg[s] -= 1
            if indeg[s] == 0:
                ready_ops.append(s)
                dr[s] = data_ready(s)
        ready_ops.sort()
    return dev_of_group


@register("m-topo")
def place_m_topo(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Baechi's m-TOPO: topological order, each device filled up to its compute share and its memory."""
    groups = groups_of(graph, cluster)
    devs = accelerators(cluster)
    d = len(devs)
    share = groups.throughput(devs)  # fraction of the graph each target device should get
    time_s = groups.time_s[:, devs]
    tot = time_s.sum(axis=0)
    frac = np.where(tot > 0, time_s / np.where(tot > 0, tot, 1.0), 1.0 / max(groups.num, 1))
    free = np.array([cluster.devices[i].memory_bytes for i in devs], dtype=np.int64)
    dev_of_group = np.zeros(groups.num, dtype=np.int64)
    cur, filled = 0, 0.0
    for g in range(groups.num):
        # move on when this group would overflow the current device's share (unless the device is still
        # empty) or its memory; the last device takes whatever is left
        while cur < d - 1 and (
            (filled > 0 and filled + frac[g, cur] > share[cur] + 1e-12) or free[cur] < groups.mem_bytes[g]
        ):
            cur, filled = cur + 1, 0.0
        dev_of_group[g] = devs[cur]
        filled += frac[g, cur]
        free[cur] -= groups.mem_bytes[g]
    return finish(graph, cluster, groups, dev_of_group)


@register("m-etf")
def place_m_etf(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Baechi's m-ETF: memory-constrained earliest-time-first list scheduling (deterministic)."""
    groups = groups_of(graph, cluster)
    return finish(graph, cluster, groups, list_schedule(graph, cluster, groups, favourite=False))


@register("m-sct")
def place_m_sct(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Baechi's m-SCT (simplified, see the module docstring): ETF preferring favourite children on their
    parent's device (deterministic)."""
    groups = groups_of(graph, cluster)
    return finish(graph, cluster, groups, list_schedule(graph, cluster, groups, favourite=True))
