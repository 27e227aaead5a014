"""``placer train``: train a placement policy on one graph and cluster, CleanRL-style, into a run folder.

A run lives in ``runs/{graph}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}/``:

- ``config.json`` — the fully resolved :class:`TrainConfig`; ``graph.json`` / ``cluster.json`` — the exact inputs;
- TensorBoard events: ``charts/best_step_time_s``, ``charts/mean_step_time_s``, ``charts/reward``,
  ``charts/entropy``, ``charts/samples_per_s``, ``charts/failure_rate``, ``losses/policy``, ``losses/grad_norm``,
  ``losses/baseline``, ``baseline/<method>_step_time_s`` (every classic baseline, simulated, as reference lines),
  ``real/best_step_time_s`` and ``real/top<k>_step_time_s`` (engine re-measurements with ``--reward sim+real``),
  and the hyperparameters as a text table; the x axis is the number of sampled placements;
- ``checkpoint.pt`` — policy, optimizer, algorithm state (baseline, sampling RNG), global RNG states, best
  placement, counters and learning history, written atomically every ``checkpoint_every_s`` and at the end, so
  ``--resume`` after a kill loses at most one interval;
- ``placement.json`` — the best placement so far (``placer.placement/v1``, atomic), with its step time simulated on
  the full op graph and, with the engine, measured;
- ``learning_curve.png`` — best and mean step time against wall time and samples, with the baselines.

The step time budget counts training wall time across resumes (a resumed run trains until the total reaches
``budget_s``). Policies and algorithms come from the registries in :mod:`policies` (``seq2seq``, ``reinforce``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from envs.placement_env import PlacementEnv, make_env, resolve_cluster, resolve_graph
from envs.rewards import SimRealBackend
from graphs.ir import OpGraph
from placer.core.cluster import Cluster
from placer.io.document import save_placement, write_json_atomic
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.app.runs import (Progress, find_run, hparams_markdown, new_run_dir, plot_learning_curve,
                         save_torch_atomic, stamped_name)
from policies import make_algo, make_policy

log = logging.getLogger(__name__)

CLASSIC = ("scotch", "mincut", "expert")
"""ColocRL's reference baselines."""
ALGORITHMIC = ("m-etf", "m-sct", "heft")
"""Scheduling-based baselines (Baechi, HEFT)."""
DEFAULT_BASELINES = ("single-cpu", "single-gpu", *CLASSIC, "metis", "m-topo", *ALGORITHMIC, "pipedream-dp")
RESUME_OVERRIDES = ("budget_s", "checkpoint_every_s", "progress", "max_updates", "real_every_s")
"""Fields a resumed run takes from the new config; everything else comes from the run's ``config.json``."""


# ============================================================================================== config
@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; written resolved to ``config.json``."""

    graph: str | OpGraph = "rnnlm"
    """Benchmark name (``rnnlm``, ``nmt-paper``; ``graph_config`` when the name has none) or a graph JSON path."""
    graph_config: str = "small"
    """Benchmark configuration used when ``graph`` is a bare name: ``small`` or ``paper``."""
    cluster: str | Cluster = "cpu-2"
    """Cluster preset (``cpu-2``, ``cpu+4gpu`` ...) or cluster JSON path."""
    policy: str = "seq2seq"
    """Policy name (:data:`policies.base.POLICIES`)."""
    algo: str = "reinforce"
    """Algorithm name (:data:`policies.base.ALGOS`)."""
    budget_s: float = 600.0
    """Training wall time in seconds (total across resumes)."""
    max_updates: int | None = None
    """Stop after this many updates even if budget is left (tests, exact reproductions)."""
    reward: str = "sim"
    """Reward backend: ``sim``, ``real`` (engine) or ``sim+real`` (sim reward, top-k re-measured by the engine)."""
    seed: int = 0
    """Seeds the policy's initialisation, the sampling generator and the global RNGs."""
    num_groups: int = 128
    """At most this many groups (ColocRL's co-location grouping; graphs with fewer natural groups keep them:
    RNNLM-paper has 40, NMT-paper 110). Inception-V3 (282 natural groups) with seq2seq in 540 s: 256 groups reach
    0.525 s, 128 groups 0.487 s (fewer decisions, 2.7x the samples per second). But no placement of its 128
    groups matches m-ETF's 0.468 s (a one-group local search from m-ETF's placement stops at 0.495 s), while 180
    groups express it; GNN + REINFORCE in 180 s at 180 groups: 0.482 s (lr 1e-3), 0.475 s (lr 3e-3,
    ``benchmarks/bench_rl_part2.py``, which uses 180)."""
    reference: str = "expert"
    """Baseline whose step time normalises the reward (``-sqrt(t / t_ref)``)."""
    incremental: bool = False
    """Placeto-style per-step rewards in the env (REINFORCE uses the episode total, which is the same)."""
    failure_penalty: float | None = None
    """Reward of a failed/OOM placement (``None``: ``-sqrt(100)``, i.e. 100x the reference step time)."""
    sim_graph: str = "full"
    """Simulate the full op graph (exact) or the ``coarse`` graph of runs of same-group ops."""
    schedule: str = "none"
    """Micro-batch schedule the reward simulates/measures (``none``, ``gpipe``, ``1f1b`` ...)."""
    microbatches: int = 1
    """Micro-batches per step for ``schedule``."""
    samples_per_update: int = 128
    """Placements sampled per update (the policy's cost is per step, not per sample: larger batches are cheap)."""
    lr: float = 1e-3
    """Adam learning rate."""
    entropy_coef: float = 0.05
    """Entropy bonus weight (per decision)."""
    baseline: str = "quantile"
    """REINFORCE baseline: ``quantile`` (risk-seeking, default), ``ema`` (ColocRL's moving average) or ``batch``.
    Tuned on NMT-paper (150 s runs, cpu+4gpu): ``ema`` and ``batch`` settle at 0.272 s, ``quantile`` with
    ``top_fraction`` 0.1 reaches 0.244 s, and with self-imitation 0.235 s (a greedy local search from every
    baseline stops at 0.235 s)."""
    top_fraction: float = 0.1
    """``quantile`` baseline: fraction of each batch trained on."""
    baseline_decay: float = 0.9
    """Decay of the ``ema`` baseline (the hierarchical planner used 0.9)."""
    max_grad_norm: float = 1.0
    """Gradient-norm clipping."""
    self_imitation_coef: float = 0.5
    """Self-imitation weight (Oh et al. 2018; 0: off): replays the best placements seen so far."""
    self_imitation_size: int = 4
    """How many best placements self-imitation replays."""
    warm_start: str | None = None
    """Behaviour-clone this baseline's placement before RL (``best``: the best simulated baseline), and seed the
    self-imitation buffer with it. Off by default; results of such runs are not "from scratch" and are labelled
    ``+warm:<method>`` in placement.json."""
    warm_start_steps: int = 300
    """Most imitation steps of the warm start (it stops earlier once the policy reproduces the placement)."""
    hidden: int = 64
    """Hidden size of the policy's LSTMs."""
    policy_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the policy factory (e.g. ``{"embed": 64}``)."""
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    """Baselines simulated once for the reference lines and the comparison."""
    checkpoint_every_s: float = 60.0
    """Seconds between checkpoints."""
    runs_dir: str = "runs"
    """Where run folders are created."""
    run_name: str | None = None
    """Folder name; ``None``: ``{graph}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}``."""
    resume: str | None = None
    """A run folder (path, or name under ``runs_dir``) to continue; its config is reused (except
    :data:`RESUME_OVERRIDES`)."""
    top_k_real: int = 5
    """``sim+real``: how many of the best simulated placements the engine re-measures."""
    real_every_s: float = 120.0
    """``sim+real``: seconds between periodic re-measurements (and once at the end)."""
    calibrate: str = "auto"
    """Calibrate the simulator against this machine's workers before training (:func:`placer.engine.calibrate.calibrate_cluster`):
    ``auto`` does it when the reward uses the engine (``real``/``sim+real``) and the cluster is an uncalibrated
    all-CPU preset (``cpu-2``), so the simulated reward and the measured one describe the same machine (the
    ``cpu-2`` preset's guessed link and no per-message cost made ``sim+real`` on RNNLM-small prefer 2-device
    splits measuring 3x slower than Single); ``always`` / ``never`` force it. The calibrated cluster is saved as the
    run's ``cluster.json``, so a resume reuses it."""
    engine_timeout_s: float = 120.0
    """Seconds an engine measurement may take before it counts as failed."""
    torch_threads: int = 1
    """``torch.set_num_threads`` for the policy (small networks run fastest on one thread)."""
    progress: bool = True
    """Show the rich progress line."""

    def to_json(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would recurse into an OpGraph given as ``graph``
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("graph", "cluster"):
            if not isinstance(d[key], str):
                d[key] = d[key].name
        d["baselines"] = list(self.baselines)
        d["policy_options"] = dict(self.policy_options)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
        d = dict(d)
        if "baselines" in d:
            d["baselines"] = tuple(d["baselines"])
        return cls(**d)


@dataclass(kw_only=True)
class TrainResult:
    """What a run produced."""

    run_dir: Path
    placement: Placement
    """Best placement (op level)."""
    device_of_group: np.ndarray
    predicted: StepResult
    """Best placement simulated on the full op graph."""
    measured: StepResult | None
    """Engine measurement of the best placement (``real`` / ``sim+real``)."""
    best_step_time_s: float
    """Best step time under the reward backend (what the search optimised)."""
    baselines: dict[str, float]
    """Simulated step time of each baseline (``inf`` for OOM)."""
    history: list[dict[str, float]]
    """Per update: ``elapsed_s``, ``samples``, ``best_step_time_s``, ``mean_step_time_s``."""
    samples: int
    updates: int
    elapsed_s: float
    reference_step_time_s: float

    def time_to_within(self, fraction: float) -> float:
        """Training seconds until the best was within ``fraction`` (0.02 = 2%) of the final best."""
        target = self.best_step_time_s * (1 + fraction)
        for h in self.history:
            if h["best_step_time_s"] <= target:
                return h["elapsed_s"]
        return self.elapsed_s


# ============================================================================================== helpers
def evaluate_baselines(graph: OpGraph, cluster: Cluster, methods: Sequence[str], *, schedule: str = "none",
                       microbatches: int = 1, seed: int = 0) -> dict[str, tuple[Placement, StepResult]]:
    """Each applicable baseline's placement and its simulated step on the full graph (``n/a`` ones left out)."""
    from placer import baselines
    from placer.costmodel.sim import Simulator

    sim = Simulator(graph, cluster)
    out = {}
    for m in methods:
        try:
            p = baselines.place(m, graph, cluster, seed=seed)
        except ValueError as e:
            log.info("baseline %s does not apply: %s", m, e)
            continue
        out[m] = (p, sim.run(p, schedule=schedule, microbatches=microbatches))
    return out


# ============================================================================================== train
def _check_names(config: TrainConfig) -> None:
    """Unknown registry names fail before a run folder is created."""
    from envs.rewards import BACKENDS
    from policies import ALGOS, POLICIES

    for what, name, known in (("policy", config.policy, POLICIES), ("algorithm", config.algo, ALGOS),
                              ("reward backend", config.reward, BACKENDS)):
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(known))}")
    if not config.budget_s > 0:
        raise ValueError(f"budget must be positive, got {config.budget_s} s")
    if config.warm_start not in (None, "best", *config.baselines):
        raise ValueError(f"warm start {config.warm_start!r}: not 'best' nor one of the evaluated baselines "
                         f"({', '.join(config.baselines)})")


def needs_calibration(cluster: Cluster, *, mode: str = "auto", uses_engine: bool = True) -> bool:
    """Whether to measure ``cluster``'s workers before use (:attr:`TrainConfig.calibrate`): ``always``,
    ``never``, or ``auto`` = the engine will measure (``uses_engine``) on an uncalibrated all-CPU cluster."""
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"calibrate must be auto, always or never, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return (uses_engine and cluster.meta.get("source") != "calibrated" and cluster.num_devices >= 2
            and all(d.kind == "cpu" for d in cluster.devices))


def maybe_calibrate(cluster: Cluster, *, mode: str = "auto", uses_engine: bool = True) -> Cluster:
    """``cluster``, or the same devices calibrated on this machine (see :func:`needs_calibration`)."""
    if not needs_calibration(cluster, mode=mode, uses_engine=uses_engine):
        return cluster
    from placer.engine.calibrate import calibrate_cluster  # noqa: PLC0415 - spawns workers; only when asked

    log.info("calibrating %d CPU workers so the simulator matches the engine ...", cluster.num_devices)
    measured = calibrate_cluster(cluster.num_devices, name=f"{cluster.name}-calibrated")
    return dataclasses.replace(measured, devices=tuple(
        dataclasses.replace(dev, name=orig.name) for dev, orig in zip(measured.devices, cluster.devices)))


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; see the module docstring for what it writes."""
    _check_names(config)
    # ---------------------------------------------------------------- run folder and config
    if config.resume:
        run_dir = find_run(config.resume, config.runs_dir)
        saved = json.loads((run_dir / "config.json").read_text())
        saved.update({k: getattr(config, k) for k in RESUME_OVERRIDES})
        saved["resume"] = str(run_dir)
        config = TrainConfig.from_json(saved)
        graph = OpGraph.load(run_dir / "graph.json")
        cluster = Cluster.load(run_dir / "cluster.json")
    else:
        graph = resolve_graph(config.graph, config=config.graph_config)
        cluster = maybe_calibrate(resolve_cluster(config.cluster), mode=config.calibrate,
                                  uses_engine=config.reward in ("real", "sim+real"))
        run_dir = new_run_dir(config.runs_dir, config.run_name
                              or stamped_name(graph.name, config.policy, config.algo, config.seed))
        graph.save(run_dir / "graph.json")
        cluster.save(run_dir / "cluster.json")
        config = dataclasses.replace(config, run_name=run_dir.name)
    write_json_atomic(run_dir / "config.json", config.to_json())

    torch.set_num_threads(max(1, config.torch_threads))
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)

    # ---------------------------------------------------------------- env, policy, algorithm
    env = make_env(graph, cluster, num_groups=config.num_groups, reward_backend=config.reward,
                       reference=config.reference, incremental=config.incremental, schedule=config.schedule,
                       microbatches=config.microbatches, failure_penalty=config.failure_penalty,
                       sim_graph=config.sim_graph, engine_timeout_s=config.engine_timeout_s)
    try:
        return _train_loop(config, run_dir, graph, cluster, env)
    finally:
        env.close()


def _train_loop(config: TrainConfig, run_dir: Path, graph: OpGraph, cluster: Cluster,
                env: PlacementEnv) -> TrainResult:
    from torch.utils.tensorboard import SummaryWriter

    from placer.costmodel.sim import Simulator

    policy = make_policy(config.policy, env.problem, hidden=config.hidden, **config.policy_options)
    algo = make_algo(config.algo, policy, env, samples_per_update=config.samples_per_update, lr=config.lr,
                     entropy_coef=config.entropy_coef, baseline=config.baseline, top_fraction=config.top_fraction,
                     baseline_decay=config.baseline_decay, max_grad_norm=config.max_grad_norm,
                     self_imitation_coef=config.self_imitation_coef,
                     self_imitation_size=config.self_imitation_size, seed=config.seed)
    full_sim = Simulator(graph, cluster)

    # ---------------------------------------------------------------- state (fresh or from the checkpoint)
    updates = samples = 0
    elapsed_before = 0.0
    best_groups: np.ndarray | None = None
    best_time = math.inf
    history: list[dict[str, float]] = []
    real_log: list[dict[str, Any]] = []
    ckpt_path = run_dir / "checkpoint.pt"
    resumed = bool(config.resume and ckpt_path.exists())
    if resumed:
        ckpt = torch.load(ckpt_path, weights_only=False)
        policy.load_state_dict(ckpt["policy"])
        algo.load_state_dict(ckpt["algo"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        updates, samples = ckpt["counters"]["updates"], ckpt["counters"]["samples"]
        elapsed_before = ckpt["counters"]["elapsed_s"]
        best_groups, best_time = ckpt["best"]["device_of_group"], ckpt["best"]["step_time_s"]
        history, real_log = ckpt["history"], ckpt.get("real", [])
        log.info("resuming %s at update %d (%d samples, %.0f s)", run_dir.name, updates, samples, elapsed_before)
    elif config.resume:
        log.warning("run %s has no checkpoint yet; starting it from scratch", run_dir.name)

    # ---------------------------------------------------------------- baselines and logging
    evaluated = evaluate_baselines(graph, cluster, config.baselines, schedule=config.schedule,
                                   microbatches=config.microbatches, seed=config.seed)
    baseline_times = {m: (r.step_time_s if r.ok else math.inf) for m, (_, r) in evaluated.items()}
    # on resume, TensorBoard drops what the killed run logged after its last checkpoint
    writer = SummaryWriter(log_dir=str(run_dir), purge_step=samples + 1 if resumed else None)
    if not resumed:
        writer.add_text("hyperparameters", hparams_markdown({
            **config.to_json(), "groups": env.num_groups, "coarse_nodes": env.problem.coarse.n,
            "reference_method": env.reference_method, "reference_step_time_s": env.reference_time_s,
            "policy_parameters": sum(p.numel() for p in policy.parameters())}))

    def log_baselines(step: int) -> None:
        for m, v in baseline_times.items():
            if math.isfinite(v):
                writer.add_scalar(f"baseline/{m}_step_time_s", v, step)

    log_baselines(samples)

    method_label = f"rl:{config.policy}+{config.algo}"
    if config.warm_start:
        method_label += f"+warm:{_warm_start(config, env, policy, algo, evaluated, writer, fresh=not resumed)}"

    def predicted_of(groups: np.ndarray) -> StepResult:
        return full_sim.run(env.problem.expand(groups), schedule=config.schedule, microbatches=config.microbatches)

    measured_best: StepResult | None = None
    measured_groups: np.ndarray | None = None
    if resumed and ckpt["best"].get("measured") is not None:
        measured_best = StepResult.from_json(ckpt["best"]["measured"])
        measured_groups = ckpt["best"]["measured_device_of_group"]

    def write_placement() -> None:
        groups = measured_groups if measured_groups is not None else best_groups
        if groups is None:
            return
        measured = measured_best
        if config.reward == "real" and measured is None:
            measured = env.result_of(groups)
        save_placement(run_dir / "placement.json", graph, cluster, env.problem.expand(groups),
                       method=method_label, seed=config.seed, run=run_dir.name,
                       predicted=predicted_of(groups), measured=measured, schedule=config.schedule,
                       microbatches=config.microbatches)

    def checkpoint() -> None:
        save_torch_atomic({
            "version": 1, "policy": policy.state_dict(), "algo": algo.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "best": {"device_of_group": best_groups, "step_time_s": best_time,
                     "measured_device_of_group": measured_groups,
                     "measured": measured_best.to_json() if measured_best is not None else None},
            "counters": {"updates": updates, "samples": samples, "elapsed_s": elapsed()},
            "history": history, "real": real_log,
        }, ckpt_path)
        write_placement()

    def remeasure(final: bool) -> None:
        nonlocal measured_best, measured_groups
        backend = env.backend
        if not isinstance(backend, SimRealBackend):
            return
        top = backend.remeasure_top(config.top_k_real, rounds=3 if final else 0)
        ok = [r for r in top if r.real.ok]
        for i, r in enumerate(top):
            writer.add_scalar(f"real/top{i + 1}_step_time_s", r.real.step_time_s if r.real.ok else float("nan"),
                              samples)
        if ok:
            win = min(ok, key=lambda r: r.real.step_time_s)
            if measured_best is None or win.real.step_time_s < measured_best.step_time_s:
                measured_best, measured_groups = win.real, win.device_of_group
            writer.add_scalar("real/best_step_time_s", measured_best.step_time_s, samples)
        real_log.append({"samples": samples, "elapsed_s": elapsed(), "final": final,
                         "measured_s": [r.real.step_time_s if r.real.ok else None for r in top],
                         "simulated_s": [r.sim.step_time_s for r in top]})

    # ---------------------------------------------------------------- the loop
    t0 = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t0

    progress = Progress(config.progress, config.budget_s, elapsed_before)
    last_ckpt = last_real = last_write = time.perf_counter()
    rate = 0.0
    dirty = False
    try:
        while elapsed() < config.budget_s and (config.max_updates is None or updates < config.max_updates):
            t_update = time.perf_counter()
            stats = algo.update()
            dt = time.perf_counter() - t_update
            updates += 1
            n = len(stats.rewards)
            samples += n
            rate = n / dt if rate == 0 else 0.9 * rate + 0.1 * n / dt
            times = np.asarray(stats.step_times_s, dtype=np.float64)
            ok = np.isfinite(times)
            i = int(np.argmin(times))
            if ok.any() and times[i] < best_time:
                best_time, best_groups, dirty = float(times[i]), np.asarray(stats.placements[i]).copy(), True
            mean_t = float(times[ok].mean()) if ok.any() else math.inf
            history.append({"elapsed_s": elapsed(), "samples": samples, "best_step_time_s": best_time,
                            "mean_step_time_s": mean_t})
            writer.add_scalar("charts/best_step_time_s", best_time, samples)
            if ok.any():
                writer.add_scalar("charts/mean_step_time_s", mean_t, samples)
            writer.add_scalar("charts/reward", float(np.mean(stats.rewards)), samples)
            writer.add_scalar("charts/entropy", stats.entropy, samples)
            writer.add_scalar("charts/samples_per_s", rate, samples)
            writer.add_scalar("charts/failure_rate", float(1 - ok.mean()), samples)
            writer.add_scalar("losses/policy", stats.loss, samples)
            writer.add_scalar("losses/grad_norm", stats.grad_norm, samples)
            writer.add_scalar("losses/baseline", stats.baseline, samples)
            progress.update(elapsed(), f"best {best_time:.4g} s | mean {mean_t:.4g} s | {rate:.0f} samples/s | "
                                       f"update {updates}")
            now = time.perf_counter()
            if now - last_ckpt >= config.checkpoint_every_s:
                checkpoint()
                last_ckpt = last_write = now
                dirty = False
            elif dirty and now - last_write >= 5.0:
                write_placement()
                last_write, dirty = now, False
            if config.reward == "sim+real" and now - last_real >= config.real_every_s:
                remeasure(final=False)
                last_real = time.perf_counter()
    except KeyboardInterrupt:  # Ctrl-C: keep what was learned, then let the caller report the interruption
        checkpoint()
        writer.close()
        raise
    finally:
        progress.close()

    # ---------------------------------------------------------------- the end
    if best_groups is None:
        raise ValueError("training ended before any placement was sampled (budget too small?)")
    if config.reward == "sim+real":
        remeasure(final=True)
    log_baselines(samples)
    checkpoint()
    writer.close()
    predicted = predicted_of(best_groups if measured_groups is None else measured_groups)
    measured = measured_best if config.reward == "sim+real" else (
        env.result_of(best_groups) if config.reward == "real" else None)
    plot_learning_curve(run_dir / "learning_curve.png", history, baseline_times,
                        title=f"{graph.name} on {cluster.name}: {config.policy} + {config.algo} (seed {config.seed})")
    final_groups = best_groups if measured_groups is None else measured_groups
    return TrainResult(run_dir=run_dir, placement=env.problem.expand(final_groups), device_of_group=final_groups,
                       predicted=predicted, measured=measured, best_step_time_s=best_time,
                       baselines=baseline_times, history=history, samples=samples, updates=updates,
                       elapsed_s=elapsed(), reference_step_time_s=env.reference_time_s)


def _warm_start(config: TrainConfig, env: PlacementEnv, policy: Any, algo: Any,
                evaluated: dict[str, tuple[Placement, StepResult]], writer: Any, *, fresh: bool) -> str:
    """Imitate a baseline's placement (fresh runs only; a resumed run has it in its checkpoint); returns its name."""
    from policies import PolicyInput, imitate

    ok = {m: r.step_time_s for m, (_, r) in evaluated.items() if r.ok}
    method = min(ok, key=ok.get) if config.warm_start == "best" and ok else config.warm_start
    if method not in evaluated:
        raise ValueError(f"warm start {config.warm_start!r}: no such evaluated baseline (have {', '.join(evaluated)})")
    if not fresh:
        return str(method)
    groups = env.problem.project(evaluated[method][0])
    reward, res = env.evaluate(groups)
    steps, nll = imitate(policy, PolicyInput.from_problem(env.problem), torch.as_tensor(groups)[None],
                         max_steps=config.warm_start_steps)
    if hasattr(algo, "seed_elite"):
        algo.seed_elite(np.array([reward]), groups[None])
    writer.add_text("warm_start", f"imitated {method} ({res.step_time_s:.6g} s on groups) for {steps} steps, "
                                  f"final NLL {nll:.3f} nats/decision")
    log.info("warm start: imitated %s (%.4g s) in %d steps, NLL %.3f", method, res.step_time_s, steps, nll)
    return str(method)


# ============================================================================================== entry points
def train_and_place(graph: OpGraph | str, cluster: Cluster | str, *, budget_s: float, seed: int = 0,
                    runs_dir: str = "runs", progress: bool = False, **overrides: Any) -> tuple[Placement, StepResult]:
    """Train a policy for ``budget_s`` seconds and return its best placement with the full-graph simulated (or,
    with ``reward="real"``/``"sim+real"``, measured) step. For ``placer compare``'s RL column."""
    config = TrainConfig(graph=graph, cluster=cluster, budget_s=budget_s, seed=seed, runs_dir=runs_dir,
                         progress=progress, **overrides)
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


def parse_duration(text: str) -> float:
    """``90s`` / ``10m`` / ``1h`` / ``30`` (seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = str(text).strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h)") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``placer train`` options (defaults from :class:`TrainConfig`)."""
    d = TrainConfig()
    parser.add_argument("--graph", help="benchmark name (rnnlm, nmt-paper ...) or graph JSON "
                                        "(required unless --resume)")
    parser.add_argument("--config", dest="graph_config", default=d.graph_config,
                        help="benchmark config for a bare name: small or paper (default %(default)s)")
    parser.add_argument("--cluster", default=d.cluster, help="cluster preset or JSON (default %(default)s)")
    parser.add_argument("--policy", default=d.policy, help="policy (default %(default)s)")
    parser.add_argument("--algo", default=d.algo, help="training algorithm (default %(default)s)")
    parser.add_argument("--budget", type=parse_duration, default=d.budget_s,
                        help="training wall time, e.g. 90s, 10m (default 10m; total across resumes)")
    parser.add_argument("--max-updates", type=int, default=None, help="stop after this many updates")
    parser.add_argument("--reward", choices=("sim", "real", "sim+real"), default=d.reward,
                        help="reward backend (default %(default)s)")
    parser.add_argument("--calibrate", choices=("auto", "always", "never"), default=d.calibrate,
                        help="measure this machine's workers first so the simulator matches the engine (auto: for "
                             "real/sim+real on an uncalibrated CPU preset; default %(default)s)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--resume", metavar="RUN", help="continue the run in this folder (or name under --runs-dir)")
    parser.add_argument("--runs-dir", default=d.runs_dir, help="where run folders go (default %(default)s)")
    parser.add_argument("--run-name", default=None,
                        help="run folder name (default {graph}__{policy}__{algo}__{seed}__{timestamp})")
    parser.add_argument("--num-groups", type=int, default=d.num_groups, help="at most this many groups")
    parser.add_argument("--reference", default=d.reference, help="baseline normalising the reward")
    parser.add_argument("--incremental", action="store_true", help="Placeto-style incremental env rewards")
    parser.add_argument("--schedule", default=d.schedule, help="micro-batch schedule (default %(default)s)")
    parser.add_argument("--microbatches", type=int, default=d.microbatches)
    parser.add_argument("--samples-per-update", type=int, default=d.samples_per_update)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--entropy-coef", type=float, default=d.entropy_coef)
    parser.add_argument("--baseline", choices=("ema", "batch", "quantile"), default=d.baseline,
                        help="REINFORCE baseline (default %(default)s)")
    parser.add_argument("--top-fraction", type=float, default=d.top_fraction,
                        help="quantile baseline: fraction of each batch trained on")
    parser.add_argument("--sim-graph", choices=("full", "coarse"), default=d.sim_graph,
                        help="simulate the op graph or the coarse graph (default %(default)s)")
    parser.add_argument("--baseline-decay", type=float, default=d.baseline_decay)
    parser.add_argument("--self-imitation", type=float, default=d.self_imitation_coef, dest="self_imitation_coef",
                        help="self-imitation weight (0: off)")
    parser.add_argument("--warm-start", metavar="BASELINE", default=None,
                        help="imitate this baseline's placement (or 'best') before RL; reported as such")
    parser.add_argument("--hidden", type=int, default=d.hidden, help="policy LSTM size")
    parser.add_argument("--checkpoint-every", type=parse_duration, default=d.checkpoint_every_s)
    parser.add_argument("--top-k-real", type=int, default=d.top_k_real)
    parser.add_argument("--real-every", type=parse_duration, default=d.real_every_s)
    parser.add_argument("--no-progress", action="store_true", help="no progress line")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A :class:`TrainConfig` from :func:`add_train_arguments`' options."""
    if not args.graph and not args.resume:
        raise ValueError("placer train needs --graph (or --resume RUN)")
    return TrainConfig(
        graph=args.graph or "", graph_config=args.graph_config, cluster=args.cluster, policy=args.policy,
        algo=args.algo, budget_s=args.budget, max_updates=args.max_updates, reward=args.reward,
        calibrate=args.calibrate, seed=args.seed,
        resume=args.resume, runs_dir=args.runs_dir, run_name=args.run_name, num_groups=args.num_groups,
        reference=args.reference,
        incremental=args.incremental, schedule=args.schedule, microbatches=args.microbatches,
        samples_per_update=args.samples_per_update, lr=args.lr, entropy_coef=args.entropy_coef,
        baseline=args.baseline, top_fraction=args.top_fraction, baseline_decay=args.baseline_decay,
        sim_graph=args.sim_graph, self_imitation_coef=args.self_imitation_coef, warm_start=args.warm_start,
        hidden=args.hidden,
        checkpoint_every_s=args.checkpoint_every, top_k_real=args.top_k_real, real_every_s=args.real_every,
        progress=not args.no_progress)
