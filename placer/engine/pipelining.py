"""The ``pipelining`` backend: stage-contiguous placements run by ``torch.distributed.pipelining``.

When every device holds contiguous ranges of ops (stages) in device order — stage ``s`` on device ``s % D``,
one stage per device for ``gpipe``/``1f1b``, several for ``interleaved-1f1b`` — the step can be handed to
PyTorch's own pipeline runtime (``PipelineStage`` with ``ScheduleGPipe`` / ``Schedule1F1B`` /
``ScheduleInterleaved1F1B``; Huang et al. 2019, Narayanan et al. 2021) instead of the op-level executor.
Model inputs enter at the first stage (the data loader's place), so the placement of ``input`` ops is ignored.

The stages are the project's one stage type, :class:`placer.engine.stages.StageModule` (the traced step cut with
``torch.fx.passes.split_module``; the trainers' loaders build the same): every value a later stage needs
(including the integer targets) is passed through the stages in between, tuple values (``LSTMCell``'s
``(h, c)``) travel as tensor leaves, and shape-derived Python ints (``x.size(0)``) are constants of the
micro-batch shape. Each stage runs its ops with ordinary autograd.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_map_only

from graphs.batch import batched_tensors, input_batches, split_inputs
from placer.engine.command import MeasureCommand
from placer.engine.executor import MemoryTracker, optimizer_state_bytes
from placer.engine.program import StepProgram
from placer.engine.stages import StageModule, split_stages

__all__ = ["StageLayout", "stage_layout", "plan_pipeline", "run_pipelined"]

STAGE_CACHE_SIZE = 8
"""Split placements a worker keeps (each holds its stages' example tensors of one micro-batch)."""

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


def _identity_loss(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output


def plan_pipeline(runtime: Any, cmd: MeasureCommand) -> tuple[StageLayout, list[StageModule]]:
    """The stages of ``cmd``'s placement (a one-line ``ValueError`` when this backend cannot run it), split from
    the traced step on the CPU (:func:`placer.engine.stages.split_stages`) with one micro-batch."""
    prog: StepProgram = runtime.prog
    layout = stage_layout(prog, cmd.device_of_op, runtime.world_size, cmd.schedule)
    key = (cmd.microbatches, layout.stage_of_op.tobytes())
    cache: dict[Any, list[StageModule]] = runtime.stage_cache
    if key not in cache:  # splitting runs the step once: do it once per placement and micro-batch count
        # inputs and attribute reads are not split (they enter at stage 0, or where they are read)
        stage_of = {op.name: max(0, int(layout.stage_of_op[op.index])) for op in prog.ops}
        runtime.all_on_cpu()  # the split runs the step on the CPU to record the values crossing each cut
        mb = split_inputs(runtime.cpu_inputs, cmd.microbatches, 0)
        if len(cache) >= STAGE_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = split_stages(prog.gm, stage_of, layout.num_stages, mb)
    return layout, cache[key]


def run_pipelined(runtime: Any, cmd: MeasureCommand, layout: StageLayout, modules: list[StageModule],
                  owned: list[tuple[str, nn.Parameter]], fault: Any) -> dict[str, Any]:
    """Measure a step on this rank with ``torch.distributed.pipelining`` (same reply as the op-level path)."""
    from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,  # noqa: PLC0415
                                              ScheduleInterleaved1F1B)

    rank, device = runtime.rank, runtime.device
    M = cmd.microbatches
    schedule = cmd.schedule
    stages = []
    for s in range(layout.num_stages):
        if layout.device_of_stage[s] != rank:
            continue
        mod = modules[s]
        mod.recompute = rank in cmd.recompute
        # static shapes from the recorded micro-batch (runtime shape inference would run the stage once on
        # uninitialised receive buffers)
        ex_in = tuple(t.to(device) for t in mod.example_in)  # tensors only (stage 0: the batched ones)
        ex_out = tree_map_only(torch.Tensor, lambda t: t.to(device), mod.example_out)
        stages.append(PipelineStage(mod, s, layout.num_stages, device, input_args=ex_in, output_args=ex_out))
    # Gradients are divided by M once per parameter after the step (_measure_loop): torch divides each stage's,
    # so a parameter two stages of this rank share (a tied embedding and head, interleaved) was divided twice.
    if schedule == "interleaved-1f1b":
        sched = ScheduleInterleaved1F1B(stages, M, loss_fn=_identity_loss, scale_grads=False)
    elif schedule == "1f1b":
        sched = Schedule1F1B(stages[0], M, loss_fn=_identity_loss, scale_grads=False)
    else:
        sched = ScheduleGPipe(stages[0], M, loss_fn=_identity_loss, scale_grads=False)
    return _measure_loop(runtime, cmd, sched, stages, layout, modules, owned, fault)


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


def _sent_bytes(layout: StageLayout, modules: list[StageModule], rank: int, world: int,
                microbatches: int) -> np.ndarray:
    """Bytes this rank sends to each rank per step: activations to the next stage, gradients to the previous."""
    sent = np.zeros(world, dtype=np.int64)
    for st_idx in range(layout.num_stages):
        if layout.device_of_stage[st_idx] != rank:
            continue
        if st_idx + 1 < layout.num_stages:  # activations forward
            nxt = layout.device_of_stage[st_idx + 1]
            if nxt != rank:
                sent[nxt] += sum(t.nbytes for t in modules[st_idx].example_out) * microbatches
        if st_idx > 0:  # gradients back
            prv = layout.device_of_stage[st_idx - 1]
            if prv != rank:
                sent[prv] += sum(t.nbytes for t in modules[st_idx].example_in if t.requires_grad) * microbatches
    return sent


def _measure_loop(runtime: Any, cmd: MeasureCommand, sched: Any, stages: list[Any], layout: StageLayout,
                  modules: list[StageModule], owned: list[tuple[str, nn.Parameter]], fault: Any) -> dict[str, Any]:
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
    batch = input_batches(runtime.inputs)[0][1]
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
        sched.step(*(batched_tensors(runtime.inputs) if first else ()), target=target, losses=losses if last else None,
                   return_outputs=False)
        for p in params:  # the mean over micro-batches of their mean losses: the step's loss
            if p.grad is not None:
                p.grad.div_(cmd.microbatches)
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
    sent = _sent_bytes(layout, modules, rank, runtime.world_size, cmd.microbatches)
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
