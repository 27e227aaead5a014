"""Combine the workers' records of a measurement into one :class:`~placer.core.result.StepResult`.

Step time: the median over measured steps of ``max(end) - min(start)`` across workers when they share a host
(``perf_counter`` is one monotonic clock for all processes there), else of each worker's own duration from the
common barrier. The timeline, busy times and bytes moved are those of the measured step closest to the median.
"""

from __future__ import annotations

import logging
import statistics
from typing import Any, Sequence

import numpy as np

from placer.engine.ordering import Task
from placer.core.cluster import is_cuda_name
from placer.core.result import StepResult, TimelineEvent

__all__ = ["assemble_result", "error_reason"]

log = logging.getLogger(__name__)


def error_reason(msg: dict[str, Any], devices: Sequence[str]) -> str:
    """The one line a failed result carries; the worker's traceback, when it sent one, goes to the debug log
    (``placer -v``), where the op that failed can be found."""
    r = msg.get("rank", -1)
    where = devices[r] if 0 <= r < len(devices) else "?"
    if msg.get("trace"):
        log.debug("worker %s failed:\n%s", where, msg["trace"])
    if msg.get("oom"):
        return f"out of memory on {where}: {msg.get('reason')}"
    return f"worker {where} failed: {msg.get('reason')}"



def _message_events(replies: Sequence[dict[str, Any]], k: int, names: Sequence[str], devices: Sequence[str],
                    rel: Any) -> list[TimelineEvent]:
    """One ``send`` event per message of step ``k``, from its send until its receive completed."""
    recv_done: dict[tuple[int, int, int], float] = {}
    for r in replies:
        recvs = r.get("recvs")
        for (src, tag), t in (recvs[k] if recvs else {}).items():
            recv_done[(src, r["rank"], tag)] = t
    events = []
    for r in replies:
        src, sends = r["rank"], r.get("sends")
        for (dst, tag), t in (sends[k] if sends else {}).items():
            op, mb, _kind = r["sent_msgs"][(dst, tag)]
            end = recv_done.get((src, dst, tag), t)
            events.append(TimelineEvent(track=f"{devices[src]}->{devices[dst]}", op=names[op], microbatch=mb,
                                        phase="send", start_s=rel(src, t), end_s=max(rel(src, t), rel(dst, end))))
    return events


def assemble_result(replies: Sequence[dict[str, Any]], *, graph: Any, cluster: Any, tasks: list[list[Task]],
                    schedule: str, microbatches: int, same_host: bool, order: str | None = None,
                    note: str = "", recompute: tuple[int, ...] = ()) -> StepResult:
    """Combine per-worker records into one :class:`StepResult` (median step, its timeline).

    ``order`` is the order the workers ran when it differs from ``schedule`` (a deadlock fallback), ``note`` why;
    ``recompute``: the devices that recomputed activations.
    """
    ran = {"schedule": schedule, "schedule_ran": order or schedule, "schedule_note": note, "recompute": recompute}
    devices = tuple(cluster.device_names)
    d = len(devices)
    bad = [r for r in replies if not r.get("ok")]
    if bad:
        return StepResult.failed(error_reason(bad[0], devices), source="engine", devices=devices,
                                 **ran, microbatches=microbatches)
    nsteps = len(replies[0]["t0"])
    if same_host:
        starts = [min(r["t0"][s] for r in replies) for s in range(nsteps)]
        samples = [max(r["t1"][s] for r in replies) - starts[s] for s in range(nsteps)]
    else:  # separate clocks: each worker's own duration from the common barrier
        starts = None
        samples = [max(r["t1"][s] - r["t0"][s] for r in replies) for s in range(nsteps)]
    med = float(statistics.median(samples))
    k = int(np.argmin([abs(x - med) for x in samples]))  # the step shown in the timeline

    def rel(rank: int, t: float) -> float:
        return t - (starts[k] if starts is not None else replies[rank]["t0"][k])

    events: list[TimelineEvent] = []
    busy = np.zeros(d)
    names = graph.op_names
    pipelined = "stage_tasks" in replies[0]
    for r in replies:
        rank = r["rank"]
        if pipelined:  # one event per stage and micro-batch (the pipelining runtime runs whole stages)
            for stage, mb, phase, s, e in r["stage_tasks"][k]:
                busy[rank] += e - s
                events.append(TimelineEvent(track=devices[rank], op=f"stage{stage}" if stage >= 0 else "update",
                                            microbatch=mb, phase=phase, start_s=rel(rank, s), end_s=rel(rank, e)))
            continue
        for pos, s, e in r["tasks"][k]:
            op, mb, phase = tasks[rank][pos]
            busy[rank] += e - s
            events.append(TimelineEvent(track=devices[rank], op=names[op] if op >= 0 else "update",
                                        microbatch=mb, phase=phase, start_s=rel(rank, s), end_s=rel(rank, e)))
    events += _message_events(replies, k, names, devices, rel)
    events.sort(key=lambda e: (e.start_s, e.track))
    bytes_moved = np.zeros((d, d), dtype=np.int64)
    peak = np.zeros(d, dtype=np.int64)
    loss_sum = None
    for r in replies:
        bytes_moved[r["rank"]] = r["sent_bytes"]
        peak[r["rank"]] = r["peak_bytes"]
        if r["losses"] and r["losses"][-1]:
            loss_sum = float(np.mean(r["losses"][-1]))
    extra: dict[str, Any] = {"samples_s": [float(x) for x in samples],
                             "backend": "pipelining" if pipelined else "ops", "order": order or schedule}
    if same_host:  # how far apart the workers left the starting barrier (wake-up latency on a busy machine)
        extra["start_skew_s"] = [float(max(r["t0"][s] for r in replies) - starts[s]) for s in range(nsteps)]
    if loss_sum is not None:
        extra["loss"] = loss_sum
    over = [i for i in range(d) if peak[i] > cluster.devices[i].memory_bytes]
    if over and not is_cuda_name(devices[over[0]]):
        i = over[0]
        return StepResult(step_time_s=med, source="engine", devices=devices, busy_s=busy, peak_memory_bytes=peak,
                          bytes_moved=bytes_moved, oom=True, oom_device=i,
                          failure=f"{devices[i]} needs {int(peak[i])} bytes (engine accounting) > its "
                                  f"{cluster.devices[i].memory_bytes}", **ran,
                          microbatches=microbatches, timeline=tuple(events), extra=extra)
    return StepResult(step_time_s=med, source="engine", devices=devices, busy_s=busy, peak_memory_bytes=peak,
                      bytes_moved=bytes_moved, **ran, microbatches=microbatches,
                      timeline=tuple(events), extra=extra)
