"""The static description of one placement problem: a grouped graph on a cluster.

Built once per (graph, cluster, number of groups) and shared by the environment (observations, masks, rewards)
and the policies (``env.problem``), so both see exactly the same groups, features and memory model.

Groups come from :func:`graphs.grouping.group_ops` (ColocRL's co-location heuristics, Mirhoseini et al. 2017,
section 3.2) and are renumbered in the order the environment places them: longest path to the end of the forward
pass first (HEFT's order, :func:`placement_order`). The coarse graph of :func:`graphs.grouping.contract` (one
node per run of consecutive same-group ops) is kept for simulators that want it (``sim_graph="coarse"``); the
default reward simulates the op graph itself (see :mod:`envs.rewards`).

Features are scale-free (times and bytes relative to the graph's own mean, then ``log1p``) so that one policy can
read graphs of very different sizes; the column layout is in :data:`NODE_STATIC_FEATURES` and
:data:`DEVICE_STATIC_FEATURES`. :class:`FinishEstimate` adds one dynamic feature that depends on the partial
placement: when the group being placed would finish on each device (a list-schedule estimate, HEFT/ETF style).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from envs._finish_kernel import group_finishes, record
from graphs.grouping import contract, group_ops, op_weights
from graphs.ir import OpGraph
from placer.costmodel._sim_kernel import csr
from placer.costmodel.costs import PARAM_COPIES, op_time_s
from placer.baselines.baechi import bottom_level_s
from placer.core.cluster import Cluster
from placer.core.placement import Placement

log = logging.getLogger(__name__)

KIND_BUCKETS = 64
"""Op kinds are hashed (crc32) into this many ids, so an unseen kind in a new graph still has an embedding."""

NODE_STATIC_FEATURES = ("fwd", "bwd", "bytes_in", "bytes_out", "param_bytes", "mem_vs_capacity", "depth",
                        "position", "num_ops", "is_source", "is_sink")
"""Static per-group feature columns (see :func:`build_problem`); per-device times follow in the observation."""

DEVICE_STATIC_FEATURES = ("present", "throughput", "capacity_vs_need", "is_cpu")
"""Static per-device feature columns; the environment appends the dynamic load columns."""

EDGE_FEATURES = ("bytes", "transfer_vs_compute")
"""Per group-edge feature columns."""


def kind_id(kind: str) -> int:
    """Stable id of an op kind in ``[1, KIND_BUCKETS)`` (0 is padding); the same in every process."""
    return 1 + zlib.crc32(kind.encode()) % (KIND_BUCKETS - 1)


def _rel(x: np.ndarray) -> np.ndarray:
    """``log1p(x / mean(x))``: scale-free, 0 for zero entries, ~0.7 for an average one."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean() if x.size else 0.0
    return np.log1p(x / m) if m > 0 else np.zeros_like(x)


@dataclass(frozen=True, kw_only=True, eq=False)
class PlacementProblem:
    """Everything static about placing ``graph``'s groups on ``cluster`` (numpy; policies convert once)."""

    graph: OpGraph
    """The full op graph (placements are expanded to it for export and for the engine)."""
    cluster: Cluster
    group_of_op: np.ndarray
    """``(n,)`` group of each op; groups numbered in the order the environment places them."""
    coarse: OpGraph
    """The simulator's graph: runs of same-group ops; ``coarse.colocation`` is the group id."""
    kinds: tuple[str, ...]
    """Op kind of each group's heaviest op (ColocRL's "op type" input)."""
    kind_ids: np.ndarray
    """``(G,)`` :func:`kind_id` of :attr:`kinds`."""
    node_features: np.ndarray
    """``(G, len(NODE_STATIC_FEATURES))`` float32 static features."""
    node_device_time: np.ndarray
    """``(G, D)`` float32: ``log1p`` of each group's forward+backward time on each device over the mean group time
    on the fastest device."""
    edge_index: np.ndarray
    """``(2, E)`` directed group edges (producer group, consumer group), no self-loops, no duplicates."""
    edge_bytes: np.ndarray
    """``(E,)`` bytes carried by each group edge."""
    edge_features: np.ndarray
    """``(E, len(EDGE_FEATURES))`` float32."""
    time_s: np.ndarray
    """``(G, D)`` forward+backward seconds of each group on each device."""
    mem_bytes: np.ndarray
    """``(G,)`` resident bytes of each group: parameters x :data:`PARAM_COPIES` + activations stashed for backward."""
    capacity_bytes: np.ndarray
    """``(D,)`` device memory."""
    device_features: np.ndarray
    """``(D, len(DEVICE_STATIC_FEATURES))`` float32 static device features."""
    mean_group_s: float
    """Mean forward+backward seconds of a group on the fastest device (the unit of the time features)."""
    transfer_s_per_byte: np.ndarray
    """``(D, D)`` seconds per byte from device i to j (``1 / bandwidth``; 0 on the diagonal)."""
    latency_s: np.ndarray
    """``(D, D)`` link latency (0 on the diagonal)."""

    @property
    def num_groups(self) -> int:
        return int(self.kind_ids.shape[0])

    @property
    def num_devices(self) -> int:
        return self.cluster.num_devices

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def expand(self, device_of_group: Sequence[int] | np.ndarray) -> Placement:
        """The op-level placement of a per-group one."""
        return Placement.from_groups(self.group_of_op, device_of_group)

    def coarse_devices(self, device_of_group: Sequence[int] | np.ndarray) -> np.ndarray:
        """The per-node device array of :attr:`coarse` for a per-group placement."""
        return np.asarray(device_of_group, dtype=np.int64)[self.coarse.colocation]

    def project(self, placement: Placement) -> np.ndarray:
        """A per-group placement from an op-level one: each group goes where most of its compute was put."""
        w = op_weights(self.graph) + 1e-12
        votes = np.zeros((self.num_groups, self.num_devices))
        np.add.at(votes, (self.group_of_op, placement.device_of_op), w)
        return votes.argmax(axis=1).astype(np.int64)


def placement_order(group_of_op: np.ndarray, bottom_level_s: np.ndarray) -> np.ndarray:
    """Renumber groups in the order they are placed: by the longest path from any of their ops to the end of the
    forward pass, longest first (HEFT's upward-rank order, Topcuoglu et al. 2002), ties by first op.

    Descending bottom level orders ops topologically (a producer's path includes its consumer's), so a group of
    one op or one chain comes after its producers' groups, and of a block's parallel branches the longest is
    placed first, as a list scheduler would schedule them: greedy placement by the finish estimate
    (:class:`FinishEstimate`) of Inception-V3's 180 groups on ``cpu+4gpu`` simulates at 0.488 s in this order
    against 0.533 s in first-op order, where each branch of a block is placed whole before the next.
    """
    groups, first = np.unique(group_of_op, return_index=True)
    top = np.full(groups.size, -np.inf)
    np.maximum.at(top, np.searchsorted(groups, group_of_op), bottom_level_s)
    rank = np.empty(groups.size, dtype=np.int64)
    rank[np.lexsort((first, -top))] = np.arange(groups.size)
    return rank[np.searchsorted(groups, group_of_op)]


def _group_edges(graph: OpGraph, group_of_op: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(2, E)`` group edges (sorted, no self-loops) and their bytes: a producer's tensor counts once per
    consumer group (its largest edge into that group)."""
    src, dst = graph.edge_index
    gs, gd = group_of_op[src], group_of_op[dst]
    cross = gs != gd
    per_producer: dict[tuple[int, int], int] = {}
    for s_op, d_grp, nbytes in zip(src[cross].tolist(), gd[cross].tolist(), graph.edge_bytes[cross].tolist()):
        per_producer[(s_op, d_grp)] = max(per_producer.get((s_op, d_grp), 0), nbytes)
    group_edges: dict[tuple[int, int], int] = {}
    for (s_op, d_grp), nbytes in per_producer.items():
        key = (int(group_of_op[s_op]), d_grp)
        group_edges[key] = group_edges.get(key, 0) + nbytes
    keys = sorted(group_edges)
    edge_index = np.array([[k[0] for k in keys], [k[1] for k in keys]], dtype=np.int64).reshape(2, -1)
    return edge_index, np.array([group_edges[k] for k in keys], dtype=np.int64)


def _heaviest_kinds(graph: OpGraph, group_of_op: np.ndarray, g_num: int) -> tuple[str, ...]:
    """Op kind of each group's heaviest op (ties: the first)."""
    weights = op_weights(graph)
    heaviest = np.full(g_num, -1)
    for i in range(graph.n):
        g = group_of_op[i]
        if heaviest[g] < 0 or weights[i] > weights[heaviest[g]]:
            heaviest[g] = i
    return tuple(graph.op_kinds[h] for h in heaviest)


def _position_columns(graph: OpGraph, group_of_op: np.ndarray, edge_index: np.ndarray,
                      g_num: int) -> list[np.ndarray]:
    """The ``depth``, ``position``, ``num_ops``, ``is_source`` and ``is_sink`` columns of the node features."""
    depth = np.full(g_num, np.iinfo(np.int64).max)
    np.minimum.at(depth, group_of_op, graph.depth())
    has_in = np.bincount(edge_index[1], minlength=g_num) > 0
    has_out = np.bincount(edge_index[0], minlength=g_num) > 0
    return [depth / max(1, depth.max()), np.arange(g_num) / max(1, g_num - 1),
            _rel(np.bincount(group_of_op, minlength=g_num)), (~has_in).astype(np.float64),
            (~has_out).astype(np.float64)]


def device_static_features(cluster: Cluster, time_s: np.ndarray, capacity_bytes: np.ndarray,
                           mem_bytes: np.ndarray) -> np.ndarray:
    """``(D, len(DEVICE_STATIC_FEATURES))`` float32: present, relative throughput on this graph (``1 / whole
    graph time``, over the best), memory over the graph's total need (at most 10) and :attr:`Device.is_cpu`."""
    total = time_s.sum(axis=0)
    throughput = np.where(total > 0, 1.0 / np.maximum(total, 1e-30), 1.0)
    return np.stack([
        np.ones(cluster.num_devices),
        throughput / throughput.max(),
        np.minimum(capacity_bytes / max(1, mem_bytes.sum()), 10.0),
        np.array([dev.is_cpu for dev in cluster.devices], dtype=np.float64),
    ], axis=1).astype(np.float32)


def device_load_features(time_used_s: Any, mem_used_bytes: Any, device_total_s: Any, capacity_bytes: Any
                         ) -> tuple[Any, Any]:
    """The dynamic per-device columns ``compute_load`` and ``memory_used`` of a partial placement: compute placed
    on each device so far over that device's time for the whole graph, and memory used over its capacity.

    One definition for the environment's observation and the GNN policy, which tracks the same partial placement
    while it decodes (numpy arrays or torch tensors, any leading dimensions).
    """
    return time_used_s / device_total_s, mem_used_bytes / capacity_bytes


def build_problem(graph: OpGraph, cluster: Cluster, num_groups: int) -> PlacementProblem:
    """Group ``graph`` into at most ``num_groups`` groups and compute every static feature (module docstring)."""
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if graph.n == 0:
        raise ValueError(f"graph {graph.name!r} has no ops")
    d_num = cluster.num_devices
    # ---- compute per device (the simulator's op times, placer.costmodel.costs)
    op_t = op_time_s(graph, cluster)

    raw = group_ops(graph, num_groups)
    group_of_op = placement_order(raw, bottom_level_s(graph, op_t))
    coarse = contract(graph, group_of_op)
    g_num = int(group_of_op.max()) + 1
    time_s = np.zeros((g_num, d_num))
    np.add.at(time_s, group_of_op, op_t)
    fastest = int(np.argmin(time_s.sum(axis=0)))
    kind0 = cluster.devices[fastest].kind
    c0 = graph.costs[kind0]
    fwd = np.bincount(group_of_op, weights=c0.fwd_s, minlength=g_num)
    bwd = np.bincount(group_of_op, weights=c0.bwd_s, minlength=g_num)
    mean_t = time_s[:, fastest].mean()
    node_device_time = np.log1p(time_s / mean_t) if mean_t > 0 else np.zeros_like(time_s)

    # ---- memory (the simulator's model with Adam and no micro-batching; inputs hold their batch)
    is_input = np.array([k == "input" for k in graph.op_kinds])
    stash = np.where(is_input, np.maximum(graph.stash_bytes, graph.out_bytes), graph.stash_bytes)
    mem = np.bincount(group_of_op, weights=graph.param_bytes * PARAM_COPIES + stash, minlength=g_num)
    mem = np.ceil(mem).astype(np.int64)
    capacity = np.array([dev.memory_bytes for dev in cluster.devices], dtype=np.int64)

    # ---- group edges: a producer's tensor reaches each consumer group once
    edge_index, edge_bytes = _group_edges(graph, group_of_op)
    bytes_in = np.bincount(edge_index[1], weights=edge_bytes, minlength=g_num)
    bytes_out = np.bincount(edge_index[0], weights=edge_bytes, minlength=g_num)
    off = ~np.eye(d_num, dtype=bool)
    mean_bw = float(cluster.bandwidth_Bps[off].mean()) if d_num > 1 else 1e12
    transfer_s = edge_bytes / mean_bw
    edge_features = np.stack([_rel(edge_bytes), np.log1p(transfer_s / mean_t if mean_t > 0 else transfer_s)],
                             axis=1).astype(np.float32).reshape(-1, len(EDGE_FEATURES))

    # ---- per-group and per-device static features
    kinds = _heaviest_kinds(graph, group_of_op, g_num)
    node_features = np.stack([
        _rel(fwd), _rel(bwd), _rel(bytes_in), _rel(bytes_out), _rel(np.bincount(
            group_of_op, weights=graph.param_bytes, minlength=g_num)),
        np.minimum(mem / capacity.max(), 4.0),
        *_position_columns(graph, group_of_op, edge_index, g_num),
    ], axis=1).astype(np.float32)
    device_features = device_static_features(cluster, time_s, capacity, mem)

    log.debug("problem %s on %s: %d ops -> %d groups (%d coarse nodes), %d group edges", graph.name, cluster.name,
              graph.n, g_num, coarse.n, edge_bytes.size)
    eye = np.eye(d_num, dtype=bool)
    return PlacementProblem(
        graph=graph, cluster=cluster, group_of_op=group_of_op, coarse=coarse, kinds=kinds,
        kind_ids=np.array([kind_id(k) for k in kinds], dtype=np.int64), node_features=node_features,
        node_device_time=node_device_time.astype(np.float32), edge_index=edge_index, edge_bytes=edge_bytes,
        edge_features=edge_features, time_s=time_s, mem_bytes=mem, capacity_bytes=capacity,
        device_features=device_features, mean_group_s=float(mean_t),
        transfer_s_per_byte=np.where(eye, 0.0, 1.0 / np.maximum(cluster.bandwidth_Bps, 1e-30)),
        latency_s=np.where(eye, 0.0, cluster.latency_s))


class FinishEstimate:
    """When would the group being placed finish on each device? A list-schedule estimate with HEFT's insertion
    policy, tracked for ``S`` partial placements at once; the policies' ``finish_estimate`` feature.

    It schedules the nodes of the coarse graph (runs of same-group ops), so a group whose calls are spread over
    time overlaps its producers: the second layer of an unrolled LSTM on another device starts after the first
    layer's first step, not after its last. Groups are placed in order. Placing group ``t`` on device ``d`` runs
    its nodes in order on ``d``, each in the earliest idle gap of ``d`` that is long enough and starts once its
    producers have finished: those of other devices plus the transfer of their output (latency + bytes /
    bandwidth, counted twice: the activation and its gradient). Gaps matter when groups interleave in time: a
    per-step op placed after a recurrent layer fits between the layer's steps instead of queueing behind its last
    one (append-only, a busy device looked free only at its end, so an idle CPU looked best for every small op).
    Producers in groups not placed yet are ignored, as are the backward pass's reverse order and link
    contention: a feature for the policy, not a simulator. A group's estimate is when its last node would finish.
    The loops are numba kernels (:mod:`envs._finish_kernel`).
    """

    def __init__(self, problem: PlacementProblem, samples: int = 1) -> None:
        self.problem = problem
        coarse = problem.coarse
        self.group_of_node = np.asarray(coarse.colocation, dtype=np.int64)
        self.node_s = np.ascontiguousarray(op_time_s(coarse, problem.cluster), dtype=np.float64)
        order = np.argsort(self.group_of_node, kind="stable")
        bounds = np.searchsorted(self.group_of_node[order], np.arange(problem.num_groups + 1))
        self.nodes = [np.ascontiguousarray(order[bounds[g]:bounds[g + 1]], dtype=np.int64)
                      for g in range(problem.num_groups)]
        src, dst = coarse.edge_index
        self.in_ptr, self.in_src, self.in_bytes = csr(  # each node's producers and the bytes they send
            np.ascontiguousarray(dst, dtype=np.int64), np.ascontiguousarray(src, dtype=np.int64),
            coarse.edge_bytes.astype(np.float64), coarse.n)
        self.latency_s = np.ascontiguousarray(problem.latency_s, dtype=np.float64)
        self.s_per_byte = np.ascontiguousarray(problem.transfer_s_per_byte, dtype=np.float64)
        d = problem.num_devices
        self.finish_s = np.zeros((samples, coarse.n))
        self.starts = np.zeros((samples, d, coarse.n))  # busy intervals of each device, sorted
        self.ends = np.zeros((samples, d, coarse.n))
        self.count = np.zeros((samples, d), dtype=np.int64)
        self._pending: tuple[int, np.ndarray] | None = None  # (group, (S, nodes, D) finishes) of the last estimate

    def estimates(self, t: int, device_of_group: np.ndarray) -> np.ndarray:
        """``(S, D)`` finish time of group ``t`` on each device, given the devices ``(S, >= t)`` of groups ``< t``."""
        where_group = np.ascontiguousarray(device_of_group, dtype=np.int64)
        ends = group_finishes(t, self.nodes[t], self.node_s, self.in_ptr, self.in_src, self.in_bytes,
                              self.group_of_node, where_group, self.finish_s, self.latency_s, self.s_per_byte,
                              self.starts, self.ends, self.count)
        self._pending = (t, ends)
        return ends.max(axis=1)  # every group has at least one node

    def place(self, t: int, device: np.ndarray) -> None:
        """Record that group ``t`` went to ``device`` ``(S,)``, with the per-node finishes that the last call,
        :meth:`estimates` for ``t``, computed."""
        if self._pending is None or self._pending[0] != t:
            raise ValueError(f"place({t}) needs estimates({t}) first")
        record(self.nodes[t], self.node_s, np.ascontiguousarray(device, dtype=np.int64), self._pending[1],
               self.finish_s, self.starts, self.ends, self.count)
        self._pending = None

    def feature(self, estimates: np.ndarray) -> np.ndarray:
        """``log1p`` of each device's delay over the earliest finish, in mean group times (0 for the best)."""
        late = estimates - estimates.min(axis=1, keepdims=True)
        return np.log1p(late / self.problem.mean_group_s) if self.problem.mean_group_s > 0 else np.zeros_like(late)
