"""``placer graph``, ``cluster``, ``baseline``, ``run``, ``export`` and ``show``: building and inspecting graphs,
clusters and placements. Registry names in the help come from the registries."""

from __future__ import annotations

import argparse

from placer.app.cli_base import (checked_document, command, console, int_at_least, load_graph_arg, parse_duration,
                                 parse_overrides, placed_from_document, placement_file, preset_names, schedule_names,
                                 writable_file)


# ---------------------------------------------------------------------------------------------- graph
TRACERS = {"fx": "torch.fx (inside composite modules, primitive layers one op each)",
           "export": "torch.export (torch.fx could not trace it; batch dimension dynamic)"}
"""``graph.meta["trace"]`` -> what ``graph build`` and ``graph show`` say about the tracer that ran."""

LEGACY_LOSS = ("the loss_fn the factory returns (benchmark models: their own loss); without one, the output "
               "itself when it is a scalar, else output.mean() (built before graphs recorded their loss)")
"""The step's loss of a graph built before ``meta["loss"]`` existed (:mod:`graphs.trace` rebuilds it so)."""


def trace_rows(meta: dict) -> list[tuple[str, str]]:
    """What ``graph build`` and ``graph show`` say about how the step was traced: the tracer, the modules kept
    whole and why, the loss, and whether (and where not) the step splits into micro-batches."""
    tracer = TRACERS.get(meta.get("trace"), str(meta.get("trace", "an unknown tracer")))
    if "kept_whole" not in meta and meta.get("trace") == "fx":  # graphs.trace rebuilds these with fx's leaf rule
        tracer = "torch.fx (every torch.nn module one op: built before tracing went inside composite modules)"
    rows = [("traced with", tracer)]
    if meta.get("trace_note"):
        rows.append(("trace note", str(meta["trace_note"])))
    kept = meta.get("kept_whole")
    if kept is not None:
        rows.append(("kept whole", "; ".join(f"{k}: {v}" for k, v in kept.items()) or "none"))
    rows.append(("step loss", str(meta.get("loss", LEGACY_LOSS))))
    if "microbatchable" in meta:
        rows.append(("micro-batchable", "yes" if meta["microbatchable"] else
                     f"no: op {meta.get('microbatch_op', '?')!r} {meta.get('microbatch_why', '')}".rstrip()))
    return rows


def source_text(source) -> str:
    """``graph.meta["source"]`` in words (``factory tests.fixtures_models:mlp, seed 0``), not a Python dict."""
    if not isinstance(source, dict):
        return str(source)
    parts = []
    for key, value in source.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        parts.append(f"{key} {value}")
    return ", ".join(parts)


@command("graph", "build, profile and inspect op graphs")
def _graph_parser(p: argparse.ArgumentParser) -> None:
    gsub = p.add_subparsers(dest="graph_cmd", required=True)
    b = gsub.add_parser("build", help="trace a model to an op graph and profile it")
    b.add_argument("source", help="benchmark model (rnnlm, nmt, inception_v3) or pkg.module:factory")
    b.add_argument("--config", default="small", help="benchmark config: small, medium, paper (gpt: also 1.3b)"
                   " (default small)")
    b.add_argument("--batch", type=int_at_least(1), help="override the batch size")
    b.add_argument("--set", nargs="*", metavar="NAME=VALUE", help="override other config fields")
    b.add_argument("--profile", default="cpu", help="cpu, cpu:THREADS, cuda, or none (default cpu = 1 thread)")
    b.add_argument("--estimate", default="K80,V100,A100,H100",
                   help="GPU kinds to add roofline estimates for (comma list, or none)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="output graph JSON")
    b.set_defaults(func=cmd_graph_build)
    s = gsub.add_parser("show", help="summarise a graph JSON")
    s.add_argument("graph", help="graph JSON file or benchmark name")
    s.add_argument("--groups", type=int_at_least(1), default=256, help="group count to report (default 256)")
    s.add_argument("--top", type=int_at_least(0), default=10, help="number of most expensive ops to list")
    s.set_defaults(func=cmd_graph_show)


def cmd_graph_build(args: argparse.Namespace) -> None:
    import time

    from graphs.build import build_graph
    from graphs.roofline import GPUS, with_estimates

    out = writable_file(args.out, "graph")  # before tracing and profiling, which take a while
    gpus = () if args.estimate == "none" else tuple(k for k in args.estimate.split(",") if k)
    if set(gpus) - set(GPUS):
        raise ValueError(f"--estimate: unknown GPU(s) {', '.join(sorted(set(gpus) - set(GPUS)))}; known: "
                         f"{', '.join(sorted(GPUS))}, or none")
    overrides = parse_overrides(args.set)
    if args.batch is not None:
        overrides["batch"] = args.batch
    profile = None if args.profile == "none" else args.profile
    t0 = time.perf_counter()
    graph = build_graph(args.source, config=args.config, overrides=overrides, profile=profile, seed=args.seed,
                        progress=True)
    if profile and gpus:
        graph = with_estimates(graph, gpus)
    graph.save(out)
    console.print(f"wrote {out}: {graph.n} ops, {graph.num_edges} edges, "
                  f"costs for {', '.join(graph.costs) or 'none'} in {time.perf_counter() - t0:.1f} s")
    for key, text in trace_rows(dict(graph.meta)):
        console.print(f"  {key}: {text}")


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
        summary.add_row("source", source_text(g.meta["source"]))
    for key, text in trace_rows(dict(g.meta)):
        summary.add_row(key, text)
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
@command("cluster", "show presets or calibrate this machine's workers")
def _cluster_parser(p: argparse.ArgumentParser) -> None:
    csub = p.add_subparsers(dest="cluster_cmd", required=True)
    s = csub.add_parser("show", help="devices and links of a preset or cluster JSON")
    s.add_argument("cluster", help=f"preset name ({preset_names()}) or JSON file")
    s.set_defaults(func=cmd_cluster_show)
    c = csub.add_parser("calibrate", help="measure link latency/bandwidth and device speed between gloo workers")
    c.add_argument("--devices", type=int_at_least(2), default=2, help="worker processes (at most one per core)")
    c.add_argument("--threads", type=int_at_least(1), default=1, help="intra-op threads per worker")
    c.add_argument("--repeats", type=int_at_least(1), default=20)
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
    import os

    from placer.engine.calibrate import calibrate_cluster

    out = writable_file(args.out, "cluster")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.devices * args.threads > cores:
        raise ValueError(f"--devices {args.devices} x --threads {args.threads} needs {args.devices * args.threads} "
                         f"cores; this machine gives placer {cores} (calibrating oversubscribed cores measures "
                         f"the contention, not the links)")
    with console.status(f"calibrating {args.devices} gloo workers…"):
        cluster = calibrate_cluster(args.devices, repeats=args.repeats, threads_per_device=args.threads)
    cluster.save(out)
    print_cluster(cluster)
    if "message_wakeup_s" in cluster.meta:
        console.print(f"a receiver that has waited wakes {cluster.meta['message_wakeup_s'] * 1e3:.3f} ms after the "
                      f"link latency (meta.message_wakeup_s)")
    console.print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- baselines
@command("baseline", "place a graph with a classic method and simulate it")
def _baseline_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graph", required=True, help="graph JSON or shipped benchmark graph (rnnlm, nmt-paper, …)")
    p.add_argument("--cluster", required=True, help=f"cluster preset ({preset_names()}) or cluster JSON")
    from placer.baselines import BASELINES

    p.add_argument("--method", required=True, choices=sorted(BASELINES), metavar="METHOD",
                   help=f"placement method: {', '.join(sorted(BASELINES))}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedule", default="auto", choices=schedule_names(),
                   help="micro-batch schedule (default auto: the placement's best schedule and micro-batch count)")
    p.add_argument("--microbatches", type=int_at_least(1), default=1, help="micro-batches (ignored with auto)")
    p.add_argument("--out", help="write the placement JSON here")
    p.set_defaults(func=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> None:
    import numpy as np

    from placer import baselines
    from placer.costmodel.bounds import efficiency
    from placer.core.cluster import get_cluster
    from placer.io.document import save_placement
    from placer.costmodel.plans import simulate_plan

    out = writable_file(args.out, "placement") if args.out is not None else None
    graph, cluster = load_graph_arg(args.graph), get_cluster(args.cluster)
    placement = baselines.place(args.method, graph, cluster, seed=args.seed)
    result = simulate_plan(graph, cluster, placement, schedule=args.schedule, microbatches=args.microbatches)
    if result.ok:
        console.print(f"{args.method} on {cluster.name}: step {result.step_time_s * 1e3:.2f} ms (sim, "
                      f"{result.schedule_label}), "
                      f"efficiency {efficiency(result, graph, cluster):.2f}, ops per device "
                      f"{[int(x) for x in np.bincount(placement.device_of_op, minlength=cluster.num_devices)]}")
    else:
        console.print(f"{args.method} on {cluster.name}: {result.failure}")
    if out:
        save_placement(out, graph, cluster, placement, method=args.method, seed=args.seed,
                       schedule=args.schedule, microbatches=args.microbatches, predicted=result)
        console.print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------- run
def _document_overrides(p: argparse.ArgumentParser) -> None:
    """``--graph`` / ``--cluster``: what a placement document names, overridden (:func:`placed_from_document`)."""
    p.add_argument("--graph", help="graph JSON or shipped graph (default: the placement's graph name)")
    p.add_argument("--cluster", help=f"cluster preset ({preset_names()}) or JSON (default: the placement's cluster)")


@command("run", "execute a placement for real (one worker process per device) and time it")
def _run_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("placement", help="placement JSON, or a run folder (its placement.json)")
    _document_overrides(p)
    p.add_argument("--schedule", choices=schedule_names(),
                   help="override the placement's schedule (auto: the simulator's best schedule and micro-batches)")
    p.add_argument("--microbatches", type=int_at_least(1), help="override the placement's micro-batch count")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="measured steps (median reported)")
    p.add_argument("--warmup", type=int_at_least(0), default=3)
    p.add_argument("--timeout", type=parse_duration, default=300.0, metavar="DURATION",
                   help="time the workers may take to start, and then to measure, before the run counts as failed "
                        "(default 300s)")
    p.add_argument("--timeline", help="timeline PNG (default: beside the placement, *_timeline.png)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> None:
    from placer.engine import EngineConfig, measure
    from placer.costmodel.plans import AUTO, best_plan
    from placer.costmodel.sim import get_simulator, simulate
    from placer.io.timeline import plot_gantt, to_chrome_trace

    from graphs.jsonio import atomic_target, read_json

    path = placement_file(args.placement)
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout:g} s")
    # beside the placement's file (through links: /dev/stdin < p.json writes p_timeline.png); from a pipe, here
    real = atomic_target(path)
    beside = real.with_name(real.stem + "_timeline.png") if real.is_file() else "placement_timeline.png"
    stem = writable_file(beside if args.timeline is None else args.timeline, "timeline")
    doc = read_json(path, "placement")
    graph, cluster, placement = placed_from_document(doc, path, args.graph, args.cluster)
    schedule = args.schedule or doc["schedule"]["name"]
    micro = args.microbatches or doc["schedule"]["microbatches"]
    recompute = tuple(doc["schedule"].get("recompute", ()))
    if schedule == AUTO:  # measure the plan the simulator finds best for this placement
        plan, _ = best_plan(get_simulator(graph, cluster), placement)
        schedule, micro, recompute = plan.schedule, plan.microbatches, plan.recompute
    with console.status(f"measuring {args.steps} steps on {cluster.num_devices} workers…"):
        result = measure(graph, cluster, placement, schedule=schedule, microbatches=micro, steps=args.steps,
                         warmup=args.warmup, config=EngineConfig(timeout_s=args.timeout,
                                                                 start_timeout_s=args.timeout),
                         recompute=recompute)
    predicted = simulate(graph, cluster, placement, schedule=schedule, microbatches=micro, recompute=recompute)
    if not result.ok:
        raise RuntimeError(f"measurement failed: {result.failure}")
    console.print(f"measured step {result.step_time_s * 1e3:.2f} ms (median of {args.steps}, {result.schedule_label}); "
                  f"simulator predicted {predicted.step_time_s * 1e3:.2f} ms")
    plot_gantt(result, stem, title=f"{graph.name} on {cluster.name} ({result.schedule_label}, measured)")
    to_chrome_trace(result, stem.with_suffix(".trace.json"))
    console.print(f"wrote {stem} and {stem.with_suffix('.trace.json')}")


# ---------------------------------------------------------------------------------------------- export
@command("export", "export a run's (or a file's) placement for a trainer")
def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a run folder (its placement.json) or a placement JSON")
    p.add_argument("--format", choices=("json", "torch"), default="json",
                   help="json: the validated placement JSON; torch: a torch.save'd dict of module -> device name")
    p.add_argument("--out", required=True, help="output file")
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    from graphs.jsonio import read_json, write_json_atomic
    from placer.io.document import placement_from_document

    path = placement_file(args.source)
    out = writable_file(args.out, "export")
    doc = checked_document(read_json(path, "placement"), path)
    placement_from_document(doc, where=str(path))  # device indices in range
    if args.format == "json":
        write_json_atomic(out, doc)
    else:
        from placer.app.runs import save_torch_atomic

        devices = doc["devices"]
        save_torch_atomic({"schema": doc["schema"], "graph": doc["graph"], "devices": devices,
                           "modules": {m: devices[d] for m, d in doc["modules"].items()},
                           "ops": {o: devices[d] for o, d in doc["ops"].items()},
                           "stages": doc["stages"], "schedule": doc["schedule"]}, out)
    console.print(f"wrote {out} ({args.format}) from {path}")


# ---------------------------------------------------------------------------------------------- show
@command("show", "summarise a placement JSON or a step result; draw its timeline")
def _show_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="placement JSON or run folder (re-simulated), or a StepResult JSON")
    _document_overrides(p)
    p.add_argument("--timeline", help="write a Gantt PNG here")
    p.add_argument("--trace", help="write a Perfetto/Chrome trace JSON here")
    p.set_defaults(func=cmd_show)


def cmd_show(args: argparse.Namespace) -> None:
    from graphs.jsonio import read_json
    from placer.core.result import StepResult

    path = placement_file(args.path)
    timeline = writable_file(args.timeline, "timeline") if args.timeline is not None else None
    trace = writable_file(args.trace, "trace") if args.trace is not None else None
    doc = read_json(path, "placement or result")
    if isinstance(doc, dict) and doc.get("schema") == "placer.placement/v1":
        from placer.costmodel.sim import simulate

        graph, cluster, placement = placed_from_document(doc, path, args.graph, args.cluster)
        result = simulate(graph, cluster, placement, schedule=doc["schedule"]["name"],
                          microbatches=doc["schedule"]["microbatches"], timeline=True,
                          recompute=doc["schedule"].get("recompute", ()))
        title = f"{graph.name} on {cluster.name}: {doc['provenance']['method']}"
    elif isinstance(doc, dict) and "step_time_s" in doc:
        try:
            result = StepResult.from_json(doc)
        except KeyError as e:
            raise ValueError(f"{path}: a step result without its field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: a malformed step result: {(str(e) or type(e).__name__).splitlines()[0]}"
                             ) from None
        title = f"{result.source} step"
    else:
        raise ValueError(f"{path} is neither a placement JSON nor a step result")
    console.print(f"{title}: step {result.step_time_s * 1e3:.2f} ms ({result.source}), schedule "
                  f"{result.schedule_label}" if result.ok else f"{title}: failed — {result.failure}")
    for d, busy, mem in zip(result.devices, result.busy_s, result.peak_memory_bytes):
        console.print(f"  {d}: busy {busy * 1e3:.2f} ms, peak memory {mem / 1e6:.1f} MB")
    if timeline:
        from placer.io.timeline import plot_gantt

        plot_gantt(result, timeline, title=title)
        console.print(f"wrote {timeline}")
    if trace:
        from placer.io.timeline import to_chrome_trace

        to_chrome_trace(result, trace)
        console.print(f"wrote {trace}")
