"""Runs one device's share of training steps: its tasks in schedule order, with point-to-point transfers.

Fused segments (the default, :mod:`placer.engine.segments`): a device's run of consecutive ops of one micro-batch
runs as one forward over live, autograd-connected values and one ``autograd.backward`` from the outputs the
segment exposes; everything below then holds at segment instead of op granularity (a segment is a unit that reads
detached inputs). With ``PLACER_ENGINE_PER_OP=1`` the engine runs op by op, as follows.

Clean per-op autograd: every op runs on *detached* copies of its inputs (``requires_grad`` where the source
requires grad), so its backward task is one ``torch.autograd.backward(outputs, accumulated output grads)`` that
touches nothing but the op itself, whenever the schedule says. Input gradients land in the ``.grad`` of those
copies, which are shared by all consumers on a device (a received value is one set of leaves however many local
ops read it), so they accumulate before the producer (or the grad transfer back to it) reads them. Parameters are
used in place, so their gradients accumulate over micro-batches exactly as in single-device training. The
scale ``1/M`` is the seed gradient of each micro-batch's loss: the step loss is the mean of micro-batch losses.

Transfers are non-blocking ``dist.isend``/``dist.irecv`` (see :mod:`placer.engine.plan` for the tags); every
receive of a step is posted before the step's starting barrier, in the sender's order (see :func:`run_step` for
why), and every send is waited for at its end, so a device blocks only on data it needs now. That cannot deadlock
as long as the schedule respects the data dependencies (the per-device orders come from one global order).
Posting is part of the measured step. Note:
pre-posting allocates every receive buffer at the step start; peak-memory accounting counts a received
activation only from its first use (as if it had been received just in time).

Timestamps are ``time.perf_counter()`` pairs around each task (the waits for inputs excluded), cheap enough not
to distort the step. In a fused segment each op's forward is timed; the one backward call's span is split among
its tasks in proportion to their forward times (so busy time sums are exact, per-op backward times estimated).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from placer.engine.plan import Message, StepPlan
from placer.engine.program import StepProgram, ValueMeta
from placer.engine.memory import MemoryTracker, optimizer_state_bytes
from placer.engine.record import StepRecord, split_times
from placer.engine.segments import Segment
from placer.engine.wire import WIRE_DTYPE as _WIRE_DTYPE
from placer.engine.wire import backward as _backward
from placer.engine.wire import split as _split
from placer.engine.wire import unwire as _unwire
from placer.engine.wire import wire as _wire

log = logging.getLogger(__name__)

__all__ = ["MemoryTracker", "optimizer_state_bytes", "run_step"]

def run_step(prog: StepProgram, metas: Sequence[ValueMeta], plan: StepPlan, inputs: Sequence[Sequence[Any]], *,
             device: torch.device, comm_device: Callable[[int], torch.device], update: Callable[[], None] | None,
             memory: MemoryTracker | None, fault: Callable[[int], None] | None = None) -> StepRecord:
    """Run one training step of device ``plan.rank``.

    ``inputs[m]`` are the step inputs of micro-batch ``m``; ``comm_device(peer)`` is where tensors exchanged
    with ``peer`` live (CPU for gloo, this GPU for NCCL); ``update`` runs the optimizer (None: skip it);
    ``fault(task_position)`` is a test hook.
    """
    step = _Step(prog, metas, plan, inputs, device=device, comm_device=comm_device, memory=memory)
    rec = step.rec
    perf = time.perf_counter
    hooks = (torch.autograd.graph.saved_tensors_hooks(memory.pack, lambda t: t) if memory is not None
             else contextlib.nullcontext())
    # Every receive of the step is posted before the starting barrier, so the barrier also carries each side's
    # "receive posted" notices to the other: gloo writes a message's data from the ``isend`` call only once it
    # has read that notice, and a notice still unread at the send is left to gloo's transport thread, which
    # waits for this core's compute thread to block (a step's early messages then arrived 1.9 ms after their send
    # on average, 0.10 ms with this order: the early send of benchmarks/bench_latency.py). Posting costs gloo
    # ~10-20 us of CPU a receive and stays part of the step:
    # t0 is moved back by it.
    s_post = perf()
    step.post_receives()
    post_s = perf() - s_post
    dist.barrier()
    rec.t0 = perf() - post_s
    with hooks:
        if plan.segments is not None:
            _run_segments(step, plan.segments, update, fault)
        else:
            for k, tp in enumerate(plan.tasks):
                if fault is not None:
                    fault(k)
                phase = tp.phase
                if phase == "fwd":
                    step.forward(k, tp)
                elif phase == "bwd":
                    step.backward(k, tp)
                else:  # update
                    s = perf()
                    if update is not None:
                        update()
                    rec.task_times.append((k, s, perf()))
        step.drain()
        rec.t1 = perf()
    step.write_state()
    rec.losses = [float(x) for x in rec.losses]
    if memory is not None:
        rec.peak_dynamic_bytes = memory.peak
    return rec


def _run_segments(step: "_Step", segments: Sequence[Segment], update: Callable[[], None] | None,
                  fault: Callable[[int], None] | None) -> None:
    """Fused execution: one forward / backward per segment (a segment's time is recorded at its first task)."""
    rec, perf = step.rec, time.perf_counter
    for seg in segments:
        if fault is not None:
            for k in seg.positions:
                fault(k)
        if seg.phase == "fwd":
            step.forward_segment(seg)
        elif seg.phase == "bwd":
            step.backward_segment(seg)
        else:  # update
            s = perf()
            if update is not None:
                update()
            rec.task_times.append((seg.positions[0], s, perf()))


class _Step:
    """The state one step's tasks share on this device: values per micro-batch, outputs awaiting backward, the
    posted receives and sends (:func:`run_step` drives it task by task)."""

    def __init__(self, prog: StepProgram, metas: Sequence[ValueMeta], plan: StepPlan,
                 inputs: Sequence[Sequence[Any]], *, device: torch.device,
                 comm_device: Callable[[int], torch.device], memory: MemoryTracker | None) -> None:
        self.prog, self.metas, self.plan = prog, metas, plan
        self.inputs = [prog.placeholder_values(x) for x in inputs]  # per micro-batch, as the placeholders take them
        self.device, self.comm_device, self.memory = device, comm_device, memory
        self.env: list[dict[int, Any]] = [{} for _ in range(plan.microbatches)]
        self.outs: dict[tuple[int, int], list[Any]] = {}
        self.views: dict[tuple[int, int], list[Any]] = {}
        self.recvd: dict[tuple[int, int], list[Any]] = {}
        self.pending_sends: list[tuple[Any, torch.Tensor]] = []
        self.act_recvs: dict[tuple[int, int], list[tuple[Message, torch.Tensor, Any]]] = {}
        self.grad_recvs: dict[tuple[int, int], tuple[torch.Tensor, Any]] = {}
        self.waited: set[tuple[int, int]] = set()
        self.seed: torch.Tensor | None = None
        self.fwd_marks: dict[tuple[int, int], list[float]] = {}
        self.rec = StepRecord(t0=0.0, t1=0.0, task_times=[])

    def post_receives(self) -> None:
        """Post every receive of the step, in each sender's order."""
        metas = self.metas
        for src, msgs in self.plan.recvs.items():
            cdev = self.comm_device(src)
            for msg in msgs:
                dtype = metas[msg.op].leaves[msg.leaves[0]].dtype
                buf = torch.empty(msg.numel, dtype=_WIRE_DTYPE.get(dtype, dtype), device=cdev)
                work = dist.irecv(buf, src=src, tag=msg.tag)
                if msg.kind == "act":
                    self.act_recvs.setdefault((msg.op, msg.mb), []).append((msg, buf, work))
                else:
                    self.grad_recvs[(src, msg.tag)] = (buf, work)

    def send(self, msg: Message, tensors: list[torch.Tensor], rec: Any) -> None:
        """Post ``msg`` (``tensors`` packed for the wire); the send is waited for at the step's end.

        On gloo the core is yielded first: a message that arrived while this worker computed has woken gloo's
        transport thread, which shares this worker's core, and an ``isend`` issued before that thread has run
        often blocked on it for a scheduler tick (~4 ms; the exchange in ``benchmarks/bench_latency.py``)."""
        t = _wire(tensors, self.comm_device(msg.dst))
        if t.device.type == "cpu":
            os.sched_yield()
        rec.send_times[(msg.dst, msg.tag)] = time.perf_counter()
        self.pending_sends.append((dist.isend(t, dst=msg.dst, tag=msg.tag), t))

    def _receive_inputs(self, tp: Any) -> None:
        """Wait for the remote inputs first needed by forward task ``tp`` and unpack them into its micro-batch."""
        m, metas, memory, rec, perf = tp.mb, self.metas, self.memory, self.rec, time.perf_counter
        for j in tp.wait_values:
            meta = metas[j]
            leaves = [leaf.const for leaf in meta.leaves]
            for msg, buf, work in self.act_recvs.pop((j, m), ()):
                work.wait()
                rec.recv_times[(msg.src, msg.tag)] = perf()
                self.waited.add((msg.src, msg.tag))
                for leaf_k, t in zip(msg.leaves, _split(buf, meta, msg.leaves)):
                    t = _unwire(t, meta.leaves[leaf_k].dtype, self.device)
                    if meta.leaves[leaf_k].requires_grad:
                        t.requires_grad_(True)
                    leaves[leaf_k] = t
            self.recvd[(j, m)] = leaves
            self.env[m][j] = meta.unflatten(leaves)
            if memory is not None:
                memory.begin()
                memory.end(("recv", j, m), leaves)

    def forward(self, k: int, tp: Any) -> None:
        """Forward task ``k``: run the op on its (local or received) inputs and post its sends."""
        if tp.wait_values:
            self._receive_inputs(tp)
        i, m, memory, rec, perf = tp.op, tp.mb, self.memory, self.rec, time.perf_counter
        env = self.env[m]
        plan = self.plan
        s = perf()
        op = self.prog.ops[i]
        if memory is not None:
            memory.begin()
        if op.kind == "compute":
            v = op.run([env[j] for j in op.inputs])
        elif op.kind == "input":
            v = self.inputs[m][op.input_position]
        else:
            v = op.attr
        if isinstance(v, torch.Tensor):
            leaves = [v]
            spec = None
        else:
            leaves, spec = tree_flatten(v)
        if plan.local_view[i]:
            vl = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.requires_grad else x
                  for x in leaves]
            self.views[(i, m)] = vl
            env[i] = vl[0] if spec is None else self.metas[i].unflatten(vl)
        else:
            env[i] = v
        has_bwd = plan.has_bwd[i]
        if has_bwd:
            self.outs[(i, m)] = leaves
        if i == self.prog.loss_op:
            rec.losses.append(leaves[0].detach())
        for msg in tp.sends:
            self.send(msg, [leaves[leaf_k] for leaf_k in msg.leaves], rec)
        if memory is not None:
            memory.end((i, m), leaves if has_bwd else ())
        rec.task_times.append((k, s, perf()))

    def backward(self, k: int, tp: Any) -> None:
        """Backward task ``k``: sum the local and received output gradients, backpropagate through the op, and
        send the gradients of received values back after their last local consumer."""
        i, m, metas, memory, rec, perf = tp.op, tp.mb, self.metas, self.memory, self.rec, time.perf_counter
        got: dict[int, list[torch.Tensor]] = {}
        for msg in tp.grad_recvs:
            buf, work = self.grad_recvs[(msg.src, msg.tag)]
            work.wait()
            rec.recv_times[(msg.src, msg.tag)] = perf()
            self.waited.add((msg.src, msg.tag))
            for leaf_k, t in zip(msg.leaves, _split(buf, metas[i], msg.leaves)):
                got.setdefault(leaf_k, []).append(t)
        s = perf()
        if self.plan.has_bwd[i]:
            self._backprop(i, m, got)
            if memory is not None:
                memory.release((i, m))
        self._send_grads_and_release(tp, m, rec, memory)
        rec.task_times.append((k, s, perf()))

    def _send_grads_and_release(self, tp: Any, m: int, rec: Any, memory: Any) -> None:
        """After a backward task: send the gradients of the values it received (their last local consumer has
        run) and drop the received values it was the last to read."""
        for msg in tp.sends:
            xs = [self.recvd[(msg.op, msg.mb)][leaf_k] for leaf_k in msg.leaves]
            self.send(msg, [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs], rec)
        for j in tp.release_values:
            self.recvd.pop((j, m), None)
            if memory is not None:
                memory.release(("recv", j, m))

    def _backprop(self, i: int, m: int, got: dict[int, list[torch.Tensor]]) -> None:
        """``torch.autograd.backward`` through op ``i`` of micro-batch ``m`` with its summed output gradients (the
        loss op's seed is ``1/M``)."""
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        self._grad_pairs(i, m, got, tensors, grads)
        if tensors:
            _backward(tensors, grads)

    def _grad_pairs(self, i: int, m: int, got: dict[int, list[torch.Tensor]], tensors: list[torch.Tensor],
                    grads: list[torch.Tensor]) -> None:
        """Append op ``i``'s output leaves (micro-batch ``m``) and their summed gradients: a local view's ``.grad``,
        the received ones ``got[leaf]``, the loss seed."""
        metas = self.metas
        leaves = self.outs.pop((i, m))
        vl = self.views.pop((i, m), None)
        for leaf_k in metas[i].grad_leaves:
            g = vl[leaf_k].grad if vl is not None else None
            for buf in got.get(leaf_k, ()):
                buf = _unwire(buf, metas[i].leaves[leaf_k].dtype, self.device)
                g = buf if g is None else g + buf
            if i == self.prog.loss_op:
                if self.seed is None:
                    self.seed = torch.full_like(leaves[leaf_k].detach(), 1.0 / self.plan.microbatches)
                g = self.seed if g is None else g + self.seed
            if g is not None:
                tensors.append(leaves[leaf_k])
                grads.append(g)

    def forward_segment(self, seg: Segment) -> None:
        """Run a fused segment's ops on live (autograd-connected) values; expose its outputs, post its sends."""
        tasks = self.plan.tasks
        first = tasks[seg.positions[0]]
        if first.wait_values:
            self._receive_inputs(first)
        m, memory, rec, perf = seg.mb, self.memory, self.rec, time.perf_counter
        env = self.env[m]
        s = perf()
        if memory is not None:
            memory.begin()
        marks: list[float] = []
        if self.plan.recompute:
            self._checkpointed(seg, env, marks)
        else:
            self._run_ops(seg.ops, m, env, marks)
        kept: list[Any] = []
        for i in seg.outputs:
            v = env[i]
            leaves = [v] if isinstance(v, torch.Tensor) else tree_flatten(v)[0]
            self.outs[(i, m)] = leaves
            kept.extend(leaves)
        if self.prog.loss_op in seg.ops:
            rec.losses.append(env[self.prog.loss_op].detach())
        for k in seg.positions:
            for msg in tasks[k].sends:
                v = env[msg.op]
                leaves = [v] if isinstance(v, torch.Tensor) else tree_flatten(v)[0]
                self.send(msg, [leaves[leaf_k] for leaf_k in msg.leaves], rec)
        for i in seg.views:  # local readers outside the segment get detached leaves collecting their gradients
            v = env[i]
            leaves = [v] if isinstance(v, torch.Tensor) else tree_flatten(v)[0]
            vl = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.requires_grad else x
                  for x in leaves]
            self.views[(i, m)] = vl
            env[i] = vl[0] if isinstance(v, torch.Tensor) else self.metas[i].unflatten(vl)
        if memory is not None:
            memory.end(("seg", seg.ops[0], m), kept)
        marks[0] = s
        marks.append(perf())
        rec.task_times.extend((k, marks[n], marks[n + 1]) for n, k in enumerate(seg.positions))
        self.fwd_marks[(seg.ops[0], m)] = marks

    def _run_ops(self, op_ids: Sequence[int], m: int, env: dict[int, Any], marks: list[float] | None) -> None:
        """Run ops in order on ``env`` (values by op), ``marks`` getting each op's start time."""
        ops = self.prog.ops
        for i in op_ids:
            if marks is not None:
                marks.append(time.perf_counter())
            op = ops[i]
            if op.kind == "compute":
                try:
                    env[i] = op.run([env[j] for j in op.inputs])
                except Exception as e:  # name the op: the one line a failed result carries says where
                    e.add_note(f"at op {op.name!r}, micro-batch {m}")
                    raise
            elif op.kind == "input":
                env[i] = self.inputs[m][op.input_position]
            else:
                env[i] = op.attr

    def _checkpointed(self, seg: Segment, env: dict[int, Any], marks: list[float]) -> None:
        """The segment's ops under ``torch.utils.checkpoint`` (non-reentrant): autograd keeps only the values it
        reads from outside; its backward runs the ops again. Only the values used outside it reach ``env``."""
        inside = set(seg.ops)
        ext = sorted({j for i in seg.ops for j in self.prog.ops[i].inputs if j not in inside})
        tasks = self.plan.tasks
        needed = {*seg.outputs, *seg.exposed, *(msg.op for k in seg.positions for msg in tasks[k].sends),
                  *(i for i, _ in self.prog.state_writes)}
        if self.prog.loss_op in inside:
            needed.add(self.prog.loss_op)
        keep = [i for i in seg.ops if i in needed]
        first = [True]

        def body(*vals: Any) -> tuple[Any, ...]:
            local = dict(zip(ext, vals))
            self._run_ops(seg.ops, seg.mb, local, marks if first[0] else None)  # the recomputation: no marks
            first[0] = False
            return tuple(local[i] for i in keep)

        env.update(zip(keep, checkpoint(body, *(env[j] for j in ext), use_reentrant=False)))

    def backward_segment(self, seg: Segment) -> None:
        """One ``autograd.backward`` from the segment's outputs; then the gradients of received values go back."""
        tasks, metas = self.plan.tasks, self.metas
        m, memory, rec, perf = seg.mb, self.memory, self.rec, time.perf_counter
        got: dict[int, dict[int, list[torch.Tensor]]] = {}
        for msg in tasks[seg.positions[0]].grad_recvs:  # only the first task waits (segments.py)
            buf, work = self.grad_recvs[(msg.src, msg.tag)]
            work.wait()
            rec.recv_times[(msg.src, msg.tag)] = perf()
            self.waited.add((msg.src, msg.tag))
            for leaf_k, t in zip(msg.leaves, _split(buf, metas[msg.op], msg.leaves)):
                got.setdefault(msg.op, {}).setdefault(leaf_k, []).append(t)
        s = perf()
        tensors: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        for i in seg.outputs:
            self._grad_pairs(i, m, got.get(i, {}), tensors, grads)
        if tensors:
            _backward(tensors, grads)
        if memory is not None:
            memory.release(("seg", seg.ops[0], m))
        for k in seg.positions:
            self._send_grads_and_release(tasks[k], m, rec, memory)
        split_times(rec, seg.positions, s, perf(), self.fwd_marks.pop((seg.ops[0], m), None))

    def write_state(self) -> None:
        """Each buffer the step updated in place here takes its updated value from the last micro-batch (the ops
        ran out of place), so the next step reads it as on one device; with ``M`` micro-batches every one of them
        read the step's starting value."""
        last = self.env[-1]
        with torch.no_grad():
            for i, buffer in self.prog.state_writes:
                if i in last:
                    buffer.copy_(last[i])

    def drain(self) -> None:
        """Complete the receives nobody consumed (e.g. a value whose readers skip backward) and every send."""
        for pairs in self.act_recvs.values():
            for _msg, _, work in pairs:
                work.wait()
        for key, (_, work) in self.grad_recvs.items():
            if key not in self.waited:
                work.wait()
        for work, _ in self.pending_sends:
            work.wait()
