"""Discrete-event simulation of one training step of a placed graph.

Model (kept identical to what the engine executes, so fidelity is a direct comparison):

* **Order.** Every device is an in-order executor of its task list from :mod:`placer.costmodel.schedules` (not a dynamic
  list scheduler): a task starts when its device is free and its inputs have arrived.
* **Compute.** Op time on device ``d`` = ``graph.costs[kind].fwd_s`` (or ``bwd_s``) ``/ d.speed`` for the full
  batch. A micro-batch of ``M`` takes what the cost set measured at ``batch / M`` when it has that size
  (``OpCosts.microbatch_s[M]``, profiled by :mod:`graphs.profile_batch`); between measured sizes the time is
  interpolated linearly in the micro-batch's samples (a fixed plus a per-sample cost per op); beyond the
  smallest measured size, and for cost sets with none, ``o + (t - o) / M`` with ``o = min(t, dispatch overhead)``:
  tiny micro-batches do not scale linearly, each still pays the per-op dispatch (framework + kernel launch) cost.
  Overheads per device kind come from ``dispatch_overhead_s=`` (a number or ``{kind: s}``), else
  ``cluster.meta["dispatch_overhead_s"][kind]``, else the roofline spec's ``launch_s``
  (:data:`graphs.roofline.GPUS`), else :data:`DISPATCH_OVERHEAD_S`, else :data:`DEFAULT_DISPATCH_OVERHEAD_S`.
  With ``M = 1`` the overhead changes nothing. Each micro-batch pass also streams its ops' weights and
  gradients through memory, which op-by-op profiles (weights hot in cache) do not see:
  ``k x param_bytes / memory bandwidth`` per op and pass
  (:data:`placer.costmodel.costs.PARAM_TRAFFIC_PER_MICROBATCH`, CPU only).
* **Missing costs.** A device whose kind has no cost set in the graph is a one-line ``ValueError`` naming the
  kind and the graph; ``cost_kind=`` substitutes on purpose (the one rule of :mod:`placer.costmodel.costs`).
* **Transfers.** A tensor read by ops on another device goes through that directed link's FIFO queue once per
  micro-batch (``latency + bytes / M / bandwidth``; the link is busy for the whole time). Several readers on one
  device share one transfer (bytes = the largest edge from the producer to that device). The gradient goes back
  along the same link with the same bytes after the last local reader's backward. Zero-byte edges order tasks
  but cost nothing (as :meth:`Cluster.transfer_s`). A micro-batch's input data is already on its input op's
  device (the data loader puts it there), so inputs cost no transfer.
* **Machine overheads** (0 unless ``cluster.meta`` declares them, a number or ``{kind: s}``; ``placer cluster
  calibrate`` measures them on the engine, see :mod:`placer.engine.calibrate_engine`). A task that
  posts ``s`` messages keeps its device ``s x send_overhead_s`` longer (gloo's send work runs on the worker's
  own core); a task whose device sat idle waiting for a message pays ``recv_overhead_s`` once before it runs
  (waking the blocked worker); a step whose tasks span several devices starts ``step_overhead_s`` late on each
  of them (start barrier and receive posting). Only values that depend on a parameter send a gradient back
  (autograd makes none for inputs and targets); a graph without parameters counts every value.
  The engine runs each device's maximal runs of consecutive ops as fused segments (:mod:`placer.engine.segments`;
  :meth:`Simulator.segment_starts` is the same rule on the schedule's arrays): the task that starts a forward
  segment takes ``segment_fwd_overhead_s`` longer, the one that starts a backward segment
  ``segment_bwd_overhead_s`` (one autograd call and the exposed views), for every schedule and ``M``.
* **Update.** Each device updates its parameters once per step after its last backward:
  ``param_bytes x touched / (memory bandwidth x speed)`` plus one dispatch overhead, where ``touched`` is the
  bytes read and written per parameter byte (:data:`OPTIMIZERS`; Adam reads param, grad, m, v and writes
  param, m, v: 7). Memory bandwidth per kind: ``memory_bandwidth_Bps=``, else
  ``cluster.meta["memory_bandwidth_Bps"][kind]``, else the roofline spec (peak x efficiency), else
  :data:`MEMORY_BANDWIDTH_BPS` (estimates, see the table).
* **Memory.** Per device: parameters + gradients + optimizer state (``state_copies`` x params) + the stash of
  every micro-batch in flight, found by walking the device's actual order (a forward adds ``stash / M``, its
  backward frees it) + the running op's ``temp_bytes / M``. Input ops hold ``max(stash, out_bytes) / M`` (the
  batch itself). Peak over capacity -> ``oom=True``, ``step_time_s = inf``. Devices that recompute activations
  (``recompute=``) hold only their segments' inputs and pay each segment's forward again
  (:mod:`placer.costmodel.recompute`).

Use :class:`Simulator` in loops (it precomputes arrays once per graph and cluster); :func:`simulate` is a thin
wrapper that caches one per (graph, cluster).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from graphs.grouping import colocation_first
from placer.costmodel import _sim_kernel as K
from placer.costmodel._segment_kernel import segment_starts as _segment_starts_kernel
from placer.costmodel.recompute import recompute_walk
from placer.costmodel.costs import CostKind, cost_kind_of, meta_per_kind, param_traffic_s
from placer.core.placement import Placement
from placer.core.result import StepResult, TimelineEvent
from placer.costmodel.schedules import PHASES, Schedule, build_schedule, graph_arrays, warn_schedule

if TYPE_CHECKING:
    from graphs.ir import OpCosts, OpGraph
    from placer.core.cluster import Cluster

log = logging.getLogger(__name__)

DISPATCH_OVERHEAD_S: dict[str, float] = {
    "cpu": 10e-6,   # eager PyTorch op dispatch on one core (~5-15 us measured for tiny ops)
    "K80": 10e-6,   # TF-era GPU: kernel launch + executor overhead
    "V100": 6e-6,
    "A100": 5e-6,
    "H100": 4e-6,   # CUDA launch ~2-4 us plus framework dispatch
}
"""Per-op, per-micro-batch fixed cost by device kind (seconds); the roofline spec's ``launch_s`` wins for GPUs."""
DEFAULT_DISPATCH_OVERHEAD_S = 5e-6
"""Used for kinds missing from :data:`DISPATCH_OVERHEAD_S`."""

MEMORY_BANDWIDTH_BPS: dict[str, float] = {
    "cpu": 10e9,     # one core streaming (a Zen 3 core sustains ~10-20 GB/s; optimizer kernels reach less)
    "K80": 160e9,    # 240 GB/s peak per GK210 die, ~2/3 sustained
    "V100": 800e9,   # 900 GB/s HBM2 peak
    "A100": 1.6e12,
    "H100": 2.8e12,  # 3.35 TB/s HBM3 peak (SXM)
}
"""Sustained memory bandwidth by device kind for the optimizer update (bytes/s, estimates); the roofline spec
(peak x efficiency) wins for GPUs it knows."""
DEFAULT_MEMORY_BANDWIDTH_BPS = 100e9


@dataclass(frozen=True)
class Optimizer:
    state_copies: int
    """Optimizer state as a multiple of parameter bytes (Adam: m and v)."""
    touched: int
    """Bytes read plus written per parameter byte by one update."""


OPTIMIZERS: dict[str, Optimizer] = {
    "sgd": Optimizer(0, 3),        # read p, g; write p
    "momentum": Optimizer(1, 5),   # read p, g, buf; write p, buf
    "adam": Optimizer(2, 7),       # read p, g, m, v; write p, m, v
    "adamw": Optimizer(2, 7),
}


def optimizer_of(name: str) -> Optimizer:
    """The :data:`OPTIMIZERS` entry of ``name``; a one-line ``ValueError`` naming the choices otherwise."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None


def _roofline_value(kind: str, meta_key: str) -> float | None:
    from graphs.roofline import GPUS

    spec = GPUS.get(kind)
    if spec is None:
        return None
    return spec.launch_s if meta_key == "dispatch_overhead_s" else spec.bandwidth_Bps * spec.efficiency


def _per_kind(value: float | Mapping[str, float] | None, meta_key: str, cluster: "Cluster", kind: str,
              table: Mapping[str, float], default: float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping) and kind in value:
        return float(value[kind])
    meta = cluster.meta.get(meta_key)
    if isinstance(meta, Mapping) and kind in meta:
        return float(meta[kind])
    spec = _roofline_value(kind, meta_key)
    if spec is not None:
        return float(spec)
    return float(table.get(kind, default))


def per_microbatch_s(t_s: np.ndarray, overhead_s: np.ndarray | float, microbatches: float) -> np.ndarray:
    """One micro-batch of an op whose full-batch time is ``t_s``: ``o + (t - o) / M`` with ``o = min(t, overhead)``."""
    if microbatches == 1:
        return np.asarray(t_s, dtype=np.float64)
    o = np.minimum(t_s, overhead_s)
    return o + (t_s - o) / microbatches


def microbatch_costs_s(costs: "OpCosts", overhead_s: float, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward seconds per op of one micro-batch of ``batch / microbatches`` (module docstring):
    measured, interpolated in samples between measured sizes, or the dispatch rule beyond / without them."""
    if microbatches == 1:
        return costs.fwd_s, costs.bwd_s
    if microbatches in costs.microbatch_s:
        return costs.microbatch_s[microbatches]
    # measured points as (samples as a fraction of the batch, fwd, bwd), the full batch included
    pts = [(1.0, costs.fwd_s, costs.bwd_s)] + [(1.0 / m, f, b) for m, (f, b) in costs.microbatch_s.items()]
    pts.sort(key=lambda p: p[0])
    x = 1.0 / microbatches
    if x < pts[0][0]:  # smaller than any measured size: the dispatch rule from the smallest one
        k = pts[0][0] / x
        return per_microbatch_s(pts[0][1], overhead_s, k), per_microbatch_s(pts[0][2], overhead_s, k)
    hi = next(i for i, p in enumerate(pts) if p[0] >= x)
    (x0, f0, b0), (x1, f1, b1) = pts[hi - 1], pts[hi]
    w = (x - x0) / (x1 - x0)
    return f0 + w * (f1 - f0), b0 + w * (b1 - b0)


class Simulator:
    """Precomputed arrays for one (graph, cluster); :meth:`run` simulates one placement (thousands per second)."""

    def __init__(self, graph: "OpGraph", cluster: "Cluster", *, cost_kind: CostKind = None,
                 dispatch_overhead_s: float | Mapping[str, float] | None = None,
                 memory_bandwidth_Bps: float | Mapping[str, float] | None = None) -> None:
        """``cost_kind``: cost set to use for every device (a name) or per device kind (``{"K80": "cpu"}``);
        ``dispatch_overhead_s`` / ``memory_bandwidth_Bps``: overrides (a number, or per device kind)."""
        self.graph, self.cluster = graph, cluster
        n, d = graph.n, cluster.num_devices
        self.kinds: list[str] = []
        self._cost_sets: list[OpCosts] = []
        self._mb_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        fwd = np.zeros((d, n))
        bwd = np.zeros((d, n))
        overhead = np.zeros(d)
        mem_bw = np.zeros(d)
        for i, dev in enumerate(cluster.devices):
            kind = cost_kind_of(graph, dev, cost_kind)
            self.kinds.append(kind)
            c = graph.costs[kind]
            self._cost_sets.append(c)
            fwd[i] = c.fwd_s / dev.speed
            bwd[i] = c.bwd_s / dev.speed
            overhead[i] = _per_kind(dispatch_overhead_s, "dispatch_overhead_s", cluster, dev.kind,
                                    DISPATCH_OVERHEAD_S, DEFAULT_DISPATCH_OVERHEAD_S)
            mem_bw[i] = _per_kind(memory_bandwidth_Bps, "memory_bandwidth_Bps", cluster, dev.kind,
                                  MEMORY_BANDWIDTH_BPS, DEFAULT_MEMORY_BANDWIDTH_BPS) * dev.speed
        self.fwd_s, self.bwd_s, self.overhead_s, self.mem_bw_Bps = fwd, bwd, overhead, mem_bw
        # per-message CPU costs and the multi-device step constant: 0 unless the cluster declares them
        self.send_overhead_s = np.array([meta_per_kind(cluster, "send_overhead_s", dv.kind)
                                         for dv in cluster.devices])
        self.recv_overhead_s = np.array([meta_per_kind(cluster, "recv_overhead_s", dv.kind)
                                         for dv in cluster.devices])
        # the fixed cost of each fused forward / backward segment the engine runs (0 unless declared)
        self.segment_fwd_s = np.array([meta_per_kind(cluster, "segment_fwd_overhead_s", dv.kind)
                                       for dv in cluster.devices])
        self.segment_bwd_s = np.array([meta_per_kind(cluster, "segment_bwd_overhead_s", dv.kind)
                                       for dv in cluster.devices])
        self.step_overhead_s = float(cluster.meta.get("step_overhead_s", 0.0))  # checked by the Cluster
        self._ar = np.arange(n)
        self.param_bytes = graph.param_bytes.astype(np.float64)
        self.param_traffic_s = param_traffic_s(cluster, self.param_bytes, mem_bw)
        stash = graph.stash_bytes.astype(np.float64)
        is_input = np.array([k == "input" for k in graph.op_kinds], dtype=bool)
        self.stash_bytes = np.where(is_input, np.maximum(stash, graph.out_bytes), stash)
        self.temp_bytes = graph.temp_bytes.astype(np.float64)
        self.memory_bytes = np.array([dev.memory_bytes for dev in cluster.devices], dtype=np.float64)
        self.latency_s = np.asarray(cluster.latency_s, dtype=np.float64)
        self.bandwidth_Bps = np.asarray(cluster.bandwidth_Bps, dtype=np.float64)
        self.arrays = graph_arrays(graph)
        # autograd makes a gradient only for values that depend on a parameter (inputs, targets, shapes: none);
        # a graph without parameters (hand-made cost graphs) counts every value as trainable
        needs = self.param_bytes > 0 if self.param_bytes.any() else np.ones(n, dtype=bool)
        pp, pi = self.arrays.pred_ptr, self.arrays.pred_idx
        for i in range(n):
            if not needs[i] and pp[i + 1] > pp[i]:
                needs[i] = bool(needs[pi[pp[i]:pp[i + 1]]].any())
        self.needs_grad = needs
        self._coloc_first = colocation_first(graph)
        self._warned: set[tuple[str, int, int, str]] = set()
        self._names = cluster.device_names

    # ------------------------------------------------------------------ helpers
    def device_array(self, placement: Placement | np.ndarray) -> np.ndarray:
        """Placement as an int64 array, validated (one-line ``ValueError`` from :meth:`Placement.validate`)."""
        dev = np.ascontiguousarray(getattr(placement, "device_of_op", placement), dtype=np.int64).reshape(-1)
        if not dev.flags.writeable:  # Placement arrays are read-only; numba would compile a second specialisation
            dev = dev.copy()
        ok = dev.shape[0] == self.graph.n
        if ok and dev.size:
            ok = bool(dev.min() >= 0 and dev.max() < self.cluster.num_devices
                      and (dev[self._coloc_first] == dev).all())
        if not ok:
            Placement(dev).validate(self.graph, self.cluster)
            raise ValueError("invalid placement")  # pragma: no cover - validate() raises first
        return dev

    def schedule(self, placement: Placement | np.ndarray, name: str = "none", *, microbatches: int = 1,
                 _checked: bool = False) -> Schedule:
        """The schedule :meth:`run` would execute (warnings logged once per simulator and situation)."""
        dev = placement if _checked else self.device_array(placement)
        sched = build_schedule(name, self.graph, dev, self.cluster.num_devices, microbatches=microbatches, warn=False,
                               sim=self)
        key = (sched.name, sched.microbatches, sched.num_stages, sched.note[:40])
        if key not in self._warned:
            self._warned.add(key)
            warn_schedule(sched)
        return sched

    def microbatch_s(self, microbatches: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D, n)`` forward and backward seconds of one micro-batch of every op on every device (cached),
        including the weight traffic of :func:`placer.costmodel.costs.param_traffic_s`."""
        got = self._mb_cache.get(microbatches)
        if got is None:
            fwd, bwd = np.zeros_like(self.fwd_s), np.zeros_like(self.bwd_s)
            for i, (c, dv) in enumerate(zip(self._cost_sets, self.cluster.devices)):
                f, b = microbatch_costs_s(c, float(self.overhead_s[i]) * dv.speed, microbatches)
                fwd[i] = f / dv.speed + 0.2 * self.param_traffic_s[i]
                bwd[i] = b / dv.speed + 0.8 * self.param_traffic_s[i]
            got = self._mb_cache[microbatches] = (fwd, bwd)
        return got

    def transfer_s(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, microbatches: int) -> np.ndarray:
        """:meth:`Cluster.transfer_s` for one micro-batch of ``nbytes`` (full-batch bytes), element-wise over
        arrays of source and destination devices: latency + bytes / M / bandwidth, 0 where nothing moves."""
        out = np.zeros(np.shape(nbytes))
        far = (src != dst) & (nbytes > 0)
        a, b = src[far], dst[far]
        out[far] = self.latency_s[a, b] + nbytes[far] / microbatches / self.bandwidth_Bps[a, b]
        return out

    # ------------------------------------------------------------------ the step
    def run(self, placement: Placement | np.ndarray, *, schedule: str | Schedule = "none", microbatches: int = 1,
            optimizer: str = "adam", timeline: bool = False, recompute: Sequence[int] = ()) -> StepResult:
        """Simulate one training step; OOM gives a failed result, a bad placement a ``ValueError``.

        ``schedule`` is a name from :data:`placer.costmodel.schedules.SCHEDULES` or a :class:`Schedule` already
        built for this placement (e.g. the one the engine runs); ``microbatches`` is then taken from it.
        ``recompute``: the devices that recompute activations (:mod:`placer.costmodel.recompute`).
        """
        dev = self.device_array(placement)
        if isinstance(schedule, Schedule):
            sched = schedule
            if sched.num_devices != self.cluster.num_devices:
                raise ValueError(f"schedule is for {sched.num_devices} devices, cluster has {self.cluster.num_devices}")
        else:
            sched = self.schedule(dev, schedule, microbatches=microbatches, _checked=True)
        opt = optimizer_of(optimizer)
        m = sched.microbatches
        names, num_dev = self._names, self.cluster.num_devices

        # memory first: an OOM placement needs no timing
        extra: dict[str, Any] = {"schedule_order": sched.order, "stages": sched.num_stages}
        ran: dict[str, Any] = {"schedule": sched.name, "schedule_ran": sched.order, "schedule_note": sched.note}
        params = np.bincount(dev, weights=self.param_bytes, minlength=num_dev)
        static = params * (2 + opt.state_copies)
        act = K.activation_peaks(sched.device_ptr, sched.op, sched.phase, self.stash_bytes / m, self.temp_bytes / m)
        fwd_m, bwd_m = self.microbatch_s(m)
        dur_f, dur_b = fwd_m[dev, self._ar], bwd_m[dev, self._ar]
        redo = recompute_walk(self, sched, dev, recompute, dur_f)
        if redo is not None:
            act = np.where(redo[0], redo[1], act)
            ran["recompute"] = tuple(int(d) for d in np.flatnonzero(redo[0]))
        peak = static + act
        over = np.flatnonzero(peak > self.memory_bytes)
        if sched.note:
            extra["note"] = sched.note
        if over.size:
            i = int(over[0])
            return StepResult.failed(self._oom_reason(i, static[i], act[i]), source="sim", devices=names, oom_device=i,
                                     peak_memory_bytes=np.ceil(peak).astype(np.int64), **ran,
                                     microbatches=m, extra=extra)

        upd = np.where(params > 0, params * opt.touched / self.mem_bw_Bps + self.overhead_s, 0.0)
        ga = self.arrays
        tid_of, prod, src, dst, nbytes, ncons = K.transfer_table(dev, ga.succ_ptr, ga.succ_idx, ga.succ_bytes, num_dev)
        x_time = self.transfer_s(src, dst, nbytes, m)
        msg = nbytes > 0
        # a step that spans devices starts late on each of them (see the module docstring)
        used = np.diff(sched.device_ptr) > 0
        start = np.where(used, self.step_overhead_s, 0.0) if used.sum() > 1 else np.zeros(num_dev)
        extra_s, n_segments = self._segment_costs(sched, dev)
        extra_s = extra_s + redo[2] if redo is not None else extra_s  # + the recomputed forwards
        status, step, busy, crit, t_start, t_end, x_start, x_end, stuck = K.sweep_costed(
            sched.device_ptr, sched.op, sched.microbatch, sched.phase, dev, ga.pred_ptr, ga.pred_idx,
            ga.succ_ptr, ga.succ_idx, tid_of, src, dst, ncons, x_time, dur_f, dur_b, upd, m, timeline,
            self.send_overhead_s, self.recv_overhead_s, msg, self.needs_grad[prod], start, extra_s)
        if status != K.OK:  # build_schedule never returns such an order; a hand-made Schedule might
            d = int(np.flatnonzero(stuck >= 0)[0])
            k = int(stuck[d])
            op_name = self.graph.op_names[int(sched.op[k])] if sched.op[k] >= 0 else "update"
            return StepResult.failed(f"schedule deadlocks: {names[d]} waits forever at {PHASES[int(sched.phase[k])]} "
                                     f"of {op_name!r}", source="sim", devices=names, **ran,
                                     microbatches=m, extra=extra)
        if not np.isfinite(step):  # finite inputs whose sums overflow (a link of 1e308 s)
            return StepResult.failed("the step time overflows: the link or op costs are too large to add up",
                                     source="sim", devices=names, **ran, microbatches=m, extra=extra)
        # activations one way, their gradients (same size) back where autograd makes one
        dd = num_dev * num_dev
        moved = (np.bincount(src * num_dev + dst, weights=nbytes, minlength=dd)
                 + np.bincount(dst * num_dev + src, weights=nbytes * self.needs_grad[prod], minlength=dd))
        moved = moved.astype(np.int64).reshape(num_dev, num_dev)
        extra.update(transfers=int(prod.shape[0]), messages=int(msg.sum() + (msg & self.needs_grad[prod]).sum()) * m,
                     segments=n_segments)  # segments: None when the cluster declares no segment costs
        extra["update_s"] = [float(x) for x in upd]
        events: tuple[TimelineEvent, ...] = ()
        if timeline:
            events = self._events(sched, prod, src, dst, t_start, t_end, x_start, x_end)
        return StepResult(step_time_s=float(step), source="sim", devices=names, busy_s=busy,
                          peak_memory_bytes=np.ceil(peak).astype(np.int64), bytes_moved=moved,
                          critical_path_s=float(crit), **ran, microbatches=m, timeline=events,
                          extra=extra)

    def _oom_reason(self, i: int, static_bytes: float, act_bytes: float) -> str:
        gib = 1 << 30  # one line: which device, by how much, of what
        return (f"out of memory on {self._names[i]}: needs {(static_bytes + act_bytes) / gib:.2f} GiB "
                f"(parameters+gradients+optimizer {static_bytes / gib:.2f} GiB, activations+temporaries "
                f"{act_bytes / gib:.2f} GiB) > {self.memory_bytes[i] / gib:.2f} GiB")

    def _segment_costs(self, sched: Schedule, dev: np.ndarray) -> tuple[np.ndarray, int | None]:
        """Per task, the fixed cost of the fused segment it starts (:func:`segment_starts`), and how many
        segments there are; zeros and None when the cluster declares no segment costs."""
        if not (self.segment_fwd_s.any() or self.segment_bwd_s.any()):
            return np.zeros(sched.num_tasks), None
        starts = self.segment_starts(sched, dev)
        dev_of_task = sched.device_of_task()
        extra_s = np.where(starts == 1, self.segment_fwd_s[dev_of_task],
                           np.where(starts == 2, self.segment_bwd_s[dev_of_task], 0.0))
        return extra_s, int((starts > 0).sum())

    def segment_starts(self, sched: Schedule, dev: np.ndarray) -> np.ndarray:
        """Per task of ``sched``: 1 if it starts a fused forward segment of the engine, 2 a backward one, else 0
        (:func:`placer.costmodel._segment_kernel.segment_starts`)."""
        ga = self.arrays
        remote_grad = np.zeros(self.graph.n, dtype=bool)  # a remote consumer sends this op's gradient back
        src, dst = self.graph.edge_index
        has_bwd = self.needs_grad & (self.graph.out_bytes > 0)  # sizes and other non-tensors get no gradient
        cross = (dev[src] != dev[dst]) & has_bwd[src] & has_bwd[dst]
        remote_grad[src[cross]] = True
        return _segment_starts_kernel(sched.device_ptr, sched.op, sched.microbatch, sched.phase, dev, ga.pred_ptr,
                                ga.pred_idx, ga.succ_ptr, ga.succ_idx, remote_grad, sched.microbatches, self.graph.n)

    def _events(self, sched: Schedule, prod: np.ndarray, src: np.ndarray, dst: np.ndarray, t_start: np.ndarray,
                t_end: np.ndarray, x_start: np.ndarray, x_end: np.ndarray) -> tuple[TimelineEvent, ...]:
        names, ops = self._names, self.graph.op_names
        out = []
        dev_of_task = sched.device_of_task()
        for k in range(sched.num_tasks):
            op = int(sched.op[k])
            phase: Any = PHASES[int(sched.phase[k])]
            out.append(TimelineEvent(track=names[dev_of_task[k]], op=ops[op] if op >= 0 else "update",
                                     microbatch=int(sched.microbatch[k]), phase=phase,
                                     start_s=float(t_start[k]), end_s=float(t_end[k])))
        for direction in (0, 1):
            for t, m in zip(*np.nonzero(x_end[direction] > x_start[direction])):
                a, b = (src[t], dst[t]) if direction == 0 else (dst[t], src[t])
                label = ops[prod[t]] if direction == 0 else f"grad:{ops[prod[t]]}"
                out.append(TimelineEvent(track=f"{names[a]}->{names[b]}", op=label, microbatch=int(m), phase="send",
                                         start_s=float(x_start[direction, t, m]), end_s=float(x_end[direction, t, m])))
        out.sort(key=lambda e: (e.start_s, e.track))
        return tuple(out)


_SIMS: "weakref.WeakKeyDictionary[OpGraph, weakref.WeakKeyDictionary[Cluster, dict[str, Simulator]]]" = (
    weakref.WeakKeyDictionary())


def get_simulator(graph: "OpGraph", cluster: "Cluster", *, cost_kind: CostKind = None,
                  dispatch_overhead_s: float | Mapping[str, float] | None = None) -> Simulator:
    """A cached :class:`Simulator` for this graph and cluster object."""
    per_cluster = _SIMS.setdefault(graph, weakref.WeakKeyDictionary())
    cache = per_cluster.setdefault(cluster, {})
    as_key = lambda v: sorted(v.items()) if isinstance(v, Mapping) else v  # noqa: E731
    key = repr((as_key(cost_kind), as_key(dispatch_overhead_s)))
    sim = cache.get(key)
    if sim is None:
        sim = cache[key] = Simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    return sim


def simulate(graph: "OpGraph", cluster: "Cluster", placement: Placement | np.ndarray, *,
             schedule: str | Schedule = "none", microbatches: int = 1, optimizer: str = "adam",
             cost_kind: CostKind = None,
             dispatch_overhead_s: float | Mapping[str, float] | None = None, timeline: bool = False,
             recompute: Sequence[int] = ()) -> StepResult:
    """Simulate one training step of ``graph`` placed by ``placement`` on ``cluster`` (see the module docstring)."""
    sim = get_simulator(graph, cluster, cost_kind=cost_kind, dispatch_overhead_s=dispatch_overhead_s)
    return sim.run(placement, schedule=schedule, microbatches=microbatches, optimizer=optimizer, timeline=timeline,
                   recompute=recompute)
