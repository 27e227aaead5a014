"""Plans measured on real workers beside the references a user compares against: Single and the even split.

What ``placer demo`` and ``benchmarks/bench_plan_real.py`` share: a :class:`PlanRow` per plan (a placement and
the schedule and micro-batch count the plan search finds best for it, :func:`plan_row`), the even layer split
(:func:`even_split`, torchtitan's default), the fastest plan by simulation (:func:`winning_plan`), and
:func:`measure_interleaved`, which measures every row in rounds on one warm :class:`placer.engine.Measurer` so
that a slow spell of a shared machine hits all plans alike (the median over rounds is the figure), and
:func:`costs_of_the_day`, which gives the simulator this machine's op costs as they are now.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from graphs.ir import OpGraph
from placer import baselines
from placer.core.cluster import Cluster
from placer.core.placement import Placement
from placer.core.result import StepResult, plan_label
from placer.costmodel.plans import best_plan
from placer.engine.command import DEFAULT_OPTIMIZER
from placer.io.document import contiguous_stages
from placer.io.parts import model_parts, split_after

log = logging.getLogger(__name__)

__all__ = ["PlanRow", "plan_row", "even_split", "contiguous_splits", "winning_plan", "measure_interleaved",
           "costs_of_the_day"]


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
    recompute: tuple[int, ...] = ()
    """Devices that recompute activations (the plan's)."""
    real_rounds_s: list[float] = field(default_factory=list)
    """Measured step time of each round (s)."""
    result: StepResult | None = None
    """The last round's measured result (its timeline)."""

    @property
    def plan_label(self) -> str:
        """``"1f1b x8"``, ``"1f1b x8 +recompute 0"``."""
        return plan_label(self.schedule, self.microbatches, self.recompute)

    @property
    def real_s(self) -> float:
        """Median measured step over the rounds (s); inf before any."""
        return float(statistics.median(self.real_rounds_s)) if self.real_rounds_s else float("inf")

    def to_json(self) -> dict[str, Any]:
        return {"plan": self.name, "split": self.label, "schedule": self.schedule, "microbatches": self.microbatches,
                "recompute": list(self.recompute), "sim_s": self.sim_s, "real_s": self.real_s,
                "real_rounds_s": list(self.real_rounds_s)}


def plan_row(sim: Any, name: str, label: str, placement: Placement) -> PlanRow:
    """A row for ``placement`` under its best schedule and micro-batch count by simulation (the plan search's
    :func:`placer.costmodel.plans.best_plan`, with the engine's optimizer)."""
    plan, res = best_plan(sim, placement, optimizer=DEFAULT_OPTIMIZER)
    return PlanRow(name=name, label=label, placement=placement, schedule=plan.schedule,
                   microbatches=plan.microbatches, sim_s=res.step_time_s, recompute=plan.recompute)


def even_split(graph: OpGraph, cluster: Cluster) -> Placement:
    """torchtitan's default split: the ``even-layers`` baseline (blocks split evenly over the devices, the
    embeddings on the first stage, norm, head and loss on the last)."""
    return baselines.place("even-layers", graph, cluster, seed=0)


def contiguous_splits(graph: OpGraph) -> list[tuple[str, Placement]]:
    """Every contiguous two-stage split between two model parts: ``(label, placement)``."""
    return [(f"split after {last}", split_after(graph, last)) for last in model_parts(graph)[:-1]]


def winning_plan(sim: Any, *, methods: Sequence[str] | None = None, seed: int = 0) -> tuple[str, Placement]:
    """The fastest plan by simulation among every baseline's placement (``methods``, default all that apply)
    and every contiguous two-stage split, each under its best schedule: ``(label, placement)``. The function
    boundary a learned planner's result joins."""
    graph, cluster = sim.graph, sim.cluster
    candidates = list(contiguous_splits(graph)) if cluster.num_devices == 2 else []
    for method in methods if methods is not None else baselines.names():
        try:
            candidates.append((method, baselines.place(method, graph, cluster, seed=seed)))
        except ValueError as e:  # a method that does not apply here (single-gpu on a CPU cluster)
            log.info("%s: %s", method, e)
    timed = [(best_plan(sim, p, optimizer=DEFAULT_OPTIMIZER)[1].step_time_s, label, p) for label, p in candidates]
    _, label, placement = min(timed, key=lambda t: t[0])
    if not label.startswith("split after"):  # a baseline's name alone does not say where it cut
        stages = contiguous_stages(graph, placement)
        cuts = ", ".join(s["last_op"] for s in stages[:-1]) if stages else None
        label += f" (stages end after {cuts})" if cuts else " (not stage-contiguous)"
    return label, placement


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
                                warmup=warmup, recompute=row.recompute)
                if not res.ok:
                    raise RuntimeError(f"engine run of {row.name} failed: {res.failure}")
                row.real_rounds_s.append(res.step_time_s)
                row.result = res
                say(f"  round {r + 1}/{rounds} {row.name:<12} {row.plan_label}: "
                    f"{res.step_time_s:.3f} s per step (samples "
                    f"{[round(x, 3) for x in res.extra.get('samples_s', [])]}, {time.perf_counter() - t:.0f} s)")


def costs_of_the_day(graph: OpGraph, cluster: Cluster, *, steps: int = 3,
                     say: Callable[[str], None] = print) -> OpGraph:
    """``graph`` with its ``cpu`` op costs read off a Single run on ``cluster``'s workers now
    (:func:`placer.engine.calibrate.engine_op_costs`). The shipped one-core profile was taken on another day, and
    this VM's speed drifts (on 2026-12-04 the same gpt-medium step ran 1.9-2.4x slower than profiled), so a
    simulator that predicts seconds on these workers needs today's; says the two sums."""
    from placer.engine import EngineConfig, Measurer  # noqa: PLC0415 - spawns workers
    from placer.engine.calibrate import engine_op_costs  # noqa: PLC0415

    with Measurer(graph, cluster, config=EngineConfig(threads_per_device=1, timeout_s=900)) as m:
        day = engine_op_costs(graph, m, steps=steps, warmup=1)
    shipped, today = graph.cost("cpu").step_s.sum(), day.cost("cpu").step_s.sum()
    say(f"op costs of the day: ops sum to {today:.3f} s on the workers now, {shipped:.3f} s in the shipped "
        f"profile ({today / shipped:.2f}x)")
    return day
