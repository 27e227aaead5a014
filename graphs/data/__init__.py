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


def load_benchmark_graph(name: str, *, config: str = "small") -> OpGraph:
    """Load ``name`` (``nmt``, or ``nmt-paper`` with the config in the name)."""
    stem = name if "-" in name else f"{name}-{config}"
    path = DATA_DIR / f"{stem}.json"
    if not path.exists():
        raise ValueError(
            f"no shipped graph {stem!r} (have: {', '.join(available()) or 'none'}); "
            f"build one with 'placer graph build' and pass its JSON path"
        )
    return OpGraph.load(path)
