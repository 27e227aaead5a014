"""The end-to-end demo — the README's main command (``placer demo``): the mission on this machine.

1. Loads the shipped, profiled gpt ``medium`` graph (8 blocks of width 512, a 16k vocabulary; a 3.5 s step on one
   core, so a pipeline across the two workers pays off) and calibrates ``cpu-2`` (two worker processes pinned to
   one core each) so that the simulator describes these workers; with ``op_costs="engine"`` (the default when
   measuring on CPU workers) the simulator also takes today's op costs from a Single run on them
   (:func:`placer.app.measured.costs_of_the_day`: this VM's speed drifts from the shipped profile's day). The
   exported placement is made for the shipped graph (same ops), so trainers load it as they load any other.
2. Trains ColocRL's seq2seq policy with REINFORCE on the simulator for ``budget_s`` seconds, each placement
   scored under its best schedule and micro-batch count (``schedule="auto"``, the plan search).
3. Places the graph with every classic baseline and tabulates them with RL, simulated (ColocRL's table).
4. Takes the table's winner, Single and the even layer split (torchtitan's default), each under the schedule and
   micro-batch count the simulator finds best for it, and measures the three on the two workers in ``rounds``
   interleaved rounds (:mod:`placer.app.measured`); the median is what the table of plans shows.
5. Writes, under ``runs/demo__{graph}__{ts}/``: ``placement.json`` (the winner, its schedule, its torchtitan
   ``module_fqns_per_model_part``, predicted and measured times), ``compare.md``/``.csv``/``.json``,
   ``plans.md``, ``timeline.png`` (+ a Perfetto trace) of the winner's measured step, and the training run's
   folder (``learning_curve.png``, TensorBoard events, checkpoints). About 5 minutes with the defaults.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphs.ir import OpGraph
from placer.core.cluster import Cluster, get_cluster
from placer.core.placement import Placement
from placer.engine.command import DEFAULT_OPTIMIZER

log = logging.getLogger(__name__)

@dataclass(kw_only=True)
class DemoConfig:
    """What the demo runs."""

    graph: str = "gpt-medium"
    """Shipped benchmark graph (a bare name is its small config) or a graph JSON path."""
    build: bool = False
    """Trace and profile the model afresh instead of loading the shipped graph (``gpt-medium``: model ``gpt``,
    config ``medium``; profiling adds a few minutes at that size)."""
    cluster: str = "cpu-2"
    """Cluster preset or JSON; ``cpu-2`` is this machine's two pinned workers."""
    budget_s: float = 120.0
    """RL training wall time."""
    seed: int = 0
    runs_dir: str = "runs"
    steps: int = 2
    """Engine steps per plan per round (median reported), after one warm-up step."""
    rounds: int = 3
    """Interleaved measurement rounds of the three plans (median reported)."""
    schedule: str = "auto"
    """Schedule RL and the table score every placement with; ``auto``: each placement under its best schedule
    and micro-batch count (the plan search)."""
    microbatches: int = 8
    """Micro-batches per step for ``schedule`` (``auto`` chooses them)."""
    real: bool = True
    """Re-measure on the engine (False: simulator only, e.g. where processes cannot be spawned)."""
    op_costs: str = "engine"
    """``engine``: simulate with op costs read off a Single run on the workers now (CPU clusters, ``real`` only);
    ``profile``: the graph's shipped profile."""
    progress: bool = True


@dataclass(kw_only=True)
class DemoResult:
    out_dir: Path
    table_markdown: str
    best_method: str
    best_step_time_s: float
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0


def _load_graph(config: DemoConfig) -> OpGraph:
    if config.build:
        from graphs.build import build_graph
        from graphs.roofline import with_estimates

        model, _, size = config.graph.partition("-")  # gpt-medium: model gpt, config medium
        return with_estimates(build_graph(model, config=size or "small", profile="cpu", progress=config.progress))
    from graphs.data import resolve_graph

    return resolve_graph(config.graph, config="small")


def _winner(row: Any) -> str:
    """The column with the best simulated step among those that produced a placement."""
    def key(name: str) -> float:
        cell = row.cells.get(name)
        if cell is None or cell.placement is None:
            return math.inf
        return cell.step_time_s if math.isfinite(cell.step_time_s) else math.inf

    return min(row.cells, key=key)


def _plans_markdown(rows: list[Any], measured: bool) -> str:
    """The plans table: simulated and measured step, speed-up over Single, step over the even split's."""
    single, even = rows[0], rows[1]
    lines = ["| plan | placement | schedule | simulated (ms) | measured (ms) | vs Single | vs even split |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.real_s if measured else r.sim_s
        ref_s, ref_e = (single.real_s, even.real_s) if measured else (single.sim_s, even.sim_s)
        rounds = f" ({', '.join(f'{x * 1e3:.2f}' for x in r.real_rounds_s)})" if measured else ""
        lines.append(f"| {r.name} | {r.label} | {r.plan_label} | {r.sim_s * 1e3:.2f} | "
                     f"{f'{r.real_s * 1e3:.2f}' if measured else '—'}{rounds} | {ref_s / t:.2f}x | {t / ref_e:.2f} |")
    src = "measured, median of the rounds; each round's time in brackets" if measured else "simulated"
    return "\n".join(lines) + (f"\n\n(vs columns: {src}. Each plan is its placement's best schedule and micro-batch "
                               f"count; simulated with the workers' optimizer ({DEFAULT_OPTIMIZER}), where the table "
                               "above simulates Adam's update, so a placement's times differ between the two)\n")


def run_demo(config: DemoConfig, *, say: Any = print) -> DemoResult:
    """Run the demo (see the module docstring); ``say`` prints progress lines."""
    from placer.app.compare import compare
    from placer.app.compare import default_methods
    from placer.app.measured import costs_of_the_day, even_split, measure_interleaved, plan_row
    from placer.app.runs import curve_summary
    from placer.app.train import TrainConfig, maybe_calibrate, needs_calibration, train
    from placer.costmodel.sim import Simulator
    from placer.io.document import write_json_atomic

    if config.op_costs not in ("engine", "profile"):
        raise ValueError(f"op costs must be 'engine' or 'profile', got {config.op_costs!r}")
    t0 = time.perf_counter()
    graph = _load_graph(config)
    cluster = get_cluster(config.cluster)
    if needs_calibration(cluster, uses_engine=config.real):
        say(f"      calibrating {cluster.name}'s workers (links, core speed, per-message cost) for the simulator…")
        cluster = maybe_calibrate(cluster, uses_engine=config.real)
    shipped = graph
    if config.real and config.op_costs == "engine" and all(d.is_cpu for d in cluster.devices):
        say("      reading today's op costs off a Single run on the workers (the simulator's input)…")
        graph = costs_of_the_day(shipped, cluster, say=lambda line: say(f"      {line}"))
    out_dir = Path(config.runs_dir) / f"demo__{graph.name}__{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"[1/4] graph {graph.name}: {graph.n} ops, {graph.param_bytes.sum() / 1e6:.2f} MB parameters; "
        f"cluster {cluster.name}: {', '.join(cluster.device_names)}")

    # ---- RL: seq2seq + REINFORCE on the simulator, every placement scored under the schedule
    how = "each placement under its best schedule" if config.schedule == "auto" else \
        f"{config.schedule} x{config.microbatches}"
    say(f"[2/4] training seq2seq + REINFORCE for {config.budget_s:.0f} s (sim reward, {how})…")
    run = train(TrainConfig(graph=graph, cluster=cluster, policy="seq2seq", algo="reinforce", reward="sim",
                            budget_s=config.budget_s, seed=config.seed, runs_dir=str(out_dir),
                            schedule=config.schedule, microbatches=config.microbatches, progress=config.progress))
    rl_placement = run.placement
    say(f"      best simulated step {run.best_step_time_s:.3f} s after {run.samples} samples; run {run.run_dir}")
    say(f"      {curve_summary(run.only.history)}")

    def rl(g: OpGraph, c: Cluster, *, seed: int, budget_s: float | None) -> Placement:
        return rl_placement

    # ---- every baseline and RL, simulated
    say("[3/4] placing with every baseline (simulated)…")
    table = compare([graph], [cluster], methods=[m for m in default_methods() if m != "single-gpu"],
                    extra={"RL": rl}, out_dir=out_dir,
                    seed=config.seed, schedule=config.schedule, microbatches=config.microbatches)
    best = _winner(table.rows[0])

    # ---- the winner beside Single and the even split, each under its best schedule, on the workers
    sim = Simulator(graph, cluster)
    rows = [plan_row(sim, "Single", "all on cpu:0", Placement.single(graph)),
            plan_row(sim, "even split", "even-layers", even_split(graph, cluster)),
            plan_row(sim, f"winner: {best}", f"{best}'s placement", table.rows[0].cells[best].placement)]
    if config.real:
        say(f"[4/4] measuring the winner ({best}), Single and the even split on the workers, {config.rounds} "
            f"interleaved rounds…")
        measure_interleaved(graph, cluster, rows, rounds=config.rounds, steps=config.steps, warmup=1, say=say)
    else:
        say("[4/4] (no real measurement: simulated plans only)")
    plans_md = _plans_markdown(rows, config.real)
    files = _write_outputs(out_dir, graph, cluster, table, plans_md, rows[-1], config=config, run_dir=run.run_dir,
                           shipped=shipped)
    win = rows[-1]
    write_json_atomic(out_dir / "demo.json", {
        "graph": graph.name, "cluster": cluster.name, "best": best, "best_schedule": win.schedule,
        "best_microbatches": win.microbatches, "best_step_time_s": win.real_s if config.real else win.sim_s,
        "plans": [r.to_json() for r in rows], "rl_best_sim_s": run.best_step_time_s, "budget_s": config.budget_s,
        "wall_s": time.perf_counter() - t0, "files": {k: str(v) for k, v in files.items()}})
    files["summary"] = out_dir / "demo.json"
    return DemoResult(out_dir=out_dir, table_markdown=table.to_markdown() + "\n" + plans_md, best_method=best,
                      best_step_time_s=win.real_s if config.real else win.sim_s, files=files,
                      wall_s=time.perf_counter() - t0)


def _write_outputs(out_dir: Path, graph: OpGraph, cluster: Cluster, table: Any, plans_md: str, win: Any, *,
                   config: DemoConfig, run_dir: Path, shipped: OpGraph) -> dict[str, Path]:
    """The tables, the winner's placement JSON (made for the ``shipped`` graph: the same ops as ``graph``, which
    may carry the day's costs), its timeline (measured when there is one, else simulated) as a Gantt chart and a
    Chrome trace; the paths by name."""
    from placer.costmodel.sim import simulate
    from placer.io.document import save_placement
    from placer.io.timeline import plot_gantt, to_chrome_trace

    predicted = simulate(graph, cluster, win.placement, schedule=win.schedule, microbatches=win.microbatches,
                         timeline=True, recompute=win.recompute)
    files = table.write(out_dir)
    files["plans"] = out_dir / "plans.md"
    files["plans"].write_text(plans_md)
    files["placement"] = save_placement(
        out_dir / "placement.json", shipped, cluster, win.placement, method=win.name.removeprefix("winner: "),
        seed=config.seed, run=str(run_dir), schedule=win.schedule, microbatches=win.microbatches,
        predicted=predicted, measured=win.result)
    timeline_src = win.result if win.result is not None and win.result.timeline else predicted
    files["timeline"] = plot_gantt(timeline_src, out_dir / "timeline.png",
                                   title=f"{graph.name} on {cluster.name}: {win.name} ({win.plan_label}, "
                                         f"{'measured' if timeline_src is win.result else 'simulated'})")
    files["trace"] = to_chrome_trace(timeline_src, out_dir / "timeline.trace.json")
    files["learning_curve"] = run_dir / "learning_curve.png"
    files["train_run"] = run_dir
    return files
