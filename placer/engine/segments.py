"""Fused segments: a device's maximal runs of consecutive ops that the engine runs as one forward and one backward.

Per-op execution (the engine's original mode) pays one Python dispatch chain and one ``autograd.backward`` call
per op, which is 1.2-1.5x eager PyTorch on small CNN / transformer configs. A *segment* groups ops of one
micro-batch whose forward tasks are consecutive in the device's task list and whose backward tasks are too, so
that inside it values flow as ordinary autograd-connected tensors (no detached copies) and the whole segment's
backward is one ``torch.autograd.backward`` over its outputs.

A run of forward tasks ``i_1 < ... < i_k`` (micro-batch ``m``) is one segment when

* only ``i_1`` waits for remote inputs (the segment receives once, at its start; sends of the ops inside are
  posted at its end, before the device's next wait, so delaying them cannot deadlock);
* the backward tasks of ``i_k, ..., i_1`` are consecutive in the task list and only ``i_k``'s (the first) waits
  for gradients from remote consumers;
* every local consumer outside the segment runs its backward before the segment's backward (true for the
  schedules' reverse op-index order within a micro-batch; checked anyway, else the run is split into single ops).

Why a closure over the per-op callables and not fx sub-modules: measured 2026-12-03 (one thread, core 0, 7
interleaved rounds), a whole-step forward + backward through the closure loop took 1.04x (nmt small), 1.02x (gpt
small), 1.01x (inception_v3 small) of the traced ``fx.GraphModule`` itself, the best an fx sub-module could do,
while splitting the graph and generating code per segment would cost milliseconds per placement planned.

A single-op segment behaves exactly like per-op execution. Which ops a segment must expose: those read by local
ops outside it (they read a detached *view* whose ``.grad`` collects their gradient), those with remote
consumers that send a gradient back, and the loss op (seeded with ``1/M``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from placer.engine.plan import TaskPlan
    from placer.engine.program import StepProgram

__all__ = ["Segment", "build_segments", "fused_default", "PER_OP_ENV"]

PER_OP_ENV = "PLACER_ENGINE_PER_OP"
"""Environment variable: ``1`` makes the engine run op by op (the comparison mode of the tests); default fused."""


def fused_default() -> bool:
    """Fused segments unless ``PLACER_ENGINE_PER_OP=1`` (read by each worker when it plans)."""
    return os.environ.get(PER_OP_ENV, "0") not in ("1", "true", "yes")


@dataclass(eq=False)
class Segment:
    """One forward or backward run of tasks executed as a unit (or the update task)."""

    phase: str
    """``fwd``, ``bwd`` or ``update``."""
    mb: int
    positions: tuple[int, ...]
    """Task positions covered, consecutive, in execution order (the first is the one that waits)."""
    ops: tuple[int, ...]
    """Ops of the segment in forward (op-index) order."""
    views: tuple[int, ...] = ()
    """Ops whose output local consumers outside the segment read as a detached view."""
    outputs: tuple[int, ...] = ()
    """Ops whose output the segment's backward starts from (views, remote gradients, the loss)."""
    exposed: tuple[int, ...] = ()
    """Ops whose output local consumers outside the segment read (the views and values without a gradient)."""


def _local_consumers(prog: "StepProgram", dev: Sequence[int], rank: int) -> list[list[int]]:
    cons: list[list[int]] = [[] for _ in prog.ops]
    for op in prog.ops:
        if int(dev[op.index]) == rank:
            for j in op.inputs:
                cons[j].append(op.index)
    return cons


def _runs(tasks: "Sequence[TaskPlan]", bwd_pos: dict[tuple[int, int], int]) -> list[list[int]]:
    """Forward positions grouped by the segment rules (before the consumer check)."""
    runs: list[list[int]] = []
    cur: list[int] = []
    for k, tp in enumerate(tasks):
        if tp.phase != "fwd":
            if cur:
                runs.append(cur)
            cur = []
            continue
        if cur:
            last = tasks[cur[-1]]
            b_last, b_new = bwd_pos.get((last.op, last.mb)), bwd_pos.get((tp.op, tp.mb))
            if (tp.mb == last.mb and not tp.wait_values and b_last is not None and b_new == b_last - 1
                    and not tasks[b_last].grad_recvs):
                cur.append(k)
                continue
            runs.append(cur)
        cur = [k]
    if cur:
        runs.append(cur)
    return runs


def build_segments(prog: "StepProgram", tasks: "Sequence[TaskPlan]", dev: Sequence[int], rank: int,
                   has_bwd: Sequence[bool]) -> list[Segment]:
    """This device's tasks as segments in execution order (every task in exactly one segment)."""
    bwd_pos = {(tp.op, tp.mb): k for k, tp in enumerate(tasks) if tp.phase == "bwd"}
    local = _local_consumers(prog, dev, rank)
    groups: list[list[int]] = []
    for run in _runs(tasks, bwd_pos):
        m = tasks[run[0]].mb
        ops = {tasks[k].op for k in run}
        first_bwd = bwd_pos[(tasks[run[-1]].op, m)] if len(run) > 1 else None
        ok = first_bwd is None or all(bwd_pos.get((c, m), -1) < first_bwd
                                      for i in ops for c in local[i] if c not in ops)
        groups.extend([run] if ok else [[k] for k in run])
    segs: list[Segment] = []
    covered: set[int] = set()
    for run in groups:
        m = tasks[run[0]].mb
        ops = tuple(tasks[k].op for k in run)
        members = set(ops)
        exposed = tuple(i for i in ops if any(c not in members for c in local[i]))
        views = tuple(i for i in exposed if prog.ops[i].kind == "compute" and has_bwd[i])
        bpos = tuple(bwd_pos[(i, m)] for i in reversed(ops) if (i, m) in bwd_pos)
        remote_grad = {i for i in ops if (i, m) in bwd_pos and tasks[bwd_pos[(i, m)]].grad_recvs}
        outputs = tuple(i for i in ops if has_bwd[i] and (i in views or i in remote_grad or i == prog.loss_op))
        segs.append(Segment("fwd", m, tuple(run), ops, views, outputs, exposed))
        covered.update(run)
        if bpos:
            segs.append(Segment("bwd", m, bpos, ops, views, outputs, exposed))
            covered.update(bpos)
    for k, tp in enumerate(tasks):  # the update, and backward tasks of ops without a forward here (none today)
        if k not in covered:
            segs.append(Segment(tp.phase, tp.mb, (k,), (tp.op,) if tp.op >= 0 else ()))
    segs.sort(key=lambda s: s.positions[0])
    return segs
