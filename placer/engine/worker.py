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
import json
import logging
import os
import sys
import threading
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from placer.core.cluster import is_cuda_name
from placer.engine.command import LoadCommand, MeasureCommand, PingCommand, StopCommand
from placer.engine.procs import die_with_parent, is_oom, one_line, pin_process
from placer.engine.runtime import WorkerRuntime, backend_for, torch_device

log = logging.getLogger(__name__)

__all__ = ["WorkerSpec", "worker_main", "main"]


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


def _quiet_tqdm() -> None:
    # fx's Interpreter creates a tqdm bar, and tqdm a multiprocessing lock (a named semaphore) that a killed
    # worker would leak; a thread lock is all a single-threaded worker needs.
    try:
        from tqdm import tqdm  # noqa: PLC0415
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def worker_main(spec: WorkerSpec, conn: Any) -> None:
    """Entry point of a spawned worker: set up, then serve commands from the parent until told to stop."""
    try:
        os.setpgrp()  # our own process group, so the parent can kill us and anything we started at once
    except OSError:
        pass
    die_with_parent(spec.parent_pid)
    logging.basicConfig(level=logging.WARNING)
    _quiet_tqdm()
    try:
        pin_process(spec.cores, spec.threads)
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
            conn.send({"ok": False, "ready": False, "reason": one_line(e), "rank": spec.rank,
                       "trace": traceback.format_exc(limit=5)})
        finally:
            os._exit(2)
    while True:
        try:
            cmd = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        if isinstance(cmd, StopCommand):
            conn.send({"ok": True, "stopped": True})
            break
        try:
            if isinstance(cmd, MeasureCommand):
                reply = runtime.measure(cmd)
            elif isinstance(cmd, LoadCommand):  # another graph, same processes and process group
                runtime = None
                runtime = WorkerRuntime(rank=spec.rank, world_size=spec.world_size, device=device,
                                        device_names=spec.device_names, factory=cmd.factory,
                                        op_names=cmd.op_names)
                reply = {"ok": True, "rank": spec.rank}
            elif isinstance(cmd, PingCommand):
                reply = {"ok": True, "rank": spec.rank}
            else:
                reply = {"ok": False, "phase": "plan", "rank": spec.rank, "reason": f"unknown command {cmd!r}"}
        except BaseException as e:  # the step failed midway: peers may be stuck; the parent restarts us all
            if runtime is None:
                conn.send({"ok": False, "phase": "run", "rank": spec.rank, "reason": one_line(e)})
                os._exit(2)
            reply = {"ok": False, "phase": "run", "rank": spec.rank, "reason": one_line(e), "oom": is_oom(e),
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
def _host_rank(rank: int, world: int) -> tuple[int, int]:
    """``(this rank's index among the ranks on this host, their number)``. torchrun's ``LOCAL_RANK`` and
    ``LOCAL_WORLD_SIZE`` count one node's ranks, but several nodes can share a host (a multi-node run tried on one
    machine): each then took every core with as many threads, and a woken receiver waited for its core behind the
    other rank's threads (2 nodes x 1 rank on 2 cores, RNNLM-small round-robin 1f1b x4: 0.60 s a step, 0.10 s
    with one thread each, 0.06 s in the Measurer's workers pinned to a core each)."""
    import socket  # noqa: PLC0415

    hosts: list[Any] = [None] * world
    dist.all_gather_object(hosts, socket.gethostname())
    mine = hosts[rank]
    return sum(h == mine for h in hosts[:rank]), sum(h == mine for h in hosts)


def _pin_among(local_rank: int, local_world: int, threads: int) -> None:
    """Pin this worker to its share of the host's cores (``threads`` per worker; 0: cores / workers)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per = max(1, len(cores) // max(1, local_world)) if cores else 1
    mine = tuple(cores[(local_rank * per + k) % len(cores)] for k in range(per)) if cores else ()
    pin_process(mine, threads or per)


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
            raise ValueError(f"cannot read placement {args.placement}: {one_line(e)}") from None
        placement = Placement(np.asarray(raw)).validate(graph, cluster)
    except ValueError as e:
        raise SystemExit(f"placer.engine.worker: error: {e}") from None
    name = cluster.devices[rank].name
    device = torch_device(f"cuda:{local_rank}" if is_cuda_name(name) else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend_for(cluster.device_names)
    dist.init_process_group(backend, rank=rank, world_size=world)
    if backend == "gloo":  # all CPU: count the ranks of every node on this host (see _pin_among)
        local_rank, local_world = _host_rank(rank, world)
    _pin_among(local_rank, local_world, args.threads)
    runtime = WorkerRuntime(rank=rank, world_size=world, device=device, device_names=cluster.device_names,
                            factory=model_factory(graph), op_names=graph.op_names)
    tasks, order, note = device_tasks(graph, placement, cluster.num_devices, schedule=args.schedule,
                                      microbatches=args.microbatches, cluster=cluster)
    cmd = MeasureCommand(device_of_op=placement.device_of_op, tasks=tasks, microbatches=args.microbatches,
                         steps=args.steps, warmup=args.warmup, schedule=args.schedule)
    try:
        reply = runtime.measure(cmd)
    except Exception as e:  # noqa: BLE001 - reported by rank 0 as a failed result
        reply = {"ok": False, "phase": "run", "rank": rank, "reason": one_line(e), "oom": is_oom(e)}
    replies: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(reply, replies if rank == 0 else None, dst=0)
    if rank == 0:
        result = assemble_result(replies, graph=graph, cluster=cluster, tasks=tasks, schedule=args.schedule,
                                 microbatches=args.microbatches, same_host=False, order=order,
                                 note=note)
        text = json.dumps(result.to_json(), indent=1)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        print(f"step_time_s = {result.step_time_s:.6f}" if result.ok else f"failed: {result.failure}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
