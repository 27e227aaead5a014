"""Lower bounds on the step time of any placement, and the efficiency of a result against them.

``lower_bound_s = max(critical path, work bound)``, both on the best device for every op and ignoring transfers,
so no placement or schedule can beat it:

* **critical path**: the longest chain of forward then backward times through the graph (forward along a path,
  backward back along it), each op at its fastest device's time. With ``M`` micro-batches one micro-batch's
  chain must still run end to end, so the per-micro-batch times of :func:`placer.sim.per_microbatch_s` are used;
  with ``M = 1`` this is the usual full-batch critical path.
* **work bound**: for any weights ``lam_d >= 0`` summing to 1, ``T >= sum_i min_d lam_d w_i(d)`` where
  ``w_i(d) = M x per-micro-batch time`` of op ``i`` on device ``d`` (the LP dual of spreading all work over the
  devices). We take the best of ``lam`` uniform and ``lam_d`` proportional to device ``d``'s speed
  (``1 / its total work``); for devices of one kind that differ only in speed this is exactly
  ``total work / total speed``.

The parameter update is left out (it only adds), so the bound stays valid for every optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from placer.sim import Simulator, get_simulator, per_microbatch_s

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.cluster import Cluster
    from placer.result import StepResult


def _per_device_times(sim: Simulator, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fwd, bwd)`` per-micro-batch times, shape ``(D, n)``."""
    o = sim.overhead_s[:, None]
    return per_microbatch_s(sim.fwd_s, o, microbatches), per_microbatch_s(sim.bwd_s, o, microbatches)


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


def lower_bound_s(graph: "OpGraph", cluster: "Cluster", *, microbatches: int = 1,
                  cost_kind: str | Mapping[str, str] | None = None,
                  dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """``max(critical path on the fastest devices, total work / total speed)``: no placement is faster."""
    kw = dict(microbatches=microbatches, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    return max(critical_path_s(graph, cluster, **kw), work_bound_s(graph, cluster, **kw))


def efficiency(result: "StepResult", graph: "OpGraph", cluster: "Cluster", *,
               cost_kind: str | Mapping[str, str] | None = None,
               dispatch_overhead_s: float | Mapping[str, float] | None = None) -> float:
    """``lower_bound / step_time`` in (0, 1] (0 for a failed step); 1 means no placement could be faster."""
    if not result.ok or result.step_time_s <= 0:
        return 0.0
    lb = lower_bound_s(graph, cluster, microbatches=result.microbatches, cost_kind=cost_kind,
                       dispatch_overhead_s=dispatch_overhead_s)
    return lb / result.step_time_s
