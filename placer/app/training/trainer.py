"""The training loop of ``placer train``, for one graph or many (one graph is the case N = 1).

Every graph of a run is a :class:`Slot`: its environment (built by :func:`envs.placement_env.make_env`), its
algorithm instance (own reward normalisation, REINFORCE baseline or PPO critic, seeded with the run's seed plus
the graph's index), its best placement and learning history, and its callbacks
(:mod:`placer.app.training.callbacks`). The policy's weights are shared, and for REINFORCE so is one Adam optimizer.
A round updates every graph once, in order; the budget and ``max_updates`` count rounds.

The run folder (see :mod:`placer.app.train`) is written by :meth:`Trainer.checkpoint` (``checkpoint.pt``, the
placements) and at the end (``learning_curve.png`` for one graph). TensorBoard tags carry a ``/<graph>`` suffix
when there are several graphs; the x axis is the number of sampled placements.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from envs.placement_env import PlacementEnv
from graphs.ir import OpGraph
from placer.app.runs import Progress, hparams_markdown, plot_learning_curve, safe_name
from placer.app.training.callbacks import Callback, callbacks_for
from placer.app.training.checkpoint import load_checkpoint, save_checkpoint
from placer.app.training.config import TrainConfig
from placer.app.training.refining import RefinedPlacement, refine_slot
from placer.app.training.seeding import seed_from_baselines, source_of
from placer.core.cluster import Cluster
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.io.document import save_placement

log = logging.getLogger(__name__)


# ============================================================================================== a graph
@dataclass(kw_only=True, eq=False)
class Slot:
    """One graph of a run: its env, algorithm, best placement, history and callbacks."""

    graph: OpGraph
    env: PlacementEnv
    algo: Any
    tag: str
    """TensorBoard tag suffix: empty for a one-graph run, ``/<graph>`` otherwise."""
    callbacks: list[Callback] = field(default_factory=list)
    best_time_s: float = math.inf
    """Best step time sampled so far, under the reward backend."""
    best_groups: np.ndarray | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    """Per update: ``elapsed_s``, ``samples``, ``best_step_time_s``, ``mean_step_time_s``."""
    measured: StepResult | None = None
    """The best engine-measured placement's result, when a callback measures (``sim+real``)."""
    measured_groups: np.ndarray | None = None
    baselines: dict[str, float] = field(default_factory=dict)
    """Simulated step time of each evaluated baseline (one-graph runs)."""
    evaluated: dict[str, tuple[Placement, StepResult]] = field(default_factory=dict)
    """Each evaluated baseline's placement and simulated step (one-graph runs)."""
    dirty: bool = False
    """A better placement was found since the placement file was last written."""
    kept_on_disk: str | None = None
    """Why the placement file was left as it was (:meth:`Trainer.write_placement`), once it was."""
    seeded: tuple[str, bytes] | None = None
    """The baseline the search was seeded with and its groups (:mod:`placer.app.training.seeding`)."""
    refined: RefinedPlacement | None = None
    """The refined plan reported instead of the best groups' (:mod:`placer.app.training.refining`)."""

    def record(self, stats: Any, *, samples: int, elapsed_s: float) -> float:
        """Track the best of an update's placements and append to the history; returns the update's mean step
        time (``inf`` when every placement failed)."""
        times = np.asarray(stats.step_times_s, dtype=np.float64)
        ok = np.isfinite(times)
        if ok.any():
            i = int(np.argmin(times))
            if times[i] < self.best_time_s:
                self.best_time_s, self.best_groups, self.dirty = float(times[i]), np.asarray(
                    stats.placements[i]).copy(), True
        mean_t = float(times[ok].mean()) if ok.any() else math.inf
        self.history.append({"elapsed_s": elapsed_s, "samples": samples, "best_step_time_s": self.best_time_s,
                             "mean_step_time_s": mean_t})
        return mean_t

    @property
    def final_groups(self) -> np.ndarray | None:
        """The placement the run reports: the best measured one when measured, else the best sampled one."""
        return self.measured_groups if self.measured_groups is not None else self.best_groups

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.graph.name, "algo": self.algo.state_dict(),
                "best": {"device_of_group": self.best_groups, "step_time_s": self.best_time_s},
                "history": self.history, "callbacks": {cb.name: cb.state_dict(self) for cb in self.callbacks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.algo.load_state_dict(state["algo"])
        self.best_groups, self.best_time_s = state["best"]["device_of_group"], state["best"]["step_time_s"]
        self.history = list(state.get("history", []))
        for cb in self.callbacks:
            if cb.name in state.get("callbacks", {}):
                cb.load_state_dict(self, state["callbacks"][cb.name])


@dataclass(kw_only=True)
class GraphOutcome:
    """What a run produced for one graph."""

    placement: Placement
    """Best placement (op level)."""
    device_of_group: np.ndarray | None
    """The policy's best groups (None when only refinement found a plan that runs)."""
    predicted: StepResult
    """Best placement simulated on the full op graph."""
    measured: StepResult | None
    """Engine measurement of the best placement (``real`` / ``sim+real``)."""
    best_step_time_s: float
    """Best step time under the reward backend (what the search optimised)."""
    reference_step_time_s: float
    baselines: dict[str, float]
    """Simulated step time of each baseline (``inf`` for OOM; one-graph runs)."""
    history: list[dict[str, float]]
    """Per update: ``elapsed_s``, ``samples``, ``best_step_time_s``, ``mean_step_time_s``."""
    failed_measurements: int = 0
    """Engine measurements of this graph that failed during the run (``sim+real`` re-measurements)."""
    kept_on_disk: str | None = None
    """Set when the run folder's placement file holds a better placement than this run's best (one written before
    a kill and a resume): what was kept, in words. The file is left as it is."""
    source: str | None = None
    """``refined from <start>`` when refinement's plan is reported; else ``seeded by <baseline>`` or ``policy`` for
    a run with ``seed_baselines``; None otherwise."""
    refined: RefinedPlacement | None = None
    """The refined plan when it is the one reported (``placement``, ``predicted`` are its own, not the groups')."""


# ============================================================================================== the run
def held_step_time_s(path: Path, *, measured: bool) -> float | None:
    """The step time a placement file already holds: its measured one when ``measured``, else its simulated one
    (``None``: no file, no such time, or a file that cannot be read, which is then overwritten)."""
    import json

    try:
        entry = json.loads(path.read_text())["measured" if measured else "predicted"]
        value = entry["step_time_s"] if entry else None
        return float(value) if value is not None and math.isfinite(float(value)) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate_baselines(graph: OpGraph, cluster: Cluster, methods: Sequence[str], *, schedule: str = "none",
                       microbatches: int = 1, seed: int = 0) -> dict[str, tuple[Placement, StepResult]]:
    """Each applicable baseline's placement and its simulated step on the full graph (``n/a`` ones left out)."""
    from placer import baselines
    from placer.costmodel.plans import run_plan
    from placer.costmodel.sim import Simulator

    sim = Simulator(graph, cluster)
    out = {}
    for m in methods:
        try:
            p = baselines.place(m, graph, cluster, seed=seed)
        except ValueError as e:
            log.info("baseline %s does not apply: %s", m, e)
            continue
        out[m] = (p, run_plan(sim, p, schedule=schedule, microbatches=microbatches))
    return out


class Trainer:
    """One run: policy, the graphs' slots, the writer and the counters (module docstring)."""

    def __init__(self, config: TrainConfig, run_dir: Path, cluster: Cluster, envs: list[PlacementEnv]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from policies import make_algo, make_policy

        self.config, self.run_dir, self.cluster = config, run_dir, cluster
        try:
            self.policy = make_policy(config.policy, envs[0].problem, hidden=config.hidden, **config.policy_options)
        except TypeError as e:  # an option the policy does not take (--policy-options nonsense=1)
            raise ValueError(f"policy {config.policy!r} does not take policy_options "
                             f"{', '.join(sorted(config.policy_options)) or '(none)'}: {e}") from None
        several = len(envs) > 1
        self.slots = []
        for i, env in enumerate(envs):
            algo = make_algo(config.algo, self.policy, env, dataclasses.replace(config.algo_config,
                                                                                seed=config.seed + i))
            self.slots.append(Slot(graph=env.graph, env=env, algo=algo, tag=f"/{env.graph.name}" if several else "",
                                   callbacks=callbacks_for(env.backend, top_k_real=config.top_k_real,
                                                           real_every_s=config.real_every_s)))
        first = self.slots[0].algo
        if several and hasattr(first, "optimizer"):  # one optimizer for the shared weights
            for slot in self.slots[1:]:
                slot.algo.optimizer = first.optimizer
        self.updates = self.samples = 0
        self.elapsed_before = 0.0
        self.trained_s = 0.0
        """Training seconds (across resumes) when the loop stopped, before the final re-measurement."""
        ckpt = run_dir / "checkpoint.pt"
        self.resumed = bool(config.resume and ckpt.exists())
        if self.resumed:
            self._load(ckpt)
        elif config.resume:
            log.warning("run %s has no checkpoint yet; starting it from scratch", run_dir.name)
        if not several:
            self._evaluate_baselines(self.slots[0])
            if config.seed_baselines and not self.resumed:
                seed_from_baselines(self.slots[0])
        # on resume, TensorBoard drops what the killed run logged after its last checkpoint
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=self.samples + 1 if self.resumed else None)
        self.method = f"rl:{config.policy}+{config.algo}" + ("+multi" if several else "")
        self.t0 = time.perf_counter()

    def _load(self, path: Path) -> None:
        from placer.app.training.checkpoint import set_rng_state

        state = load_checkpoint(path, [s.graph.name for s in self.slots])
        self.policy.load_state_dict(state["policy"])
        for slot, slot_state in zip(self.slots, state["graphs"]):
            slot.load_state_dict(slot_state)
        set_rng_state(state["rng"])
        counters = state["counters"]
        self.updates, self.samples, self.elapsed_before = counters["updates"], counters["samples"], counters[
            "elapsed_s"]
        log.info("resuming %s at update %d (%d samples, %.0f s)", self.run_dir.name, self.updates, self.samples,
                 self.elapsed_before)

    def _evaluate_baselines(self, slot: Slot) -> None:
        c = self.config
        slot.evaluated = evaluate_baselines(slot.graph, self.cluster, c.baselines, schedule=c.schedule,
                                            microbatches=c.microbatches, seed=c.seed)
        slot.baselines = {m: (r.step_time_s if r.ok else math.inf) for m, (_, r) in slot.evaluated.items()}

    def elapsed(self) -> float:
        """Training seconds, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t0

    # ------------------------------------------------------------------------------------------ logging
    def log_start(self) -> None:
        """Hyper-parameters (fresh runs) and the baselines' reference lines."""
        if not self.resumed:
            rows: dict[str, Any] = {**self.config.to_json(),
                                    "policy_parameters": sum(p.numel() for p in self.policy.parameters())}
            for s in self.slots:
                rows.update({f"groups{s.tag}": s.env.num_groups, f"coarse_nodes{s.tag}": s.env.problem.coarse.n,
                             f"reference_method{s.tag}": s.env.reference_method,
                             f"reference_step_time_s{s.tag}": s.env.reference_time_s})
            self.writer.add_text("hyperparameters", hparams_markdown(rows))
        self.log_baselines()

    def log_baselines(self) -> None:
        for s in self.slots:
            for m, v in s.baselines.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"baseline/{m}_step_time_s{s.tag}", v, self.samples)

    def log_update(self, slot: Slot, stats: Any, mean_t: float, rate: float) -> None:
        w, n, tag = self.writer, self.samples, slot.tag
        times = np.asarray(stats.step_times_s, dtype=np.float64)
        ok = np.isfinite(times)
        w.add_scalar(f"charts/best_step_time_s{tag}", slot.best_time_s, n)
        if ok.any():
            w.add_scalar(f"charts/mean_step_time_s{tag}", mean_t, n)
        w.add_scalar(f"charts/reward{tag}", float(np.mean(stats.rewards)), n)
        w.add_scalar(f"charts/entropy{tag}", stats.entropy, n)
        w.add_scalar(f"charts/samples_per_s{tag}", rate, n)
        w.add_scalar(f"charts/failure_rate{tag}", float(1 - ok.mean()) if len(ok) else math.nan, n)
        w.add_scalar(f"losses/policy{tag}", stats.loss, n)
        w.add_scalar(f"losses/grad_norm{tag}", stats.grad_norm, n)
        w.add_scalar(f"losses/baseline{tag}", stats.baseline, n)

    def warm_start(self) -> None:
        """Imitate a baseline's placement before RL (fresh runs only: a resumed run has it in its checkpoint) and
        label the run's placements ``+warm:<method>``."""
        from policies import PolicyInput, imitate

        c, slot = self.config, self.slots[0]
        ok = {m: r.step_time_s for m, (_, r) in slot.evaluated.items() if r.ok}
        method = min(ok, key=ok.get) if c.warm_start == "best" and ok else c.warm_start
        if method not in slot.evaluated:
            raise ValueError(f"warm start {c.warm_start!r}: no such evaluated baseline (have "
                             f"{', '.join(slot.evaluated)})")
        self.method += f"+warm:{method}"
        if self.resumed:
            return
        import torch

        groups = slot.env.problem.project(slot.evaluated[method][0])
        reward, res = slot.env.evaluate(groups)
        steps, nll = imitate(self.policy, PolicyInput.from_problem(slot.env.problem), torch.as_tensor(groups)[None],
                             max_steps=c.warm_start_steps)
        if hasattr(slot.algo, "seed_elite"):
            slot.algo.seed_elite(np.array([reward]), groups[None])
        self.writer.add_text("warm_start", f"imitated {method} ({res.step_time_s:.6g} s on groups) for {steps} "
                                           f"steps, final NLL {nll:.3f} nats/decision")
        log.info("warm start: imitated %s (%.4g s) in %d steps, NLL %.3f", method, res.step_time_s, steps, nll)

    def _refine(self, slot: Slot) -> None:
        """Plan refinement after training (:mod:`placer.app.training.refining`); its step goes to TensorBoard."""
        groups = slot.final_groups
        policy = self.predicted_of(slot, groups) if groups is not None else None
        slot.refined = refine_slot(slot, self.cluster, policy, budget_s=self.config.refine_s, seed=self.config.seed)
        if slot.refined is not None:
            slot.dirty = True
            self.writer.add_scalar("charts/refined_step_time_s", slot.refined.predicted.step_time_s, self.samples)

    # ------------------------------------------------------------------------------------------ files
    def predicted_of(self, slot: Slot, groups: np.ndarray) -> StepResult:
        """``groups`` simulated on the full op graph."""
        from placer.costmodel.plans import simulate_plan

        c = self.config
        return simulate_plan(slot.graph, self.cluster, slot.env.problem.expand(groups), schedule=c.schedule,
                        microbatches=c.microbatches)

    def reported(self, slot: Slot) -> tuple[Placement, StepResult, str | None]:
        """What the run reports for ``slot``: its refined plan when there is one (a sim run: nothing measured), else
        the best groups' placement; with its full-graph simulated result and its source label."""
        if (ref := slot.refined) is not None:
            return ref.placement, ref.predicted, ref.source
        groups = slot.final_groups
        return slot.env.problem.expand(groups), self.predicted_of(slot, groups), source_of(slot)

    def measured_of(self, slot: Slot) -> StepResult | None:
        """The engine's result of the reported placement (``real``: its reward; ``sim+real``: the callback's)."""
        if slot.measured is None and slot.env.backend.source == "engine" and slot.final_groups is not None:
            return slot.env.result_of(slot.final_groups)
        return slot.measured

    def placement_path(self, slot: Slot) -> Path:
        """The placement file of ``slot``'s graph in the run folder."""
        name = "placement.json" if len(self.slots) == 1 else f"placement_{safe_name(slot.graph.name)}.json"
        return self.run_dir / name

    def write_placement(self, slot: Slot) -> None:
        """Write the slot's reported placement; a resumed run first reads the file, and leaves it when it holds a
        better placement (written before a kill that came between a placement write and the next checkpoint): the
        best on disk never gets worse. A fresh run's file holds only its own placements."""
        if slot.final_groups is None and slot.refined is None:
            return
        path = self.placement_path(slot)
        placement, predicted, source = self.reported(slot)
        measured = self.measured_of(slot)
        held = held_step_time_s(path, measured=measured is not None) if self.config.resume else None
        mine = measured if measured is not None else predicted
        if held is not None and (not mine.ok or held < mine.step_time_s):
            if slot.kept_on_disk is None:
                slot.kept_on_disk = (f"{path.name} keeps its {held * 1e3:.3f} ms placement ({mine.source}); this "
                                     f"run's best is {mine.step_time_s * 1e3:.3f} ms")
                log.warning("%s", slot.kept_on_disk)
            slot.dirty = False
            return
        save_placement(path, slot.graph, self.cluster, placement,
                       method=self.method, seed=self.config.seed, run=self.run_dir.name,
                       predicted=predicted, measured=measured, source=source,
                       schedule=self.config.schedule, microbatches=self.config.microbatches)
        slot.dirty = False

    def checkpoint(self) -> None:
        """``checkpoint.pt`` and every graph's placement file, atomically."""
        save_checkpoint(self.run_dir / "checkpoint.pt", policy=self.policy.state_dict(),
                        counters={"updates": self.updates, "samples": self.samples, "elapsed_s": self.elapsed()},
                        graphs=[s.state_dict() for s in self.slots])
        for slot in self.slots:
            self.write_placement(slot)

    # ------------------------------------------------------------------------------------------ loop
    def run(self) -> list[GraphOutcome]:
        """Train until the budget or ``max_updates`` is spent; returns each graph's outcome."""
        c = self.config
        for slot in self.slots:
            for cb in slot.callbacks:
                cb.on_start(self, slot)
        self.t0 = time.perf_counter()
        progress = Progress(c.progress, c.budget_s, self.elapsed_before)
        last_ckpt = last_write = time.perf_counter()
        rate = 0.0
        try:
            while self.elapsed() < c.budget_s and (c.max_updates is None or self.updates < c.max_updates):
                for slot in self.slots:
                    rate = self._update(slot, rate)
                self.updates += 1
                head = self.slots[0]
                progress.update(self.elapsed(), f"best {head.best_time_s:.4g} s | {rate:.0f} samples/s | "
                                                f"update {self.updates}")
                now = time.perf_counter()
                if now - last_ckpt >= c.checkpoint_every_s:
                    self.checkpoint()
                    last_ckpt = last_write = now
                elif now - last_write >= 5.0 and any(s.dirty for s in self.slots):
                    for slot in (s for s in self.slots if s.dirty):
                        self.write_placement(slot)
                    last_write = now
                for slot in self.slots:
                    for cb in slot.callbacks:
                        cb.on_round(self, slot)
        except KeyboardInterrupt:  # Ctrl-C: keep what was learned, then let the caller report the interruption
            self.checkpoint()
            self.writer.close()
            raise
        finally:
            progress.close()
        self.trained_s = self.elapsed()  # what the budget bounds; the final re-measurement and files come after
        return self._finish()

    def _update(self, slot: Slot, rate: float) -> float:
        """One update of ``slot``'s algorithm, tracked and logged; returns the samples-per-second average."""
        t_update = time.perf_counter()
        stats = slot.algo.update()
        dt = time.perf_counter() - t_update
        n = len(stats.rewards)
        self.samples += n
        rate = n / dt if rate == 0 else 0.9 * rate + 0.1 * n / dt
        mean_t = slot.record(stats, samples=self.samples, elapsed_s=self.elapsed())
        self.log_update(slot, stats, mean_t, rate)
        return rate

    def _finish(self) -> list[GraphOutcome]:
        c = self.config
        if c.refine_s > 0 and len(self.slots) == 1:  # first: it also starts from the baselines and the splits
            self._refine(self.slots[0])
        missing = [s.graph.name for s in self.slots if s.best_groups is None and s.refined is None]
        if missing:
            raise ValueError(f"no placement of {', '.join(missing)} sampled in training ran (each failed or was out "
                             f"of memory, or the budget was too small)")
        for slot in self.slots:
            for cb in slot.callbacks:
                cb.on_end(self, slot)
        self.log_baselines()
        self.checkpoint()
        self.writer.close()
        out = []
        for slot in self.slots:
            groups = slot.final_groups
            if len(self.slots) == 1:
                plot_learning_curve(self.run_dir / "learning_curve.png", slot.history, slot.baselines,
                                    title=f"{slot.graph.name} on {self.cluster.name}: {c.policy} + {c.algo} "
                                          f"(seed {c.seed})")
            placement, predicted, source = self.reported(slot)
            ref = slot.refined
            out.append(GraphOutcome(placement=placement, device_of_group=groups, refined=ref, predicted=predicted,
                                    measured=self.measured_of(slot),
                                    best_step_time_s=ref.predicted.step_time_s if ref else slot.best_time_s,
                                    reference_step_time_s=slot.env.reference_time_s, baselines=slot.baselines,
                                    history=slot.history, kept_on_disk=slot.kept_on_disk, source=source,
                                    failed_measurements=sum(getattr(cb, "failures", 0) for cb in slot.callbacks)))
        return out
