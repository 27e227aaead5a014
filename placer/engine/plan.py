"""What one device does in a step: its tasks with the receives to wait for and the sends to post.

A :class:`StepPlan` is computed identically on every worker from the compiled step, the value descriptions, the
placement and the schedule, so sender and receiver agree on every transfer without talking about it:

* **Messages.** Between each ordered pair of devices the transfers of a step form one sequence, in the order
  the sender posts them (it walks its own task list). A message's tag is its position in that sequence, so tags
  are unique per (op, micro-batch, phase, destination), and the receiver posts its receives in the same
  order — which is also what NCCL needs, since it ignores tags and matches point-to-point ops in issue order.
* **Forward.** After op ``i`` runs for micro-batch ``m``, each remote device that has consumers of ``i`` gets
  the output once (all its tensor leaves in one message per dtype), however many of its ops read it.
* **Backward.** A received value is a set of autograd leaves shared by all local consumers, so their input
  gradients accumulate in ``.grad``; after the last of them (in the device's task order) has run backward,
  the accumulated gradient goes back to the producer, which adds it to its own before its backward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from placer.engine.ordering import Task
from placer.engine.program import StepProgram, ValueMeta
from placer.engine.segments import Segment, build_segments, fused_default

__all__ = ["Message", "TaskPlan", "StepPlan", "build_plan"]


@dataclass(frozen=True)
class Message:
    """One buffer moved from ``src`` to ``dst`` in a step: the tensor leaves of one value (or their gradients)
    of one dtype, flattened and concatenated — gloo costs tens of microseconds per message on this machine, so
    ``LSTMCell``'s ``(h, c)`` goes as one message, not two."""

    src: int
    dst: int
    tag: int
    """Position in the (src, dst) sequence."""
    kind: str
    """``act`` (an output going forward) or ``grad`` (a gradient going back to the producer)."""
    op: int
    """The producer op whose output (or its gradient) moves."""
    mb: int
    leaves: tuple[int, ...]
    """Leaf indices of the value, in order; all of one dtype."""
    numel: int
    nbytes: int


@dataclass(eq=False)
class TaskPlan:
    """One task of this device with its communication."""

    op: int
    mb: int
    phase: str
    wait_values: list[int] = field(default_factory=list)
    """fwd: remote producers whose value for ``mb`` is first needed here (wait for their receives)."""
    sends: list[Message] = field(default_factory=list)
    """fwd: output leaves to post to remote consumers after running; bwd: gradients of received values."""
    grad_recvs: list[Message] = field(default_factory=list)
    """bwd: gradients of this op's output coming back from remote consumers."""
    release_values: list[int] = field(default_factory=list)
    """bwd: received values (producers) for ``mb`` no longer needed after this task."""


@dataclass(eq=False)
class StepPlan:
    rank: int
    num_devices: int
    microbatches: int
    device_of_op: np.ndarray
    tasks: list[TaskPlan]
    recvs: dict[int, list[Message]]
    """Per source device, every message this device receives, in the sender's posting order."""
    sent_bytes: np.ndarray
    """Bytes this device sends to each device per step."""
    local_view: np.ndarray
    """Per op: consumers on its own device read detached copies of its output (cuts autograd per op)."""
    has_bwd: np.ndarray
    """Per op: the output requires grad (its backward task does work)."""
    segments: list[Segment] | None = None
    """Fused execution (:mod:`placer.engine.segments`): the tasks grouped into segments; None: op by op."""
    recompute: bool = False
    """Run each forward segment under activation checkpointing (keep its inputs, recompute in its backward)."""


def _validate(tasks: list[list[Task]], dev: np.ndarray, microbatches: int, prog: StepProgram) -> None:
    for d, lst in enumerate(tasks):
        seen_fwd: set[tuple[int, int]] = set()
        for (i, m, phase) in lst:
            if phase == "update":
                continue
            if phase not in ("fwd", "bwd"):
                raise ValueError(f"device {d}: unknown task phase {phase!r}")
            if not (0 <= i < len(dev)) or int(dev[i]) != d or not (0 <= m < microbatches):
                raise ValueError(f"device {d} has task ({i}, {m}, {phase}) for an op it does not hold")
            if phase == "fwd":
                for j in prog.ops[i].inputs:
                    if int(dev[j]) == d and (j, m) not in seen_fwd:
                        raise ValueError(f"device {d}: op {prog.ops[i].name} (micro-batch {m}) runs before "
                                         f"its input {prog.ops[j].name}")
                seen_fwd.add((i, m))
        expect = {(int(i), m) for i in np.flatnonzero(dev == d) for m in range(microbatches)}
        if seen_fwd != expect:
            missing = sorted(expect - seen_fwd)[:1]
            raise ValueError(f"device {d}: schedule misses or repeats forward tasks (e.g. {missing})")


class _Messages:
    """Message sequences per ``(src, dst)`` in the sender's posting order (the tag is the position), and the
    messages ``rank`` posts after each of its tasks."""

    def __init__(self, metas: Sequence[ValueMeta], rank: int) -> None:
        self.metas, self.rank = metas, rank
        self.seqs: dict[tuple[int, int], list[Message]] = {}
        self.sends_at: dict[int, list[Message]] = {}  # our task position -> messages we post after it

    def add(self, src: int, dst: int, kind: str, op: int, mb: int, leaves: Sequence[int], pos: int) -> None:
        """Messages carrying ``leaves`` of op ``op``'s output (one per dtype), posted after task ``pos`` of src."""
        metas = self.metas
        by_dtype: dict[object, list[int]] = {}
        for leaf in leaves:
            by_dtype.setdefault(metas[op].leaves[leaf].dtype, []).append(leaf)
        for group in by_dtype.values():
            seq = self.seqs.setdefault((src, dst), [])
            lm = [metas[op].leaves[leaf] for leaf in group]
            msg = Message(src=src, dst=dst, tag=len(seq), kind=kind, op=op, mb=mb, leaves=tuple(group),
                          numel=sum(int(np.prod(x.shape, dtype=np.int64)) for x in lm),
                          nbytes=sum(x.nbytes for x in lm))
            seq.append(msg)
            if src == self.rank:
                self.sends_at.setdefault(pos, []).append(msg)


def _task_plans(prog: StepProgram, dev: np.ndarray, my_tasks: list[Task], rank: int,
                last_bwd: dict[tuple[int, int], int], grad_in: dict[tuple[int, int], list[Message]],
                sends_at: dict[int, list[Message]]) -> list[TaskPlan]:
    """``rank``'s tasks with what each waits for (remote inputs first needed, gradients) and posts."""
    plans: list[TaskPlan] = []
    first_use: set[tuple[int, int]] = set()
    for k, (i, m, p) in enumerate(my_tasks):
        tp = TaskPlan(op=i, mb=m, phase=p)
        if p == "fwd":
            for j in prog.ops[i].inputs:
                if int(dev[j]) != rank and (j, m) not in first_use:
                    first_use.add((j, m))
                    tp.wait_values.append(j)
        elif p == "bwd":
            tp.grad_recvs = grad_in.get((i, m), [])
            tp.release_values = [j for (j, mb) in last_bwd if mb == m and last_bwd[(j, mb)] == k]
        tp.sends = sends_at.get(k, [])
        plans.append(tp)
    return plans


def build_plan(prog: StepProgram, metas: Sequence[ValueMeta], device_of_op: Sequence[int] | np.ndarray,
               tasks: list[list[Task]], *, rank: int, microbatches: int, fused: bool | None = None,
               recompute: bool = False) -> StepPlan:
    """The plan of device ``rank`` (raises a one-line ``ValueError`` for an inconsistent schedule).

    ``fused``: group the tasks into fused segments (None: :func:`placer.engine.segments.fused_default`);
    ``recompute``: checkpoint each segment (always fused then: the simulator's recomputation is per segment)."""
    dev = np.asarray(device_of_op, dtype=np.int64)
    num_devices = len(tasks)
    n = prog.n
    if len(dev) != n:
        raise ValueError(f"placement has {len(dev)} ops, the step has {n}")
    _validate(tasks, dev, microbatches, prog)
    cons = prog.consumers()
    has_bwd = np.array([metas[i].requires_grad for i in range(n)], dtype=bool)
    # remote devices reading each op, and which of their consumers run a backward that feeds a gradient back
    remote_devs = [sorted({int(dev[c]) for c in cons[i]} - {int(dev[i])}) for i in range(n)]
    local_view = np.array([prog.ops[i].kind == "compute" and has_bwd[i]
                           and any(int(dev[c]) == int(dev[i]) for c in cons[i]) for i in range(n)], dtype=bool)

    def grad_back(j: int, d: int) -> tuple[int, ...]:
        """Leaves of op j's output for which device d (a remote consumer) returns a gradient."""
        if not has_bwd[j]:
            return ()
        if not any(int(dev[c]) == d and has_bwd[c] for c in cons[j]):
            return ()
        return metas[j].grad_leaves

    # For every device, where its gradients of received values are sent: after the last local consumer's bwd.
    last_bwd: list[dict[tuple[int, int], int]] = []  # device -> (producer, mb) -> position of that bwd task
    for d, lst in enumerate(tasks):
        pos: dict[tuple[int, int], int] = {}
        for k, (i, m, p) in enumerate(lst):
            if p == "bwd" and has_bwd[i]:
                for j in prog.ops[i].inputs:
                    if int(dev[j]) != d and grad_back(j, d):
                        pos[(j, m)] = k
        last_bwd.append(pos)

    messages = _Messages(metas, rank)
    for src, lst in enumerate(tasks):
        grads_after: dict[int, list[tuple[int, int]]] = {}
        for key, k in last_bwd[src].items():
            grads_after.setdefault(k, []).append(key)
        for k, (i, m, p) in enumerate(lst):
            if p == "fwd":
                for dst in remote_devs[i]:
                    if metas[i].tensor_leaves:
                        messages.add(src, dst, "act", i, m, metas[i].tensor_leaves, k)
            elif p == "bwd":
                for (j, mb) in sorted(grads_after.get(k, ()), key=lambda t: -t[0]):
                    if grad_back(j, src):
                        messages.add(src, int(dev[j]), "grad", j, mb, grad_back(j, src), k)

    seqs = messages.seqs
    recvs = {src: seqs.get((src, rank), []) for src in range(num_devices) if src != rank}
    grad_in: dict[tuple[int, int], list[Message]] = {}
    for msgs in recvs.values():
        for msg in msgs:
            if msg.kind == "grad":
                grad_in.setdefault((msg.op, msg.mb), []).append(msg)
    plans = _task_plans(prog, dev, tasks[rank], rank, last_bwd[rank], grad_in, messages.sends_at)
    sent = np.zeros(num_devices, dtype=np.int64)
    for (src, dst), seq in seqs.items():
        if src == rank:
            sent[dst] = sum(msg.nbytes for msg in seq)
    if fused is None:
        fused = fused_default()
    segments = build_segments(prog, plans, dev, rank, has_bwd) if fused or recompute else None
    return StepPlan(rank=rank, num_devices=num_devices, microbatches=microbatches, device_of_op=dev,
                    tasks=plans, recvs=recvs, sent_bytes=sent, local_view=local_view, has_bwd=has_bwd,
                    segments=segments, recompute=recompute)
