"""The end-to-end demo — the README's main command (``placer demo``).

1. Loads the shipped, profiled small NMT graph (or builds and profiles it when ``--build`` is given).
2. Places it on ``cpu-2`` (two worker processes pinned to one core each) with every classic baseline, simulated.
3. Trains ColocRL's seq2seq policy with REINFORCE on the simulator for ``budget_s`` seconds.
4. Re-measures every placement — baselines and RL — on the real engine (two gloo workers), then the winners
   again with GPipe and 1F1B micro-batching.
5. Prints ColocRL's table with the RL column and writes, under ``runs/demo__{graph}__{ts}/``: ``placement.json``
   (the best measured placement), ``compare.md``/``.csv``/``.json``, ``schedules.md``, ``timeline.png`` (+ a
   Perfetto trace) of the winner's measured step, and the training run's folder (``learning_curve.png``,
   TensorBoard events, checkpoints).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from graphs.ir import OpGraph
from placer.core.cluster import Cluster, get_cluster
from placer.core.placement import Placement
from placer.core.result import StepResult

log = logging.getLogger(__name__)

DEMO_METHODS = ("single", "scotch", "mincut", "metis", "expert", "m-topo", "m-etf", "m-sct", "heft",
                "pipedream-dp", "round-robin", "random")
"""Baselines the demo compares (all registered ones that apply to a CPU-only cluster)."""


@dataclass(kw_only=True)
class DemoConfig:
    """What the demo runs."""

    graph: str = "nmt"
    """Shipped benchmark graph (small config) or a graph JSON path."""
    build: bool = False
    """Trace and profile the model afresh instead of loading the shipped graph (adds ~20 s)."""
    cluster: str = "cpu-2"
    """Cluster preset or JSON; ``cpu-2`` is this machine's two pinned workers."""
    budget_s: float = 180.0
    """RL training wall time."""
    seed: int = 0
    runs_dir: str = "runs"
    steps: int = 10
    """Engine steps per measurement (median reported)."""
    microbatches: int = 4
    """Micro-batches for the GPipe / 1F1B re-measurement of the winners."""
    real: bool = True
    """Re-measure on the engine (False: simulator only, e.g. where processes cannot be spawned)."""
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

        return with_estimates(build_graph(config.graph, config="small", profile="cpu", progress=config.progress))
    from graphs.data import resolve_graph

    return resolve_graph(config.graph, config="small")


def _winner(row: Any) -> str:
    """The column with the best measured (else simulated) step among those that produced a placement."""
    def key(name: str) -> float:
        cell = row.cells.get(name)
        if cell is None or cell.placement is None:
            return math.inf
        t = cell.real_step_time_s if cell.real_step_time_s is not None else cell.step_time_s
        return t if t is not None and math.isfinite(t) else math.inf

    return min(row.cells, key=key)


def _schedules(graph: OpGraph, cluster: Cluster, row: Any, best: str, config: DemoConfig,
               measure: Callable[..., StepResult] | None) -> tuple[str, tuple[float, str, StepResult | None]]:
    """The winner and RL again under no schedule, GPipe and 1F1B: the Markdown table and the winner's best
    ``(step time, schedule, measured result)``."""
    from placer.costmodel.sim import simulate

    lines = ["| placement | schedule | simulated (ms) | measured (ms) |", "|---|---|---|---|"]
    candidates: list[tuple[float, str, StepResult | None]] = []  # the winner under each schedule
    for name in dict.fromkeys([best, "RL"]):
        p = row.cells[name].placement
        for sched, m in (("none", 1), ("gpipe", config.microbatches), ("1f1b", config.microbatches)):
            sim_r = simulate(graph, cluster, p, schedule=sched, microbatches=m)
            real_r = measure(graph, p, sched, m) if measure is not None else None
            lines.append(f"| {name} | {sim_r.schedule_label} | {_ms(sim_r)} | {_ms(real_r) if real_r else '—'} |")
            if name == best:
                r = real_r if real_r is not None else sim_r
                candidates.append((r.step_time_s if r.ok else math.inf, sched, real_r))
    return "\n".join(lines) + "\n", min(candidates, key=lambda c: c[0])


def run_demo(config: DemoConfig, *, say: Any = print) -> DemoResult:
    """Run the demo (see the module docstring); ``say`` prints progress lines."""
    from placer.app.compare import compare
    from placer.io.document import write_json_atomic
    from placer.app.train import TrainConfig, maybe_calibrate, needs_calibration, train

    t0 = time.perf_counter()
    graph = _load_graph(config)
    cluster = get_cluster(config.cluster)
    if needs_calibration(cluster, uses_engine=config.real):
        say(f"      calibrating {cluster.name}'s workers (links, core speed, per-message cost) for the simulator…")
        cluster = maybe_calibrate(cluster, uses_engine=config.real)
    out_dir = Path(config.runs_dir) / f"demo__{graph.name}__{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    say(f"[1/4] graph {graph.name}: {graph.n} ops, {graph.param_bytes.sum() / 1e6:.2f} MB parameters; "
        f"cluster {cluster.name}: {', '.join(cluster.device_names)}")

    # ---- RL: seq2seq + REINFORCE on the simulator
    say(f"[2/4] training seq2seq + REINFORCE for {config.budget_s:.0f} s (sim reward)…")
    run = train(TrainConfig(graph=graph, cluster=cluster, policy="seq2seq", algo="reinforce", reward="sim",
                            budget_s=config.budget_s, seed=config.seed, runs_dir=str(out_dir),
                            progress=config.progress))
    rl_placement = run.placement
    say(f"      best simulated step {run.best_step_time_s * 1e3:.2f} ms after {run.samples} samples; run {run.run_dir}")

    # ---- compare: baselines + RL, simulated and (with real=True) measured on warm engine workers
    say("[3/4] placing with every baseline" + (" and re-measuring on the engine…" if config.real else "…"))
    measurer = None
    if config.real:
        from placer.engine import Measurer

        measurer = Measurer(graph, cluster)

    def measure(g: OpGraph, p: Placement, schedule: str = "none", microbatches: int = 1) -> StepResult:
        assert measurer is not None
        return measurer.measure(p, schedule=schedule, microbatches=microbatches, steps=config.steps, warmup=2)

    def rl(g: OpGraph, c: Cluster, *, seed: int, budget_s: float | None) -> Placement:
        return rl_placement

    try:
        table = compare([graph], [cluster], methods=[m for m in DEMO_METHODS], extra={"RL": rl},
                        real=measure if measurer is not None else None, out_dir=out_dir, seed=config.seed)
        row = table.rows[0]
        best = _winner(row)
        best_placement = row.cells[best].placement
        # ---- the winners again with micro-batch pipelining
        say(f"[4/4] re-measuring the winner ({best}) and RL with GPipe / 1F1B, {config.microbatches} micro-batches…")
        sched_md, best_measured = _schedules(graph, cluster, row, best, config,
                                             measure if measurer is not None else None)
    finally:
        if measurer is not None:
            measurer.close()

    best_t, best_sched, best_result = best_measured
    files = _write_outputs(out_dir, graph, cluster, table, sched_md, best, best_placement, best_sched, best_result,
                           config=config, run_dir=run.run_dir)
    write_json_atomic(out_dir / "demo.json", {
        "graph": graph.name, "cluster": cluster.name, "best": best, "best_schedule": best_sched,
        "best_step_time_s": best_t, "rl_best_sim_s": run.best_step_time_s, "budget_s": config.budget_s,
        "wall_s": time.perf_counter() - t0, "files": {k: str(v) for k, v in files.items()}})
    files["summary"] = out_dir / "demo.json"
    return DemoResult(out_dir=out_dir, table_markdown=table.to_markdown() + "\n" + sched_md, best_method=best,
                      best_step_time_s=best_t, files=files, wall_s=time.perf_counter() - t0)


def _write_outputs(out_dir: Path, graph: OpGraph, cluster: Cluster, table: Any, sched_md: str, best: str,
                   best_placement: Placement, best_sched: str, best_result: StepResult | None, *,
                   config: DemoConfig, run_dir: Path) -> dict[str, Path]:
    """The table, the schedules, the winner's placement JSON, its timeline (measured when there is one, else
    simulated) as a Gantt chart and a Chrome trace; the paths by name."""
    from placer.costmodel.sim import simulate
    from placer.io.document import save_placement
    from placer.io.timeline import plot_gantt, to_chrome_trace

    micro = 1 if best_sched == "none" else config.microbatches
    predicted = simulate(graph, cluster, best_placement, schedule=best_sched, microbatches=micro, timeline=True)
    files = table.write(out_dir)
    files["schedules"] = out_dir / "schedules.md"
    files["schedules"].write_text(sched_md)
    files["placement"] = save_placement(
        out_dir / "placement.json", graph, cluster, best_placement, method=best, seed=config.seed,
        run=str(run_dir), schedule=best_sched, microbatches=micro, predicted=predicted, measured=best_result)
    timeline_src = best_result if best_result is not None and best_result.timeline else predicted
    files["timeline"] = plot_gantt(timeline_src, out_dir / "timeline.png",
                                   title=f"{graph.name} on {cluster.name}: {best} ({best_sched} x{micro}, "
                                         f"{'measured' if timeline_src is best_result else 'simulated'})")
    files["trace"] = to_chrome_trace(timeline_src, out_dir / "timeline.trace.json")
    files["learning_curve"] = run_dir / "learning_curve.png"
    files["train_run"] = run_dir
    return files


def _ms(result: StepResult | None) -> str:
    if result is None:
        return "—"
    return f"{result.step_time_s * 1e3:.2f}" if result.ok else "fail"
