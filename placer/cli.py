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

console = Console()
err_console = Console(stderr=True)

COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str) -> Callable:
    """Register a function that adds one sub-command's parser (keeps each command's options beside its code)."""

    def deco(fn: Callable[[argparse._SubParsersAction], None]) -> Callable:
        COMMANDS[name] = fn
        return fn

    return deco


def parse_size(text: str) -> float:
    """``10m`` / ``90s`` / ``1h`` / ``30`` (seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h)") from None


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
    """A graph from a JSON file, or a shipped benchmark graph by name (``rnnlm``, ``nmt-paper``...)."""
    from graphs.data import load_benchmark_graph
    from graphs.ir import OpGraph

    path = Path(text)
    if path.suffix == ".json" or path.exists():
        return OpGraph.load(path)
    return load_benchmark_graph(text, config=config)


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
    for kind, c in g.costs.items():
        p = c.provenance
        summary.add_row(f"[{kind}] fwd + bwd", f"{c.fwd_s.sum() * 1e3:.2f} + {c.bwd_s.sum() * 1e3:.2f} ms "
                        f"({p.method}, {p.device}, {p.threads} thr, {p.date})")
        summary.add_row(f"[{kind}] critical path", f"{g.critical_path_s(kind) * 1e3:.2f} ms")
    if "source" in g.meta:
        summary.add_row("source", str(g.meta["source"]))
    console.print(summary)
    if g.costs:
        kind = next(iter(g.costs))
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
        err_console.print("placer: interrupted")
        return 130
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        err_console.print(f"placer: error: {msg.splitlines()[0] if msg else type(e).__name__}", markup=False,
                          highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
