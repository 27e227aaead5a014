"""Train one placement policy on several graphs at once (Placeto, Addanki et al., NeurIPS 2019, section 5).

Placeto trains a single GNN policy on a family of graphs so that it can place graphs it never saw. Here the
family is the named benchmark graphs (``rnnlm``, ``nmt`` ... or graph JSON files) plus ``random_dags`` random
layered DAGs (:func:`envs.synthetic.layered_dag`, sizes drawn from the seed), so the policy sees variety.

Each graph gets its own environment and algorithm instance (its own reward normalisation, REINFORCE baseline or
PPO critic); the policy's weights are shared, and for REINFORCE so is one Adam optimizer. A round updates every
graph once, in order. The run folder ``runs/multi-{k}__{policy}__{algo}__{seed}__{ts}/`` has ``config.json``
(with the same ``policy`` / ``hidden`` / ``num_groups`` / ``policy_options`` keys as a single-graph run, so
:mod:`placer.app.place` reads both), ``checkpoint.pt`` (``policy`` weights, written atomically every
``checkpoint_every_s`` and at the end), TensorBoard ``charts/best_step_time_s/<graph>`` and
``charts/reward/<graph>``, and ``placement_<graph>.json`` with each graph's best placement. ``--resume RUN`` continues a killed run from its last
checkpoint (policy, every algorithm's optimizer/baseline state, the RNGs, the best placements and the counters;
the budget counts across resumes, as for a single-graph run).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.placement_env import PlacementEnv, make_env, resolve_cluster, resolve_graph
from envs.synthetic import branch_blocks, layered_dag, recurrent_grid, seq2seq_grid
from graphs.ir import OpGraph
from placer.io.document import save_placement, write_json_atomic
from placer.app.runs import find_run, new_run_dir, safe_name, save_torch_atomic, stamped_name
from policies import make_algo, make_policy

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class MultiTrainConfig:
    """A multi-graph training run; written resolved to ``config.json``."""

    graphs: tuple[str, ...] = ("rnnlm", "nmt")
    """Benchmark names or graph JSON paths."""
    random_dags: int = 0
    """How many random layered DAGs to add (sizes and costs drawn from ``seed``)."""
    graph_config: str = "small"
    """Benchmark configuration for bare names: ``small`` or ``paper``."""
    cluster: str = "cpu+4gpu"
    """Cluster preset or JSON path."""
    policy: str = "gnn"
    """Policy name; it must not depend on the graph's size (``gnn``)."""
    algo: str = "reinforce"
    """``reinforce`` or ``ppo``."""
    budget_s: float = 600.0
    """Training wall time in seconds."""
    max_rounds: int | None = None
    """Stop after this many rounds (one update per graph each)."""
    seed: int = 0
    """Seeds the policy, the sampling and the random DAGs."""
    num_groups: int = 256
    """At most this many groups per graph."""
    reference: str = "expert"
    """Baseline normalising each graph's reward."""
    samples_per_update: int = 32
    """Placements per update per graph (a round's time is mostly the policy's, so more samples cost few rounds:
    458 rounds of 32 against 463 of 16 in 420 s)."""
    lr: float = 3e-3
    """Adam learning rate."""
    entropy_coef: float = 0.01
    """Entropy bonus weight."""
    baseline: str = "quantile"
    """REINFORCE baseline (``quantile``, ``ema`` or ``batch``, see :mod:`policies.reinforce`)."""
    top_fraction: float = 0.25
    """``quantile`` baseline: the share of each graph's batch trained on."""
    self_imitation_coef: float = 0.5
    """REINFORCE self-imitation weight (each graph replays its own best placements; 0: off).

    As single-graph training does, risk-seeking with self-imitation: the policy is pulled toward the best
    placements it found on each graph, not its average one, which is what the best of a few hundred zero-shot
    samples profits from. Inception-V3 left out (``benchmarks/bench_rl_part2.py``'s zero-shot step, 420 s, seed 0):
    1.147 of the GNN trained on it with ``ema`` and no self-imitation, 1.053 with ``quantile`` 0.25 (32 samples
    per update), 1.019 with quantile 0.25 and self-imitation; but then, as the estimate is hidden from half of the
    samples, the hidden view learnt nothing (NMT left out: 1.294), hence :mod:`policies.reinforce`'s per-view
    baselines: NMT 1.038 and Inception-V3 1.117 with 16 samples per update, 1.103 and 1.046 with 32."""
    hidden: int = 64
    """Policy width."""
    policy_options: dict[str, Any] = field(default_factory=dict)
    """Extra policy keyword arguments (e.g. ``{"layers": 2}``)."""
    checkpoint_every_s: float = 60.0
    """Seconds between checkpoints."""
    runs_dir: str = "runs"
    """Where run folders go."""
    torch_threads: int = 1
    """``torch.set_num_threads`` for the policy (small networks run fastest on one thread)."""
    run_name: str | None = None
    """Folder name (``None``: ``multi-{k}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}``)."""
    resume: str | None = None
    """A multi-graph run folder (path, or name under ``runs_dir``) to continue; its ``config.json`` is reused except
    :data:`RESUME_OVERRIDES`."""

    def __post_init__(self) -> None:
        if not self.graphs and self.random_dags < 1 and not self.resume:
            raise ValueError("multi-graph training needs at least one graph (--graphs or --random-dags)")
        if self.random_dags < 0:
            raise ValueError(f"random_dags must be >= 0, got {self.random_dags}")
        if not self.budget_s > 0:
            raise ValueError(f"budget must be positive, got {self.budget_s} s")


RESUME_OVERRIDES = ("budget_s", "max_rounds", "checkpoint_every_s")
"""Fields a resumed multi-graph run takes from the new config."""


def _resumed_config(config: MultiTrainConfig) -> tuple[MultiTrainConfig, Path]:
    """The saved config of the run named by ``config.resume`` (with :data:`RESUME_OVERRIDES`) and its folder."""
    import json

    run_dir = find_run(str(config.resume), config.runs_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    if not saved.get("multi"):
        raise ValueError(f"{run_dir.name} is a single-graph run; resume it without --graphs")
    fields = {f.name for f in dataclasses.fields(MultiTrainConfig)}
    kept = {k: v for k, v in saved.items() if k in fields and k not in RESUME_OVERRIDES}
    kept.update(graphs=tuple(kept.get("graphs", ())), resume=str(run_dir),
                **{k: getattr(config, k) for k in RESUME_OVERRIDES})
    return MultiTrainConfig(**kept), run_dir


@dataclass(kw_only=True)
class MultiTrainResult:
    run_dir: Path
    best_step_time_s: dict[str, float]
    """Best simulated step time found per graph."""
    reference_step_time_s: dict[str, float]
    rounds: int
    elapsed_s: float


def random_graphs(count: int, seed: int) -> list[OpGraph]:
    """``count`` random graphs drawn from ``seed``, the four families of :mod:`envs.synthetic` in turn: layered
    DAGs of 3-8 layers x 2-6 ops, recurrent grids of 2-4 layers x 8-30 steps, 6-14 Inception-like blocks of 2-5
    branches of 1-5 convolutions, and attentional encoder-decoders of 1-3 layers x 8-30 source and target steps.

    The Inception-like graphs come near Inception-V3's size (median 118 ops over 60 draws, at most 184; it has 317
    ops in 180 groups): with 3-10 blocks of 2-4 branches of 1-3 convolutions (median 61 ops) Inception-V3's
    zero-shot ratio was 1.318, with these 1.138 (``benchmarks/bench_rl_part2.py``'s zero-shot step, 420 s, finish
    dropout 0.5, best of 16 samples per view, groups placed by first op). Their costs have Inception-V3's
    proportions (:func:`envs.synthetic.branch_blocks`); with 200-300x its parameter bytes per CPU-second, the
    zero-shot GNN learnt to spread parameters and placed Inception-V3 at 1.29 (1.15 with these costs, both with
    ``ema`` baselines, groups in HEFT's order).

    Tensor sizes and GPU speed-ups keep the generators' defaults. Tried: drawing them per graph (mean output
    0.5-16 MB, GPU speed-ups up to 5-40x): Inception-V3's zero-shot ratio went from 1.30 to 1.24 and RNNLM's from
    1.03 to 2.71 (``benchmarks/bench_rl_part2.py``'s zero-shot step, 180 s each), so it was left out.
    """
    rng = np.random.default_rng(seed)
    out: list[OpGraph] = []
    for i in range(count):
        sizes = rng.integers(3, 9), rng.integers(2, 7), rng.integers(2, 5), rng.integers(8, 31), rng.integers(6, 15)
        s = int(rng.integers(1 << 30))
        family = i % 4
        if family == 3:
            layers, src, tgt = int(rng.integers(1, 4)), int(rng.integers(8, 31)), int(rng.integers(8, 31))
            out.append(seq2seq_grid(layers, src, tgt, seed=s))
        else:
            out.append(layered_dag(int(sizes[0]), int(sizes[1]), seed=s) if family == 0 else
                       recurrent_grid(int(sizes[2]), int(sizes[3]), seed=s) if family == 1 else
                       branch_blocks(int(sizes[4]), seed=s, max_branches=5, max_chain=5))
    return out


def train_multi(config: MultiTrainConfig) -> MultiTrainResult:
    """Train ``config.policy`` on every graph in turn (module docstring)."""
    from torch.utils.tensorboard import SummaryWriter

    from policies import ALGOS, POLICIES

    for what, name, known in (("policy", config.policy, POLICIES), ("algorithm", config.algo, ALGOS)):
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(sorted(known))}")
    resume_dir = None
    if config.resume:
        config, resume_dir = _resumed_config(config)
    cluster = resolve_cluster(config.cluster)
    graphs = [resolve_graph(g, config=config.graph_config) for g in config.graphs]
    graphs += random_graphs(config.random_dags, config.seed)  # the same DAGs again on resume: drawn from the seed
    names = [g.name for g in graphs]
    if len(set(names)) != len(names):
        raise ValueError(f"graph names repeat: {', '.join(names)}")
    if resume_dir is not None:
        run_dir = resume_dir
    else:
        run_dir = new_run_dir(config.runs_dir, config.run_name
                              or stamped_name(f"multi-{len(graphs)}", config.policy, config.algo, config.seed))
        config = dataclasses.replace(config, run_name=run_dir.name)
    doc = dataclasses.asdict(config)
    doc.update(graphs=list(config.graphs), graph_names=names, multi=True)
    write_json_atomic(run_dir / "config.json", doc)

    torch.set_num_threads(max(1, config.torch_threads))
    torch.manual_seed(config.seed)
    np.random.seed(config.seed % 2**32)
    envs = [make_env(g, cluster, num_groups=config.num_groups, reference=config.reference) for g in graphs]
    try:
        policy = make_policy(config.policy, envs[0].problem, hidden=config.hidden, **config.policy_options)
        algos = [make_algo(config.algo, policy, env, samples_per_update=config.samples_per_update, lr=config.lr,
                           entropy_coef=config.entropy_coef, baseline=config.baseline,
                           top_fraction=config.top_fraction, self_imitation_coef=config.self_imitation_coef,
                           seed=config.seed + i) for i, env in enumerate(envs)]
        if config.algo == "reinforce":  # one optimizer for the shared weights
            for a in algos[1:]:
                a.optimizer = algos[0].optimizer
        best = {n: math.inf for n in names}
        best_groups: dict[str, np.ndarray] = {}
        ckpt = run_dir / "checkpoint.pt"
        rounds = samples = 0
        elapsed_before = 0.0
        if resume_dir is not None and ckpt.exists():
            state = torch.load(ckpt, weights_only=False)
            if "algos" not in state:
                raise ValueError(f"{run_dir.name}: its checkpoint predates resumable multi-graph runs")
            policy.load_state_dict(state["policy"])
            for algo, algo_state in zip(algos, state["algos"]):
                algo.load_state_dict(algo_state)
            torch.set_rng_state(state["rng"]["torch"])
            np.random.set_state(state["rng"]["numpy"])
            best.update(state["best"])
            best_groups.update(state["best_groups"])
            rounds, samples, elapsed_before = state["rounds"], state["samples"], state["elapsed_s"]
            log.info("resuming %s at round %d (%d samples, %.0f s)", run_dir.name, rounds, samples, elapsed_before)
        # on resume, TensorBoard drops what the killed run logged after its last checkpoint
        writer = SummaryWriter(log_dir=str(run_dir), purge_step=samples + 1 if samples else None)

        def checkpoint() -> None:
            save_torch_atomic({"version": 2, "policy": policy.state_dict(),
                               "algos": [a.state_dict() for a in algos],
                               "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state()},
                               "best": best, "best_groups": best_groups, "rounds": rounds, "samples": samples,
                               "elapsed_s": elapsed_before + time.perf_counter() - t0}, ckpt)
            for g, env in zip(graphs, envs):
                if g.name in best_groups:
                    save_placement(run_dir / f"placement_{safe_name(g.name)}.json", g, cluster,
                                   env.problem.expand(best_groups[g.name]), method=f"rl:{config.policy}+"
                                   f"{config.algo}+multi", seed=config.seed, run=run_dir.name)

        t0 = time.perf_counter()
        last_ckpt = t0
        while (elapsed_before + time.perf_counter() - t0 < config.budget_s
               and (config.max_rounds is None or rounds < config.max_rounds)):
            for g, env, algo in zip(graphs, envs, algos):
                stats = algo.update()
                samples += len(stats.rewards)
                times = np.asarray(stats.step_times_s, dtype=np.float64)
                if len(times) and np.isfinite(times).any():
                    i = int(np.argmin(times))
                    if times[i] < best[g.name]:
                        best[g.name], best_groups[g.name] = float(times[i]), np.asarray(stats.placements[i]).copy()
                writer.add_scalar(f"charts/best_step_time_s/{g.name}", best[g.name], samples)
                writer.add_scalar(f"charts/reward/{g.name}", float(np.mean(stats.rewards)), samples)
            rounds += 1
            if time.perf_counter() - last_ckpt >= config.checkpoint_every_s:
                checkpoint()
                last_ckpt = time.perf_counter()
        checkpoint()
        writer.close()
        return MultiTrainResult(run_dir=run_dir, best_step_time_s=best,
                                reference_step_time_s={g.name: e.reference_time_s for g, e in zip(graphs, envs)},
                                rounds=rounds, elapsed_s=elapsed_before + time.perf_counter() - t0)
    finally:
        for env in envs:
            env.close()


def add_multi_arguments(parser: argparse.ArgumentParser) -> None:
    """``--graphs`` and ``--random-dags`` for ``placer train`` (the other options come from
    :func:`placer.app.train.add_train_arguments`)."""
    parser.add_argument("--graphs", help="train one policy on these comma-separated graphs (Placeto-style; "
                        "learning options left at their defaults take the multi-graph ones: 32 samples per "
                        "update, lr 3e-3, entropy 0.01, quantile baseline top 25%%, self-imitation 0.5)")
    parser.add_argument("--random-dags", type=int, default=0,
                        help="add this many random graphs (layered, recurrent, Inception-like, encoder-decoder)")
    parser.add_argument("--finish-dropout", type=float, default=0.0,
                        help="gnn+reinforce: hide the finish-estimate column from this share of the training "
                             "samples (`placer place` then tries both views; the benchmark uses 0.5)")


LEARNING_OPTIONS = ("samples_per_update", "lr", "entropy_coef", "baseline", "top_fraction", "self_imitation_coef")
"""``placer train`` options whose multi-graph defaults differ from one graph's: left at (or set to) the
single-graph default, they take :class:`MultiTrainConfig`'s, the setting the zero-shot figures were measured with."""


def multi_config_from_args(args: argparse.Namespace) -> MultiTrainConfig:
    """A :class:`MultiTrainConfig` from ``placer train``'s options (with :func:`add_multi_arguments`)."""
    from placer.app.train import TrainConfig

    single = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    learning = {k: getattr(args, k) for k in LEARNING_OPTIONS if getattr(args, k) != single[k]}
    graphs = tuple(g.strip() for g in (args.graphs or "").split(",") if g.strip())
    options = {}
    if args.finish_dropout:
        if (args.policy, args.algo) != ("gnn", "reinforce"):
            raise ValueError(f"--finish-dropout needs --policy gnn --algo reinforce, not {args.policy}+{args.algo}")
        options["finish_dropout"] = args.finish_dropout
    return MultiTrainConfig(
        graphs=graphs, random_dags=args.random_dags, graph_config=args.graph_config, cluster=args.cluster,
        policy=args.policy, algo=args.algo, budget_s=args.budget, max_rounds=args.max_updates, seed=args.seed,
        num_groups=args.num_groups, reference=args.reference, hidden=args.hidden, runs_dir=args.runs_dir,
        run_name=args.run_name, resume=args.resume, policy_options=options, **learning)
