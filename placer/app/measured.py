"""Plans measured on real workers beside the references a user compares against: Single and the even split.

What ``placer demo`` and ``benchmarks/bench_plan_real.py`` share: a :class:`PlanRow` per plan (a placement and
the schedule and micro-batch count the simulator finds best for it, :func:`best_schedule`), the even layer split
(:func:`even_split`, torchtitan's default), the fastest contiguous split by simulation (:func:`best_split`), and
:func:`measure_interleaved`, which measures every row in rounds on one warm :class:`placer.engine.Measurer` so
that a slow spell of a shared machine hits all plans alike (the median over rounds is the figure).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from graphs.ir import OpGraph
from placer.core.cluster import Cluster
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.engine.command import DEFAULT_OPTIMIZER
from placer.io.parts import model_parts, split_after

__all__ = ["SEARCHED_SCHEDULES", "MICROBATCHES", "PlanRow", "best_schedule", "even_split", "best_split", "plan_row",
           "measure_interleaved"]

SEARCHED_SCHEDULES = ("gpipe", "1f1b")
"""Pipelined schedules searched for a placement on several devices (one stage per device: interleaving has
nothing to interleave)."""
MICROBATCHES = (2, 4, 8, 16)
"""Micro-batch counts searched (those that do not divide the graph's batch are skipped by the simulator's
schedules' own check, as a failed candidate)."""


@dataclass(kw_only=True, eq=False)
class PlanRow:
    """One plan: what it is, what the simulator predicts, what the workers measured."""

    name: str
    """Its name in tables (``Single``, ``even split``, a method)."""
    label: str
    """What the placement is, in words (``split after blocks.5``)."""
    placement: Placement
    """One device per op."""
    schedule: str
    """Schedule it runs with (the best by simulation)."""
    microbatches: int
    """Micro-batches per step for ``schedule``."""
    sim_s: float
    """Simulated step time (s)."""
    real_rounds_s: list[float] = field(default_factory=list)
    """Measured step time of each round (s)."""
    result: StepResult | None = None
    """The last round's measured result (its timeline)."""

    @property
    def real_s(self) -> float:
        """Median measured step over the rounds (s); inf before any."""
        return float(statistics.median(self.real_rounds_s)) if self.real_rounds_s else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.name, "split": self.label, "schedule": self.schedule, "microbatches": self.microbatches,
                "sim_s": self.sim_s, "real_s": self.real_s, "real_rounds_s": list(self.real_rounds_s)}


def best_schedule(sim: Any, placement: Placement) -> tuple[str, int, StepResult]:
    """``(schedule, M, simulated step)`` of ``placement``'s fastest schedule by simulation: ``none`` x1 on one
    device, else the best of :data:`SEARCHED_SCHEDULES` x :data:`MICROBATCHES` (the engine's optimizer). The plan search
    (``placer.costmodel.plans.best_plan``) replaces this where it is merged."""
    if np.unique(placement.device_of_op).size == 1:
        return "none", 1, sim.run(placement, optimizer=DEFAULT_OPTIMIZER)
    best: tuple[str, int, StepResult] | None = None
    for name in SEARCHED_SCHEDULES:
        for m in MICROBATCHES:
            try:
                res = sim.run(placement, schedule=name, microbatches=m, optimizer=DEFAULT_OPTIMIZER)
            except ValueError:  # M does not split this graph's batch
                continue
            if res.ok and (best is None or res.step_time_s < best[2].step_time_s):
                best = (name, m, res)
    if best is None:
        raise ValueError(f"no schedule of {', '.join(SEARCHED_SCHEDULES)} with M in {MICROBATCHES} fits this placement")
    return best


def even_split(graph: OpGraph) -> Placement:
    """torchtitan's default two-stage split: the first half of the transformer blocks (and everything before
    them) on device 0, the rest on device 1. One-line ``ValueError`` for a model with fewer than two blocks."""
    blocks = [p for p in model_parts(graph) if p.split(".")[-1].isdigit()]
    if len(blocks) < 2:
        raise ValueError(f"{graph.name} has {len(blocks)} repeated blocks; an even layer split needs 2 or more")
    return split_after(graph, blocks[len(blocks) // 2 - 1])


def best_split(sim: Any) -> tuple[str, Placement]:
    """The fastest contiguous two-stage split between model parts, each under its :func:`best_schedule`:
    ``(label, placement)``."""
    found = []
    for last in model_parts(sim.graph)[:-1]:
        placement = split_after(sim.graph, last)
        found.append((best_schedule(sim, placement)[2].step_time_s, f"split after {last}", placement))
    _, label, placement = min(found, key=lambda f: f[0])
    return label, placement


def plan_row(sim: Any, name: str, label: str, placement: Placement) -> PlanRow:
    """A row for ``placement`` under its best schedule by simulation."""
    schedule, m, res = best_schedule(sim, placement)
    return PlanRow(name=name, label=label, placement=placement, schedule=schedule, microbatches=m,
                   sim_s=res.step_time_s)


def measure_interleaved(graph: OpGraph, cluster: Cluster, rows: Sequence[PlanRow], *, rounds: int, steps: int,
                        warmup: int, say: Callable[[str], None] = print) -> None:
    """Measure every row ``rounds`` times, one row after the other within a round, on one warm Measurer (one
    worker per device, one thread each); fills ``real_rounds_s`` and ``result``. A failed measurement is a
    one-line ``RuntimeError`` naming the plan."""
    from placer.engine import EngineConfig, Measurer  # noqa: PLC0415 - spawns workers

    with Measurer(graph, cluster, config=EngineConfig(threads_per_device=1, timeout_s=900)) as m:
        for r in range(rounds):
            for row in rows:
                t = time.perf_counter()
                res = m.measure(row.placement, schedule=row.schedule, microbatches=row.microbatches, steps=steps,
                                warmup=warmup)
                if not res.ok:
                    raise RuntimeError(f"engine run of {row.name} failed: {res.failure}")
                row.real_rounds_s.append(res.step_time_s)
                row.result = res
                say(f"  round {r + 1}/{rounds} {row.name:<12} {row.schedule} x{row.microbatches}: "
                    f"{res.step_time_s:.3f} s per step (samples "
                    f"{[round(x, 3) for x in res.extra.get('samples_s', [])]}, {time.perf_counter() - t:.0f} s)")
