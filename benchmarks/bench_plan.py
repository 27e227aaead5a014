"""The plan search against every baseline, each with its best schedule and micro-batch count (issue 20).

**Simulated half** (``--sim-only``, this file): for G in gpt-paper, gpt-1.3b, moe-paper, inception_v3-paper,
nmt-paper and C in h100x8, mixed, memory-tight (``placer.costmodel.tight.memory_tight(h100x8, G)``: each graph
gets the memory that makes it tight), within ``--budget-s`` seconds per (G, C):

1. every registered baseline places G on C; each placement is scored with its best plan
   (:func:`placer.costmodel.plans.best_plan`, ``schedule="auto"``);
2. the planner, run as a user runs it (``placer train --schedule auto --refine``, :func:`planner`): RL from scratch
   (seq2seq + REINFORCE, reward under ``schedule="auto"``) for ``--rl-share`` of the budget, then plan refinement
   (:func:`placer.costmodel.refine.refine`) for the rest, started from the RL placement, every feasible baseline
   placement (the planner may be seeded by them; the ``source`` column says which start the final plan descends
   from) and the balanced / interleaved / memory-balanced splits;
3. prints the table and::

    figure: plan_vs_best_baseline[G,C] = X      plan step / best baseline step (target: geomean <= 0.85, none > 1)
    figure: plan_vs_best_baseline[geomean] = X
    figure: plan_vs_lower_bound[G,C] = X        plan step / placer.costmodel.plans.plan_lower_bound_s (the smallest
                                                placer.costmodel.bounds.lower_bound_s, Adam's updates included, over
                                                the M that memory does not rule out)

and, per pair, ``# bound of G on C: X ms at M = m, set by <term>`` (which term of the bound binds).

**Real half** (``--real-only``): :func:`real_section`, written in ``benchmarks/bench_plan_real.py`` (cpu-2, the gpt
model measured on two workers); this file calls it when that file is present.

``--compare-fixed`` measures the choice of :mod:`placer.costmodel.plans` instead: RL with a fixed ``1f1b x M``
reward against RL with the ``auto`` reward, same graph, cluster and ``--budget-s`` each.

Run: ``flock /work/bench.lock python3 benchmarks/bench_plan.py [--budget-s 40] [--graphs gpt-paper]
[--clusters h100x8] [--rl-share 0.3] [--sim-only]``. The default budget fits ~10 minutes for the 15 pairs of
the simulated half on 2 cores (the issue's 600 s read as the benchmark's budget).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from graphs.data import load_benchmark_graph  # noqa: E402
from placer import baselines  # noqa: E402
from placer.core.cluster import Cluster, get_cluster  # noqa: E402
from placer.costmodel.plans import best_plan, plan_bound  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402
from placer.costmodel.tight import memory_tight  # noqa: E402

GRAPHS = ("gpt-paper", "gpt-1.3b", "moe-paper", "inception_v3-paper", "nmt-paper")
CLUSTERS = ("h100x8", "mixed", "memory-tight")


def cluster_for(name: str, graph: Any) -> Cluster:
    """A preset, or ``memory-tight``: h100x8 with the memory that makes ``graph`` tight."""
    return memory_tight(get_cluster("h100x8"), graph) if name == "memory-tight" else get_cluster(name)


def score_baselines(sim: Simulator, seed: int) -> dict[str, tuple[float, str, np.ndarray]]:
    """Every applicable baseline: ``(best-plan step or inf, plan label, device per op)``."""
    out = {}
    for m in baselines.names():
        try:
            p = baselines.place(m, sim.graph, sim.cluster, seed=seed)
        except ValueError:
            continue  # does not apply to this cluster (single-cpu on GPUs)
        plan, res = best_plan(sim, p)
        out[m] = (res.step_time_s if res.ok else math.inf, plan.label if res.ok else "OOM", p.device_of_op)
    return out


def rl_placement(graph: Any, cluster: Cluster, budget_s: float, seed: int, runs_dir: str, *,
                 schedule: str = "auto", microbatches: int = 1) -> np.ndarray | None:
    """RL from scratch with its reward under ``schedule`` for ``budget_s`` seconds: its best placement (None: no
    time)."""
    if budget_s < 1.0:
        return None
    from placer.app.train import train
    from placer.app.training.config import flat_config

    try:
        res = train(flat_config(graph=graph, cluster=cluster, budget_s=budget_s, seed=seed, runs_dir=runs_dir,
                                progress=False, schedule=schedule, microbatches=microbatches, baselines=[]))
    except ValueError as e:  # e.g. every sample so far OOM on a memory-tight cluster: refinement goes on without
        print(f"# RL on {graph.name}/{cluster.name}: {e}", flush=True)
        return None
    return np.asarray(res.placement.device_of_op)


def compare_fixed(args: argparse.Namespace) -> None:
    """The design choice of :mod:`placer.costmodel.plans`, measured: RL whose reward uses one fixed plan
    (``1f1b x M``) against RL whose reward is each placement's best plan (``auto``), same graph, cluster and
    budget; both final placements are then scored under their best plan."""
    g_name, c_name, m = args.fixed_graph, args.fixed_cluster, args.fixed_microbatches
    graph = load_benchmark_graph(g_name)
    cluster = cluster_for(c_name, graph)
    sim = Simulator(graph, cluster)
    for label, sched, micro in ((f"1f1b_x{m}", "1f1b", m), ("auto", "auto", 1)):
        dev = rl_placement(graph, cluster, args.budget_s, args.seed, args.runs_dir, schedule=sched,
                           microbatches=micro)
        own = sim.run(dev, schedule="1f1b", microbatches=m) if sched != "auto" else None
        plan, res = best_plan(sim, dev)
        extra = f", under 1f1b x{m} {_ms(own.step_time_s if own.ok else math.inf)} ms" if own is not None else ""
        print(f"# RL with reward {label} on {g_name}/{c_name}, {args.budget_s:.0f} s: best plan "
              f"{_ms(res.step_time_s if res.ok else math.inf)} ms ({plan.label}){extra}", flush=True)
        print(f"figure: rl_reward_{label}_best_plan_ms[{g_name},{c_name}] = "
              f"{(res.step_time_s if res.ok else math.inf) * 1e3:.3f}")


def lower_bound(graph: Any, cluster: Cluster) -> tuple[float, str]:
    """No plan beats this (:func:`placer.costmodel.plans.plan_bound`; NaN where it does not apply), and a note
    saying which term binds at which micro-batch count."""
    try:
        bound_s, m, term = plan_bound(graph, cluster)
    except ValueError:
        return math.nan, "does not apply"
    if m is None:
        return bound_s, "no micro-batch count fits in memory"
    return bound_s, f"{bound_s * 1e3:.2f} ms at M = {m}, set by {term}"


def planner(graph: Any, cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    """The planner as a user runs it: ``placer train --schedule auto --refine`` (:func:`placer.app.train.train`),
    RL from scratch for ``--rl-share`` of the budget, then refinement for the rest from RL's best placement, every
    feasible baseline's and the splits (also when every RL sample was out of memory). Its plan, RL's own best plan
    (``nan`` when none ran), the start the plan descends from and how many plans refinement scored."""
    from placer.app.train import train
    from placer.app.training.config import flat_config

    rl_s = args.budget_s * args.rl_share
    try:
        out = train(flat_config(graph=graph, cluster=cluster, budget_s=rl_s, refine_s=args.budget_s - rl_s,
                                seed=args.seed, runs_dir=args.runs_dir, progress=False, schedule="auto",
                                baselines=baselines.names())).only
    except ValueError as e:  # no RL sample ran and refinement found no plan that fits
        print(f"# planner on {graph.name}/{cluster.name}: {e}", flush=True)
        return {"plan_s": math.inf, "plan": "OOM", "rl_s": math.nan, "source": "-", "evals": 0}
    plan_s = out.predicted.step_time_s if out.predicted.ok else math.inf
    got = {"plan_s": plan_s, "plan": out.predicted.plan_label}
    if (ref := out.refined) is None:  # refinement did not beat the policy's best: that is the plan
        return {**got, "rl_s": plan_s, "source": "rl", "evals": 0}
    own = ref.policy_step_s
    return {**got, "rl_s": own if math.isfinite(own) else math.nan, "source": ref.start, "evals": ref.evaluations}


def bench_pair(g_name: str, c_name: str, args: argparse.Namespace) -> dict[str, Any]:
    graph = load_benchmark_graph(g_name)
    cluster = cluster_for(c_name, graph)
    t0 = time.perf_counter()
    base = score_baselines(Simulator(graph, cluster), args.seed)
    best_m = min(base, key=lambda m: (base[m][0], m))
    got = planner(graph, cluster, args)
    lb, lb_note = lower_bound(graph, cluster)
    return {"graph": g_name, "cluster": c_name, "base": base, "best_m": best_m, **got, "lb": lb,
            "lb_note": lb_note, "wall_s": time.perf_counter() - t0}


def _ms(x: float, unit: str = "") -> str:
    return f"{x * 1e3:.2f}{unit}" if math.isfinite(x) else "OOM"


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| graph | cluster | best baseline (plan) | RL alone | planner (plan) | source | plan / best baseline | "
          "plan / bound |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["base"][r["best_m"]]
        print(f"| {r['graph']} | {r['cluster']} | {r['best_m']} {_ms(b[0], ' ms')} ({b[1]}) | "
              f"{_ms(r['rl_s'], ' ms')} | {_ms(r['plan_s'], ' ms')} ({r['plan']}) | {r['source']} | "
              f"{r['plan_s'] / b[0]:.3f} | {r['plan_s'] / r['lb']:.3f} |")
    print()
    print("Every baseline, best plan each (ms, schedule x micro-batches):")
    for r in rows:
        cells = ", ".join(f"{m} {_ms(t)} {lab}" for m, (t, lab, _) in sorted(r["base"].items(), key=lambda x: x[1][0]))
        print(f"- {r['graph']} on {r['cluster']}: {cells}")


def print_figures(rows: list[dict[str, Any]]) -> None:
    ratios = []
    for r in rows:
        best = r["base"][r["best_m"]][0]
        x = r["plan_s"] / best if math.isfinite(best) else (0.0 if math.isfinite(r["plan_s"]) else math.nan)
        key = f"{r['graph']},{r['cluster']}"
        print(f"figure: plan_vs_best_baseline[{key}] = {x:.3f}")
        if math.isfinite(r["lb"]) and r["lb"] > 0:
            print(f"figure: plan_vs_lower_bound[{key}] = {r['plan_s'] / r['lb']:.3f}")
        if math.isfinite(x) and x > 0:
            ratios.append(x)
    if ratios:
        print(f"figure: plan_vs_best_baseline[geomean] = {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


def real_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """THE REAL HALF (cpu-2, the gpt model on two workers): ``benchmarks/bench_plan_real.py``'s ``real_section``
    when that file is present; it prints its own figures and returns its table rows."""
    try:
        from benchmarks.bench_plan_real import real_section as real  # type: ignore[import-not-found]
    except ImportError:
        print("# real half: benchmarks/bench_plan_real.py is not here yet; skipped")
        return []
    return real(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--graphs", default=",".join(GRAPHS))
    p.add_argument("--clusters", default=",".join(CLUSTERS))
    p.add_argument("--budget-s", type=float, default=40.0, help="planner seconds per (graph, cluster)")
    p.add_argument("--rl-share", type=float, default=0.3, help="share of the budget for RL before refinement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default=None, help="RL run folders (default: a temporary folder)")
    half = p.add_mutually_exclusive_group()
    half.add_argument("--sim-only", action="store_true")
    half.add_argument("--real-only", action="store_true")
    half.add_argument("--compare-fixed", action="store_true",
                      help="only RL with a fixed 1f1b x M reward against RL with the auto reward (--budget-s each)")
    p.add_argument("--fixed-graph", default="inception_v3-paper")
    p.add_argument("--fixed-cluster", default="h100x8")
    p.add_argument("--fixed-microbatches", type=int, default=8)
    args = p.parse_args(argv)
    if not 0 <= args.rl_share < 1:
        p.error("--rl-share must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.ERROR)
    args = parse_args(argv)
    if args.compare_fixed:
        with tempfile.TemporaryDirectory() as tmp:
            args.runs_dir = args.runs_dir or tmp
            compare_fixed(args)
        return
    if not args.real_only:
        with tempfile.TemporaryDirectory() as tmp:
            args.runs_dir = args.runs_dir or tmp
            rows = []
            for g in (x for x in args.graphs.split(",") if x):
                for c in (x for x in args.clusters.split(",") if x):
                    rows.append(bench_pair(g, c, args))
                    r = rows[-1]
                    print(f"# {g} on {c}: planner {_ms(r['plan_s'])} ms ({r['plan']}, from {r['source']}, "
                          f"{r['evals']} plans scored), best baseline {r['best_m']} "
                          f"{_ms(r['base'][r['best_m']][0])} ms, {r['wall_s']:.0f} s", flush=True)
                    print(f"# bound of {g} on {c}: {r['lb_note']}", flush=True)
        print_table(rows)
        print_figures(rows)
    if not args.sim_only:
        real_section(args)


if __name__ == "__main__":
    main()
