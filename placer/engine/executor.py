"""Runs one device's share of training steps: its tasks in schedule order, with point-to-point transfers.

Clean per-op autograd: every op runs on *detached* copies of its inputs (``requires_grad`` where the source
requires grad), so its backward task is one ``torch.autograd.backward(outputs, accumulated output grads)`` that
touches nothing but the op itself, whenever the schedule says. Input gradients land in the ``.grad`` of those
copies, which are shared by all consumers on a device (a received value is one set of leaves however many local
ops read it), so they accumulate before the producer (or the grad transfer back to it) reads them. Parameters are
used in place, so their gradients accumulate over micro-batches exactly as in single-device training. The
scale ``1/M`` is the seed gradient of each micro-batch's loss: the step loss is the mean of micro-batch losses.

Transfers are non-blocking ``dist.isend``/``dist.irecv`` (see :mod:`placer.engine.plan` for the tags); every
receive of a step is posted at its start, in the sender's order, and every send is waited for at its end, so a
device blocks only on data it needs now. That cannot deadlock as long as the schedule respects the data
dependencies (the per-device orders come from one global order). Posting is part of the measured step. Note:
pre-posting allocates every receive buffer at the step start; peak-memory accounting counts a received
activation only from its first use (as if it had been received just in time).

Timestamps are ``time.perf_counter()`` pairs around each task (the waits for inputs excluded), cheap enough not
to distort the step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_flatten

from placer.engine.plan import Message, StepPlan
from placer.engine.program import StepProgram, ValueMeta

log = logging.getLogger(__name__)

__all__ = ["StepRecord", "MemoryTracker", "optimizer_state_bytes", "run_step"]

_WIRE_DTYPE = {torch.bool: torch.uint8}  # gloo has no bool

try:  # the C++ engine directly: torch.autograd.backward re-validates every gradient (~20 us per call here)
    from torch.autograd.variable import Variable as _Variable

    _run_backward = _Variable._execution_engine.run_backward
except (ImportError, AttributeError):  # pragma: no cover - other torch versions
    _run_backward = None


def _backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``torch.autograd.backward(tensors, grads)`` for gradients already of the right shape, dtype and device."""
    if _run_backward is None:  # pragma: no cover
        torch.autograd.backward(tensors, grads)
    else:
        _run_backward(tuple(tensors), tuple(grads), False, False, (), True, True)


@dataclass(eq=False)
class StepRecord:
    """What one device saw in one step (absolute ``perf_counter`` seconds)."""

    t0: float
    t1: float
    task_times: list[tuple[int, float, float]]
    """``(task position, start, end)`` per executed task."""
    send_times: dict[tuple[int, int], float] = field(default_factory=dict)
    """``(dst, tag) -> time the isend was posted``."""
    recv_times: dict[tuple[int, int], float] = field(default_factory=dict)
    """``(src, tag) -> time the data was in hand here`` (when the wait returned: an upper bound on arrival)."""
    losses: list[float] = field(default_factory=list)
    """Loss of each micro-batch, on the device holding the loss op."""
    peak_dynamic_bytes: int = 0

    @property
    def busy_s(self) -> float:
        return sum(e - s for _, s, e in self.task_times)


def optimizer_state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state tensors (momenta...); 0 without an optimizer."""
    if opt is None:
        return 0
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


class MemoryTracker:
    """Own accounting of activation memory on CPU devices (CUDA uses the allocator's peak instead).

    Live bytes = tensors autograd saved for backward (unique storages, parameters excluded) plus the op's own
    outputs, from an op's forward until its backward, plus received activations from first use until their
    gradient is returned. Counted through ``torch.autograd.graph.saved_tensors_hooks``, which costs ~25 us per
    op, so the worker tracks only the first step of a measurement (the peak is the same every step). The
    device's peak reported in a :class:`StepResult` adds parameters, gradients and optimizer state.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.seen: set[int] = set()
        self.live = 0
        self.peak = 0
        self._cur: list[int] = []
        self.owned: dict[Any, tuple[int, list[int]]] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self._add(t)
        return t

    def _add(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            p = st.data_ptr()
            if p and p not in self.seen and p not in self.exclude:
                self.seen.add(p)
                self._cur.append(p)
                self._bytes += st.nbytes()

    def begin(self) -> None:
        self._cur = []
        self._bytes = 0

    def end(self, key: Any, extra: Sequence[Any] = ()) -> None:
        for t in extra:
            self._add(t)
        if self._cur:
            self.owned[key] = (self._bytes, self._cur)
            self.live += self._bytes
            self.peak = max(self.peak, self.live)

    def release(self, key: Any) -> None:
        got = self.owned.pop(key, None)
        if got is not None:
            self.live -= got[0]
            self.seen.difference_update(got[1])


def _wire(ts: Sequence[torch.Tensor], comm_device: torch.device) -> torch.Tensor:
    """The leaves of one message as one flat, contiguous buffer of a dtype gloo knows, on the comm device."""
    t = ts[0].detach().reshape(-1) if len(ts) == 1 else torch.cat([x.detach().reshape(-1) for x in ts])
    if t.dtype in _WIRE_DTYPE:
        t = t.to(_WIRE_DTYPE[t.dtype])
    if t.device != comm_device:
        t = t.to(comm_device)
    return t.contiguous()


def _split(buf: torch.Tensor, meta: ValueMeta, leaves: Sequence[int]) -> list[torch.Tensor]:
    """Views of a received flat buffer, one per leaf, in the leaves' shapes."""
    if len(leaves) == 1:
        return [buf.view(meta.leaves[leaves[0]].shape).detach()]  # detached: an autograd leaf, not a view
    out, at = [], 0
    for k in leaves:
        shape = meta.leaves[k].shape
        n = 1
        for d in shape:
            n *= d
        out.append(buf[at:at + n].view(shape).detach())
        at += n
    return out


def _unwire(buf: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if buf.dtype != dtype:
        buf = buf.to(dtype)
    if buf.device != device:
        buf = buf.to(device)
    return buf


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
             else _NullContext())
    dist.barrier()
    rec.t0 = perf()  # posting the receives is part of the step: gloo spends ~10-20 us of CPU on each
    step.post_receives()
    with hooks:
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
    rec.losses = [float(x) for x in rec.losses]
    if memory is not None:
        rec.peak_dynamic_bytes = memory.peak
    return rec


class _Step:
    """The state one step's tasks share on this device: values per micro-batch, outputs awaiting backward, the
    posted receives and sends (:func:`run_step` drives it task by task)."""

    def __init__(self, prog: StepProgram, metas: Sequence[ValueMeta], plan: StepPlan,
                 inputs: Sequence[Sequence[Any]], *, device: torch.device,
                 comm_device: Callable[[int], torch.device], memory: MemoryTracker | None) -> None:
        self.prog, self.metas, self.plan, self.inputs = prog, metas, plan, inputs
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
            t = _wire([leaves[leaf_k] for leaf_k in msg.leaves], self.comm_device(msg.dst))
            rec.send_times[(msg.dst, msg.tag)] = perf()
            self.pending_sends.append((dist.isend(t, dst=msg.dst, tag=msg.tag), t))
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
        for msg in tp.sends:  # gradients of received values, after their last local consumer
            xs = [self.recvd[(msg.op, msg.mb)][leaf_k] for leaf_k in msg.leaves]
            t = _wire([x.grad if x.grad is not None else torch.zeros_like(x) for x in xs],
                      self.comm_device(msg.dst))
            rec.send_times[(msg.dst, msg.tag)] = perf()
            self.pending_sends.append((dist.isend(t, dst=msg.dst, tag=msg.tag), t))
        for j in tp.release_values:
            self.recvd.pop((j, m), None)
            if memory is not None:
                memory.release(("recv", j, m))
        rec.task_times.append((k, s, perf()))

    def _backprop(self, i: int, m: int, got: dict[int, list[torch.Tensor]]) -> None:
        """``torch.autograd.backward`` through op ``i`` of micro-batch ``m`` with its summed output gradients (the
        loss op's seed is ``1/M``)."""
        metas = self.metas
        leaves = self.outs.pop((i, m))
        vl = self.views.pop((i, m), None)
        tensors, grads = [], []
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
        if tensors:
            _backward(tensors, grads)

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


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
