"""Micro-batch schedules: the exact per-device order of (op, micro-batch, phase) tasks of one training step.

Both the simulator and the real engine run these orders **as given**: every device is an in-order executor that
takes its next task once that task's inputs have arrived. Rules shared by all schedules:

* an op's backward runs on its forward's device (TensorFlow colocated gradients; ColocRL relied on it);
* a forward waits for its inputs' forwards, a backward for its own forward and its readers' backwards;
* within one micro-batch (and one chunk, see below) a device runs its forwards in op-index order (a global
  topological order) and its backwards in reverse op-index order (all but ``dataflow``);
* each device that owns ops ends with one ``update`` task (``op = -1``, ``microbatch = -1``) after all its
  backwards (gradients are accumulated over micro-batches, then its parameters are updated once).

Schedules, by name (:data:`SCHEDULES`):

``none``
    Micro-batches one after the other with gradient accumulation (plain training when ``M = 1``); always
    deadlock-free.
``gpipe``
    GPipe (Huang et al., 2019): all forwards of all micro-batches, then all backwards (micro-batch 0 first, as
    ``torch.distributed.pipelining.ScheduleGPipe``). Deadlock-free for any placement: every device's list is a
    subsequence of one global order in which every dependency comes first.
``1f1b``
    PipeDream-flush / Megatron-LM 1F1B (Narayanan et al., 2021): a device at stage ``s`` of ``S`` runs
    ``min(S - s - 1, M)`` warm-up forwards, then alternates one forward / one backward, then drains the
    remaining backwards. A device's forward block for a micro-batch is all its ops in index order.
``interleaved-1f1b``
    Megatron-LM's interleaved schedule: a device owning several chunks (virtual stages) runs the forwards of
    micro-batch groups of ``S`` chunk by chunk (backwards: last chunk first), with ``2 (S - s - 1) + (v - 1) S``
    warm-up forwards (all forwards first when ``M == S``, as Megatron does). With one chunk per device it is
    exactly ``1f1b``.
``dataflow``
    Each device runs whichever of its tasks is ready, earliest micro-batch first: TensorFlow's executor, on which
    ColocRL and the list-scheduling placers (HEFT, Baechi's m-ETF / m-SCT) measured their placements. The orders
    above fix a device's order by op index within a micro-batch, so a device holding parts of many layers (the
    experts of every MoE block under expert parallelism, a HEFT placement) finishes one micro-batch's chain
    before it starts the next one's. ``dataflow`` makes the executor's order static (the engine matches
    messages by position, so it cannot reorder at run time) by list scheduling on the simulator's costs
    (:func:`placer.costmodel._schedule_kernel.list_order`): tasks are released by the dependencies above plus
    the transfer times, and a device that becomes free takes, among its released tasks ready by then, the one
    of the earliest micro-batch, backwards first, then the longest remaining path; when none is ready it waits
    for the first that will be. Every list is then a subsequence of one global order (the start times) in which
    every dependency comes first, so it never deadlocks; the simulator times it as any schedule (per-message
    costs, link queues, which the list scheduling only approximates). It needs the costs: ``build_schedule(...,
    sim=)`` (the simulator and :func:`placer.engine.ordering.device_tasks` pass theirs). Stages are numbered as
    for ``gpipe``. The op-level engine runs it; ``torch.distributed.pipelining`` does not.

**Stages and chunks.** A device's ops are cut into *chunks* (virtual stages) such that the graph of chunks is
acyclic: a new chunk starts where a path leaves the device and comes back (dev0 -> dev1 -> dev0 gives dev0 two
chunks). When separate paths still close a cycle between chunks (dev0 -> dev1 by one path, dev1 -> dev0 by
another), chunks are instead cut greedily in op order so that every cross-chunk edge goes to a later chunk.
Chunks are ranked in a topological order of that graph (ties: lowest first op index); a device's *stage* is the
rank of its first chunk among the devices in use. For a pipeline chain this is the rank of each device's first op
in op order. (We rank by the chunk graph rather than by first op index because a device whose first op is an
early input but which also consumes a later device's output would otherwise get too few warm-up forwards and
the 1F1B order could deadlock.)

**Deadlock fallback.** ``1f1b`` on a placement whose devices hold several chunks, or ``interleaved-1f1b`` on an
irregular one, can deadlock an in-order executor (dev0 -> dev1 -> dev0: dev0's second forward needs dev1's
forward, which waits for dev0's first backward). Every 1F1B-family order is therefore checked with a zero-cost
run of the executor model before it is returned; if it would deadlock, ``interleaved-1f1b`` falls back to
``1f1b`` and then ``gpipe``, and ``1f1b`` falls back to ``gpipe``, with a logged warning (once per process and
order: the simulator's prediction and the engine's measurement of a step share it). ``Schedule.order`` names the
order actually built, and both backends' :class:`~placer.core.result.StepResult` carry it as ``schedule_ran``.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

import numpy as np

from placer.costmodel import _schedule_kernel as S
from placer.costmodel import _sim_kernel as K
from placer.costmodel.task import PHASES, Task

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.placement import Placement
    from placer.costmodel.sim import Simulator

log = logging.getLogger(__name__)

class Transfer(NamedTuple):
    """A tensor sent between devices once per micro-batch (and its gradient back)."""

    producer: int
    """Op whose output is sent."""
    src: int
    """Device of the producer."""
    dst: int
    """Device holding one or more consumers."""
    nbytes: int
    """Full-batch bytes (the largest edge from the producer to the destination device)."""
    consumers: tuple[int, ...]
    """Ops on ``dst`` reading it; the gradient goes back after the last of their backwards on ``dst``."""


@dataclass(frozen=True, kw_only=True, eq=False)
class Schedule:
    """Per-device task orders in flat arrays: device ``d`` runs tasks ``device_ptr[d]:device_ptr[d+1]`` in order."""

    name: str
    """Schedule requested (a key of :data:`SCHEDULES`)."""
    order: str
    """Order actually built: ``name``, or the fallback (``1f1b``/``gpipe``) when ``name`` would deadlock."""
    microbatches: int
    num_devices: int
    device_ptr: np.ndarray
    """``(D + 1,)`` offsets into the task arrays."""
    op: np.ndarray
    """Op index per task (-1 for update)."""
    microbatch: np.ndarray
    """Micro-batch per task (-1 for update)."""
    phase: np.ndarray
    """Phase code per task: 0 fwd, 1 bwd, 2 update (see :data:`PHASES`)."""
    stage_of_device: np.ndarray
    """Pipeline stage per device, -1 for unused devices."""
    num_stages: int
    """Devices in use."""
    chunks_per_device: np.ndarray
    """Number of chunks (virtual stages) per device (0 when unused)."""
    note: str = ""
    """Why a fallback happened, when it did."""

    def tasks(self, device: int) -> list[Task]:
        """Device ``device``'s order as readable tuples."""
        a, b = int(self.device_ptr[device]), int(self.device_ptr[device + 1])
        return [Task(int(o), int(m), PHASES[int(p)])  # type: ignore[arg-type]
                for o, m, p in zip(self.op[a:b], self.microbatch[a:b], self.phase[a:b])]

    @property
    def num_tasks(self) -> int:
        return int(self.device_ptr[-1])

    def device_of_task(self) -> np.ndarray:
        """Device index of every task (flat)."""
        return np.repeat(np.arange(self.num_devices), np.diff(self.device_ptr))


Builder = Callable[..., Schedule]
SCHEDULES: dict[str, Builder] = {}
COSTED: set[str] = set()
"""Schedules whose order depends on the ops' costs: their builders take the ``sim`` keyword."""


def register_schedule(name: str, *, costed: bool = False) -> Callable[[Builder], Builder]:
    """Register a builder ``(graph, device per op, num_devices, *, microbatches[, sim]) -> Schedule``; with
    ``costed`` it also receives the :class:`placer.costmodel.sim.Simulator` whose costs order the tasks."""
    def deco(fn: Builder) -> Builder:
        SCHEDULES[name] = fn
        if costed:
            COSTED.add(name)
        return fn

    return deco


# ---------------------------------------------------------------------- graph arrays (cached per graph)
@dataclass(frozen=True)
class GraphArrays:
    """Adjacency of a graph in compressed rows, computed once per graph."""

    pred_ptr: np.ndarray
    pred_idx: np.ndarray
    pred_bytes: np.ndarray
    succ_ptr: np.ndarray
    succ_idx: np.ndarray
    succ_bytes: np.ndarray
    succ_src: np.ndarray
    """Source op of each entry of ``succ_idx`` (so ``(succ_src, succ_idx)`` lists every edge)."""


_ARRAYS: "weakref.WeakKeyDictionary[OpGraph, GraphArrays]" = weakref.WeakKeyDictionary()


def graph_arrays(graph: "OpGraph") -> GraphArrays:
    ga = _ARRAYS.get(graph)
    if ga is None:
        src = np.ascontiguousarray(graph.edge_index[0], dtype=np.int64)
        dst = np.ascontiguousarray(graph.edge_index[1], dtype=np.int64)
        w = np.ascontiguousarray(graph.edge_bytes, dtype=np.int64)
        pp, pi, pb = K.csr(dst, src, w, graph.n)
        sp, si, sb = K.csr(src, dst, w, graph.n)
        ga = GraphArrays(pp, pi, pb, sp, si, sb, np.repeat(np.arange(graph.n, dtype=np.int64), np.diff(sp)))
        _ARRAYS[graph] = ga
    return ga


def _device_array(placement: "Placement | np.ndarray", n: int) -> np.ndarray:
    dev = getattr(placement, "device_of_op", placement)
    dev = np.ascontiguousarray(dev, dtype=np.int64).reshape(-1)
    if not dev.flags.writeable:  # Placement arrays are read-only; numba would compile a second specialisation
        dev = dev.copy()
    if dev.shape[0] != n:
        raise ValueError(f"placement has {dev.shape[0]} ops but the graph has {n}")
    return dev


# ---------------------------------------------------------------------- stages
def virtual_stages(graph: "OpGraph", placement: "Placement | np.ndarray",
                   num_devices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(chunk_of_op, stage_of_device, chunks_per_device)`` as described in the module docstring."""
    dev = _device_array(placement, graph.n)
    ga = graph_arrays(graph)
    level = S.virtual_chunks(dev, ga.pred_ptr, ga.pred_idx, num_devices)
    stage, _, acyclic = S.chunk_stages(dev, level, ga.succ_src, ga.succ_idx, num_devices)
    if not acyclic:  # separate paths close a cycle between chunks: cut in op order instead (always acyclic)
        level = S.ordered_chunks(dev, ga.pred_ptr, ga.pred_idx, num_devices)
        stage, _, acyclic = S.chunk_stages(dev, level, ga.succ_src, ga.succ_idx, num_devices)
        assert acyclic
    nchunks = np.zeros(num_devices, dtype=np.int64)
    np.maximum.at(nchunks, dev, level + 1)
    return level, stage, nchunks


def stage_of_device(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int) -> np.ndarray:
    """Pipeline stage of each device (-1 when it holds no op); see the module docstring."""
    return virtual_stages(graph, placement, num_devices)[1]


def is_stage_contiguous(graph: "OpGraph", placement: "Placement | np.ndarray") -> bool:
    """True when every used device holds one contiguous range of op indices (what ``torch.distributed.pipelining``
    can split into stages; edges then only go from a stage to a later one)."""
    dev = _device_array(placement, graph.n)
    if dev.size == 0:
        return True
    runs = int(np.count_nonzero(np.diff(dev))) + 1
    return runs == np.unique(dev).size


def transfer_plan(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int) -> list[Transfer]:
    """Every cross-device tensor of the placement, as the simulator models it (and the engine should send it)."""
    dev = _device_array(placement, graph.n)
    ga = graph_arrays(graph)
    tid_of, prod, src, dst, nbytes, _ = K.transfer_table(dev, ga.succ_ptr, ga.succ_idx, ga.succ_bytes, num_devices)
    out = []
    for t in range(prod.shape[0]):
        p, d = int(prod[t]), int(dst[t])
        cons = ga.succ_idx[ga.succ_ptr[p]:ga.succ_ptr[p + 1]]
        out.append(Transfer(p, int(src[t]), d, int(nbytes[t]), tuple(int(c) for c in cons if dev[c] == d)))
    return out


def find_deadlock(schedule: Schedule, graph: "OpGraph", placement: "Placement | np.ndarray") -> str | None:
    """None if in-order executors finish ``schedule``; else a one-line description of the blocked tasks."""
    dev = _device_array(placement, graph.n)
    ga = graph_arrays(graph)
    d = schedule.num_devices
    tid_of, _, src, dst, _, ncons = K.transfer_table(dev, ga.succ_ptr, ga.succ_idx, ga.succ_bytes, d)
    zeros_n = np.zeros(graph.n)
    status, *_, stuck = K.sweep(schedule.device_ptr, schedule.op, schedule.microbatch, schedule.phase, dev,
                                ga.pred_ptr, ga.pred_idx, ga.succ_ptr, ga.succ_idx, tid_of, src, dst, ncons,
                                np.zeros(src.shape[0]), zeros_n, zeros_n, np.zeros(d), schedule.microbatches, False)
    if status == K.OK:
        return None
    parts = []
    for q in np.flatnonzero(stuck >= 0)[:3]:
        k = int(stuck[q])
        op = int(schedule.op[k])
        parts.append(f"device {q} waits at {PHASES[int(schedule.phase[k])]} of "
                     f"{graph.op_names[op] if op >= 0 else 'update'!r} (micro-batch {int(schedule.microbatch[k])})")
    return "deadlock: " + "; ".join(parts)


# ---------------------------------------------------------------------- the schedules
_KIND = {"none": 0, "gpipe": 1, "1f1b": 2, "interleaved-1f1b": 3}


def _assemble(name: str, order: str, dev: np.ndarray, num_devices: int, microbatches: int, *, level: np.ndarray,
              stage: np.ndarray, nchunks: np.ndarray, merge_chunks: bool, note: str = "") -> Schedule:
    used = stage >= 0
    s_count = int(used.sum())
    blk_ptr, blk = S.pipeline_blocks(_KIND[order], stage, nchunks, s_count, microbatches)
    if merge_chunks:
        level = np.zeros_like(dev)
    ptr, op, mb, ph = S.expand_blocks(blk_ptr, blk, dev, level, int(level.max(initial=0)) + 1)
    return Schedule(name=name, order=order, microbatches=microbatches, num_devices=num_devices, device_ptr=ptr,
                    op=op, microbatch=mb, phase=ph, stage_of_device=stage, num_stages=s_count,
                    chunks_per_device=nchunks, note=note)


def _stages_by_first_op(dev: np.ndarray, num_devices: int) -> tuple[np.ndarray, np.ndarray]:
    """``(stage per device, used per device)``: the devices in use numbered in the order of their first op."""
    n = dev.shape[0]
    first = np.full(num_devices, n, dtype=np.int64)
    np.minimum.at(first, dev, np.arange(n))
    used = first < n
    stage = np.full(num_devices, -1, dtype=np.int64)
    stage[np.argsort(first, kind="stable")[:int(used.sum())]] = np.arange(int(used.sum()))
    return stage, used


def _simple(name: str, graph: "OpGraph", dev: np.ndarray, num_devices: int, microbatches: int) -> Schedule:
    """none / gpipe: no stages needed; devices are numbered by their first op."""
    stage, used = _stages_by_first_op(dev, num_devices)
    return _assemble(name, name, dev, num_devices, microbatches, level=np.zeros_like(dev), stage=stage,
                     nchunks=used.astype(np.int64), merge_chunks=True)


@register_schedule("none")
def _none(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, *, microbatches: int) -> Schedule:
    return _simple("none", graph, _device_array(placement, graph.n), num_devices, microbatches)


@register_schedule("gpipe")
def _gpipe(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, *, microbatches: int) -> Schedule:
    return _simple("gpipe", graph, _device_array(placement, graph.n), num_devices, microbatches)


def _pipelined(name: str, graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int,
               microbatches: int) -> Schedule:
    """1f1b / interleaved-1f1b with the deadlock check and fallbacks of the module docstring."""
    dev = _device_array(placement, graph.n)
    level, stage, nchunks = virtual_stages(graph, dev, num_devices)
    kw = dict(level=level, stage=stage, nchunks=nchunks)
    multi = bool((nchunks > 1).any())
    notes = []
    for order in (("interleaved-1f1b", "1f1b") if name == "interleaved-1f1b" and multi else ("1f1b",)):
        sched = _assemble(name, order, dev, num_devices, microbatches, merge_chunks=order == "1f1b",
                          note="; ".join(notes), **kw)
        if not multi:  # one chunk per device: the device graph is a DAG ranked topologically, never deadlocks
            return sched
        why = find_deadlock(sched, graph, dev)
        if why is None:
            return sched
        notes.append(f"{order} order would {why}")
    notes.append("using gpipe order")
    return _assemble(name, "gpipe", dev, num_devices, microbatches, merge_chunks=True, note="; ".join(notes), **kw)


@register_schedule("1f1b")
def _1f1b(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, *, microbatches: int) -> Schedule:
    return _pipelined("1f1b", graph, placement, num_devices, microbatches)


@register_schedule("interleaved-1f1b")
def _interleaved(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, *,
                 microbatches: int) -> Schedule:
    return _pipelined("interleaved-1f1b", graph, placement, num_devices, microbatches)


def build_schedule(name: str, graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, *,
                   microbatches: int, warn: bool = True, sim: "Simulator | None" = None) -> Schedule:
    """The per-device task orders of schedule ``name`` for a placement; ``ValueError`` for a bad name or M.

    ``sim``: the simulator whose costs order a :data:`COSTED` schedule's tasks (``dataflow``); others ignore it.

    ``warn`` logs a warning when ``microbatches`` < pipeline stages (the pipeline cannot fill) and when a
    fallback order was used. ``microbatches`` > 1 for a graph recorded as not micro-batchable is a one-line
    ``ValueError`` naming the op (:func:`graphs.microbatch.check_microbatchable`).
    """
    try:
        builder = SCHEDULES[name]
    except KeyError:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None
    if int(microbatches) != microbatches or microbatches < 1:
        raise ValueError(f"microbatches must be a positive integer, got {microbatches!r}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be positive, got {num_devices}")
    from graphs.microbatch import check_microbatchable  # noqa: PLC0415 - torch only where a schedule is built

    check_microbatchable(graph, microbatches)  # the simulator never scores what the engine cannot run
    dev = _device_array(placement, graph.n)
    if dev.size and (dev.min() < 0 or dev.max() >= num_devices):
        raise ValueError(f"placement uses device {int(dev.max() if dev.max() >= num_devices else dev.min())}, "
                         f"outside 0..{num_devices - 1}")
    kw = {"sim": sim} if name in COSTED else {}
    sched = builder(graph, dev, num_devices, microbatches=int(microbatches), **kw)
    if warn:
        warn_schedule(sched)
    return sched


_WARNED: dict[tuple, None] = {}
"""Schedules already warned about in this process (insertion-ordered, bounded by :data:`_WARNED_MAX`)."""
_WARNED_MAX = 4096


def reset_schedule_warnings() -> None:
    """Forget which schedules were warned about (tests that check a warning start from here)."""
    _WARNED.clear()


def warn_schedule(sched: Schedule) -> None:
    """Log the warnings a schedule deserves (micro-batches < stages; fallback order), once per process and kind.

    The key leaves the placement out: a search (RL's samples, the plan search) builds the schedule for thousands
    of placements, and one line per kind says what a user needs (the simulator's prediction and the engine's
    measurement of one step, too, warn once between them). A fallback note is keyed by its first clause (which
    order fell back to which), not by the ops it names.
    """
    key = (sched.name, sched.order, sched.microbatches, sched.num_stages, sched.note.split(":")[0])
    if key in _WARNED:
        return
    if len(_WARNED) >= _WARNED_MAX:  # a long search over placements: forget the oldest, keep memory bounded
        del _WARNED[next(iter(_WARNED))]
    _WARNED[key] = None
    if sched.name not in ("none", "dataflow") and sched.microbatches < sched.num_stages:  # those have no fill
        log.warning("schedule %s: %d micro-batches < %d pipeline stages; the pipeline never fills",
                    sched.name, sched.microbatches, sched.num_stages)
    if sched.note:
        log.warning("schedule %s: %s", sched.name, sched.note)


# ---------------------------------------------------------------------- dataflow
@register_schedule("dataflow", costed=True)
def _dataflow(graph: "OpGraph", placement: np.ndarray, num_devices: int, *, microbatches: int,
              sim: "Simulator | None" = None) -> Schedule:
    """The list-scheduled order of the module docstring's ``dataflow``, on ``sim``'s costs."""
    if sim is None:
        raise ValueError("schedule 'dataflow' orders tasks by their costs: it needs the simulator of the devices")
    if sim.graph is not graph or sim.cluster.num_devices != num_devices:
        raise ValueError("schedule 'dataflow': the simulator is for another graph or cluster")
    dev = np.asarray(placement, dtype=np.int64)
    m = int(microbatches)
    ga = graph_arrays(graph)
    fwd, bwd = sim.microbatch_s(m)
    ar = np.arange(graph.n)
    succ_x = sim.transfer_s(dev[ga.succ_src], dev[ga.succ_idx], ga.succ_bytes, m)
    pred_x = sim.transfer_s(dev[ga.pred_idx], dev[np.repeat(ar, np.diff(ga.pred_ptr))], ga.pred_bytes, m)
    ptr, op, mb, phase = S.list_order(dev, num_devices, m, np.ascontiguousarray(fwd[dev, ar]),
                                      np.ascontiguousarray(bwd[dev, ar]), ga.pred_ptr, ga.pred_idx, pred_x,
                                      ga.succ_ptr, ga.succ_idx, succ_x, sim.needs_grad.astype(np.float64))
    stage, used = _stages_by_first_op(dev, num_devices)
    return Schedule(name="dataflow", order="dataflow", microbatches=m, num_devices=num_devices, device_ptr=ptr,
                    op=op, microbatch=mb, phase=phase, stage_of_device=stage, num_stages=int(used.sum()),
                    chunks_per_device=used.astype(np.int64))
