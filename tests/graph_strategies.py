"""Hypothesis strategies shared by the property tests of graphs, schedules, the simulator and the bounds."""

from __future__ import annotations

from hypothesis import strategies as st


def dag_edges(n: int, max_size: int) -> st.SearchStrategy[list[tuple[int, int]]]:
    """Distinct edges ``(i, j)`` with ``i < j < n`` (op-index order is topological), at most ``max_size``."""
    pairs = [(i, j) for j in range(n) for i in range(j)]
    return st.lists(st.sampled_from(pairs), unique=True, max_size=max_size) if pairs else st.just([])
