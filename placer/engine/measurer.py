"""Measuring placements for real: warm worker processes driven over pipes, results as :class:`StepResult`.

:class:`Measurer` starts one worker per device (see :mod:`placer.engine.worker`) and keeps them warm, so the RL
reward loop can measure many placements without respawning: each :meth:`Measurer.measure` sends the placement
and schedule to every worker, which plans, runs ``warmup`` steps then ``steps`` measured steps, and replies with
its timestamps. The step time is the median over measured steps of ``max(end) - min(start)`` across workers
(one host: ``perf_counter`` is one monotonic clock for all processes; each step starts at a barrier).

Failures never raise and never hang: a crashed worker, an OOM inside a worker, or no reply within
``timeout_s`` gives a failed :class:`StepResult` with a one-line reason, and the workers are killed (whole
process groups) and restarted on the next measurement. ``close()``, ``with``-exit and interpreter exit
(``atexit``) leave no process behind; workers also die with their parent.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing.connection as mpc
import os
import signal
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch.multiprocessing as tmp

from graphs.build import model_factory
from placer.engine.assemble import assemble_result, error_reason
from placer.engine.command import (BACKENDS, DEFAULT_LR, DEFAULT_OPTIMIZER, Command, LoadCommand, MeasureCommand,
                                   StopCommand, check_optimizer)
from placer.engine.ordering import device_tasks
from placer.engine.worker import WorkerSpec, worker_main
from placer.core.cluster import is_cuda_name
from placer.core.result import StepResult

log = logging.getLogger(__name__)

__all__ = ["EngineConfig", "StepOutputs", "Measurer", "measure"]

_LIVE: "weakref.WeakSet[Measurer]" = weakref.WeakSet()
_GENERATION = itertools.count()


@dataclass(kw_only=True)
class EngineConfig:
    """How the engine runs and measures."""

    optimizer: str = DEFAULT_OPTIMIZER
    """Parameter update on each owner: one of :data:`placer.engine.command.OPTIMIZERS` (``sgd`` or ``adam``)."""
    lr: float = DEFAULT_LR
    """Learning rate of that optimizer."""
    threads_per_device: int = 0
    """``torch.set_num_threads`` of each CPU worker; 0: this process's cores divided among the CPU devices."""
    timeout_s: float = 120.0
    """Seconds a measurement may take before its workers count as hung."""
    start_timeout_s: float = 180.0
    """Seconds the workers may take to start (import torch, rebuild and trace the model)."""
    track_memory: bool = True
    """CPU devices: account activation memory through saved-tensor hooks (see ``executor.MemoryTracker``)."""
    pin_cores: bool = True
    """Pin each CPU worker to its own core(s) with ``os.sched_setaffinity``."""
    backend: str = "ops"
    """``ops`` (the op-level executor, any placement) or ``pipelining`` (``torch.distributed.pipelining``,
    stage-contiguous placements and the gpipe / 1f1b / interleaved-1f1b schedules only)."""

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        if not self.timeout_s > 0 or not self.start_timeout_s > 0:
            raise ValueError("timeouts must be positive")
        if self.threads_per_device < 0:
            raise ValueError(f"threads_per_device must be >= 0, got {self.threads_per_device}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass(eq=False)
class StepOutputs:
    """What a training step computed (for checking the engine against single-device training)."""

    result: StepResult
    loss: float
    """Mean of the micro-batch losses of the last step."""
    grads: dict[str, Any] = field(default_factory=dict)
    """Parameter name -> gradient after the last step (from its owner)."""
    params: dict[str, Any] = field(default_factory=dict)
    """Parameter name -> value after the last step's update."""


def _cores_for(devices: Sequence[str], threads: int, pin: bool) -> tuple[list[tuple[int, ...]], int]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cpu_devs = [k for k, d in enumerate(devices) if not is_cuda_name(d)]
    per = threads or max(1, len(cores) // max(1, len(cpu_devs)))
    if len(cpu_devs) * per > len(cores):
        log.warning("%d CPU devices x %d threads > %d cores: workers share cores", len(cpu_devs), per, len(cores))
    out: list[tuple[int, ...]] = [() for _ in devices]
    if pin:
        for slot, k in enumerate(cpu_devs):
            out[k] = tuple(cores[(slot * per + j) % len(cores)] for j in range(per))
    return out, per


def _alive(proc: Any) -> bool:
    """A worker that can still answer: running, and not a zombie the parent has yet to reap."""
    if not proc.is_alive():
        return False
    try:
        import psutil

        return psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # noqa: BLE001 - gone between the two checks
        return False


class Measurer:
    """Warm workers measuring many placements of one graph on one cluster (see the module docstring).

    ``factory`` rebuilds the traced model in each worker (default: from ``graph.meta["source"]``).
    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, graph: Any, cluster: Any, *, factory: Callable[[], Any] | None = None,
                 config: EngineConfig | None = None, **overrides: Any) -> None:
        self.graph = graph
        self.cluster = cluster
        try:
            self.config = replace(config or EngineConfig(), **overrides)
        except TypeError as e:
            raise ValueError(f"unknown engine option: {e}") from None
        self.factory = factory if factory is not None else model_factory(graph)
        self.devices = tuple(cluster.device_names)
        self._procs: list[Any] = []
        self._conns: list[Any] = []
        self._store: Any = None
        self.restarts = 0
        _LIVE.add(self)

    # ------------------------------------------------------------------ lifecycle
    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _start(self) -> str | None:
        """Start the workers; None when they are ready, else the reason they are not."""
        import torch.distributed as dist  # noqa: PLC0415

        ctx = tmp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, len(self.devices) + 1, is_master=True, wait_for_workers=False,
                                    timeout=_td(self.config.start_timeout_s))
        cores, per = _cores_for(self.devices, self.config.threads_per_device, self.config.pin_cores)
        prefix = f"placer-{os.getpid()}-{next(_GENERATION)}"
        for rank, name in enumerate(self.devices):
            parent, child = ctx.Pipe()
            spec = WorkerSpec(rank=rank, world_size=len(self.devices), device=name, device_names=self.devices,
                              cores=cores[rank], threads=per, store_host="127.0.0.1", store_port=self._store.port,
                              prefix=prefix, factory=self.factory, op_names=tuple(self.graph.op_names),
                              pg_timeout_s=max(self.config.timeout_s, self.config.start_timeout_s) * 2,
                              parent_pid=os.getpid())
            proc = ctx.Process(target=worker_main, args=(spec, child), daemon=True, name=f"placer-worker-{rank}")
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        replies = self._gather(self.config.start_timeout_s, "start")
        if isinstance(replies, str):
            self._kill()
            return replies
        bad = [r for r in replies if not r.get("ok")]
        if bad:
            self._kill()
            return f"worker {bad[0].get('rank')} could not start: {bad[0].get('reason')}"
        return None

    def _gather(self, timeout_s: float, what: str) -> list[dict[str, Any]] | str:
        """One reply per worker, or a one-line reason (crash, error reply, timeout)."""
        replies: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        waiting = {c: r for r, c in enumerate(self._conns)}
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                ranks = sorted(waiting.values())
                return (f"worker(s) {', '.join(self.devices[r] for r in ranks)} hung: no reply to {what} "
                        f"within {timeout_s:g} s")
            ready = mpc.wait(list(waiting) + list(sentinels), timeout=left)
            for obj in ready:
                if obj in waiting:
                    r = waiting[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        code = self._procs[r].exitcode
                        self._procs[r].join(1.0)
                        return f"worker {self.devices[r]} crashed (exit code {self._procs[r].exitcode or code})"
                    del waiting[obj]
                    replies[r] = msg
                    if not msg.get("ok") and msg.get("phase") != "plan":
                        return error_reason(msg, self.devices)
            for obj in ready:
                if obj in sentinels and sentinels[obj] in waiting.values():
                    r = sentinels[obj]
                    conn = self._conns[r]
                    if conn.poll():  # it replied just before exiting: read that first
                        continue
                    self._procs[r].join(1.0)
                    return f"worker {self.devices[r]} crashed (exit code {self._procs[r].exitcode})"
        return [replies[r] for r in range(len(self._conns))]

    def _broadcast(self, cmd: Command, timeout_s: float, what: str) -> list[dict[str, Any]] | str:
        """Send ``cmd`` to every worker and gather the replies (or the reason there are none)."""
        for r, c in enumerate(self._conns):
            try:
                c.send(cmd)
            except (BrokenPipeError, OSError):
                self._procs[r].join(1.0)
                return f"worker {self.devices[r]} crashed (exit code {self._procs[r].exitcode})"
        return self._gather(timeout_s, what)

    def _kill(self) -> None:
        for p in self._procs:
            if p.pid is not None and p.exitcode is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # the worker leads its own process group
                except (ProcessLookupError, PermissionError, OSError):
                    pass
                try:
                    p.kill()
                except (ValueError, OSError):
                    pass
        for p in self._procs:
            p.join(5.0)
        for c in self._conns:
            c.close()
        self._procs, self._conns = [], []
        self._store = None

    def close(self) -> None:
        """Stop the workers (politely, then by force); idempotent."""
        if not self._procs:
            return
        for c in self._conns:
            try:
                c.send(StopCommand())
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 5.0
        for p in self._procs:
            p.join(max(0.0, deadline - time.monotonic()))
        self._kill()

    def switch_graph(self, graph: Any, *, factory: Callable[[], Any] | None = None) -> None:
        """Measure another graph from now on, reusing the warm workers (they rebuild the new model).

        Raises ``ValueError`` (and leaves the workers stopped) if they cannot build it.
        """
        factory = factory if factory is not None else model_factory(graph)
        self.graph, self.factory = graph, factory
        if not self._procs:
            return
        replies = self._broadcast(LoadCommand(factory=factory, op_names=tuple(graph.op_names)),
                                  self.config.start_timeout_s, "load")
        if isinstance(replies, str):
            self._kill()
            raise ValueError(f"workers cannot load graph {graph.name!r}: {replies}")

    # ------------------------------------------------------------------ measuring
    def _failed(self, reason: str, *, schedule: str, microbatches: int, oom_device: int | None = None,
                ran: tuple[str, str] = ("", ""), recompute: tuple[int, ...] = ()) -> StepResult:
        """A failed result; ``ran`` is ``(order, note)`` of :func:`device_tasks` once the order is built."""
        return StepResult.failed(reason, source="engine", devices=self.devices, oom_device=oom_device,
                                 schedule=schedule, microbatches=microbatches, schedule_ran=ran[0],
                                 schedule_note=ran[1], recompute=recompute)

    def _root_cause(self, reason: str) -> str:
        """When a peer reports a broken connection because another worker died, name the dead worker instead."""
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for r, p in enumerate(self._procs):
                if not _alive(p):
                    p.join(0.1)
                    return f"worker {self.devices[r]} crashed (exit code {p.exitcode})"
            time.sleep(0.05)
        return reason

    def _run(self, placement: Any, *, schedule: str, microbatches: int, steps: int, warmup: int, update: bool,
             collect: bool, timeout_s: float | None, fault: str | None, backend: str | None,
             recompute: Sequence[int] = ()) -> tuple[StepResult, list[dict[str, Any]]]:
        placement.validate(self.graph, self.cluster)
        recompute = tuple(sorted({int(d) for d in recompute}))
        if any(not 0 <= d < len(self.devices) for d in recompute):
            raise ValueError(f"recompute names devices {list(recompute)}; the cluster has {len(self.devices)}")
        backend = backend or self.config.backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        tasks, order, note = device_tasks(self.graph, placement, len(self.devices), schedule=schedule,
                                          microbatches=microbatches, cluster=self.cluster)
        ran = (order, note) if backend == "ops" else ("", "")  # the pipelining backend runs torch's own schedule
        cmd = MeasureCommand(device_of_op=np.asarray(placement.device_of_op), tasks=tasks, microbatches=microbatches,
                             steps=steps, warmup=warmup, schedule=schedule, recompute=recompute, backend=backend,
                             update=update,
                             collect=collect, optimizer=self.config.optimizer, lr=self.config.lr,
                             track_memory=self.config.track_memory, fault=fault)
        if self._procs and not all(_alive(p) for p in self._procs):  # one died while idle: start afresh
            dead = [self.devices[r] for r, p in enumerate(self._procs) if not _alive(p)]
            log.warning("engine worker(s) %s died while idle; restarting workers", ", ".join(dead))
            self._kill()
            self.restarts += 1
        if not self._procs:
            why = self._start()
            if why is not None:
                return self._failed(why, schedule=schedule, microbatches=microbatches, ran=ran, recompute=recompute), []
        replies = self._broadcast(cmd, self.config.timeout_s if timeout_s is None else timeout_s, "measure")
        if isinstance(replies, str):
            replies = self._root_cause(replies)
            log.warning("engine measurement failed (%s); restarting workers", replies)
            self._kill()
            self.restarts += 1
            oom = _oom_device(replies, self.devices)
            return self._failed(replies, schedule=schedule, microbatches=microbatches, oom_device=oom,
                                ran=ran, recompute=recompute), []
        plan_errors = [r for r in replies if not r.get("ok")]
        if plan_errors:
            reason = next((r["reason"] for r in plan_errors if r.get("reason") != "a peer failed to plan"),
                          plan_errors[0]["reason"])
            return self._failed(f"cannot run this placement: {reason}", schedule=schedule,
                                microbatches=microbatches, ran=ran, recompute=recompute), []
        result = assemble_result(replies, graph=self.graph, cluster=self.cluster, tasks=tasks, schedule=schedule,
                                 microbatches=microbatches, same_host=True,
                                 order=ran[0] or schedule, note=ran[1], recompute=recompute)
        return result, replies

    def measure(self, placement: Any, *, schedule: str = "none", microbatches: int = 1, steps: int = 5,
                warmup: int = 2, backend: str | None = None, timeout_s: float | None = None,
                _fault: str | None = None, recompute: Sequence[int] = ()) -> StepResult:
        """Median step time (and the rest of a :class:`StepResult`) of ``placement`` under ``schedule``.

        Every measurement starts from the model's initial parameters. ``backend`` overrides
        ``config.backend``; ``recompute``: the devices that recompute activations (a plan's). ``_fault`` is a test
        hook: ``"crash"``, ``"hang"``, ``"oom"`` or ``"error"`` injected in the last device's last step (halfway
        through its tasks on the ``ops`` backend).
        """
        return self._run(placement, schedule=schedule, microbatches=microbatches, steps=steps, warmup=warmup,
                         update=True, collect=False, timeout_s=timeout_s, fault=_fault, backend=backend,
                         recompute=recompute)[0]

    def run_step(self, placement: Any, *, schedule: str = "none", microbatches: int = 1, steps: int = 1,
                 update: bool = True, backend: str | None = None, timeout_s: float | None = None,
                 recompute: Sequence[int] = ()) -> StepOutputs:
        """Run ``steps`` training steps from the initial parameters; return the last loss, gradients and
        parameters (for comparing with single-device training)."""
        result, replies = self._run(placement, schedule=schedule, microbatches=microbatches, steps=steps,
                                    warmup=0, update=update, collect=True, timeout_s=timeout_s, fault=None,
                                    backend=backend, recompute=recompute)
        grads: dict[str, Any] = {}
        params: dict[str, Any] = {}
        for r in replies:
            grads.update(r.get("grads", {}))
            params.update(r.get("params", {}))
        return StepOutputs(result=result, loss=float(result.extra.get("loss", float("nan"))), grads=grads,
                           params=params)


def _td(seconds: float) -> Any:
    from datetime import timedelta  # noqa: PLC0415

    return timedelta(seconds=seconds)


def _oom_device(reason: str, devices: Sequence[str]) -> int | None:
    if not reason.startswith("out of memory on "):
        return None
    name = reason[len("out of memory on "):].split(":", 2)
    name = ":".join(name[:2])
    return devices.index(name) if name in devices else None


def measure(graph: Any, cluster: Any, placement: Any, *, schedule: str = "none", microbatches: int = 1,
            steps: int = 5, warmup: int = 2, factory: Callable[[], Any] | None = None,
            config: EngineConfig | None = None, recompute: Sequence[int] = ()) -> StepResult:
    """One-shot measurement: start workers, measure ``placement``, stop them."""
    with Measurer(graph, cluster, factory=factory, config=config) as m:
        return m.measure(placement, schedule=schedule, microbatches=microbatches, steps=steps, warmup=warmup,
                         recompute=recompute)


@atexit.register
def _close_all() -> None:
    for m in list(_LIVE):
        try:
            m.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
