"""The RL placer against the baselines (issue 6 targets): seq2seq + REINFORCE, simulated reward, ``cpu+4gpu``.

For each graph G in rnnlm, nmt, inception_v3 (the ``paper`` config from ``graphs/data/`` when present, else
``small``; each line says which), train for ``--budget`` seconds with :func:`placer.app.train.train` and print::

    figure: rl_vs_best_classic[G] = R        RL step time / best of Scotch, MinCut, Expert   (target <= 1.00 rnnlm,
                                                                                            <= 0.80 nmt, inception)
    figure: rl_vs_best_algorithmic[G] = R    RL step time / best of m-ETF, m-SCT, HEFT       (target <= 1.00)
    figure: time_to_2pct_s[G] = S            training seconds until the best was within 2% of the final best
                                                                                           (target <= 600)

All step times are simulated on the full op graph. The policy learns from scratch; with ``--warm-start best`` it
first imitates the best baseline's placement (behaviour cloning, :func:`policies.base.imitate`) and the figures
are printed as ``rl_warm_vs_best_classic[G]`` etc., so the two are never confused. With ``--real`` it also trains on
the ``small`` configs on
``cpu-2`` with ``--reward sim+real`` (which first calibrates the simulator on this machine's workers, see
``TrainConfig.calibrate``; the baselines below place on that calibrated cluster too) and measures, with the engine
in one warm session, the RL placement and
Single, Scotch, MinCut and Expert (interleaved rounds, median of each)::

    figure: rl_real_vs_best_classic[G] = R   measured RL / best measured of Single, Scotch, MinCut, Expert

Run: ``python3 benchmarks/bench_rl.py [--budget 540] [--quick] [--graphs rnnlm,nmt] [--real]``. The default
budget fits ~10 minutes per graph on 2 cores. Timings are noisy on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.data import available, load_benchmark_graph  # noqa: E402
from placer.core.cluster import Cluster, get_cluster  # noqa: E402
from placer.app.train import ALGORITHMIC, CLASSIC, train  # noqa: E402
from placer.app.training.config import flat_config  # noqa: E402

MODELS = ("rnnlm", "nmt", "inception_v3")
REAL_CLASSIC = ("single", "scotch", "mincut", "expert")


def load(model: str, data_dir: Path | None, config: str | None = None):
    """``(graph, config)``: the paper config when shipped (or in ``data_dir``), else small."""
    from graphs.ir import OpGraph

    for cfg in ([config] if config else ["paper", "small"]):
        if data_dir is not None and (data_dir / f"{model}-{cfg}.json").exists():
            return OpGraph.load(data_dir / f"{model}-{cfg}.json"), cfg
        if f"{model}-{cfg}" in available():
            return load_benchmark_graph(model, config=cfg), cfg
    raise ValueError(f"no {model} graph in graphs/data{' or ' + str(data_dir) if data_dir else ''}")


def ratio(rl_s: float, others: dict[str, float], methods: tuple[str, ...]) -> tuple[float, str]:
    ok = {m: others[m] for m in methods if m in others and math.isfinite(others[m])}
    if not ok:
        return math.nan, "none"
    best = min(ok, key=ok.get)
    return rl_s / ok[best], best


def bench_sim(model: str, args: argparse.Namespace) -> None:
    graph, config = load(model, args.data_dir)
    warm = {"warm_start": args.warm_start} if args.warm_start else {}
    res = train(flat_config(graph=graph, cluster="cpu+4gpu", budget_s=args.budget, seed=args.seed,
                            runs_dir=args.runs_dir, progress=not args.no_progress, **warm, **args.overrides))
    rl = res.predicted.step_time_s
    r_c, best_c = ratio(rl, res.baselines, CLASSIC)
    r_a, best_a = ratio(rl, res.baselines, ALGORITHMIC)
    name = "rl_warm" if args.warm_start else "rl"
    warm_note = f" (warm start: {args.warm_start})" if warm else ""
    print(f"# {model}-{config} on cpu+4gpu{warm_note}: RL {rl:.5g} s; "
          f"{best_c} {res.baselines.get(best_c, math.nan):.5g} s; "
          f"{best_a} {res.baselines.get(best_a, math.nan):.5g} s; {res.samples} samples in {res.elapsed_s:.0f} s "
          f"({res.samples / max(res.elapsed_s, 1e-9):.0f}/s); curve {res.run_dir / 'learning_curve.png'}")
    print(f"figure: {name}_vs_best_classic[{model}] = {r_c:.3f}")
    print(f"figure: {name}_vs_best_algorithmic[{model}] = {r_a:.3f}")
    print(f"figure: {'warm_' if warm else ''}time_to_2pct_s[{model}] = {res.time_to_within(0.02):.0f}", flush=True)


def bench_real(model: str, args: argparse.Namespace) -> None:
    from envs.problem import build_problem
    from envs.rewards import EngineSession
    from placer import baselines

    graph, _ = load(model, args.data_dir, "small")
    cluster = get_cluster(args.real_cluster)
    res = train(flat_config(graph=graph, cluster=cluster, budget_s=args.real_budget, seed=args.seed,
                            reward=args.real_reward, real_every_s=max(30.0, args.real_budget / 4),
                            runs_dir=args.runs_dir, progress=not args.no_progress, **args.overrides))
    cluster = Cluster.load(res.run_dir / "cluster.json")  # calibrated by train() for an engine reward on cpu-2
    placements = {"rl": res.placement}
    for m in REAL_CLASSIC:
        try:
            placements[m] = baselines.place(m, graph, cluster, seed=args.seed)
        except ValueError as e:
            print(f"# {m} does not apply: {e}")
    session = EngineSession(build_problem(graph, cluster, 8), timeout_s=300, steps=5, warmup=2, schedule="none",
                            microbatches=1)
    times: dict[str, list[float]] = {m: [] for m in placements}
    try:
        for _ in range(args.real_rounds):  # interleaved rounds, so drifting machine load hits every method
            for m, p in placements.items():
                r = session.measure_placement(p)
                times[m].append(r.step_time_s if r.ok else math.inf)
    finally:
        session.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    r, best = ratio(med["rl"], med, REAL_CLASSIC)
    print(f"# {model}-small on {cluster.name} (reward {args.real_reward}; engine, median of {args.real_rounds}): "
          f"RL {med['rl']:.5g} s; "
          + ", ".join(f"{m} {v:.5g} s" for m, v in med.items() if m != "rl") + f"; run {res.run_dir}")
    print(f"figure: rl_real_vs_best_classic[{model}] = {r:.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=540.0, help="training seconds per graph (default 540)")
    ap.add_argument("--graphs", default=",".join(MODELS), help="comma list of models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 s per graph (30 s with --real)")
    ap.add_argument("--real", action="store_true", help="also the engine part (small configs, cpu-2)")
    ap.add_argument("--real-only", action="store_true", help="only the engine part")
    ap.add_argument("--real-budget", type=float, default=240.0, help="training seconds per graph with --real")
    ap.add_argument("--real-rounds", type=int, default=3, help="engine measurement rounds per placement")
    ap.add_argument("--real-reward", choices=("sim+real", "real"), default="sim+real",
                    help="reward of the engine part (default sim+real, as the issue asks)")
    ap.add_argument("--real-cluster", default="cpu-2",
                    help="cluster the engine part simulates: cpu-2 or a calibrated cluster JSON (same devices)")
    ap.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench_rl"))
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="look for {model}-{paper,small}.json here first (default: graphs/data only)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="TrainConfig or algorithm config overrides")
    ap.add_argument("--warm-start", metavar="BASELINE", default=None,
                    help="start the policy by imitating this baseline ('best': the best simulated one); figures are "
                         "then printed as rl_warm_* / warm_time_to_2pct_s, never under the from-scratch names")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.real_budget = 20.0, 30.0
    args.overrides = {}
    for pair in args.set:
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                args.overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            args.overrides[key] = value
    logging.basicConfig(level=logging.WARNING)
    models = [m for m in args.graphs.split(",") if m]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if not args.real_only:
        for m in models:
            bench_sim(m, args)
    if args.real or args.real_only:
        for m in models:
            bench_real(m, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
