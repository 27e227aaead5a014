"""``placer train``: train a placement policy on one graph or several, CleanRL-style, into a run folder.

A one-graph run lives in ``runs/{graph}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}/``:

- ``config.json`` — the fully resolved :class:`TrainConfig` (the algorithm's config nested in ``algo_config``);
  ``graph.json`` / ``cluster.json`` — the exact inputs;
- TensorBoard events: ``charts/best_step_time_s``, ``charts/mean_step_time_s``, ``charts/reward``,
  ``charts/entropy``, ``charts/samples_per_s``, ``charts/failure_rate``, ``losses/policy``, ``losses/grad_norm``,
  ``losses/baseline``, ``baseline/<method>_step_time_s`` (every classic baseline, simulated, as reference lines),
  ``real/best_step_time_s`` and ``real/top<k>_step_time_s`` (engine re-measurements with ``--reward sim+real``),
  and the hyperparameters as a text table; the x axis is the number of sampled placements;
- ``checkpoint.pt`` — policy, algorithm state (optimizer, baseline, sampling RNG), global RNG states, best
  placement, counters and learning history (:mod:`placer.app.training.checkpoint`), written atomically every
  ``checkpoint_every_s`` and at the end, so ``--resume`` after a kill loses at most one interval;
- ``placement.json`` — the best placement so far (``placer.placement/v1``, atomic), with its step time simulated on
  the full op graph and, with the engine, measured;
- ``learning_curve.png`` — best and mean step time against wall time and samples, with the baselines.

With ``refine_s`` the best placement is then refined by simulation (:mod:`placer.app.training.refining`); a faster
refined plan is the one ``placement.json`` holds, labelled ``refined from <start>``
(``charts/refined_step_time_s``).

A run on several graphs (Placeto, Addanki et al., NeurIPS 2019: ``graphs`` and ``random_dags``, one shared policy
for zero-shot placement with :mod:`placer.app.place`) lives in ``runs/multi-{N}__{policy}__{algo}__{seed}__{ts}/``
with ``config.json``, ``cluster.json``, ``checkpoint.pt``, ``placement_<graph>.json`` per graph and the TensorBoard
tags above with a ``/<graph>`` suffix. Its algorithm hyper-parameters start from the ``multi-graph`` preset
(:data:`placer.app.training.config.PRESETS`).

The budget counts training wall time across resumes (a resumed run trains until the total reaches ``budget_s``).
Policies and algorithms come from the registries in :mod:`policies`; the loop is
:class:`placer.app.training.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from envs.placement_env import make_env, resolve_cluster, resolve_graph
from graphs.ir import OpGraph
from placer.app.runs import discard_run_dir, find_run, new_run_dir, stamped_name
from placer.app.training.checkpoint import seed_everything
from placer.app.training.config import (ALGORITHMIC, CLASSIC, DEFAULT_BASELINES, RESUME_OVERRIDES, TrainConfig,
                                        config_from_saved)
from placer.app.training.families import random_graphs
from placer.app.training.trainer import GraphOutcome, Trainer, evaluate_baselines
from placer.core.cluster import Cluster
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.io.document import read_json, write_json_atomic

log = logging.getLogger(__name__)

__all__ = ["ALGORITHMIC", "CLASSIC", "DEFAULT_BASELINES", "TrainConfig", "TrainResult", "evaluate_baselines",
           "family_column", "family_placer", "maybe_calibrate", "needs_calibration", "random_graphs", "rl_placer",
           "train", "train_and_place"]


@dataclass(kw_only=True)
class TrainResult:
    """What a run produced: each graph's :class:`~placer.app.training.trainer.GraphOutcome`, by name; a one-graph
    run's fields are also readable directly (``result.placement``, ``result.best_step_time_s`` ...)."""

    run_dir: Path
    outcomes: dict[str, GraphOutcome]
    samples: int
    updates: int
    """Updates of every graph (rounds)."""
    elapsed_s: float
    """Training seconds (what ``budget_s`` bounds), across resumes."""
    wall_s: float = 0.0
    """Wall time of this call: training plus what the budget does not count (calibration, baselines, the final
    engine re-measurement, files)."""
    setup_s: float = 0.0
    """Seconds before the run folder existed: loading the graphs and calibrating the cluster (``calibrate``);
    part of ``wall_s``."""
    trained_s: float = 0.0
    """Training seconds (across resumes) when the loop stopped: what ``budget_s`` bounds."""
    outside_s: float = 0.0
    """Seconds of this call neither in ``setup_s`` nor in the training loop: the baselines' simulation, the final
    engine re-measurement (``sim+real``), the learning curve and the files."""

    @property
    def only(self) -> GraphOutcome:
        """The outcome of a one-graph run."""
        if len(self.outcomes) != 1:
            raise ValueError(f"the run trained on {len(self.outcomes)} graphs; read result.outcomes")
        return next(iter(self.outcomes.values()))

    def __getattr__(self, name: str) -> Any:
        if name in {f.name for f in dataclasses.fields(GraphOutcome)}:  # placement, predicted, measured ...
            return getattr(self.only, name)
        raise AttributeError(name)

    def time_to_within(self, fraction: float) -> float:
        """Training seconds until the best was within ``fraction`` (0.02 = 2%) of the final best (one graph)."""
        target = self.only.best_step_time_s * (1 + fraction)
        for h in self.only.history:
            if h["best_step_time_s"] <= target:
                return h["elapsed_s"]
        return self.elapsed_s


# ============================================================================================== helpers
def needs_calibration(cluster: Cluster, *, mode: str = "auto", uses_engine: bool = True) -> bool:
    """Whether to measure ``cluster``'s workers before use (:attr:`TrainConfig.calibrate`): ``always``,
    ``never``, or ``auto`` = the engine will measure (``uses_engine``) on an uncalibrated all-CPU cluster."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"calibrate must be auto, always or never, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return (uses_engine and cluster.meta.get("source") != "calibrated" and cluster.num_devices >= 2
            and all(d.is_cpu for d in cluster.devices))


def maybe_calibrate(cluster: Cluster, *, mode: str = "auto", uses_engine: bool = True) -> Cluster:
    """``cluster``, or the same devices calibrated on this machine (see :func:`needs_calibration`). Simulating an
    uncalibrated CPU preset without the engine is allowed, with a warning: its per-step and per-message costs are
    not in the simulator, so a split of a small model looks faster than one worker and runs slower."""
    if not needs_calibration(cluster, mode=mode, uses_engine=uses_engine):
        if mode == "auto" and not uses_engine and needs_calibration(cluster, uses_engine=True):
            log.warning("%s is not calibrated: the simulator leaves out its workers' per-step and per-message "
                        "costs (milliseconds here), so splits of small models look faster than they run; "
                        "--calibrate always (about 10 s) or --reward sim+real measures them first", cluster.name)
        return cluster
    from placer.engine.calibrate import calibrate_cluster  # noqa: PLC0415 - spawns workers; only when asked

    log.info("calibrating %d CPU workers so the simulator matches the engine ...", cluster.num_devices)
    measured = calibrate_cluster(cluster.num_devices, name=f"{cluster.name}-calibrated")
    return dataclasses.replace(measured, devices=tuple(
        dataclasses.replace(dev, name=orig.name) for dev, orig in zip(measured.devices, cluster.devices)))


# ============================================================================================== train
def check_config(config: TrainConfig, num_graphs: int) -> None:
    """Unknown registry names and settings a run cannot honour fail before a run folder is created."""
    from envs.rewards import BACKENDS
    from policies import ALGOS, POLICIES

    for what, name, known in (("policy", config.policy, POLICIES), ("algorithm", config.algo, ALGOS),
                              ("reward backend", config.reward, BACKENDS)):
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(known))}")
    if config.warm_start not in (None, "best", *config.baselines):
        raise ValueError(f"warm start {config.warm_start!r}: not 'best' nor one of the evaluated baselines "
                         f"({', '.join(config.baselines)})")
    if num_graphs > 1 and (config.reward != "sim" or config.warm_start):
        raise ValueError(f"a run on {num_graphs} graphs trains with the sim reward and no warm start")


def resolve_graphs(config: TrainConfig) -> list[OpGraph]:
    """The run's graphs: ``graph``, ``graphs``, then ``random_dags`` random ones (the same again on resume: they
    are drawn from the seed); a one-line ``ValueError`` when two share a name."""
    named = ([config.graph] if config.graph is not None else []) + list(config.graphs)
    graphs = [resolve_graph(g, config=config.graph_config) for g in named]
    graphs += random_graphs(config.random_dags, config.seed)
    names = [g.name for g in graphs]
    if len(set(names)) != len(names):
        raise ValueError(f"graph names repeat: {', '.join(names)}")
    return graphs


def _saved_config(path: Path) -> TrainConfig:
    """A run's ``config.json`` as a :class:`TrainConfig`; any problem is a one-line ``ValueError`` naming it."""
    saved = read_json(path, "run config")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a training config (a JSON object)")
    try:
        return config_from_saved(saved)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from None


def open_run(config: TrainConfig) -> tuple[TrainConfig, Path, list[OpGraph], Cluster]:
    """The run folder with its config, graphs and cluster: ``config.resume``'s (its saved config with
    :data:`RESUME_OVERRIDES` from ``config``), or a new one. Nothing is created before the names check out."""
    if config.resume:
        run_dir = find_run(config.resume, config.runs_dir)
        saved = _saved_config(run_dir / "config.json")
        config = dataclasses.replace(saved, **{k: getattr(config, k) for k in RESUME_OVERRIDES})
        config.resume = str(run_dir)
        one = config.num_graphs == 1 and (run_dir / "graph.json").exists()
        graphs = [OpGraph.load(run_dir / "graph.json")] if one else resolve_graphs(config)
        has_cluster = (run_dir / "cluster.json").exists()  # multi-graph runs of the first trainer have none
        cluster = Cluster.load(run_dir / "cluster.json") if has_cluster else resolve_cluster(config.cluster)
        check_config(config, len(graphs))
        return config, run_dir, graphs, cluster
    graphs = resolve_graphs(config)
    check_config(config, len(graphs))
    cluster = maybe_calibrate(resolve_cluster(config.cluster), mode=config.calibrate,
                              uses_engine=config.reward in ("real", "sim+real"))
    what = graphs[0].name if len(graphs) == 1 else f"multi-{len(graphs)}"
    run_dir = new_run_dir(config.runs_dir, config.run_name or stamped_name(what, config.policy, config.algo,
                                                                            config.seed))
    if len(graphs) == 1:
        graphs[0].save(run_dir / "graph.json")
    cluster.save(run_dir / "cluster.json")
    return dataclasses.replace(config, run_name=run_dir.name), run_dir, graphs, cluster


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring for what it writes. A new run that fails before
    training starts (a setting its environment refuses, Ctrl-C) leaves no run folder behind."""
    t0 = time.perf_counter()
    fresh = not config.resume
    runs_root_existed = Path(config.runs_dir).exists()
    config, run_dir, graphs, cluster = open_run(config)
    setup_s = time.perf_counter() - t0
    envs = []
    started = False
    try:
        torch.set_num_threads(max(1, min(config.torch_threads, os.cpu_count() or 1)))
        seed_everything(config.seed)
        for g in graphs:
            envs.append(make_env(g, cluster, num_groups=config.num_groups, reward_backend=config.reward,
                                 reference=config.reference, incremental=config.incremental,
                                 schedule=config.schedule, microbatches=config.microbatches,
                                 failure_penalty=config.failure_penalty, sim_graph=config.sim_graph,
                                 engine_timeout_s=config.engine_timeout_s))
        trainer = Trainer(config, run_dir, cluster, envs)
        # after the trainer has read the checkpoint: a resume that cannot continue leaves the run as it was
        write_json_atomic(run_dir / "config.json", config.to_json())
        trainer.log_start()
        if config.warm_start:
            trainer.warm_start()
        started = True
        outcomes = trainer.run()
        wall_s = time.perf_counter() - t0
        return TrainResult(run_dir=run_dir, outcomes={g.name: o for g, o in zip(graphs, outcomes)},
                           samples=trainer.samples, updates=trainer.updates, elapsed_s=trainer.elapsed(),
                           wall_s=wall_s, setup_s=setup_s, trained_s=trainer.trained_s,
                           outside_s=max(0.0, wall_s - setup_s - (trainer.trained_s - trainer.elapsed_before)))
    except BaseException:
        if fresh and not started:  # nothing was trained: a folder that cannot be resumed would only mislead
            discard_run_dir(run_dir, root_existed=runs_root_existed)
        raise
    finally:
        for env in envs:
            env.close()


# ============================================================================================== entry points
def train_and_place(graph: OpGraph | str, cluster: Cluster | str, *, budget_s: float, seed: int = 0,
                    runs_dir: str = "runs", progress: bool = False, algo_config: Any = None,
                    **overrides: Any) -> tuple[Placement, StepResult]:
    """Train a policy for ``budget_s`` seconds and return its best placement with the full-graph simulated (or,
    with ``reward="real"``/``"sim+real"``, measured) step. For ``placer compare``'s RL column."""
    config = TrainConfig(graph=graph, cluster=cluster, budget_s=budget_s, seed=seed, runs_dir=runs_dir,
                         progress=progress, algo_config=algo_config, **overrides)
    result = train(config)
    return result.placement, result.measured or result.predicted


def rl_placer(graph: OpGraph, cluster: Cluster, *, seed: int, budget_s: float | None) -> Placement:
    """:func:`train_and_place` with :class:`placer.app.compare.ExtraPlacer`'s signature (default budget 600 s)."""
    return train_and_place(graph, cluster, budget_s=600.0 if budget_s is None else budget_s, seed=seed)[0]


def family_placer(family: str, *, runs_dir: str = "runs", **overrides: Any) -> Callable[..., Placement]:
    """A :class:`placer.app.compare.ExtraPlacer` that trains ``family`` (``policy+algo``, e.g. ``gnn+ppo``; a bare
    policy name means REINFORCE) on each graph and cluster of the comparison and returns its best placement."""
    from policies import ALGOS, POLICIES

    policy, _, algo = family.partition("+")
    algo = algo or "reinforce"
    if policy not in POLICIES or algo not in ALGOS:
        raise ValueError(f"unknown policy family {family!r}; use POLICY+ALGO with a policy in "
                         f"{', '.join(sorted(POLICIES))} and an algorithm in {', '.join(sorted(ALGOS))}")

    def place(graph: OpGraph, cluster: Cluster, *, seed: int, budget_s: float | None) -> Placement:
        return train_and_place(graph, cluster, budget_s=600.0 if budget_s is None else budget_s, seed=seed,
                               runs_dir=runs_dir, policy=policy, algo=algo, **overrides)[0]

    return place


def family_column(family: str) -> str:
    """Column title of a policy family in ``placer compare``: ColocRL's ``RL`` for seq2seq+REINFORCE."""
    policy, _, algo = family.partition("+")
    return "RL" if (policy, algo or "reinforce") == ("seq2seq", "reinforce") else f"RL:{policy}+{algo or 'reinforce'}"
