"""The real half of ``bench_plan``: gpt ``medium`` on this machine's two workers (``cpu-2``), measured.

Prints, at the end (one run, ``--rounds`` interleaved rounds, medians)::

    figure: real_speedup_vs_single[gpt] = R   # Single's measured step / the winning plan's   (target >= 1.5)
    figure: real_vs_even_split[gpt] = R       # winning plan's step / the even layer split's  (target <= 0.90)
    figure: sim_vs_real_err[gpt] = R          # |simulated - measured| / measured, winning plan (target <= 0.10)

Three plans, each with the schedule and micro-batch count the simulator finds best for it
(:func:`best_schedule`):

* **Single**: the whole step on ``cpu:0`` (schedule ``none``, one micro-batch: plain training);
* **even split**: torchtitan's default, the transformer blocks split evenly between the two stages (gpt
  ``medium``: blocks 0-3 with the embeddings on ``cpu:0``, blocks 4-7, ``ln_f``, head and loss on ``cpu:1``);
* **winner**: the fastest contiguous two-stage split by simulation (:func:`winning_plan`: every cut between two
  top-level modules, :func:`placer.io.stages.model_parts`), until the plan search replaces it.

The simulator runs on a calibrated ``cpu-2`` (``placer cluster calibrate``; ``--cluster FILE`` reuses one). The
three plans are then measured on one warm :class:`placer.engine.Measurer` (one worker per core, one thread each)
in ``--rounds`` rounds, each round measuring all three in turn so a slow spell of the shared machine hits them
alike; every figure is the median over rounds (the rounds' range is printed beside it). Run under the shared
lock: ``flock /work/bench.lock python3 benchmarks/bench_plan_real.py`` (about 3 minutes).

``bench_plan.py --real-only`` calls :func:`real_rows` and :func:`figure_lines`.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from graphs.data import resolve_graph  # noqa: E402
from graphs.ir import OpGraph  # noqa: E402
from placer.core.cluster import Cluster, get_cluster  # noqa: E402
from placer.core.placement import Placement  # noqa: E402
from placer.core.result import StepResult  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402
from placer.engine.command import DEFAULT_OPTIMIZER  # noqa: E402
from placer.io.parts import model_parts, split_after  # noqa: E402

SCHEDULES = ("gpipe", "1f1b")
"""Pipelined schedules searched for a two-stage split (one stage per device: interleaving has nothing to
interleave)."""
MICROBATCHES = (2, 4, 8, 16)
"""Micro-batch counts searched (gpt ``medium``'s batch of 16 splits into each)."""


def best_schedule(sim: Simulator, placement: Placement) -> tuple[str, int, StepResult]:
    """``(schedule, M, simulated step)`` of ``placement``'s fastest schedule: ``none`` for one device, else the
    best of :data:`SCHEDULES` x :data:`MICROBATCHES`. The function boundary the plan search
    (``placer.costmodel.plans.best_plan``) replaces."""
    if np.unique(placement.device_of_op).size == 1:
        return "none", 1, sim.run(placement, optimizer=DEFAULT_OPTIMIZER)
    best: tuple[str, int, StepResult] | None = None
    for name in SCHEDULES:
        for m in MICROBATCHES:
            res = sim.run(placement, schedule=name, microbatches=m, optimizer=DEFAULT_OPTIMIZER)
            if res.ok and (best is None or res.step_time_s < best[2].step_time_s):
                best = (name, m, res)
    if best is None:
        raise ValueError(f"no schedule of {SCHEDULES} x M in {MICROBATCHES} fits this placement in memory")
    return best


def even_split(graph: OpGraph) -> Placement:
    """torchtitan's default split: the first half of the transformer blocks (and everything before them) on
    device 0, the rest on device 1."""
    blocks = [p for p in model_parts(graph) if p.startswith("blocks.")]
    if len(blocks) < 2:
        raise ValueError(f"{graph.name} has {len(blocks)} transformer blocks; an even layer split needs 2 or more")
    return split_after(graph, blocks[len(blocks) // 2 - 1])


def winning_plan(sim: Simulator) -> tuple[str, Placement, tuple[str, int, StepResult]]:
    """The fastest contiguous two-stage split by simulation: ``(label, placement, best_schedule(...))``."""
    parts = model_parts(sim.graph)
    found = []
    for last in parts[:-1]:
        placement = split_after(sim.graph, last)
        found.append((f"split after {last}", placement, best_schedule(sim, placement)))
    return min(found, key=lambda f: f[2][2].step_time_s)


def _calibrated(args: argparse.Namespace) -> Cluster:
    if args.cluster:
        return Cluster.load(args.cluster)
    from placer.app.train import maybe_calibrate  # noqa: PLC0415 - spawns workers

    cluster = maybe_calibrate(get_cluster("cpu-2"), mode="always")
    if args.save_cluster:
        cluster.save(args.save_cluster)
    return cluster


def plans(graph: OpGraph, cluster: Cluster) -> list[dict[str, Any]]:
    """Single, the even split and the winner, each with its best schedule by simulation."""
    sim = Simulator(graph, cluster)
    rows = []
    for name, label, placement in (("Single", "all on cpu:0", Placement.single(graph)),
                                   ("even split", "blocks split evenly", even_split(graph)),
                                   ("winner", *winning_plan(sim)[:2])):
        schedule, m, res = best_schedule(sim, placement)
        rows.append({"plan": name, "split": label, "placement": placement, "schedule": schedule,
                     "microbatches": m, "sim_s": res.step_time_s})
    return rows


def measure_rounds(graph: OpGraph, cluster: Cluster, rows: list[dict[str, Any]], *, rounds: int, steps: int,
                   warmup: int, say: Callable[[str], None] = print) -> None:
    """Measure every row ``rounds`` times, round-robin, on one warm Measurer; adds ``real_s`` (median) and
    ``real_rounds_s`` to each row."""
    from placer.engine import EngineConfig, Measurer  # noqa: PLC0415 - spawns workers

    for row in rows:
        row["real_rounds_s"] = []
    with Measurer(graph, cluster, config=EngineConfig(threads_per_device=1, timeout_s=900)) as m:
        for r in range(rounds):
            for row in rows:
                t = time.perf_counter()
                res = m.measure(row["placement"], schedule=row["schedule"], microbatches=row["microbatches"],
                                steps=steps, warmup=warmup)
                if not res.ok:
                    raise SystemExit(f"engine run of {row['plan']} failed: {res.failure}")
                row["real_rounds_s"].append(res.step_time_s)
                say(f"  round {r + 1}/{rounds} {row['plan']:<10} {row['schedule']} x{row['microbatches']}: "
                    f"{res.step_time_s:.3f} s per step (samples {[round(x, 3) for x in res.extra['samples_s']]}, "
                    f"{time.perf_counter() - t:.0f} s)")
    for row in rows:
        row["real_s"] = float(statistics.median(row["real_rounds_s"]))


def real_rows(args: argparse.Namespace) -> list[dict]:
    """The three plans of gpt ``args.graph`` on calibrated ``cpu-2``, simulated and measured (see the module
    docstring). Each row: plan, split, schedule, microbatches, sim_s, real_s, real_rounds_s (``placement``
    removed)."""
    graph = resolve_graph(args.graph, config="medium")
    cluster = _calibrated(args)
    rows = plans(graph, cluster)
    measure_rounds(graph, cluster, rows, rounds=args.rounds, steps=args.steps, warmup=args.warmup)
    for row in rows:
        del row["placement"]
    return rows


def figure_lines(rows: Sequence[dict], model: str = "gpt") -> list[str]:
    """The table and the three figures of :func:`real_rows`' rows."""
    by = {r["plan"]: r for r in rows}
    single, even, win = by["Single"], by["even split"], by["winner"]
    lines = ["| plan | split | schedule | simulated (s) | measured (s), median | rounds (s) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']} | {r['split']} | {r['schedule']} x{r['microbatches']} | {r['sim_s']:.3f} | "
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_args(ap)
    ap.add_argument("--real-only", action="store_true", help="accepted for bench_plan's interface (always real)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = real_rows(args)
    print("\n".join(figure_lines(rows)))


if __name__ == "__main__":
    main()
