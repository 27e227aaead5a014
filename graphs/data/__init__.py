"""Profiled benchmark graphs shipped with placer, so tests and demos need no re-profiling.

Files are ``{model}-{config}.json`` (e.g. ``nmt-small.json``), each an :class:`~graphs.ir.OpGraph` whose cost sets
carry their provenance (measured on this project's 1-core CPU workers; GPU kinds estimated by the roofline model
unless a ``measured`` provenance says otherwise). Regenerate with ``python benchmarks/build_graphs.py``.
"""

from __future__ import annotations

from pathlib import Path

from graphs.ir import OpGraph

DATA_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the shipped graphs, e.g. ``['inception_v3-small', 'nmt-small', ...]``."""
    return sorted(p.stem for p in DATA_DIR.glob("*.json"))


DEFAULT_CONFIG = "small"
"""The config a bare graph name means: ``rnnlm`` is ``rnnlm-small`` everywhere (env, CLI, compare); the
paper-sized graphs are named in full (``rnnlm-paper``)."""


def load_benchmark_graph(name: str, *, config: str = DEFAULT_CONFIG) -> OpGraph:
    """Load a shipped graph: ``nmt-paper`` names its config, a bare ``nmt`` means ``nmt-{config}``."""
    stem = name if "-" in name else f"{name}-{config}"
    path = DATA_DIR / f"{stem}.json"
    if not path.exists():
        raise ValueError(
            f"unknown graph {name!r}: not a JSON file nor a shipped graph {stem!r} (have: "
            f"{', '.join(available()) or 'none'}); build one with 'placer graph build' and pass its JSON path"
        )
    return OpGraph.load(path)


def resolve_graph(graph: OpGraph | str | Path, *, config: str = DEFAULT_CONFIG) -> OpGraph:
    """The one graph resolver: an ``OpGraph`` as it is; a graph JSON path (``.json`` or an existing file); else a
    shipped graph's name (:func:`load_benchmark_graph`: a bare name means the ``config`` config, ``small``)."""
    if isinstance(graph, OpGraph):
        return graph
    path = Path(graph)
    if path.suffix == ".json" or path.exists():
        return OpGraph.load(path)
    return load_benchmark_graph(str(graph), config=config)
