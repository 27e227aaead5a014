"""The ``pipelining`` backend: stage-contiguous placements run by ``torch.distributed.pipelining``.

When every device holds contiguous ranges of ops (stages) in device order — stage ``s`` on device ``s % D``,
one stage per device for ``gpipe``/``1f1b``, several for ``interleaved-1f1b`` — the step can be handed to
PyTorch's own pipeline runtime (``PipelineStage`` with ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleInterleaved1F1B``; Huang et al. 2019, Narayanan et al. 2021) instead of the op-level executor.
Model inputs enter at the first stage (the data loader's place), so the placement of ``input`` ops is ignored.

Stages are built from the compiled ops rather than with ``torch.fx.passes.split_module``: a pipeline stage may
only receive the previous stage's outputs, so every value a later stage needs (including the integer targets)
must be passed through the stages in between, tuple values (``LSTMCell``'s ``(h, c)``) must travel as tensor
leaves, and shape-derived Python ints (``x.size(0)``) cannot travel at all — they are constants of the
micro-batch shape (see :func:`placer.engine.program.describe_values`) and are substituted in place.
``split_module`` gives none of that. Each :class:`StageModule` runs its ops with ordinary autograd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

from placer.engine.command import MeasureCommand
from placer.engine.executor import MemoryTracker, optimizer_state_bytes
from placer.engine.program import StepProgram, ValueMeta, split_microbatch

__all__ = ["StageLayout", "stage_layout", "StageModule", "run_pipelined"]

Item = tuple[int, int]  # (producer op, leaf index) of a tensor carried between stages


@dataclass(frozen=True)
class StageLayout:
    stage_of_op: np.ndarray
    """Stage of every compute op (-1 for inputs and attributes, which are not placed in stages)."""
    device_of_stage: tuple[int, ...]
    num_stages: int


def stage_layout(prog: StepProgram, device_of_op: Sequence[int] | np.ndarray, num_devices: int,
                 schedule: str = "gpipe") -> StageLayout:
    """The stages of a placement, or a one-line ``ValueError`` when the pipelining backend cannot run it."""
    if schedule not in ("gpipe", "1f1b", "interleaved-1f1b"):
        raise ValueError(f"the pipelining backend runs gpipe, 1f1b or interleaved-1f1b, not {schedule!r}")
    dev = np.asarray(device_of_op, dtype=np.int64)
    stage = np.full(prog.n, -1, dtype=np.int64)
    devs: list[int] = []
    for op in prog.ops:
        if op.kind != "compute":
            continue
        d = int(dev[op.index])
        if not devs or devs[-1] != d:
            devs.append(d)
        stage[op.index] = len(devs) - 1
    if not devs:
        raise ValueError("the step has no compute ops")
    s = len(devs)
    if s % num_devices or any(d != k % num_devices for k, d in enumerate(devs)):
        raise ValueError(f"the pipelining backend needs stage k on device k % {num_devices} with every device "
                         f"used equally; this placement's stages are on devices {devs[:8]}"
                         f"{'...' if s > 8 else ''} (use backend 'ops')")
    if schedule != "interleaved-1f1b" and s != num_devices:
        raise ValueError(f"{schedule} with the pipelining backend needs one contiguous stage per device, got "
                         f"{s} stages on {num_devices} devices (use interleaved-1f1b or backend 'ops')")
    return StageLayout(stage_of_op=stage, device_of_stage=tuple(devs), num_stages=s)


def _carried(prog: StepProgram, metas: Sequence[ValueMeta], layout: StageLayout) -> list[list[Item]]:
    """``out[s]``: tensor leaves stage ``s`` hands to stage ``s + 1`` (everything a later stage reads)."""
    cons = prog.consumers()
    s_count = layout.num_stages
    last_use = np.full(prog.n, -1, dtype=np.int64)
    avail = np.full(prog.n, s_count, dtype=np.int64)  # first stage at which the value exists
    for op in prog.ops:
        if op.kind == "input":
            avail[op.index] = 0
        elif op.kind == "compute":
            avail[op.index] = layout.stage_of_op[op.index]
        for c in cons[op.index]:
            last_use[op.index] = max(last_use[op.index], layout.stage_of_op[c])
    out: list[list[Item]] = []
    for s in range(s_count - 1):
        items = [(i, k) for i in range(prog.n) if prog.ops[i].kind != "get_attr" and avail[i] <= s < last_use[i]
                 for k in metas[i].tensor_leaves]
        out.append(items)
    return out


class StageModule(nn.Module):
    """One pipeline stage: ``forward(*tensors)`` runs the stage's ops on the carried values."""

    def __init__(self, prog: StepProgram, metas: Sequence[ValueMeta], ops: list[int], in_items: list[Item] | None,
                 out_items: list[Item] | None, params: list[nn.Parameter]) -> None:
        super().__init__()
        self._prog = prog
        self._metas = metas
        self._ops = ops
        self._in = in_items  # None: the first stage, whose inputs are the model's inputs
        self._out = out_items  # None: the last stage, which returns the loss
        self._inputs = [op.index for op in prog.ops if op.kind == "input"]
        # registered so that PipelineStage / the optimizer see this stage's parameters
        self.owned = nn.ParameterList(params)

    def forward(self, *flat: torch.Tensor) -> Any:
        env: dict[int, Any] = {}
        if self._in is None:
            for i, x in zip(self._inputs, flat):
                env[i] = x
        else:
            leaves: dict[int, list[Any]] = {}
            for (i, k), x in zip(self._in, flat):
                leaves.setdefault(i, [leaf.const for leaf in self._metas[i].leaves])[k] = x
            for i, lv in leaves.items():
                env[i] = self._metas[i].unflatten(lv)
        ops = self._prog.ops
        for i in self._ops:
            op = ops[i]
            for j in op.inputs:
                if j not in env:  # an attribute, or a constant produced by an earlier stage
                    if ops[j].kind == "get_attr":
                        env[j] = ops[j].attr
                    else:
                        meta = self._metas[j]
                        env[j] = meta.unflatten([leaf.const for leaf in meta.leaves])
            env[i] = op.run([env[j] for j in op.inputs])
        if self._out is None:
            return env[self._prog.loss_op]
        return tuple(tree_flatten(env[i])[0][k] for i, k in self._out)


def _identity_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output


def _example(metas: Sequence[ValueMeta], items: list[Item], device: torch.device) -> tuple[torch.Tensor, ...]:
    out = []
    for i, k in items:
        leaf = metas[i].leaves[k]
        t = torch.zeros(leaf.shape, dtype=leaf.dtype, device=device)
        out.append(t.requires_grad_(leaf.requires_grad) if t.is_floating_point() else t)
    return tuple(out)


def run_pipelined(runtime: Any, cmd: MeasureCommand, metas: list[ValueMeta], owned: list[tuple[str, nn.Parameter]],
                  fault: Any) -> dict[str, Any]:
    """Measure a step on this rank with ``torch.distributed.pipelining`` (same reply as the op-level path)."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,  # noqa: PLC0415
                                              ScheduleInterleaved1F1B)

    prog: StepProgram = runtime.prog
    rank, world, device = runtime.rank, runtime.world_size, runtime.device
    M = cmd.microbatches
    schedule = cmd.schedule
    layout = stage_layout(prog, cmd.device_of_op, world, schedule)
    carried = _carried(prog, metas, layout)
    mine = [s for s in range(layout.num_stages) if layout.device_of_stage[s] == rank]
    param_ids = {id(p) for _, p in owned}
    stages = []
    for s in mine:
        ops = [op.index for op in prog.ops if layout.stage_of_op[op.index] == s]
        params = [p for i in ops for _, p in prog.ops[i].params if id(p) in param_ids]
        params = list({id(p): p for p in params}.values())
        in_items = None if s == 0 else carried[s - 1]
        out_items = None if s == layout.num_stages - 1 else carried[s]
        mod = StageModule(prog, metas, ops, in_items, out_items, params)
        ex_in = (tuple(split_microbatch(list(runtime.inputs), M, 0)) if in_items is None
                 else _example(metas, in_items, device))
        ex_out = (torch.zeros((), device=device, requires_grad=True) if out_items is None
                  else _example(metas, out_items, device))
        stages.append(PipelineStage(mod, s, layout.num_stages, device, input_args=ex_in, output_args=ex_out))
    if schedule == "interleaved-1f1b":
        sched = ScheduleInterleaved1F1B(stages, M, loss_fn=_identity_loss)
    elif schedule == "1f1b":
        sched = Schedule1F1B(stages[0], M, loss_fn=_identity_loss)
    else:
        sched = ScheduleGPipe(stages[0], M, loss_fn=_identity_loss)
    return _measure_loop(runtime, cmd, sched, stages, layout, carried, metas, owned, fault)


class _StageTimer:
    """Wraps each stage's ``forward_one_chunk`` / ``backward_one_chunk`` to record ``(stage, chunk, phase, start,
    end)`` in :attr:`times` and, while :attr:`memory` is set, to account activation memory as the ops path does."""

    def __init__(self, stages: Sequence[Any]) -> None:
        self.times: list[tuple[int, int, str, float, float]] = []
        self.memory: MemoryTracker | None = None
        for st in stages:
            self._wrap(st)

    def _wrap(self, stage: Any) -> None:
        fwd, bwd = stage.forward_one_chunk, stage.backward_one_chunk
        perf = time.perf_counter

        def timed_fwd(chunk: int, *a: Any, **k: Any) -> Any:
            s = perf()
            memory = self.memory
            if memory is not None:
                memory.begin()
                with torch.autograd.graph.saved_tensors_hooks(memory.pack, lambda t: t):
                    out = fwd(chunk, *a, **k)
                memory.end((stage.stage_index, chunk))
            else:
                out = fwd(chunk, *a, **k)
            self.times.append((stage.stage_index, chunk, "fwd", s, perf()))
            return out

        def timed_bwd(chunk: int, *a: Any, **k: Any) -> Any:
            s = perf()
            out = bwd(chunk, *a, **k)
            if self.memory is not None:
                self.memory.release((stage.stage_index, chunk))
            self.times.append((stage.stage_index, chunk, "bwd", s, perf()))
            return out

        stage.forward_one_chunk, stage.backward_one_chunk = timed_fwd, timed_bwd


def _sent_bytes(layout: StageLayout, carried: list[list[Item]], metas: list[ValueMeta], rank: int, world: int,
                microbatches: int) -> np.ndarray:
    """Bytes this rank sends to each rank per step: activations to the next stage, gradients to the previous."""
    sent = np.zeros(world, dtype=np.int64)
    for st_idx in range(layout.num_stages):
        if layout.device_of_stage[st_idx] != rank:
            continue
        if st_idx + 1 < layout.num_stages:  # activations forward
            nxt = layout.device_of_stage[st_idx + 1]
            if nxt != rank:
                sent[nxt] += sum(metas[i].leaves[k].nbytes for i, k in carried[st_idx]) * microbatches
        if st_idx > 0:  # gradients back
            prv = layout.device_of_stage[st_idx - 1]
            if prv != rank:
                sent[prv] += sum(metas[i].leaves[k].nbytes for i, k in carried[st_idx - 1]
                                 if metas[i].leaves[k].requires_grad) * microbatches
    return sent


def _measure_loop(runtime: Any, cmd: MeasureCommand, sched: Any, stages: list[Any], layout: StageLayout,
                  carried: list[list[Item]], metas: list[ValueMeta], owned: list[tuple[str, nn.Parameter]],
                  fault: Any) -> dict[str, Any]:
    """Warm-up plus measured steps of the pipeline schedule on this rank, and the reply."""
    rank, device = runtime.rank, runtime.device
    perf = time.perf_counter
    params = [p for _, p in owned]
    opt = runtime.make_optimizer(params, cmd.optimizer, cmd.lr)
    update = cmd.update and opt is not None
    if update:
        runtime.dirty = True
    first = layout.device_of_stage[0] == rank
    last = layout.device_of_stage[-1] == rank
    batch = next(x.shape[0] for x in runtime.inputs if isinstance(x, torch.Tensor) and x.dim() > 0)
    target = torch.zeros(batch, device=device) if last else None
    timer = _StageTimer(stages)
    exclude = {p.untyped_storage().data_ptr() for p in runtime.prog.gm.parameters()}
    steps, warmup = cmd.steps, cmd.warmup
    t0s, t1s, tasks, losses_all, peaks = [], [], [], [], []
    for s in range(warmup + steps):
        for p in params:
            p.grad = None
        timer.times.clear()
        timer.memory = (MemoryTracker(exclude) if device.type != "cuda" and s == 0 and cmd.track_memory
                        else None)  # the first step only, as on the ops path
        losses: list[torch.Tensor] = []
        dist.barrier()
        t0 = perf()
        if fault is not None and s == warmup + steps - 1:
            fault(0)
        sched.step(*(runtime.inputs if first else ()), target=target, losses=losses if last else None,
                   return_outputs=False)
        u0 = perf()
        if update:
            opt.step()
        t1 = perf()
        if s >= warmup:
            t0s.append(t0)
            t1s.append(t1)
            tasks.append(list(timer.times) + [(-1, -1, "update", u0, t1)])
            losses_all.append([float(x.detach()) for x in losses])
            peaks.append(timer.memory.peak if timer.memory is not None else 0)
    sent = _sent_bytes(layout, carried, metas, rank, runtime.world_size, cmd.microbatches)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    reply: dict[str, Any] = {
        "ok": True, "rank": rank, "backend": "pipelining", "t0": t0s, "t1": t1s, "stage_tasks": tasks,
        "losses": losses_all, "sent_bytes": sent.tolist(),
        "peak_bytes": int(2 * param_bytes + optimizer_state_bytes(opt) + max(peaks, default=0)),
        "num_stages": layout.num_stages,
    }
    if cmd.collect:
        reply.update(runtime.collected(owned))
    return reply
