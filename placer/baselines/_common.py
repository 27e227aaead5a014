"""Helpers shared by every placement baseline: per-device op times, op memory, colocation groups.

Every baseline works on **colocation groups**, not raw ops: ``Placement.validate`` requires all ops of a group on
one device, so a method decides one device per group and :func:`finish` expands it to ops.

Cost model used by the baselines (the simulator has its own, finer one):

- **Time** of op ``i`` on device ``d`` = ``costs[kind].fwd_s[i] + costs[kind].bwd_s[i]`` divided by the
  device's ``speed``, where ``kind = cluster.devices[d].kind`` (:func:`placer.costmodel.costs.op_time_s`, the
  simulator's rule: a device kind the graph has no costs for is a one-line ``ValueError``).
- **Memory** of op ``i`` = ``param_bytes × 4`` (weights, gradient, Adam's two moments) ``+ stash_bytes``
  (activations kept for backward; :func:`placer.costmodel.costs.op_memory_bytes`). Temporaries and in-flight
  outputs are transient and left to the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from placer.core.placement import Placement
from placer.costmodel.costs import op_memory_bytes, op_time_s

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster


def accelerators(cluster: "Cluster") -> list[int]:
    """Indices of the non-CPU devices (:attr:`Device.is_cpu`; ColocRL's MinCut and Expert leave the host CPUs out
    when GPUs exist); all devices when the cluster has only CPUs."""
    acc = [i for i, d in enumerate(cluster.devices) if not d.is_cpu]
    return acc or list(range(cluster.num_devices))


@dataclass(frozen=True, eq=False)
class Groups:
    """The colocation groups of a graph, numbered ``0..G-1`` by their first op (so group order follows the ops'
    topological order; the quotient graph may still have back edges when a group is used at several depths)."""

    group_of_op: np.ndarray
    """``(n,)`` dense group id of each op."""
    ops: list[np.ndarray]
    """Op indices of each group, ascending."""
    time_s: np.ndarray
    """``(G, D)`` forward+backward seconds of each group on each device."""
    mem_bytes: np.ndarray
    """``(G,)`` resident bytes of each group (:func:`op_memory_bytes` summed)."""
    src: np.ndarray
    """Inter-group edges (aggregated, ``src < dst`` in group order, no duplicates): source group."""
    dst: np.ndarray
    edge_bytes: np.ndarray
    """Bytes over each aggregated inter-group edge."""

    @property
    def num(self) -> int:
        return len(self.ops)

    def throughput(self, devices: list[int] | None = None) -> np.ndarray:
        """Relative speed of each device on this graph: ``1 / (whole graph time on it)``, normalised to sum 1."""
        tot = self.time_s.sum(axis=0) if devices is None else self.time_s[:, devices].sum(axis=0)
        if not np.all(tot > 0):
            return np.full(tot.shape, 1.0 / max(1, tot.size))
        thr = 1.0 / tot
        return thr / thr.sum()


def groups_of(graph: "OpGraph", cluster: "Cluster", *, need_costs: bool = True) -> Groups:
    """Colocation groups with per-device time and memory (zero times when ``need_costs`` is False and the graph
    has no costs)."""
    _, first, inverse = np.unique(graph.colocation, return_index=True, return_inverse=True)
    # renumber groups by their first op so that group order follows the topological op order
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    gid = rank[inverse.reshape(-1)].astype(np.int64)
    g_num = int(order.size)
    sort = np.argsort(gid, kind="stable")
    bounds = np.searchsorted(gid[sort], np.arange(g_num + 1))
    ops = [sort[bounds[g]:bounds[g + 1]] for g in range(g_num)]
    if graph.costs or need_costs:
        t_op = op_time_s(graph, cluster)
    else:
        t_op = np.zeros((graph.n, cluster.num_devices))
    time_s = np.zeros((g_num, cluster.num_devices))
    np.add.at(time_s, gid, t_op)
    mem = np.zeros(g_num, dtype=np.int64)
    np.add.at(mem, gid, op_memory_bytes(graph))
    gs, gd = gid[graph.edge_index[0]], gid[graph.edge_index[1]]
    keep = gs != gd
    lo, hi = np.minimum(gs[keep], gd[keep]), np.maximum(gs[keep], gd[keep])
    key = lo * g_num + hi
    uniq, inv = np.unique(key, return_inverse=True)
    eb = np.zeros(uniq.size, dtype=np.int64)
    np.add.at(eb, inv.reshape(-1), graph.edge_bytes[keep])
    return Groups(group_of_op=gid, ops=ops, time_s=time_s, mem_bytes=mem,
                  src=(uniq // max(g_num, 1)).astype(np.int64), dst=(uniq % max(g_num, 1)).astype(np.int64),
                  edge_bytes=eb)


def finish(graph: "OpGraph", cluster: "Cluster", groups: Groups, device_of_group: np.ndarray | list[int]) -> Placement:
    """Expand a per-group choice to ops and validate it against graph and cluster."""
    dev = np.asarray(device_of_group, dtype=np.int64)
    if dev.shape != (groups.num,):
        raise ValueError(f"expected {groups.num} group devices, got shape {dev.shape}")
    return Placement.from_groups(groups.group_of_op, dev).validate(graph, cluster)


def memory_report(groups: Groups, cluster: "Cluster", device_of_group: np.ndarray) -> list[int]:
    """Devices whose capacity the given placement exceeds (the simulator will report them as OOM)."""
    used = np.bincount(np.asarray(device_of_group, dtype=np.int64), weights=groups.mem_bytes,
                       minlength=cluster.num_devices)
    cap = np.array([d.memory_bytes for d in cluster.devices], dtype=np.float64)
    return [int(i) for i in np.flatnonzero(used > cap)]


def int_weights(values: np.ndarray, *, total: float = 1e7) -> np.ndarray:
    """Positive integer weights proportional to ``values``, summing to about ``total`` (graph partitioners want
    integers > 0; the scale cancels because they only balance vertex weights and minimise edge weights)."""
    values = np.asarray(values, dtype=np.float64)
    s = float(values.sum())
    if values.size == 0:
        return values.astype(np.int64)
    if not s > 0:
        return np.ones(values.size, dtype=np.int64)
    return np.maximum(1, np.rint(values / s * total)).astype(np.int64)
