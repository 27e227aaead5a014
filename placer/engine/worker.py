"""The engine's worker: one process per device, running its share of placed training steps.

Locally, :class:`placer.engine.measurer.Measurer` spawns the workers and drives them over pipes. Across machines
the same code runs under ``torchrun``, one rank per device, with no parent process::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m placer.engine.worker --graph g.json --cluster c.json --placement p.json \\
        --schedule 1f1b --microbatches 8 --steps 20 --out result.json

Every rank reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from the
environment, rebuilds the model from the graph's source, runs the measurement, and rank 0 gathers the per-rank
records and writes the :class:`~placer.core.result.StepResult` JSON.

A CPU device is a worker pinned to its own core(s) (``os.sched_setaffinity``) with ``torch.set_num_threads(k)``;
``cuda:N`` uses that GPU and NCCL between GPUs (gloo for any pair involving a CPU, staged through host memory).
Workers die with their parent (``PR_SET_PDEATHSIG`` plus a watchdog thread) and when their pipe closes.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from placer.core.cluster import is_cuda_name
from placer.engine.executor import MemoryTracker, StepRecord, run_step
from placer.engine.plan import build_plan
from placer.engine.program import (StepProgram, ValueMeta, check_microbatches, compile_step, describe_values,
                                   split_microbatch)

log = logging.getLogger(__name__)

__all__ = ["WorkerSpec", "WorkerRuntime", "worker_main", "main"]


@dataclass(kw_only=True)
class WorkerSpec:
    """How the parent starts one worker (picklable)."""

    rank: int
    """Device index in the cluster = rank in the process group."""
    world_size: int
    device: str
    """``cpu:K`` or ``cuda:N`` (anything else runs on the CPU)."""
    device_names: tuple[str, ...]
    """All devices, to pick the process-group backend."""
    cores: tuple[int, ...]
    """CPU cores to pin to (empty: no pinning)."""
    threads: int
    """``torch.set_num_threads``."""
    store_host: str
    store_port: int
    prefix: str
    """Store prefix of this generation of workers (a restart uses a fresh one)."""
    factory: Callable[[], Any]
    """Zero-argument picklable callable returning a ``graphs.trace.TracedModel``."""
    op_names: tuple[str, ...]
    """The graph's op names; the rebuilt trace must match them exactly."""
    pg_timeout_s: float
    parent_pid: int


def _die_with_parent(parent_pid: int) -> None:
    try:  # Linux: the kernel kills us when the parent thread goes away
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass

    def watch() -> None:  # elsewhere (and as a belt-and-braces check): poll the parent
        while True:
            if os.getppid() != parent_pid:
                os._exit(17)
            time.sleep(1.0)

    if os.getppid() != parent_pid:
        os._exit(17)
    threading.Thread(target=watch, daemon=True, name="placer-parent-watch").start()


def backend_for(device_names: Sequence[str]) -> str:
    cuda = [is_cuda_name(d) for d in device_names]
    if all(cuda):
        return "nccl"
    if any(cuda):
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def torch_device(name: str) -> torch.device:
    if is_cuda_name(name):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {name} requested but CUDA is not available")
        return torch.device(name)
    return torch.device("cpu")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or \
        type(e).__name__ == "OutOfMemoryError"


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
                             f"({len(op_names)} ops): different source, seed or torch version?")
        self.prog: StepProgram = compile_step(traced.gm)
        self.cpu_inputs = tuple(traced.example_inputs)
        self.inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in traced.example_inputs)
        self.init_state = {k: v.detach().clone() for k, v in traced.gm.state_dict(keep_vars=True).items()}
        self.dirty = False
        self._metas: dict[int, list[ValueMeta]] = {}
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in traced.gm.parameters()}
        self._peer_cuda = [is_cuda_name(n) for n in self.device_names]
        self._backend = backend_for(self.device_names)

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
            if self.device.type == "cuda":
                for t in list(self.prog.gm.parameters()) + list(self.prog.gm.buffers()):
                    t.data = t.data.cpu()
            self._metas[microbatches] = describe_values(self.prog,
                                                        split_microbatch(self.cpu_inputs, microbatches, 0))
        return self._metas[microbatches]

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

    # ------------------------------------------------------------------ the measurement
    def measure(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Plan, agree with the peers that planning worked, then run warm-up plus measured steps."""
        M = int(cmd["microbatches"])
        dev = np.asarray(cmd["device_of_op"], dtype=np.int64)
        backend = cmd.get("backend", "ops")
        try:
            if backend not in ("ops", "pipelining"):
                raise ValueError(f"unknown engine backend {backend!r}; choose ops or pipelining")
            check_microbatches(self.inputs, M)
            metas = self.metas(M)
            owned = self.owned_params(dev)
            if backend == "ops":
                plan = build_plan(self.prog, metas, dev, cmd["tasks"], rank=self.rank, microbatches=M)
            else:
                from placer.engine.pipelining import stage_layout  # noqa: PLC0415

                stage_layout(self.prog, dev, self.world_size, str(cmd.get("schedule", "gpipe")))
            planned, reason = 1, ""
        except Exception as e:  # a bad schedule or placement: every worker reports, nobody hangs
            planned, reason = 0, _one_line(e)
        flag = torch.tensor([planned], dtype=torch.int64,
                            device=self.device if self._backend == "nccl" else torch.device("cpu"))
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not int(flag.item()):
            return {"ok": False, "phase": "plan", "rank": self.rank, "reason": reason or "a peer failed to plan"}

        self.reset_model()
        self._place_tensors(owned)
        if backend == "pipelining":
            from placer.engine.pipelining import run_pipelined  # noqa: PLC0415

            return run_pipelined(self, cmd, metas, owned, self._fault_hook(cmd, 1))
        params = [p for _, p in owned]
        opt = self.make_optimizer(params, cmd.get("optimizer", "sgd"), float(cmd.get("lr", 0.01)))
        update = None
        if cmd.get("update", True) and opt is not None:
            update = opt.step
            self.dirty = True
        mb_inputs = [split_microbatch(self.inputs, M, m) for m in range(M)]
        fault = self._fault_hook(cmd, len(plan.tasks))
        exclude = set(self._param_ptrs)
        cuda = self.device.type == "cuda"
        records: list[StepRecord] = []
        dynamic_peak = 0
        steps, warmup = int(cmd["steps"]), int(cmd["warmup"])
        for s in range(warmup + steps):
            for p in params:
                p.grad = None
            if cuda:
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            # Accounting memory costs ~25 us per op (saved-tensor hooks), and the peak is the same every step:
            # account the first step only (a warm-up step unless warmup=0).
            memory = None if cuda or s > 0 or not cmd.get("track_memory", True) else MemoryTracker(exclude)
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
        param_bytes = sum(p.numel() * p.element_size() for p in params)
        opt_bytes = 0
        if opt is not None:
            for state in opt.state.values():
                opt_bytes += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        if cuda:
            peak = max(r.peak_dynamic_bytes for r in records) if records else 0
        else:
            peak = 2 * param_bytes + opt_bytes + dynamic_peak
        reply: dict[str, Any] = {
            "ok": True, "rank": self.rank,
            "t0": [r.t0 for r in records], "t1": [r.t1 for r in records],
            "tasks": [r.task_times for r in records],
            "sends": [r.send_times for r in records], "recvs": [r.recv_times for r in records],
            "losses": [r.losses for r in records],
            "sent_bytes": plan.sent_bytes.tolist(), "peak_bytes": int(peak),
            "sent_msgs": {(m.dst, m.tag): (m.op, m.mb, m.kind) for tp in plan.tasks for m in tp.sends},
        }
        if cmd.get("collect"):
            reply["grads"] = {n: (None if p.grad is None else p.grad.detach().cpu().clone()) for n, p in owned}
            reply["params"] = {n: p.detach().cpu().clone() for n, p in owned}
        return reply

    def _fault_hook(self, cmd: dict[str, Any], num_tasks: int) -> Callable[[int], None] | None:
        kind = cmd.get("fault")
        if not kind or int(cmd.get("fault_rank", self.world_size - 1)) != self.rank:
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


def _quiet_tqdm() -> None:
    # fx's Interpreter creates a tqdm bar, and tqdm a multiprocessing lock (a named semaphore) that a killed
    # worker would leak; a thread lock is all a single-threaded worker needs.
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _setup_process(cores: Sequence[int], threads: int) -> None:
    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(cores))
        except OSError as e:  # a restricted cpuset: run unpinned rather than not at all
            log.warning("cannot pin to cores %s: %s", list(cores), e)
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """Entry point of a spawned worker: set up, then serve commands from the parent until told to stop."""
    try:
        os.setpgrp()  # our own process group, so the parent can kill us and anything we started at once
    except OSError:
        pass
    _die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.WARNING)
    _quiet_tqdm()
    try:
        _setup_process(spec.cores, spec.threads)
        device = torch_device(spec.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(spec.store_host, spec.store_port, spec.world_size + 1, is_master=False,
                              timeout=timedelta(seconds=spec.pg_timeout_s))
        dist.init_process_group(backend_for(spec.device_names), store=dist.PrefixStore(spec.prefix, store),
                                rank=spec.rank, world_size=spec.world_size,
                                timeout=timedelta(seconds=spec.pg_timeout_s))
        runtime = WorkerRuntime(rank=spec.rank, world_size=spec.world_size, device=device,
                                device_names=spec.device_names, factory=spec.factory, op_names=spec.op_names)
        conn.send({"ok": True, "ready": True, "pid": os.getpid(), "rank": spec.rank})
    except BaseException as e:  # report why we could not start, then exit
        try:
            conn.send({"ok": False, "ready": False, "reason": _one_line(e), "rank": spec.rank,
                       "trace": traceback.format_exc(limit=5)})
        finally:
            os._exit(2)
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if cmd.get("cmd") == "stop":
            conn.send({"ok": True, "stopped": True})
            break
        try:
            if cmd.get("cmd") == "measure":
                reply = runtime.measure(cmd)
            elif cmd.get("cmd") == "load":  # another graph, same processes and process group
                runtime = None
                runtime = WorkerRuntime(rank=spec.rank, world_size=spec.world_size, device=device,
                                        device_names=spec.device_names, factory=cmd["factory"],
                                        op_names=cmd["op_names"])
                reply = {"ok": True, "rank": spec.rank}
            elif cmd.get("cmd") == "ping":
                reply = {"ok": True, "rank": spec.rank}
            else:
                reply = {"ok": False, "phase": "plan", "rank": spec.rank, "reason": f"unknown command {cmd!r}"}
        except BaseException as e:  # the step failed midway: peers may be stuck; the parent restarts us all
            if runtime is None:
                conn.send({"ok": False, "phase": "run", "rank": spec.rank, "reason": _one_line(e)})
                os._exit(2)
            reply = {"ok": False, "phase": "run", "rank": spec.rank, "reason": _one_line(e), "oom": _is_oom(e),
                     "trace": traceback.format_exc(limit=8)}
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            os._exit(0)
    try:
        dist.destroy_process_group()
    finally:
        os._exit(0)


# ---------------------------------------------------------------------- torchrun entry point
def main(argv: Sequence[str] | None = None) -> int:
    """``torchrun ... -m placer.engine.worker``: measure one placement; rank 0 writes the StepResult JSON."""
    from graphs.build import model_factory  # noqa: PLC0415 - heavy imports only for this entry point
    from graphs.ir import OpGraph  # noqa: PLC0415
    from placer.core.cluster import get_cluster  # noqa: PLC0415
    from placer.engine.assemble import assemble_result  # noqa: PLC0415
    from placer.engine.ordering import device_tasks  # noqa: PLC0415
    from placer.core.placement import Placement  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="python -m placer.engine.worker", description=main.__doc__)
    ap.add_argument("--graph", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--placement", required=True, help="JSON list of device indices per op, or placement JSON")
    ap.add_argument("--schedule", default="none")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="threads per CPU worker (0: cores / local workers)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except KeyError:
        raise SystemExit("placer.engine.worker: error: run me under torchrun (RANK/WORLD_SIZE not set)") from None
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    try:
        graph = OpGraph.load(args.graph)
        cluster = get_cluster(args.cluster)
        if cluster.num_devices != world:
            raise ValueError(f"cluster {cluster.name} has {cluster.num_devices} devices but WORLD_SIZE={world}")
        try:
            raw = json.loads(open(args.placement).read())
            if isinstance(raw, dict):
                raw = [raw["ops"][name] for name in graph.op_names]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read placement {args.placement}: {_one_line(e)}") from None
        placement = Placement(np.asarray(raw)).validate(graph, cluster)
    except ValueError as e:
        raise SystemExit(f"placer.engine.worker: error: {e}") from None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = max(1, len(cores) // max(1, local_world)) if cores else 1
    mine = tuple(cores[(local_rank * per + k) % len(cores)] for k in range(per)) if cores else ()
    _setup_process(mine, args.threads or per)
    name = cluster.devices[rank].name
    device = torch_device(f"cuda:{local_rank}" if is_cuda_name(name) else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(cluster.device_names), rank=rank, world_size=world)
    runtime = WorkerRuntime(rank=rank, world_size=world, device=device, device_names=cluster.device_names,
                            factory=model_factory(graph), op_names=graph.op_names)
    tasks, order = device_tasks(graph, placement, cluster.num_devices, schedule=args.schedule,
                                microbatches=args.microbatches)
    cmd = {"cmd": "measure", "device_of_op": placement.device_of_op, "tasks": tasks,
           "microbatches": args.microbatches, "steps": args.steps, "warmup": args.warmup}
    try:
        reply = runtime.measure(cmd)
    except Exception as e:  # noqa: BLE001 - reported by rank 0 as a failed result
        reply = {"ok": False, "phase": "run", "rank": rank, "reason": _one_line(e), "oom": _is_oom(e)}
    replies: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(reply, replies if rank == 0 else None, dst=0)
    if rank == 0:
        result = assemble_result(replies, graph=graph, cluster=cluster, tasks=tasks, schedule=args.schedule,
                                 microbatches=args.microbatches, same_host=False, order=order)
        text = json.dumps(result.to_json(), indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(f"step_time_s = {result.step_time_s:.6f}" if result.ok else f"failed: {result.failure}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
