"""Trainer callbacks: work that depends on what a graph's reward backend can do, kept out of the loop.

A callback belongs to one graph of the run (a :class:`placer.app.training.trainer.Slot`); the trainer calls
:meth:`Callback.on_start` when the loop starts, :meth:`Callback.on_round` after every round, :meth:`Callback.on_end`
once training stops, and saves :meth:`Callback.state_dict` in the graph's checkpoint entry under
:attr:`Callback.name`. :func:`callbacks_for` picks them from the backend's capabilities
(:class:`envs.rewards.RewardBackend`), never from its class or name.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from placer.core.result import StepResult

if TYPE_CHECKING:
    from placer.app.training.trainer import Slot, Trainer

log = logging.getLogger(__name__)


class Callback:
    """Base class: every hook does nothing."""

    name = "callback"

    def on_start(self, trainer: "Trainer", slot: "Slot") -> None:
        """When the training loop starts (after the baselines and the warm start)."""

    def on_round(self, trainer: "Trainer", slot: "Slot") -> None:
        """After every round (one update of every graph)."""

    def on_end(self, trainer: "Trainer", slot: "Slot") -> None:
        """Once, after the last round, before the final checkpoint."""

    def state_dict(self, slot: "Slot") -> dict[str, Any]:
        return {}

    def load_state_dict(self, slot: "Slot", state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resumed run)."""


class Remeasure(Callback):
    """Measures the ``top_k`` best simulated placements with the engine every ``every_s`` seconds and once more,
    in 3 interleaved rounds, at the end (:meth:`envs.rewards.SimRealBackend.remeasure_top`); the best measured
    one becomes the graph's result (``slot.measured`` / ``slot.measured_groups``). TensorBoard:
    ``real/best_step_time_s`` and ``real/top<k>_step_time_s``. A measurement that fails is a warning and counts in
    :attr:`failures` (the run's summary reports it), never only a ``None`` in the log."""

    name = "remeasure"

    def __init__(self, top_k: int, every_s: float) -> None:
        self.top_k, self.every_s = top_k, every_s
        self.last = time.perf_counter()
        self.log: list[dict[str, Any]] = []
        self.failures = 0
        """Engine measurements of this graph that failed (across resumes)."""

    def on_start(self, trainer: "Trainer", slot: "Slot") -> None:
        self.last = time.perf_counter()

    def on_round(self, trainer: "Trainer", slot: "Slot") -> None:
        if time.perf_counter() - self.last >= self.every_s:
            self._remeasure(trainer, slot, final=False)
            self.last = time.perf_counter()

    def on_end(self, trainer: "Trainer", slot: "Slot") -> None:
        self._remeasure(trainer, slot, final=True)

    def _remeasure(self, trainer: "Trainer", slot: "Slot", *, final: bool) -> None:
        top = slot.env.backend.remeasure_top(self.top_k, rounds=3 if final else 0)
        ok = [r for r in top if r.real.ok]
        failed = [r.real.failure for r in top if not r.real.ok]
        if failed:
            self.failures += len(failed)
            log.warning("%s: %d of %d engine re-measurements failed (%s); %d failed so far in this run",
                        slot.graph.name, len(failed), len(top), failed[0], self.failures)
        for i, r in enumerate(top):
            trainer.writer.add_scalar(f"real/top{i + 1}_step_time_s{slot.tag}",
                                      r.real.step_time_s if r.real.ok else float("nan"), trainer.samples)
        if ok:
            win = min(ok, key=lambda r: r.real.step_time_s)
            if slot.measured is None or win.real.step_time_s < slot.measured.step_time_s:
                slot.measured, slot.measured_groups = win.real, win.device_of_group
            trainer.writer.add_scalar(f"real/best_step_time_s{slot.tag}", slot.measured.step_time_s, trainer.samples)
        self.log.append({"samples": trainer.samples, "elapsed_s": trainer.elapsed(), "final": final,
                         "measured_s": [r.real.step_time_s if r.real.ok else None for r in top],
                         "simulated_s": [r.sim.step_time_s for r in top]})

    def state_dict(self, slot: "Slot") -> dict[str, Any]:
        return {"measured": slot.measured.to_json() if slot.measured is not None else None,
                "measured_device_of_group": slot.measured_groups, "log": self.log, "failures": self.failures}

    def load_state_dict(self, slot: "Slot", state: dict[str, Any]) -> None:
        if state.get("measured") is not None:
            slot.measured = StepResult.from_json(state["measured"])
            slot.measured_groups = state["measured_device_of_group"]
        self.log = list(state.get("log", []))
        self.failures = int(state.get("failures", sum(v is None for e in self.log for v in e["measured_s"])))


def callbacks_for(backend: Any, *, top_k_real: int, real_every_s: float) -> list[Callback]:
    """The callbacks a graph whose reward comes from ``backend`` needs."""
    return [Remeasure(top_k_real, real_every_s)] if backend.remeasures else []
