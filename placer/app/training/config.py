"""The run config of ``placer train``: one dataclass for one graph or many, nesting the algorithm's own config.

:class:`TrainConfig` holds what a run needs besides the algorithm; ``algo_config`` is the algorithm's own
hyper-parameter dataclass (:class:`policies.reinforce.ReinforceConfig`, :class:`policies.ppo.PPOConfig`, from
:data:`policies.registry.ALGOS`), never a copy of its fields. Its starting values are the :data:`PRESETS` entry
of the algorithm and the run's mode (one graph, or several: Placeto's multi-graph training); fields given
explicitly (``algo_config={"lr": 1e-3}`` or ``--lr 1e-3``) replace them, whatever their value.
The resolved config is written to the run's ``config.json``; :func:`config_from_saved` reads it back, and also
reads the two formats written before (a flat one-graph ``TrainConfig``, a flat ``MultiTrainConfig``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster

CLASSIC = ("scotch", "mincut", "expert")
"""ColocRL's reference baselines."""
ALGORITHMIC = ("m-etf", "m-sct", "heft")
"""Scheduling-based baselines (Baechi, HEFT)."""
DEFAULT_BASELINES = ("single-cpu", "single-gpu", *CLASSIC, "metis", "m-topo", *ALGORITHMIC, "pipedream-dp")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "one-graph": {
        # NMT-paper, 150 s runs on cpu+4gpu: ema and batch baselines settle at 0.272 s, quantile with top 10% reaches
        # 0.244 s, with self-imitation 0.235 s (a greedy local search from every baseline stops at 0.235 s).
        # Entropy 0.01, not 0.05 (issue 20): with the quantile baseline only the top 10% of a batch get an advantage,
        # and once they tie with the quantile (a converged policy) their advantage is 0, so the entropy bonus alone
        # acts and spreads the policy out again: the per-update MEAN step climbed while the best stayed. Measured
        # (seed 0, 250 updates x 128 samples, nmt-small on a calibrated cpu-2, schedule none), mean step per fifth of
        # the run: 0.05 -> 10.40, 7.87, 9.04, 8.64, 9.05 ms; 0.01 -> 10.35, 7.72, 7.72, 7.77, 7.86 ms; best 7.402 ms
        # both. NMT-paper on cpu+4gpu, 60 updates: best 0.2658 s (0.05) vs 0.2629 s (0.01).
        # 64 samples per update, not 128 (issue 20, 2026-12-04): twice the updates in the same time, and the mean
        # converges onto the best instead of trailing it. 120 s runs under schedule auto on cpu-2 (the demo's
        # setting), seeds 0/1/2, last fifth's mean above the run's best, and the best: gpt-medium 128: 8.9%, 10%,
        # 27% (best 2.221, 2.244, 1.951 s); 64: 0.5%, 4.0%, 11.6% (2.227, 2.034, 2.179 s). nmt-small 128: 13%, 22%,
        # 7.9% (4.097, 3.938, 4.097 ms; the mean climbed after the second fifth in two runs); 64: 9.1%, 8.1%, 9.4%
        # (4.097 ms each). inception_v3-small seeds 0/1: 128 best 25.23, 25.66 ms; 64: 24.90, 24.76 ms.
        "reinforce": dict(samples_per_update=64, lr=1e-3, entropy_coef=0.01, baseline="quantile", top_fraction=0.1,
                          self_imitation_coef=0.5),
        # what the one-graph trainer gave PPO before the configs were nested (kept so that runs reproduce)
        "ppo": dict(samples_per_update=128, lr=1e-3, entropy_coef=0.05, max_grad_norm=1.0),
    },
    "multi-graph": {
        # the setting the zero-shot figures were measured with (a round's time is mostly the policy's, so 32
        # samples cost few rounds: 458 rounds of 32 against 463 of 16 in 420 s); risk-seeking with self-imitation
        # pulls the policy toward the best placement of each graph, which the best of a few hundred zero-shot
        # samples profits from (Inception-V3 left out, 420 s: ema 1.147, quantile 0.25 1.053, with self-imitation
        # 1.019 of the GNN trained on it; see policies.reinforce for the per-view baselines)
        "reinforce": dict(samples_per_update=32, lr=3e-3, entropy_coef=0.01, baseline="quantile", top_fraction=0.25,
                          self_imitation_coef=0.5),
        "ppo": dict(samples_per_update=32, lr=3e-3, entropy_coef=0.01),
    },
}
"""Starting hyper-parameters per mode and algorithm, over the algorithm config's own defaults: the one place
where one-graph and multi-graph runs differ. Explicitly given fields always replace them."""

MAX_TORCH_THREADS = 1024
"""The most ``torch_threads`` a config may ask for."""
RESUME_OVERRIDES = ("budget_s", "checkpoint_every_s", "progress", "max_updates", "real_every_s")
"""Fields a resumed run takes from the new config; everything else comes from the run's ``config.json``."""


# ============================================================================================== config
@dataclass(kw_only=True)
class TrainConfig:
    """Everything a training run needs; written resolved to ``config.json``."""

    graph: str | OpGraph | None = None
    """The graph to train on: a benchmark name (``rnnlm``, ``nmt-paper``; ``graph_config`` when the name has
    none), a graph JSON path or an ``OpGraph``. With ``graphs`` or ``random_dags`` it is one graph of several."""
    graphs: tuple[str | OpGraph, ...] = ()
    """More graphs (names or JSON paths) for one policy trained on several (Placeto, Addanki et al., NeurIPS
    2019): each gets its own environment and algorithm state, the policy's weights are shared."""
    random_dags: int = 0
    """How many random graphs to add (:func:`placer.app.training.families.random_graphs`, drawn from ``seed``)."""
    graph_config: str = "small"
    """Benchmark configuration used when a graph is a bare name: ``small`` or ``paper``."""
    cluster: str | Cluster = "cpu-2"
    """Cluster preset (``cpu-2``, ``cpu+4gpu`` ...) or cluster JSON path."""
    policy: str = "seq2seq"
    """Policy name (:data:`policies.registry.POLICIES`); several graphs need one of any size (``gnn``)."""
    algo: str = "reinforce"
    """Algorithm name (:data:`policies.registry.ALGOS`)."""
    preset: Literal["auto", "one-graph", "multi-graph"] = "auto"
    """Which :data:`PRESETS` entry starts ``algo_config``: ``auto`` takes ``multi-graph`` when the run trains on
    more than one graph, else ``one-graph``."""
    algo_config: Any = None
    """The algorithm's hyper-parameters: its config dataclass, or a dict of fields replacing the preset's values
    (``None``: the preset as it is). Its ``seed`` is the run's ``seed`` plus the graph's index."""
    budget_s: float = 600.0
    """Training wall time in seconds (total across resumes). Calibration, the baselines' simulation and the final
    engine re-measurement (``sim+real``) come on top; ``placer train`` prints how long they took."""
    max_updates: int | None = None
    """Stop after this many updates (one per graph each) even if budget is left (tests, exact reproductions)."""
    reward: str = "sim"
    """Reward backend (:data:`envs.rewards.BACKENDS`): ``sim``, ``real`` (engine) or ``sim+real`` (sim reward,
    top-k re-measured by the engine). Runs on several graphs use ``sim``."""
    seed: int = 0
    """Seeds the policy's initialisation, the sampling generators, the random graphs and the global RNGs."""
    num_groups: int = 128
    """At most this many groups per graph (ColocRL's co-location grouping; graphs with fewer natural groups keep
    them: RNNLM-paper has 40, NMT-paper 110). Inception-V3 (282 natural groups) with seq2seq in 540 s: 256 groups
    reach 0.525 s, 128 groups 0.487 s (fewer decisions, 2.7x the samples per second), but only 180 groups express
    m-ETF's 0.468 s (``benchmarks/bench_rl_part2.py`` uses 180)."""
    reference: str = "expert"
    """Baseline whose step time normalises the reward (``-sqrt(t / t_ref)``)."""
    incremental: bool = False
    """Placeto-style per-step rewards in the env (REINFORCE uses the episode total, which is the same)."""
    failure_penalty: float | None = None
    """Reward of a failed/OOM placement (``None``: ``-sqrt(100)``, i.e. 100x the reference step time)."""
    sim_graph: Literal["full", "coarse"] = "full"
    """Simulate the full op graph (exact) or the ``coarse`` graph of runs of same-group ops."""
    schedule: str = "auto"
    """Micro-batch schedule the reward simulates/measures (:data:`placer.costmodel.schedules.SCHEDULES`), or
    ``auto``: each placement under its best schedule and micro-batch count
    (:func:`placer.costmodel.plans.best_plan`)."""
    microbatches: int = 1
    """Micro-batches per step for ``schedule`` (ignored with ``auto``, which chooses them)."""
    warm_start: str | None = None
    """Behaviour-clone this baseline's placement before RL (``best``: the best simulated baseline), and seed the
    self-imitation buffer with it (one-graph runs). Off by default; results of such runs are not "from scratch"
    and are labelled ``+warm:<method>`` in placement.json."""
    seed_baselines: bool = False
    """Seed the search with the best baseline's placement (one-graph runs): the run never reports a placement
    worse than it, and labels the placement ``seeded by <baseline>`` while it is the best
    (:mod:`placer.app.training.seeding`)."""
    refine_s: float = 0.0
    """Seconds of plan refinement after training (one-graph runs, ``sim`` reward, ``auto`` schedule;
    :mod:`placer.app.training.refining`): local search from the run's best placement, every evaluated baseline's
    and the balanced / interleaved / memory-balanced splits. A refined plan that beats the run's best is the one
    reported, labelled ``refined from <start>``. Comes on top of ``budget_s``."""
    warm_start_steps: int = 300
    """Most imitation steps of the warm start (it stops earlier once the policy reproduces the placement)."""
    hidden: int = 64
    """Hidden size of the policy (LSTM or GNN width)."""
    policy_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the policy factory (e.g. ``{"layers": 2}``, ``{"finish_dropout": 0.5}``)."""
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    """Baselines simulated once for the reference lines and the comparison (one-graph runs)."""
    checkpoint_every_s: float = 60.0
    """Seconds between checkpoints."""
    runs_dir: str = "runs"
    """Where run folders are created."""
    run_name: str | None = None
    """Folder name; ``None``: ``{graph}__{policy}__{algo}__{seed}__{YYYYmmdd-HHMMSS}`` (``multi-{N}`` for the
    graph with several)."""
    resume: str | None = None
    """A run folder (path, or name under ``runs_dir``) to continue; its config is reused (except
    :data:`RESUME_OVERRIDES`)."""
    top_k_real: int = 5
    """``sim+real``: how many of the best simulated placements the engine re-measures."""
    real_every_s: float = 120.0
    """``sim+real``: seconds between periodic re-measurements (and once at the end)."""
    calibrate: Literal["auto", "always", "never"] = "auto"
    """Calibrate the simulator against this machine's workers first (:func:`placer.engine.calibrate.calibrate_cluster`):
    ``auto`` does it when the reward uses the engine (``real``/``sim+real``) and the cluster is an uncalibrated
    all-CPU preset (``cpu-2``), so the simulated and measured rewards describe the same machine; ``always`` /
    ``never`` force it. The calibrated cluster is saved as the run's ``cluster.json``, so a resume reuses it."""
    engine_timeout_s: float = 120.0
    """Seconds an engine measurement may take before it counts as failed."""
    torch_threads: int = 1
    """``torch.set_num_threads`` for the policy (small networks run fastest on one thread); at most
    :data:`MAX_TORCH_THREADS`, and the trainer uses no more than the machine's cores."""
    progress: bool = True
    """Show the rich progress line."""

    def __post_init__(self) -> None:
        self.graphs = tuple(self.graphs)
        self.baselines = tuple(self.baselines)
        self._check_numbers()
        from placer import baselines  # noqa: PLC0415 - the registry, when a config is made

        unknown = [m for m in self.baselines if m not in baselines.names()]
        if unknown:
            raise ValueError(f"unknown baseline(s) {', '.join(map(repr, unknown))}; choose from "
                             f"{', '.join(baselines.names())}")
        if self.preset not in ("auto", *PRESETS):
            raise ValueError(f"preset must be auto or one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.resume:  # the run folder's config decides the rest
            return
        if self.num_graphs < 1:
            raise ValueError("training needs a graph (graph, graphs or random_dags; --graph, --graphs or "
                             "--random-dags, or --resume RUN)")
        self.algo_config = resolve_algo_config(self.algo, self.mode, self.algo_config, seed=self.seed)
        if self.refine_s > 0:
            self._check_refine()

    def _check_refine(self) -> None:
        """Refinement polishes one graph's placement by simulation under each placement's best plan."""
        if self.num_graphs != 1:
            raise ValueError("refine_s refines one graph's placement; a run on several graphs takes none")
        if self.reward != "sim":
            raise ValueError(f"refine_s needs reward 'sim': a refined plan is simulated, and a {self.reward!r} run "
                             f"reports measured placements")
        if self.schedule != "auto":
            raise ValueError(f"refine_s needs schedule 'auto' (each placement under its best plan), not "
                             f"{self.schedule!r}")

    def _check_numbers(self) -> None:
        """Out-of-range and non-finite numbers are one-line errors before anything runs (``--budget=infs``,
        ``--microbatches 0``, a negative step count), never silently clipped or ignored."""
        import math
        import numbers

        for name, low in (("budget_s", 0.0), ("checkpoint_every_s", None), ("real_every_s", None),
                          ("engine_timeout_s", 0.0), ("failure_penalty", None), ("refine_s", None)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if low is not None and not value > low:
                raise ValueError(f"{name.removesuffix('_s')} must be positive, got {value} s")
            if low is None and name.endswith("_s") and value < 0:
                raise ValueError(f"{name} must not be negative, got {value} s")
        for name, low in (("microbatches", 1), ("num_groups", 1), ("hidden", 1), ("top_k_real", 1),
                          ("torch_threads", 1), ("warm_start_steps", 0), ("max_updates", 1), ("random_dags", 0)):
            value = getattr(self, name)
            if value is None and name == "max_updates":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.torch_threads > MAX_TORCH_THREADS:  # (a million crashed OpenBLAS; the trainer uses <= the cores)
            raise ValueError(f"torch_threads must be at most {MAX_TORCH_THREADS}, got {self.torch_threads}")

    @property
    def num_graphs(self) -> int:
        """How many graphs the run trains on."""
        return (self.graph is not None) + len(self.graphs) + self.random_dags

    @property
    def mode(self) -> str:
        """The :data:`PRESETS` key this run uses."""
        if self.preset != "auto":
            return self.preset
        return "multi-graph" if self.num_graphs > 1 else "one-graph"

    def to_json(self) -> dict[str, Any]:
        """The resolved config (``config.json``): graphs given as objects are written by name."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # asdict would recurse into graphs
        d["graph"] = _name_of(self.graph)
        d["graphs"] = [_name_of(g) for g in self.graphs]
        d["cluster"] = _name_of(self.cluster)
        d["baselines"] = list(self.baselines)
        d["policy_options"] = dict(self.policy_options)
        d["algo_config"] = (dataclasses.asdict(self.algo_config) if dataclasses.is_dataclass(self.algo_config)
                            else self.algo_config)
        return d


def _name_of(thing: Any) -> Any:
    return thing if thing is None or isinstance(thing, str) else thing.name


def algo_config_class(algo: str) -> type:
    """The config dataclass of algorithm ``algo`` (one-line ``ValueError`` for an unknown name)."""
    from policies import ALGOS

    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(sorted(ALGOS))}")
    return ALGOS[algo].config_class


def resolve_algo_config(algo: str, mode: str, given: Any, *, seed: int) -> Any:
    """``algo``'s config: ``given`` when it is one, else the :data:`PRESETS` values for ``mode`` with the fields
    of ``given`` (a dict, or ``None``) replacing them; its seed is ``seed``. A field the algorithm does not have,
    or a config of another algorithm, is a one-line ``ValueError``."""
    cls = algo_config_class(algo)
    if dataclasses.is_dataclass(given):
        if not isinstance(given, cls):
            raise ValueError(f"algorithm {algo!r} takes a {cls.__name__}, not a {type(given).__name__}")
        return dataclasses.replace(given, seed=seed)
    names = {f.name for f in dataclasses.fields(cls)}
    given = dict(given or {})
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"algorithm {algo!r} has no hyper-parameter {', '.join(unknown)} (it takes "
                         f"{', '.join(sorted(names - {'seed'}))})")
    return cls(**{**PRESETS[mode].get(algo, {}), **given, "seed": seed})


# ============================================================================================== saved configs
MULTI_V2_RENAMED = {"max_rounds": "max_updates"}
"""Fields of the multi-graph ``config.json`` written before the trainers were merged, by their new name."""


def config_from_saved(saved: dict[str, Any]) -> TrainConfig:
    """The :class:`TrainConfig` of a run's ``config.json``: this format, or the two written before it (a flat
    one-graph config; a multi-graph one marked ``"multi": true``), whose algorithm fields are moved into
    ``algo_config`` (fields its algorithm did not have were ignored then, and are now)."""
    d = dict(saved)
    if "algo_config" not in d:
        d = _from_flat(d)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown training config field(s): {', '.join(unknown)}")
    d["graphs"] = tuple(d.get("graphs") or ())
    if "baselines" in d:
        d["baselines"] = tuple(d["baselines"])
    resume = d.pop("resume", None)
    config = TrainConfig(**d)
    config.resume = resume
    return config


def _from_flat(d: dict[str, Any]) -> dict[str, Any]:
    """A config.json of the format before this one, in this format."""
    multi = bool(d.pop("multi", False))
    d.pop("graph_names", None)
    for old, new in MULTI_V2_RENAMED.items():
        if old in d:
            d[new] = d.pop(old)
    fields = {f.name for f in dataclasses.fields(algo_config_class(d.get("algo", "reinforce")))}
    moved = {k: d.pop(k) for k in list(d) if k not in {f.name for f in dataclasses.fields(TrainConfig)}}
    d["algo_config"] = {k: v for k, v in moved.items() if k in fields and k != "seed"}
    d["preset"] = "multi-graph" if multi else "one-graph"
    if multi:
        d["graph"] = None
    return d


def flat_config(**fields: Any) -> TrainConfig:
    """A :class:`TrainConfig` from run and algorithm fields side by side (the benchmarks' ``--set FIELD=VALUE``):
    the ones :class:`TrainConfig` does not have go into ``algo_config`` (and are checked against the algorithm)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    algo_fields = {k: fields.pop(k) for k in list(fields) if k not in names}
    if algo_fields and fields.get("algo_config") is not None:
        raise ValueError(f"give {', '.join(sorted(algo_fields))} in algo_config, or algo_config not at all")
    given = fields.pop("algo_config", None)
    return TrainConfig(**fields, algo_config=algo_fields or given)
