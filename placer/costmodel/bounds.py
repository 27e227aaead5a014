"""Lower bounds on the step time of any placement, and the efficiency of a result against them.

``lower_bound_s = max(critical path, work bound, colocation bound)``, all on the best device for every op and
ignoring transfers, so no placement or schedule can beat it:

* **critical path**: the longest chain of forward then backward times through the graph (forward along a path,
  backward back along it), each op at its fastest device's time. With ``M`` micro-batches one micro-batch's
  chain must still run end to end, so the per-micro-batch times of :meth:`placer.costmodel.sim.Simulator.microbatch_s`
  are used; with ``M = 1`` this is the usual full-batch critical path.
* **work bound**: for any weights ``lam_d >= 0`` summing to 1, ``T >= sum_i min_d lam_d w_i(d)`` where
  ``w_i(d) = M x per-micro-batch time`` of op ``i`` on device ``d`` (the LP dual of spreading all work over the
  devices). We take the best of ``lam`` uniform and ``lam_d`` proportional to device ``d``'s speed
  (``1 / its total work``); for devices of one kind that differ only in speed this is exactly
  ``total work / total speed``.
* **colocation bound**: the ops of one colocation group share a device, which runs one task at a time, so for
  every group ``g``: ``T >= head_g + work_g + tail_g``. ``work_g`` is the group's forward+backward work on its
  best device; ``head_g`` the earliest any of its forwards can start (the longest forward chain into the op, over
  the group's ops, the smallest); ``tail_g`` the least backward work that must follow its last backward (an op's
  backward releases its inputs' backwards, so the longest backward chain through its predecessors, the smallest
  over the group's ops). It matters where one shared module carries much of the work: NMT's output projection,
  called once per decoder step, is ~43% of the graph's GPU time.

The parameter update is left out (it only adds), so the bound stays valid for every optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from placer.costmodel.sim import Simulator, get_simulator

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.result import StepResult


def _per_device_times(sim: Simulator, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fwd, bwd)`` per-micro-batch times, shape ``(D, n)``."""
    return sim.microbatch_s(microbatches)


def critical_path_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                    cost_kind: str | Mapping[str, str] | None = None,
                    dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """Longest forward+backward chain of one micro-batch, each op on its fastest device, no transfers (seconds)."""
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    f, b = _per_device_times(sim, microbatches)
    step = (f + b).min(axis=0)
    finish = step.copy()
    src, dst = graph.edge_index
    for e in np.argsort(dst, kind="stable"):  # dst ascending is a valid order since src < dst
        finish[dst[e]] = max(finish[dst[e]], finish[src[e]] + step[dst[e]])
    return float(finish.max()) if graph.n else 0.0


def work_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                 cost_kind: str | Mapping[str, str] | None = None,
                 dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """All the work spread perfectly over the devices (seconds); see the module docstring."""
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    f, b = _per_device_times(sim, microbatches)
    work = microbatches * (f + b)  # (D, n)
    total = work.sum(axis=1)
    best = 0.0
    d = cluster.num_devices
    for lam in (np.full(d, 1.0 / d), (1.0 / np.maximum(total, 1e-300)) / (1.0 / np.maximum(total, 1e-300)).sum()):
        best = max(best, float((lam[:, None] * work).min(axis=0).sum()))
    return best


def colocation_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                       cost_kind: str | Mapping[str, str] | None = None,
                       dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """``max_g head_g + work_g + tail_g`` over the colocation groups (seconds); see the module docstring."""
    if not graph.n:
        return 0.0
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    f, b = _per_device_times(sim, microbatches)
    f_min, b_min = f.min(axis=0), b.min(axis=0)
    head, tail = np.zeros(graph.n), np.zeros(graph.n)
    src, dst = graph.edge_index
    for e in np.argsort(dst, kind="stable"):  # producers before consumers
        i, j = src[e], dst[e]
        head[j] = max(head[j], head[i] + f_min[i])
        tail[j] = max(tail[j], tail[i] + b_min[i])
    _, group = np.unique(graph.colocation, return_inverse=True)
    group = group.reshape(-1)
    g_num = int(group.max()) + 1
    work = np.zeros((g_num, f.shape[0]))
    np.add.at(work, group, microbatches * (f + b).T)
    head_g, tail_g = np.full(g_num, np.inf), np.full(g_num, np.inf)
    np.minimum.at(head_g, group, head)
    np.minimum.at(tail_g, group, tail)
    return float((head_g + work.min(axis=1) + tail_g).max())


def lower_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                  cost_kind: str | Mapping[str, str] | None = None,
                  dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """``max(critical path on the fastest devices, total work / total speed, colocation bound)``: no placement is
    faster."""
    kw = dict(microbatches=microbatches, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    return max(critical_path_s(graph, cluster, **kw), work_bound_s(graph, cluster, **kw),
               colocation_bound_s(graph, cluster, **kw))


def efficiency(result: "StepResult", graph: "OpGraph", cluster: "Cluster", *,
               cost_kind: str | Mapping[str, str] | None = None,
               dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """``lower_bound / step_time`` in (0, 1] (0 for a failed step); 1 means no placement could be faster."""
    if not result.ok or result.step_time_s <= 0:
        return 0.0
    lb = lower_bound_s(graph, cluster, microbatches=result.microbatches, cost_kind=cost_kind,
                       dispatch_overhead_s=dispatch_overhead_s)
    return lb / result.step_time_s
