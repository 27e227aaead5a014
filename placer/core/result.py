"""StepResult: what one training step cost. Returned by both the simulator and the real engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np

Phase = Literal["fwd", "bwd", "update", "send"]


@dataclass(frozen=True, kw_only=True)
class TimelineEvent:
    """One interval on a device or link track."""

    track: str
    """A device name (``cpu:0``) or a link ``cpu:0->cpu:1``."""
    op: str
    """Op name (for a transfer, the op whose output or gradient moves)."""
    microbatch: int
    phase: Phase
    start_s: float
    end_s: float

    def to_json(self) -> dict[str, Any]:
        return {"track": self.track, "op": self.op, "microbatch": self.microbatch, "phase": self.phase,
                "start_s": self.start_s, "end_s": self.end_s}


def plan_label(schedule: str, microbatches: int, recompute: Sequence[int] = ()) -> str:
    """``"1f1b x8"``; ``"1f1b x8 +recompute 0,1"`` when devices 0 and 1 recompute activations."""
    redo = f" +recompute {','.join(str(d) for d in recompute)}" if len(recompute) else ""
    return f"{schedule} x{microbatches}{redo}"


@dataclass(frozen=True, kw_only=True, eq=False)
class StepResult:
    """The cost of one training step of a placed graph.

    A failed step (OOM, crashed or hung worker, invalid placement) has ``ok=False``, ``step_time_s=inf`` and a
    one-line ``failure`` reason; callers turn it into a penalised reward rather than an exception.
    """

    step_time_s: float
    """Wall time of one training step (forward, backward, update), seconds; ``inf`` when failed."""
    source: Literal["sim", "engine"]
    devices: tuple[str, ...]
    busy_s: np.ndarray
    """Per-device compute time within the step."""
    peak_memory_bytes: np.ndarray
    """Per-device peak memory."""
    bytes_moved: np.ndarray
    """``(D, D)`` bytes sent from device i to device j during the step."""
    critical_path_s: float = 0.0
    """Longest dependency chain through compute and transfers of this placement (seconds)."""
    oom: bool = False
    oom_device: int | None = None
    failure: str | None = None
    schedule: str = "none"
    """Schedule requested (a key of ``placer.costmodel.schedules.SCHEDULES``)."""
    microbatches: int = 1
    recompute: tuple[int, ...] = ()
    """Devices that recomputed activations (activation checkpointing of their segments or stages)."""
    schedule_ran: str = ""
    """Order that actually ran when it differs from ``schedule`` (a 1F1B order that would deadlock runs
    ``gpipe``'s); empty when ``schedule`` ran as requested."""
    schedule_note: str = ""
    """Why ``schedule_ran`` differs (the deadlock found), empty otherwise."""
    timeline: tuple[TimelineEvent, ...] = field(default_factory=tuple)
    extra: dict[str, Any] = field(default_factory=dict)
    """Backend-specific facts (engine: per-step samples; sim: event count)."""

    @property
    def ok(self) -> bool:
        return self.failure is None and not self.oom and np.isfinite(self.step_time_s)

    @property
    def order(self) -> str:
        """The order that ran: ``schedule_ran`` when set, else ``schedule``."""
        return self.schedule_ran or self.schedule

    @property
    def plan_label(self) -> str:
        """``"1f1b x4"``, ``"1f1b x4 +recompute 0"``: the plan that was asked for."""
        return plan_label(self.schedule, self.microbatches, self.recompute)

    @property
    def schedule_label(self) -> str:
        """``"1f1b x4"``, or ``"1f1b x4 (ran gpipe order: 1f1b would deadlock)"`` after a fallback."""
        label = self.plan_label
        if self.order != self.schedule:
            why = "would deadlock" if "deadlock" in self.schedule_note else "fell back"
            label += f" (ran {self.order} order: {self.schedule} {why})"
        return label

    @classmethod
    def failed(cls, reason: str, *, source: Literal["sim", "engine"], devices: tuple[str, ...],
               oom_device: int | None = None, **kw: Any) -> "StepResult":
        d = len(devices)
        return cls(step_time_s=float("inf"), source=source, devices=devices, busy_s=np.zeros(d),
                   peak_memory_bytes=kw.pop("peak_memory_bytes", np.zeros(d, dtype=np.int64)),
                   bytes_moved=np.zeros((d, d), dtype=np.int64), oom=oom_device is not None,
                   oom_device=oom_device, failure=reason, **kw)

    def to_json(self) -> dict[str, Any]:
        return {
            "step_time_s": self.step_time_s if np.isfinite(self.step_time_s) else None,
            "source": self.source,
            "devices": list(self.devices),
            "busy_s": [float(x) for x in self.busy_s],
            "peak_memory_bytes": [int(x) for x in self.peak_memory_bytes],
            "bytes_moved": np.asarray(self.bytes_moved).astype(np.int64).tolist(),
            "critical_path_s": self.critical_path_s,
            "oom": self.oom,
            "oom_device": self.oom_device,
            "failure": self.failure,
            "schedule": self.schedule,
            "microbatches": self.microbatches,
            "recompute": list(self.recompute),
            "schedule_ran": self.order,
            "schedule_note": self.schedule_note,
            "timeline": [e.to_json() for e in self.timeline],
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepResult":
        return cls(
            step_time_s=float("inf") if d["step_time_s"] is None else float(d["step_time_s"]),
            source=d["source"], devices=tuple(d["devices"]), busy_s=np.array(d["busy_s"]),
            peak_memory_bytes=np.array(d["peak_memory_bytes"], dtype=np.int64),
            bytes_moved=np.array(d["bytes_moved"], dtype=np.int64), critical_path_s=d["critical_path_s"],
            oom=d["oom"], oom_device=d["oom_device"], failure=d["failure"], schedule=d["schedule"],
            microbatches=d["microbatches"], recompute=tuple(int(x) for x in d.get("recompute", ())),
            schedule_ran="" if d.get("schedule_ran", d["schedule"]) == d["schedule"] else d["schedule_ran"],
            schedule_note=d.get("schedule_note", ""), timeline=tuple(TimelineEvent(**e) for e in d["timeline"]),
            extra=d.get("extra", {}),
        )
