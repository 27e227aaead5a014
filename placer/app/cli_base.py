"""Shared pieces of the ``placer`` command line: the command registry, the console, argument parsers for
durations, overrides, graphs and placement documents. Nothing here imports torch or the policies."""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

from rich.console import Console

from graphs.jsonio import atomic_target


def _console() -> Console:
    """The console of every command. On a terminal rich measures it; piped or logged output is rich's
    non-terminal mode (no colour codes, no live bars) at ``$COLUMNS`` or 200 columns wide, so tables are not
    squeezed to 80 columns and lines are not cut with "…"."""
    out = Console(soft_wrap=True)  # no hard wraps: paths and error lines stay whole
    if out.is_terminal:
        return out
    try:
        width = int(os.environ.get("COLUMNS", "")) or 200
    except ValueError:
        width = 200
    return Console(soft_wrap=True, width=max(width, 40))


console = _console()

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
    """``90s`` / ``10m`` / ``1h`` / ``30`` (seconds) -> seconds; a finite, non-negative number of them."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = str(text).strip().lower()
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 90s, 10m, 1h)") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (a finite, non-negative time, e.g. 90s)")
    return seconds


def finite_float(text: str) -> float:
    """A float option's value: a finite number (``inf`` and ``nan`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_at_least(low: int) -> Callable[[str], int]:
    """An ``int`` option type refusing values below ``low`` (``--microbatches 0``, ``--steps -1``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value, {low}")
        return value

    parse.__name__ = f"int>={low}"  # argparse names the type in some messages
    return parse


def writable_file(text: str | Path, what: str = "output") -> Path:
    """``text`` as a path a file can be written to, checked before any work is done: not an existing directory,
    device or other special file (an atomic write would replace ``/dev/full`` by a plain file), under a folder (or
    a folder still to be created under one) that this process can create files in. A one-line ``ValueError``
    naming the path otherwise. A symbolic link stands for the file it points to (the one that is written). An
    empty path and ``-`` are refused: placer writes files, not standard output."""
    if str(text).strip() in ("", "-"):
        raise ValueError(f"cannot write the {what} to {str(text)!r}: give a file path (placer writes files, not "
                         "standard output)")
    path = atomic_target(text)
    if path.exists() and not path.is_file():
        raise ValueError(f"cannot write the {what} to {path}: it exists and is not a regular file")
    _check_folder(path.parent, f"the {what} to {path}")
    return path


def writable_folder(text: str | Path, what: str = "output folder") -> Path:
    """``text`` as a folder that exists or can be created, and can hold new files (see :func:`writable_file`)."""
    if not str(text).strip():
        raise ValueError(f"the {what} is an empty path; give a folder")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise ValueError(f"cannot use {path} as the {what}: it exists and is not a folder")
    _check_folder(path, f"into the {what} {path}")
    return path


def _check_folder(folder: Path, doing: str) -> None:
    """The nearest existing folder at or above ``folder`` accepts a new file (probed: permissions alone miss
    read-only file systems, /proc and root's rights)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"cannot write {doing}: {folder} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".placer-probe-")
    except OSError as e:
        raise ValueError(f"cannot write {doing}: cannot create a file in {folder} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


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


def placement_file(text: str | Path) -> Path:
    """The placement JSON ``text`` names: the file itself, or a run folder's ``placement.json`` (a multi-graph
    run folder has one ``placement_<graph>.json`` per graph: the message lists them)."""
    path = Path(text)
    if not path.is_dir():
        return path
    if (path / "placement.json").exists():
        return path / "placement.json"
    per_graph = sorted(p.name for p in path.glob("placement_*.json"))
    if per_graph:
        raise ValueError(f"{path} holds one placement per graph ({', '.join(per_graph)}); name one of them")
    raise ValueError(f"{path} is a folder without a placement.json (is it a run folder? was it trained?)")


_BESIDE_MAX = 32
"""JSON files beside a placement tried as its graph (newest first), beyond ``graph.json`` and ``<name>.json``."""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _graph_for(doc: dict, where: Path):
    """The graph a placement was made for: ``graph.json`` or ``<name>.json`` beside it (a run folder's own copy),
    else another graph JSON beside it with the placement's content hash (``placer baseline --graph g.json --out
    p.json`` leaves them side by side; the newest :data:`_BESIDE_MAX` JSON files are tried), else the shipped
    graph of that name, else any shipped graph with its content hash."""
    from graphs.data import available, load_benchmark_graph
    from graphs.ir import OpGraph

    name, digest = doc["graph"]["name"], doc["graph"]["hash"]
    named = [where.parent / "graph.json", where.parent / f"{name}.json"]
    others = sorted((p for p in where.parent.glob("*.json") if p not in named), key=_mtime, reverse=True)
    for k, cand in enumerate(named + others[:_BESIDE_MAX]):
        if cand.exists() and cand.resolve() != where.resolve():
            try:
                graph = OpGraph.load(cand)
            except ValueError:
                if k < len(named):
                    raise
                continue  # another placement, a result, a cluster: not a graph
            if graph.content_hash == digest:
                return graph
    for shipped in ([name] if name in available() else []) + available():
        graph = load_benchmark_graph(shipped)
        if graph.content_hash == digest:
            return graph
    raise ValueError(f"{where}: made for graph {name!r} ({digest}), which is neither beside it (graph.json) nor "
                     f"shipped; pass --graph GRAPH.json")


def _cluster_for(doc: dict, where: Path):
    """The cluster a placement was made for: ``cluster.json`` beside it when its name matches, else the preset."""
    from placer.core.cluster import PRESETS, Cluster, get_cluster

    name = doc["cluster"]
    beside = where.parent / "cluster.json"
    if beside.exists():
        cluster = Cluster.load(beside)
        if cluster.name == name:
            return cluster
    if name in PRESETS:
        return get_cluster(name)
    raise ValueError(f"{where}: made for cluster {name!r}, which is neither beside it (cluster.json) nor a preset; "
                     f"pass --cluster CLUSTER.json")


def checked_document(doc: object, where: Path) -> dict:
    """``doc`` when it is a valid placement JSON; else a one-line ``ValueError`` naming the file ``where``."""
    from placer.io.document import validate_document

    if not isinstance(doc, dict) or doc.get("schema") != "placer.placement/v1":
        raise ValueError(f"{where} is not a placement JSON (schema placer.placement/v1)")
    try:
        validate_document(doc)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return doc


def placed_from_document(doc: dict, where: str | Path, graph_arg: str | None, cluster_arg: str | None):
    """(graph, cluster, placement) of a placement JSON document read from ``where``. ``--graph``/``--cluster``
    override; otherwise the graph and cluster are found beside the placement (a run folder's ``graph.json`` and
    ``cluster.json``), then among the shipped graphs and presets (:func:`_graph_for`, :func:`_cluster_for`)."""
    from placer.core.cluster import get_cluster
    from placer.io.document import placement_from_document

    where = Path(where)
    checked_document(doc, where)
    graph = load_graph_arg(graph_arg) if graph_arg else _graph_for(doc, where)
    cluster = get_cluster(cluster_arg) if cluster_arg else _cluster_for(doc, where)
    return graph, cluster, placement_from_document(doc, graph, cluster, where=str(where)).placement


# ---------------------------------------------------------------------------------------------- registry names
def preset_names() -> str:
    """The cluster presets, from :data:`placer.core.cluster.PRESETS`."""
    from placer.core.cluster import PRESETS

    return ", ".join(PRESETS)


def schedule_names() -> list[str]:
    """What ``--schedule`` accepts: the micro-batch schedules of :data:`placer.costmodel.schedules.SCHEDULES` and
    ``auto`` (each placement's best schedule and micro-batch count, :func:`placer.costmodel.plans.schedule_choices`)."""
    from placer.costmodel.plans import schedule_choices

    return schedule_choices()


def method_names() -> str:
    """The baseline methods, from :data:`placer.baselines.registry.BASELINES` (imports the baselines)."""
    from placer.baselines import BASELINES

    return ", ".join(sorted(BASELINES))
