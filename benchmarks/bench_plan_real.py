"""The real half of ``bench_plan``: gpt ``medium`` on this machine's two workers (``cpu-2``), measured.

Prints, at the end (one run, ``--rounds`` interleaved rounds, medians)::

    figure: real_speedup_vs_single[gpt] = R   # Single's measured step / the winning plan's   (target >= 1.5)
    figure: real_vs_even_split[gpt] = R       # winning plan's step / the even layer split's  (target <= 0.90)
    figure: sim_vs_real_err[gpt] = R          # |simulated - measured| / measured, winning plan (target <= 0.10)

Three plans, each with the schedule and micro-batch count the plan search finds best for it
(:func:`placer.costmodel.plans.best_plan`, via :func:`placer.app.measured.plan_row`):

* **Single**: the whole step on ``cpu:0`` (schedule ``none``, one micro-batch: plain training);
* **even split**: torchtitan's default, the ``even-layers`` baseline (gpt ``medium``: blocks 0-3 with the
  embeddings on ``cpu:0``, blocks 4-7, ``ln_f``, head and loss on ``cpu:1``);
* **winner**: the fastest plan by simulation among every baseline and every contiguous two-stage split between
  model parts (:func:`placer.app.measured.winning_plan`).

The simulator runs on a calibrated ``cpu-2`` (``placer cluster calibrate``; ``--cluster FILE`` reuses one) with
the op costs of the day (``--op-costs engine``, the default): before the rounds, Single runs on the workers once
more and each op's forward and backward time is read off its timeline
(:func:`placer.app.measured.costs_of_the_day`), so the simulator sees this machine's speed today (the shipped
one-core profile was taken on another day: on 2026-12-04 this VM ran the same step 1.9-2.5x slower, and the
simulator's error was the machine's, not the plan's). The winner's simulated step on the shipped profile is
printed beside (``# shipped profile``); ``--op-costs profile`` simulates with it instead. The three plans are
then measured on one warm :class:`placer.engine.Measurer` (one worker per core, one thread each)
in ``--rounds`` rounds, each round measuring all three in turn so a slow spell of the shared machine hits them
alike; every figure is the median over rounds (the rounds' range is printed beside it). Run under the shared
lock: ``flock /work/bench.lock python3 benchmarks/bench_plan_real.py`` (about 3 minutes).

``bench_plan.py --real-only`` calls :func:`real_section` (the rows of :func:`real_rows`, printed with
:func:`figure_lines`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphs.data import resolve_graph  # noqa: E402
from graphs.ir import OpGraph  # noqa: E402
from placer.app.measured import (PlanRow, costs_of_the_day, even_split, measure_interleaved, plan_row,  # noqa: E402
                                 winning_plan)
from placer.core.cluster import Cluster, get_cluster  # noqa: E402
from placer.core.placement import Placement  # noqa: E402
from placer.core.result import plan_label  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402
from placer.engine.command import DEFAULT_OPTIMIZER  # noqa: E402


def _calibrated(args: argparse.Namespace) -> Cluster:
    if args.cluster:
        return Cluster.load(args.cluster)
    from placer.app.train import maybe_calibrate  # noqa: PLC0415 - spawns workers

    cluster = maybe_calibrate(get_cluster("cpu-2"), mode="always")
    if args.save_cluster:
        cluster.save(args.save_cluster)
    return cluster


def plans(graph: OpGraph, cluster: Cluster) -> list[PlanRow]:
    """Single, the even split and the winner, each with its best schedule by simulation."""
    sim = Simulator(graph, cluster)
    return [plan_row(sim, "Single", "all on cpu:0", Placement.single(graph)),
            plan_row(sim, "even split", "even-layers", even_split(graph, cluster)),
            plan_row(sim, "winner", *winning_plan(sim))]


def real_rows(args: argparse.Namespace) -> list[dict]:
    """The three plans of gpt ``args.graph`` on calibrated ``cpu-2``, simulated and measured (see the module
    docstring). Each row: plan, split, schedule, microbatches, sim_s, real_s, real_rounds_s."""
    shipped = resolve_graph(args.graph, config="medium")
    cluster = _calibrated(args)
    graph = (costs_of_the_day(shipped, cluster, say=lambda line: print(f"# {line}", flush=True))
             if args.op_costs == "engine" else shipped)
    rows = plans(graph, cluster)
    if graph is not shipped:
        win = rows[-1]
        res = Simulator(shipped, cluster).run(win.placement, schedule=win.schedule, microbatches=win.microbatches,
                                              recompute=win.recompute, optimizer=DEFAULT_OPTIMIZER)
        print(f"# shipped profile: the winner ({win.plan_label}) simulates at {res.step_time_s:.3f} s "
              f"(the day's costs: {win.sim_s:.3f} s)", flush=True)
    measure_interleaved(graph, cluster, rows, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    return [r.to_json() for r in rows]


def figure_lines(rows: Sequence[dict], model: str = "gpt") -> list[str]:
    """The table and the three figures of :func:`real_rows`' rows."""
    by = {r["plan"]: r for r in rows}
    single, even, win = by["Single"], by["even split"], by["winner"]
    lines = ["| plan | split | schedule | simulated (s) | measured (s), median | rounds (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        label = plan_label(r["schedule"], r["microbatches"], r.get("recompute", ()))
        lines.append(f"| {r['plan']} | {r['split']} | {label} | {r['sim_s']:.3f} | "
                     f"{r['real_s']:.3f} | {', '.join(f'{x:.3f}' for x in r['real_rounds_s'])} |")
    per_round = [s / w for s, w in zip(single["real_rounds_s"], win["real_rounds_s"])]
    vs_even = [w / e for w, e in zip(win["real_rounds_s"], even["real_rounds_s"])]
    lines += [
        f"figure: real_speedup_vs_single[{model}] = {single['real_s'] / win['real_s']:.3f}   "
        f"(per round {min(per_round):.3f}..{max(per_round):.3f})",
        f"figure: real_vs_even_split[{model}] = {win['real_s'] / even['real_s']:.3f}   "
        f"(per round {min(vs_even):.3f}..{max(vs_even):.3f})",
        f"figure: sim_vs_real_err[{model}] = {abs(win['sim_s'] - win['real_s']) / win['real_s']:.3f}   "
        f"(simulated {win['sim_s']:.3f} s, measured {win['real_s']:.3f} s)",
    ]
    return lines


def add_args(ap: argparse.ArgumentParser) -> None:
    """This benchmark's options (``bench_plan.py`` adds them to its own parser)."""
    ap.add_argument("--graph", default="gpt-medium", help="shipped gpt graph (or graph JSON) to measure")
    ap.add_argument("--cluster", help="calibrated cluster JSON to simulate with (default: calibrate cpu-2 now)")
    ap.add_argument("--save-cluster", help="write the calibrated cluster here (to reuse with --cluster)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (median)")
    ap.add_argument("--steps", type=int, default=2, help="measured steps per plan per round (median)")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps before them")
    ap.add_argument("--op-costs", choices=("engine", "profile"), default="engine",
                    help="op costs to simulate with: read off a Single run on the workers now (default), or the "
                         "shipped one-core profile")


def real_section(args: argparse.Namespace | None = None) -> list[dict]:
    """Measure, print the table and the figures, return the rows. ``args``: any namespace; the options of
    :func:`add_args` it carries override their defaults (``bench_plan.py``'s own options are ignored)."""
    ap = argparse.ArgumentParser()
    add_args(ap)
    ns = ap.parse_args([])
    for key in vars(ns):
        if args is not None and getattr(args, key, None) is not None:
            setattr(ns, key, getattr(args, key))
    rows = real_rows(ns)
    print("\n".join(figure_lines(rows)), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--real-only", action="store_true", help="accepted for bench_plan's interface (always real)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    real_section(args)


if __name__ == "__main__":
    main()
