"""Polishing a run's result by plan refinement (:attr:`TrainConfig.refine_s`): the planner ``bench_plan`` measures.

After training, :func:`placer.costmodel.refine.refine` searches op placements, each scored by its best plan, for
``refine_s`` seconds, started from the run's best placement (``policy``), every evaluated baseline's (by name) and
the balanced / interleaved / memory-balanced splits. The policy works on groups; refinement moves single ops
across stage boundaries, so its plan need not be expressible as groups, and it is kept as an op placement beside
the run's groups. It is reported only when its simulated step beats the policy's best simulated on the full graph
(both under their best plan, same simulator), labelled ``refined from <start>`` (``provenance.source`` in the
placement file). A resumed run refines again at its end. Where no sampled placement ran (every one out of
memory on a memory-tight cluster), the search starts from the baselines and the splits alone, and its plan, when
one fits, is the run's result instead of an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from placer.core.placement import Placement

if TYPE_CHECKING:
    from placer.app.training.trainer import Slot
    from placer.core.cluster import Cluster
    from placer.core.result import StepResult


@dataclass(frozen=True)
class RefinedPlacement:
    """A refined plan that beat the run's best placement."""

    placement: Placement
    predicted: "StepResult"
    """Its best plan, simulated on the full op graph."""
    start: str
    """The start it descends from: ``policy``, a baseline's name or a split's label (``interleaved-4x2``)."""
    policy_step_s: float
    """The run's own best, simulated the same way, which it beat (``inf`` when none of its samples ran)."""
    evaluations: int
    """Placements the search scored."""

    @property
    def source(self) -> str:
        return f"refined from {self.start}"


def refine_slot(slot: "Slot", cluster: "Cluster", policy: "StepResult | None", *, budget_s: float,
                seed: int) -> RefinedPlacement | None:
    """Refine ``slot``'s best placement (``policy``: its full-graph best-plan result; None when no sampled
    placement ran, e.g. every one out of memory, and the search starts from the baselines and the splits alone)
    for ``budget_s`` seconds; the refined plan when it runs and is faster, else None."""
    from placer.costmodel.refine import refine
    from placer.costmodel.sim import get_simulator

    starts = {m: np.asarray(p.device_of_op) for m, (p, r) in slot.evaluated.items() if r.ok}
    if slot.final_groups is not None:
        starts["policy"] = np.asarray(slot.env.problem.expand(slot.final_groups).device_of_op)
    got = refine(get_simulator(slot.graph, cluster), starts, budget_s=budget_s, seed=seed)
    policy_s = policy.step_time_s if policy is not None and policy.ok else float("inf")
    if not got.result.ok or not got.result.step_time_s < policy_s:
        return None
    return RefinedPlacement(placement=Placement(np.asarray(got.plan.device_of_op, dtype=np.int64)),
                            predicted=got.result, start=got.start, policy_step_s=policy_s,
                            evaluations=got.evaluations)
