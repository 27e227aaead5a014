"""Shared pieces of the ``placer`` command line: the command registry, the console, argument parsers for
durations, overrides, graphs and placement documents. Nothing here imports torch or the policies."""

from __future__ import annotations

import argparse
from typing import Callable

from rich.console import Console

console = Console(soft_wrap=True)  # no hard wraps: paths and error lines stay whole

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {}
"""Sub-command name -> (one-line help, function adding its arguments). The arguments of a command are added only
when that command runs, so ``placer --help`` loads no command's dependencies."""


def command(name: str, help: str) -> Callable:
    """Register a function that adds one sub-command's arguments (keeps each command's options beside its code)."""

    def deco(fn: Callable[[argparse.ArgumentParser], None]) -> Callable:
        COMMANDS[name] = (help, fn)
        return fn

    return deco


def parse_duration(text: str) -> float:
    """``90s`` / ``10m`` / ``1h`` / ``30`` (seconds) -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = str(text).strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
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


