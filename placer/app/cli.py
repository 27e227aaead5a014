"""The ``placer`` command line. It parses arguments and calls library functions; nothing else lives here.

Every expected failure (bad file, unknown name, untraceable model, OOM placement) is printed as one line
``placer: error: ...`` with exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from rich.console import Console

console = Console(soft_wrap=True)  # no hard wraps: paths and error lines stay whole

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register a function that adds one sub-command's parser (keeps each command's options beside its code)."""

    def deco(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return deco


def parse_duration(text: str) -> float:
    """``10m`` / ``90s`` / ``1h`` / ``30`` (seconds) -> seconds (:func:`placer.app.train.parse_duration`, imported on
    use so that ``placer --help`` does not load torch)."""
    from placer.app.train import parse_duration as parse  # noqa: PLC0415

    return parse(text)


def parse_overrides(pairs: list[str] | None) -> dict[str, int | float | str]:
    out: dict[str, int | float | str] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"override {pair!r} must look like NAME=VALUE (e.g. batch=32)")
        key, value = pair.split("=", 1)
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def load_graph_arg(text: str, *, config: str = "small"):
    """A graph from a JSON file, or a shipped benchmark graph by name (``rnnlm`` = ``rnnlm-small``,
    ``nmt-paper``...): :func:`graphs.data.resolve_graph`."""
    from graphs.data import resolve_graph

    return resolve_graph(text, config=config)


def placed_from_document(doc: dict, where: str, graph_arg: str | None, cluster_arg: str | None):
    """(graph, cluster, placement) of a placement JSON document; ``--graph``/``--cluster`` override its names."""
    from placer.core.cluster import get_cluster
    from placer.io.document import placement_from_document

    graph = load_graph_arg(graph_arg or doc["graph"]["name"])
    cluster = get_cluster(cluster_arg or doc.get("cluster", ""))
    return graph, cluster, placement_from_document(doc, graph, cluster, where=str(where)).placement


# ---------------------------------------------------------------------------------------------- graph
@command("graph")
def _graph_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph", help="build, profile and inspect op graphs")
    gsub = p.add_subparsers(dest="graph_cmd", required=True)
    b = gsub.add_parser("build", help="trace a model to an op graph and profile it")
    b.add_argument("source", help="benchmark model (rnnlm, nmt, inception_v3) or pkg.module:factory")
    b.add_argument("--config", default="small", help="benchmark config: paper or small (default small)")
    b.add_argument("--batch", type=int, help="override the batch size")
    b.add_argument("--set", nargs="*", metavar="NAME=VALUE", help="override other config fields")
    b.add_argument("--profile", default="cpu", help="cpu, cpu:THREADS, cuda, or none (default cpu = 1 thread)")
    b.add_argument("--estimate", default="K80,V100,A100,H100",
                   help="GPU kinds to add roofline estimates for (comma list, or none)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output graph JSON")
    b.set_defaults(func=cmd_graph_build)
    s = gsub.add_parser("show", help="summarise a graph JSON")
    s.add_argument("graph", help="graph JSON file or benchmark name")
    s.add_argument("--groups", type=int, default=256, help="group count to report (default 256)")
    s.add_argument("--top", type=int, default=10, help="number of most expensive ops to list")
    s.set_defaults(func=cmd_graph_show)


def cmd_graph_build(args: argparse.Namespace) -> None:
    import time

    from graphs.build import build_graph
    from graphs.roofline import with_estimates

    overrides = parse_overrides(args.set)
    if args.batch is not None:
        overrides["batch"] = args.batch
    profile = None if args.profile == "none" else args.profile
    t0 = time.perf_counter()
    graph = build_graph(args.source, config=args.config, overrides=overrides, profile=profile, seed=args.seed,
                        progress=True)
    if profile and args.estimate != "none":
        graph = with_estimates(graph, tuple(k for k in args.estimate.split(",") if k))
    graph.save(args.out)
    console.print(f"wrote {args.out}: {graph.n} ops, {graph.num_edges} edges, "
                  f"costs for {', '.join(graph.costs) or 'none'} in {time.perf_counter() - t0:.1f} s")


def cmd_graph_show(args: argparse.Namespace) -> None:
    import numpy as np
    from rich.table import Table

    from graphs.grouping import group_ops

    g = load_graph_arg(args.graph)
    groups = int(group_ops(g, args.groups).max()) + 1 if g.n else 0
    summary = Table(title=f"{g.name}  ({g.content_hash})", show_header=False)
    summary.add_row("ops / edges", f"{g.n} / {g.num_edges}")
    summary.add_row("colocation classes / groups (k={})".format(args.groups),
                    f"{len(np.unique(g.colocation))} / {groups}")
    summary.add_row("parameters", f"{g.param_bytes.sum() / 1e6:.2f} MB")
    summary.add_row("activations stashed for backward", f"{g.stash_bytes.sum() / 1e6:.2f} MB")
    summary.add_row("forward FLOPs", f"{g.flops.sum() / 1e9:.2f} GFLOP")
    for kind in sorted(g.costs, key=lambda k: k != g.default_cost_kind):
        c, p = g.costs[kind], g.costs[kind].provenance
        summary.add_row(f"{kind}: fwd + bwd", f"{c.fwd_s.sum() * 1e3:.2f} + {c.bwd_s.sum() * 1e3:.2f} ms "
                        f"({p.method}, {p.device}, {p.threads} thr, {p.date})")
        summary.add_row(f"{kind}: critical path", f"{g.critical_path_s(kind) * 1e3:.2f} ms")
    if "source" in g.meta:
        summary.add_row("source", str(g.meta["source"]))
    console.print(summary)
    if g.costs:
        kind = g.default_cost_kind
        step = g.cost(kind).step_s
        top = Table(title=f"top {args.top} ops by fwd+bwd time on {kind}")
        for col in ("op", "kind", "module", "fwd ms", "bwd ms", "share"):
            top.add_column(col, justify="right" if "ms" in col or col == "share" else "left")
        total = step.sum() or 1.0
        for i in np.argsort(-step, kind="stable")[: args.top]:
            c = g.cost(kind)
            top.add_row(g.op_names[i], g.op_kinds[i], g.module_paths[i], f"{c.fwd_s[i] * 1e3:.3f}",
                        f"{c.bwd_s[i] * 1e3:.3f}", f"{step[i] / total:.1%}")
        console.print(top)


# ---------------------------------------------------------------------------------------------- cluster
@command("cluster")
def _cluster_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="show presets or calibrate this machine's workers")
    csub = p.add_subparsers(dest="cluster_cmd", required=True)
    s = csub.add_parser("show", help="devices and links of a preset or cluster JSON")
    s.add_argument("cluster", help="preset name (cpu-2, cpu+2gpu, cpu+4gpu, v100x8-nvlink, h100x8, h200x8) or JSON file")
    s.set_defaults(func=cmd_cluster_show)
    c = csub.add_parser("calibrate", help="measure link latency/bandwidth and device speed between gloo workers")
    c.add_argument("--devices", type=int, default=2)
    c.add_argument("--threads", type=int, default=1, help="intra-op threads per worker")
    c.add_argument("--repeats", type=int, default=20)
    c.add_argument("--out", required=True, help="output cluster JSON")
    c.set_defaults(func=cmd_cluster_calibrate)


def print_cluster(cluster) -> None:
    from rich.table import Table

    t = Table(title=f"cluster {cluster.name}  ({cluster.meta.get('source', '')})")
    for col in ("device", "kind", "memory GiB", "speed"):
        t.add_column(col)
    for d in cluster.devices:
        t.add_row(d.name, d.kind, f"{d.memory_bytes / (1 << 30):.1f}", f"{d.speed:.2f}")
    console.print(t)
    links = Table(title="links (latency µs / bandwidth GB/s)")
    links.add_column("from \\ to")
    for d in cluster.devices:
        links.add_column(d.name)
    for i, a in enumerate(cluster.devices):
        links.add_row(a.name, *["—" if i == j else f"{cluster.latency_s[i, j] * 1e6:.0f} / "
                                f"{cluster.bandwidth_Bps[i, j] / 1e9:.2f}" for j in range(cluster.num_devices)])
    console.print(links)


def cmd_cluster_show(args: argparse.Namespace) -> None:
    from placer.core.cluster import get_cluster

    print_cluster(get_cluster(args.cluster))


def cmd_cluster_calibrate(args: argparse.Namespace) -> None:
    from placer.engine.calibrate import calibrate_cluster

    with console.status(f"calibrating {args.devices} gloo workers…"):
        cluster = calibrate_cluster(args.devices, repeats=args.repeats, threads_per_device=args.threads)
    cluster.save(args.out)
    print_cluster(cluster)
    console.print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------- baselines
@command("baseline")
def _baseline_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("baseline", help="place a graph with a classic method and simulate it")
    p.add_argument("--graph", required=True, help="graph JSON or shipped benchmark graph (rnnlm, nmt-paper, …)")
    p.add_argument("--cluster", required=True, help="preset or cluster JSON")
    p.add_argument("--method", required=True, help="single, scotch, mincut, metis, expert, m-topo, m-etf, m-sct, "
                                                   "heft, pipedream-dp, random, round-robin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="none", help="none, gpipe, 1f1b, interleaved-1f1b")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--out", help="write the placement JSON here")
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> None:
    from placer import baselines
    from placer.costmodel.bounds import efficiency
    from placer.core.cluster import get_cluster
    from placer.io.document import save_placement
    from placer.costmodel.sim import simulate

    graph, cluster = load_graph_arg(args.graph), get_cluster(args.cluster)
    placement = baselines.place(args.method, graph, cluster, seed=args.seed)
    result = simulate(graph, cluster, placement, schedule=args.schedule, microbatches=args.microbatches)
    if result.ok:
        console.print(f"{args.method} on {cluster.name}: step {result.step_time_s * 1e3:.2f} ms (sim), "
                      f"efficiency {efficiency(result, graph, cluster):.2f}, ops per device "
                      f"{[int(x) for x in __import__('numpy').bincount(placement.device_of_op, minlength=cluster.num_devices)]}")
    else:
        console.print(f"{args.method} on {cluster.name}: {result.failure}")
    if args.out:
        save_placement(args.out, graph, cluster, placement, method=args.method, seed=args.seed,
                       schedule=args.schedule, microbatches=args.microbatches, predicted=result)
        console.print(f"wrote {args.out}")


@command("compare")
def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="ColocRL's table: every method on every graph and cluster")
    p.add_argument("--graphs", default="rnnlm-paper,nmt-paper,inception_v3-paper",
                   help="comma list of graph JSONs or shipped graphs")
    p.add_argument("--clusters", default="cpu+2gpu,cpu+4gpu", help="comma list of presets or cluster JSONs")
    p.add_argument("--methods", help="comma list of baselines (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="none")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--train-budget", metavar="DURATION", type=parse_duration,
                   help="also train RL placers for this long per graph and cluster (e.g. 10m) and add their columns")
    p.add_argument("--rl", default="seq2seq+reinforce", metavar="FAMILIES",
                   help="with --train-budget: comma list of POLICY+ALGO families, one column each (default "
                        "%(default)s, the RL column; e.g. seq2seq+reinforce,gnn+ppo,gnn+reinforce,hierarchical)")
    p.add_argument("--policy-from", action="append", default=[], metavar="RUN",
                   help="add a column placing every graph zero-shot with this trained run's policy (repeatable)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    import time

    from placer.app.compare import compare
    from placer.app.place import zero_shot_placer
    from placer.app.runs import find_run
    from placer.app.train import family_column, family_placer

    graphs = [load_graph_arg(g) for g in args.graphs.split(",") if g]
    extra = {}
    budget_s = args.train_budget
    if budget_s:
        for family in (f for f in args.rl.split(",") if f):
            extra[family_column(family)] = family_placer(family, runs_dir=args.runs_dir, schedule=args.schedule,
                                                         microbatches=args.microbatches)
    for run in args.policy_from:
        run_dir = find_run(run, args.runs_dir, checkpoint=True)  # a missing run fails before anything is placed
        extra[f"zero-shot:{run_dir.name}"] = zero_shot_placer(run_dir, runs_dir=args.runs_dir)
    out_dir = Path(args.runs_dir) / f"compare__{time.strftime('%Y%m%d-%H%M%S')}"
    table = compare(graphs, [c for c in args.clusters.split(",") if c],
                    methods=args.methods.split(",") if args.methods else None, seed=args.seed,
                    schedule=args.schedule, microbatches=args.microbatches, out_dir=out_dir,
                    extra=extra, train_budget_s=budget_s)
    # Markdown, not a rich table: the table has ~18 columns and must stay readable in any terminal width
    print(table.to_markdown())
    console.print(f"wrote {out_dir}/compare.md and compare.csv")


# ---------------------------------------------------------------------------------------------- train
@command("train")
def _train_parser(sub: argparse._SubParsersAction) -> None:
    from placer.app.train import add_train_arguments
    from placer.app.train_multi import add_multi_arguments

    p = sub.add_parser("train", help="train an RL placement policy (writes runs/{graph}__{policy}__{algo}__{seed}__{ts}/)")
    add_train_arguments(p)
    add_multi_arguments(p)
    p.set_defaults(func=cmd_train)


def _is_multi_run(args: argparse.Namespace) -> bool:
    """``--resume RUN`` of a multi-graph run (its config.json says so)."""
    if not args.resume:
        return False
    import json

    from placer.app.runs import find_run

    return bool(json.loads((find_run(args.resume, args.runs_dir) / "config.json").read_text()).get("multi"))


def cmd_train(args: argparse.Namespace) -> None:
    from placer.app.train import config_from_args, train

    if getattr(args, "graphs", None) or getattr(args, "random_dags", None) or _is_multi_run(args):
        from placer.app.train_multi import multi_config_from_args, train_multi

        multi = train_multi(multi_config_from_args(args))
        console.print(f"multi-graph run folder: {multi.run_dir}")
        return
    result = train(config_from_args(args))
    best = result.measured if result.measured is not None and result.measured.ok else result.predicted
    console.print(f"best step {best.step_time_s * 1e3:.2f} ms ({best.source}) after {result.samples} samples, "
                  f"{result.updates} updates, {result.elapsed_s:.0f} s; reference "
                  f"{result.reference_step_time_s * 1e3:.2f} ms")
    for name, t in sorted(result.baselines.items(), key=lambda kv: kv[1]):
        console.print(f"  {name:>14}: {t * 1e3:.2f} ms (sim)")
    console.print(f"run folder: {result.run_dir} (placement.json, learning_curve.png, TensorBoard events)")


# ---------------------------------------------------------------------------------------------- place
@command("place")
def _place_parser(sub: argparse._SubParsersAction) -> None:
    from placer.app.place import add_place_arguments

    p = sub.add_parser("place", help="place a graph zero-shot with a trained policy (no training)")
    add_place_arguments(p)
    p.set_defaults(func=cmd_place)


def cmd_place(args: argparse.Namespace) -> None:
    from placer.app.place import run_place

    run_place(args)


# ---------------------------------------------------------------------------------------------- run
@command("run")
def _run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="execute a placement for real (one worker process per device) and time it")
    p.add_argument("placement", help="placement JSON")
    p.add_argument("--graph", help="graph JSON or shipped graph (default: the placement's graph name)")
    p.add_argument("--cluster", help="cluster preset or JSON (default: the placement's cluster)")
    p.add_argument("--schedule", help="override the placement's schedule (none, gpipe, 1f1b, interleaved-1f1b)")
    p.add_argument("--microbatches", type=int, help="override the placement's micro-batch count")
    p.add_argument("--steps", type=int, default=20, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before the measurement counts as failed")
    p.add_argument("--timeline", help="timeline PNG (default: beside the placement, *_timeline.png)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> None:
    from placer.engine import EngineConfig, measure
    from placer.costmodel.sim import simulate
    from placer.io.timeline import plot_gantt, to_chrome_trace

    from graphs.jsonio import read_json

    doc = read_json(args.placement, "placement")
    graph, cluster, placement = placed_from_document(doc, args.placement, args.graph, args.cluster)
    schedule = args.schedule or doc["schedule"]["name"]
    micro = args.microbatches or doc["schedule"]["microbatches"]
    with console.status(f"measuring {args.steps} steps on {cluster.num_devices} workers…"):
        result = measure(graph, cluster, placement, schedule=schedule, microbatches=micro, steps=args.steps,
                         warmup=args.warmup, config=EngineConfig(timeout_s=args.timeout))
    predicted = simulate(graph, cluster, placement, schedule=schedule, microbatches=micro)
    if not result.ok:
        raise RuntimeError(f"measurement failed: {result.failure}")
    console.print(f"measured step {result.step_time_s * 1e3:.2f} ms (median of {args.steps}, {schedule} x{micro}); "
                  f"simulator predicted {predicted.step_time_s * 1e3:.2f} ms")
    stem = Path(args.timeline) if args.timeline else Path(args.placement).with_name(Path(args.placement).stem + "_timeline.png")
    plot_gantt(result, stem, title=f"{graph.name} on {cluster.name} ({schedule} x{micro}, measured)")
    to_chrome_trace(result, stem.with_suffix(".trace.json"))
    console.print(f"wrote {stem} and {stem.with_suffix('.trace.json')}")


# ---------------------------------------------------------------------------------------------- demo
@command("demo")
def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="end to end: graph -> baselines -> RL -> real engine -> table + placement.json")
    p.add_argument("--graph", default="nmt", help="shipped benchmark graph (small config) or graph JSON")
    p.add_argument("--build", action="store_true", help="trace and profile the model afresh")
    p.add_argument("--cluster", default="cpu-2")
    p.add_argument("--budget", type=parse_duration, default=180.0, help="RL training time (default 3m)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10, help="engine steps per measurement")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--no-real", action="store_true", help="simulator only")
    p.add_argument("--runs-dir", default="runs")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from placer.app.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(graph=args.graph, build=args.build, cluster=args.cluster, budget_s=args.budget,
                                 seed=args.seed, runs_dir=args.runs_dir, steps=args.steps,
                                 microbatches=args.microbatches, real=not args.no_real),
                      say=console.print)
    print()
    print(result.table_markdown)
    console.print(f"best: {result.best_method} at {result.best_step_time_s * 1e3:.2f} ms; demo took {result.wall_s:.0f} s")
    for what, path in result.files.items():
        console.print(f"  {what:>15}: {path}")


# ---------------------------------------------------------------------------------------------- export
@command("export")
def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a run's (or a file's) placement for a trainer")
    p.add_argument("source", help="a run folder (its placement.json) or a placement JSON")
    p.add_argument("--format", choices=("json", "torch"), default="json",
                   help="json: the validated placement JSON; torch: a torch.save'd dict of module -> device name")
    p.add_argument("--out", required=True, help="output file")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from placer.io.document import load_placement
    from graphs.jsonio import write_json_atomic

    src = Path(args.source)
    path = src / "placement.json" if src.is_dir() else src
    doc = load_placement(path).doc
    if args.format == "json":
        write_json_atomic(args.out, doc)
    else:
        import torch

        devices = doc["devices"]
        torch.save({"schema": doc["schema"], "graph": doc["graph"], "devices": devices,
                    "modules": {m: devices[d] for m, d in doc["modules"].items()},
                    "ops": {o: devices[d] for o, d in doc["ops"].items()},
                    "stages": doc["stages"], "schedule": doc["schedule"]}, args.out)
    console.print(f"wrote {args.out} ({args.format}) from {path}")


# ---------------------------------------------------------------------------------------------- show
@command("show")
def _show_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="summarise a placement JSON or a step result; draw its timeline")
    p.add_argument("path", help="placement.json (re-simulated) or a StepResult JSON")
    p.add_argument("--graph", help="graph JSON or shipped graph (default: from the placement's graph name)")
    p.add_argument("--cluster", help="cluster preset or JSON (default: the placement's cluster)")
    p.add_argument("--timeline", help="write a Gantt PNG here")
    p.add_argument("--trace", help="write a Perfetto/Chrome trace JSON here")
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> None:
    from graphs.jsonio import read_json
    from placer.core.result import StepResult

    doc = read_json(args.path, "placement or result")
    if isinstance(doc, dict) and doc.get("schema") == "placer.placement/v1":
        from placer.costmodel.sim import simulate

        graph, cluster, placement = placed_from_document(doc, args.path, args.graph, args.cluster)
        result = simulate(graph, cluster, placement, schedule=doc["schedule"]["name"],
                          microbatches=doc["schedule"]["microbatches"], timeline=True)
        title = f"{graph.name} on {cluster.name}: {doc['provenance']['method']}"
    elif isinstance(doc, dict) and "step_time_s" in doc:
        result = StepResult.from_json(doc)
        title = f"{result.source} step"
    else:
        raise ValueError(f"{args.path} is neither a placement JSON nor a step result")
    console.print(f"{title}: step {result.step_time_s * 1e3:.2f} ms ({result.source}), schedule {result.schedule} "
                  f"x{result.microbatches}" if result.ok else f"{title}: failed — {result.failure}")
    for d, busy, mem in zip(result.devices, result.busy_s, result.peak_memory_bytes):
        console.print(f"  {d}: busy {busy * 1e3:.2f} ms, peak memory {mem / 1e6:.1f} MB")
    if args.timeline:
        from placer.io.timeline import plot_gantt

        plot_gantt(result, args.timeline, title=title)
        console.print(f"wrote {args.timeline}")
    if args.trace:
        from placer.io.timeline import to_chrome_trace

        to_chrome_trace(result, args.trace)
        console.print(f"wrote {args.trace}")


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="placer", description="Reinforcement-learning device placement for PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("placer: interrupted\n")
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        # plain write, not rich: rich would wrap a long message over several lines
        sys.stderr.write(f"placer: error: {msg.splitlines()[0] if msg else type(e).__name__}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
