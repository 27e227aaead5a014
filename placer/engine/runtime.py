"""A worker's model and its measurement routine, shared by the spawned workers
(:func:`placer.engine.worker.worker_main`) and the torchrun entry point (:func:`placer.engine.worker.main`).

:meth:`WorkerRuntime.measure` runs one :class:`~placer.engine.command.MeasureCommand`: plan this rank's share,
agree with the peers that planning worked (so a bad placement fails on every rank instead of hanging one), run
warm-up plus measured steps, and reply with the per-step records that :mod:`placer.engine.assemble` turns into a
:class:`~placer.core.result.StepResult`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from graphs.batch import inputs_to, split_inputs
from graphs.microbatch import check_microbatchable
from placer.core.cluster import is_cuda_name
from placer.engine.command import MeasureCommand
from placer.engine.executor import MemoryTracker, optimizer_state_bytes, run_step
from placer.engine.record import StepRecord
from placer.engine.plan import StepPlan, build_plan
from placer.engine.procs import one_line
from placer.engine.program import StepProgram, ValueMeta, compile_step, describe_values

__all__ = ["WorkerRuntime", "backend_for", "torch_device"]


def backend_for(device_names: Sequence[str]) -> str:
    """The process-group backend: NCCL between GPUs, gloo for any pair involving a CPU."""
    cuda = [is_cuda_name(d) for d in device_names]
    if all(cuda):
        return "nccl"
    if any(cuda):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def torch_device(name: str) -> torch.device:
    """The torch device a cluster device runs on (:func:`placer.core.cluster.is_cuda_name`)."""
    if is_cuda_name(name):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} requested but CUDA is not available")
        return torch.device(name)
    return torch.device("cpu")


class WorkerRuntime:
    """A worker's model and its measurement routine (shared by the spawned and the torchrun entry points)."""

    def __init__(self, *, rank: int, world_size: int, device: torch.device, device_names: Sequence[str],
                 factory: Callable[[], Any], op_names: Sequence[str] | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.device_names = tuple(device_names)
        traced = factory()
        names = tuple(n.name for n in traced.gm.graph.nodes if n.op != "output")
        if op_names is not None and names != tuple(op_names):
            raise ValueError(f"the rebuilt model's trace ({len(names)} ops) does not match the graph "
                             f"({len(op_names)} ops): different source, seed or torch version, or traced by an "
                             "earlier placer? build the graph again (placer graph build)")
        self.prog: StepProgram = compile_step(traced.gm)
        self.graph_meta = dict(traced.graph.meta)
        """The rebuilt graph's meta (whether it can be micro-batched)."""
        self.cpu_inputs = tuple(traced.example_inputs)
        self.inputs = inputs_to(traced.example_inputs, device)
        self.init_state = {k: v.detach().clone() for k, v in traced.gm.state_dict(keep_vars=True).items()}
        self.dirty = False
        self._metas: dict[int, list[ValueMeta]] = {}
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in traced.gm.parameters()}
        self._peer_cuda = [is_cuda_name(n) for n in self.device_names]
        self._backend = backend_for(self.device_names)
        self.stage_cache: dict[Any, Any] = {}
        """The pipelining backend's split stages by (micro-batches, stage of each op)."""

    # ------------------------------------------------------------------ helpers
    def comm_device(self, peer: int) -> torch.device:
        if self.device.type == "cuda" and self._peer_cuda[peer] and "nccl" in self._backend:
            return self.device
        return torch.device("cpu")

    def metas(self, microbatches: int) -> list[ValueMeta]:
        """Value descriptions for micro-batches of ``1/microbatches`` of the batch (cached).

        The shape pass runs the whole model on the CPU: on a GPU worker only this device's parameters live on
        the GPU (see :meth:`_place_tensors`), so everything is brought back first.
        """
        if microbatches not in self._metas:
            self.all_on_cpu()
            self._metas[microbatches] = describe_values(self.prog,
                                                        split_inputs(self.cpu_inputs, microbatches, 0))
        return self._metas[microbatches]

    def all_on_cpu(self) -> None:
        """Bring every parameter and buffer back to the CPU (a GPU worker keeps only its own there), for the
        passes that run the whole step in one process."""
        if self.device.type == "cuda":
            for t in list(self.prog.gm.parameters()) + list(self.prog.gm.buffers()):
                t.data = t.data.cpu()

    def reset_model(self) -> None:
        if self.dirty:
            with torch.no_grad():
                for k, v in self.prog.gm.state_dict(keep_vars=True).items():
                    v.copy_(self.init_state[k])
            self.dirty = False

    def owned_params(self, device_of_op: np.ndarray) -> list[tuple[str, torch.nn.Parameter]]:
        """Parameters used by this device's ops; one used on several devices is an error (colocate them)."""
        where: dict[int, tuple[str, torch.nn.Parameter, int]] = {}
        for op in self.prog.ops:
            d = int(device_of_op[op.index])
            for name, p in op.params:
                prev = where.setdefault(id(p), (name, p, d))
                if prev[2] != d:
                    raise ValueError(f"parameter {name} is used by ops on devices {prev[2]} and {d}; "
                                     f"those ops must share a colocation group")
        return [(name, p) for (name, p, d) in where.values() if d == self.rank]

    def _place_tensors(self, owned: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        if self.device.type != "cuda":
            return
        mine = {id(p) for _, p in owned}
        for p in self.prog.gm.parameters():
            target = self.device if id(p) in mine else torch.device("cpu")
            if p.device != target:
                p.data = p.data.to(target)
        for b in self.prog.gm.buffers():
            if b.device != self.device:
                b.data = b.data.to(self.device)

    def make_optimizer(self, params: list[torch.nn.Parameter], name: str, lr: float) -> torch.optim.Optimizer | None:
        if not params:
            return None
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr)
        if name == "adam":
            return torch.optim.Adam(params, lr=lr)
        raise ValueError(f"unknown optimizer {name!r}; choose sgd or adam")

    def collected(self, owned: Sequence[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
        """Each owned parameter and its gradient, on the CPU (``MeasureCommand.collect``)."""
        return {"grads": {n: (None if p.grad is None else p.grad.detach().cpu().clone()) for n, p in owned},
                "params": {n: p.detach().cpu().clone() for n, p in owned}}

    # ------------------------------------------------------------------ the measurement
    def measure(self, cmd: MeasureCommand) -> dict[str, Any]:
        """Plan, agree with the peers that planning worked, then run warm-up plus measured steps."""
        planned = self._plan(cmd)
        if isinstance(planned, str):
            return {"ok": False, "phase": "plan", "rank": self.rank, "reason": planned}
        plan, metas, owned = planned
        self.reset_model()
        self._place_tensors(owned)
        if not isinstance(plan, StepPlan):  # the pipelining backend: (layout, stages)
            from placer.engine.pipelining import run_pipelined  # noqa: PLC0415

            return run_pipelined(self, cmd, *plan, owned, self._fault_hook(cmd, 1))
        params = [p for _, p in owned]
        opt = self.make_optimizer(params, cmd.optimizer, cmd.lr)
        update = None
        if cmd.update and opt is not None:
            update = opt.step
            self.dirty = True
        if self.prog.state_writes:  # buffers the step updates are written back (executor._Step.write_state)
            self.dirty = True
        records, dynamic_peak = self._run_steps(cmd, plan, metas, params, update)
        if self.device.type == "cuda":
            peak = max(r.peak_dynamic_bytes for r in records) if records else 0
        else:
            param_bytes = sum(p.numel() * p.element_size() for p in params)
            peak = 2 * param_bytes + optimizer_state_bytes(opt) + dynamic_peak
        reply: dict[str, Any] = {
            "ok": True, "rank": self.rank,
            "t0": [r.t0 for r in records], "t1": [r.t1 for r in records],
            "tasks": [r.task_times for r in records],
            "sends": [r.send_times for r in records], "recvs": [r.recv_times for r in records],
            "losses": [r.losses for r in records],
            "sent_bytes": plan.sent_bytes.tolist(), "peak_bytes": int(peak),
            "sent_msgs": {(m.dst, m.tag): (m.op, m.mb, m.kind) for tp in plan.tasks for m in tp.sends},
        }
        if cmd.collect:
            reply.update(self.collected(owned))
        return reply

    def _plan(self, cmd: MeasureCommand) -> tuple[Any, list[ValueMeta], list[tuple[str, torch.nn.Parameter]]] | str:
        """This rank's plan (a :class:`StepPlan`, or the pipelining backend's ``(layout, stages)``), the value
        descriptions and the owned parameters; or the reason planning failed here or on a peer."""
        M = cmd.microbatches
        dev = np.asarray(cmd.device_of_op, dtype=np.int64)
        plan: Any = None
        metas: list[ValueMeta] = []
        owned: list[tuple[str, torch.nn.Parameter]] = []
        try:
            check_microbatchable(self.graph_meta, M)  # also for torchrun ranks, whose tasks came from elsewhere
            metas = self.metas(M)
            owned = self.owned_params(dev)
            if cmd.backend == "ops":
                plan = build_plan(self.prog, metas, dev, cmd.tasks, rank=self.rank, microbatches=M,
                                  recompute=self.rank in cmd.recompute)
            else:
                from placer.engine.pipelining import plan_pipeline  # noqa: PLC0415

                plan = plan_pipeline(self, cmd)
            planned, reason = 1, ""
        except Exception as e:  # a bad schedule or placement: every worker reports, nobody hangs
            planned, reason = 0, one_line(e)
        flag = torch.tensor([planned], dtype=torch.int64,
                            device=self.device if self._backend == "nccl" else torch.device("cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag.item()):
            return reason or "a peer failed to plan"
        return plan, metas, owned

    def _run_steps(self, cmd: MeasureCommand, plan: StepPlan, metas: list[ValueMeta],
                   params: list[torch.nn.Parameter], update: Callable[[], Any] | None) -> tuple[list[StepRecord], int]:
        """Warm-up plus measured steps on the op-level executor: the measured steps' records and the accounted
        activation peak (CPU devices, first step)."""
        M = cmd.microbatches
        mb_inputs = [split_inputs(self.inputs, M, m) for m in range(M)]
        fault = self._fault_hook(cmd, len(plan.tasks))
        exclude = set(self._param_ptrs)
        cuda = self.device.type == "cuda"
        records: list[StepRecord] = []
        dynamic_peak = 0
        steps, warmup = cmd.steps, cmd.warmup
        for s in range(warmup + steps):
            for p in params:
                p.grad = None
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            # Accounting memory costs ~25 us per op (saved-tensor hooks), and the peak is the same every step:
            # account the first step only (a warm-up step unless warmup=0).
            memory = None if cuda or s > 0 or not cmd.track_memory else MemoryTracker(exclude)
            rec = run_step(self.prog, metas, plan, mb_inputs, device=self.device, comm_device=self.comm_device,
                           update=update, memory=memory, fault=fault if s == warmup + steps - 1 else None)
            if cuda:
                torch.cuda.synchronize(self.device)
                rec.t1 = time.perf_counter()
                rec.peak_dynamic_bytes = int(torch.cuda.max_memory_allocated(self.device))
            if memory is not None:
                dynamic_peak = rec.peak_dynamic_bytes
            if s >= warmup:
                records.append(rec)
        return records, dynamic_peak

    def _fault_hook(self, cmd: MeasureCommand, num_tasks: int) -> Callable[[int], None] | None:
        kind = cmd.fault
        rank = self.world_size - 1 if cmd.fault_rank is None else cmd.fault_rank
        if not kind or rank != self.rank:
            return None
        at = num_tasks // 2

        def hook(k: int) -> None:
            if k != at:
                return
            if kind == "crash":
                os._exit(3)
            if kind == "hang":
                time.sleep(1e6)
            if kind == "oom":
                raise MemoryError("injected out-of-memory (test hook)")
            if kind == "error":
                raise RuntimeError("injected error (test hook)")

        return hook
