"""What one device saw in one step of the engine (:class:`StepRecord`: its tasks' and messages' timestamps, the
micro-batch losses), and how one fused backward call's span is recorded per task (:func:`split_times`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

__all__ = ["StepRecord", "split_times"]


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


def split_times(rec: StepRecord, positions: Sequence[int], s: float, e: float, fwd_marks: list[float] | None) -> None:
    """One backward call's span ``[s, e]`` recorded per task, split in proportion to the ops' forward times (one
    autograd call has no per-op clock; ``positions`` run from the last op back to the first)."""
    n = len(positions)
    if n == 1 or not fwd_marks:
        rec.task_times.append((positions[0], s, e))
        return
    fwd = [b - a for a, b in zip(fwd_marks, fwd_marks[1:])][::-1]  # in backward order
    total = sum(fwd) or 1.0
    t = s
    for k, f in zip(positions, fwd):
        end = t + (e - s) * f / total
        rec.task_times.append((k, t, end))
        t = end
