"""Seeding a run's search with the baselines' plans: the run never reports a placement worse than the best
baseline it evaluated (issue 20: "the planner never hands back a plan worse than the best baseline it compared").

With :attr:`TrainConfig.seed_baselines`, once the baselines are evaluated (one-graph runs, under the run's
schedule, ``auto`` included), the fastest feasible baseline's placement is projected onto the run's groups
(:meth:`envs.problem.PlacementProblem.project`) and scored by the environment. When it beats the run's best so far
it becomes that best, and an algorithm with a self-imitation buffer (``seed_elite``) gets it too, so the policy
is pulled toward it. The reported placement is then the better of the policy's best and the baseline's; while
the baseline's is the one reported, the placement file says ``"source": "seeded by <baseline>"``
(``provenance.source``), otherwise ``"policy"``. A projected placement can be slower than the baseline's own
op-level one (a group split between devices is not expressible); its own score is what counts. A resumed run
keeps its best but not the label.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from placer.app.training.trainer import Slot


def seed_from_baselines(slot: "Slot") -> str | None:
    """Make the best evaluated baseline the slot's best when it is better; its name, or None."""
    ok = {m: r.step_time_s for m, (_, r) in slot.evaluated.items() if r.ok}
    if not ok:
        return None
    method = min(ok, key=lambda m: (ok[m], m))
    groups = np.asarray(slot.env.problem.project(slot.evaluated[method][0]))
    reward, res = slot.env.evaluate(groups)
    if not res.ok or not res.step_time_s < slot.best_time_s:
        return None
    slot.best_time_s, slot.best_groups, slot.dirty = float(res.step_time_s), groups.copy(), True
    if hasattr(slot.algo, "seed_elite"):
        slot.algo.seed_elite(np.array([reward]), groups[None])
    slot.seeded = (method, groups.astype(np.int64).tobytes())
    return method


def source_of(slot: "Slot") -> str | None:
    """``seeded by <baseline>`` while the seeded placement is the one reported, ``policy`` after the policy beat
    it, None when the run was not seeded."""
    if slot.seeded is None:
        return None
    groups = slot.final_groups
    same = groups is not None and np.asarray(groups, dtype=np.int64).tobytes() == slot.seeded[1]
    return f"seeded by {slot.seeded[0]}" if same else "policy"
