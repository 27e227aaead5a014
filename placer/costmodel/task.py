"""One scheduled task, the unit both the simulator's schedules and the engine's workers run (like
``torch.distributed.pipelining``'s single ``_Action`` type). Kept free of numba and torch: engine workers import it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

PHASES: tuple[str, ...] = ("fwd", "bwd", "update")
"""Phase names by code (``Schedule.phase`` holds the code)."""


class Task(NamedTuple):
    """One entry of a device's order: ``(op, microbatch, phase)``; a plain tuple on the wire."""

    op: int
    """Op index (-1 for ``update``)."""
    microbatch: int
    """Micro-batch index (-1 for ``update``)."""
    phase: Literal["fwd", "bwd", "update"]
