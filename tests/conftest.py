"""Fixtures shared by every test module (pytest finds them here; the plain builders behind them live in
``tests/policy_helpers.py`` so that module-level helpers and hypothesis strategies can import them too).

- ``one_thread`` / ``one_thread_module``: one intra-op torch thread for a test / a whole module, restored after.
  Small nets run fastest so, and engine reference steps must match the workers (one thread each); with two
  OpenMP threads and another job on one of the two cores, an Inception step here took 15 s instead of 0.1 s.
- ``restore_threads``: only restores the thread count (for code under test that sets it, such as the trainer).
- ``cpu_pair``: two 16 GiB CPUs, 1 GB/s and 100 µs apart; ``cpu_cluster(d, ...)``: any number of CPUs.
- ``chain_graph(n, ...)``, ``diamond_graph(...)``: tiny hand-made graphs whose step times can be worked by hand.
"""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from graphs.ir import OpGraph
from placer.core.cluster import Cluster
from tests.policy_helpers import chain, cpus, diamond, pair, torch_threads


@pytest.fixture(autouse=True)
def fresh_schedule_warnings() -> None:
    """Schedule warnings are logged once per process; each test starts with none logged yet."""
    from placer.costmodel.schedules import reset_schedule_warnings  # noqa: PLC0415

    reset_schedule_warnings()


@pytest.fixture
def one_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """For module-scoped fixtures that compute with torch (a function-scoped fixture cannot serve them)."""
    with torch_threads(1):
        yield


@pytest.fixture
def restore_threads() -> Iterator[None]:
    with torch_threads(None):
        yield


@pytest.fixture
def cpu_pair() -> Cluster:
    return pair()


@pytest.fixture
def cpu_cluster() -> Callable[..., Cluster]:
    """:func:`tests.policy_helpers.cpus`: ``cpu_cluster(3, memory_bytes=..., bandwidth_Bps=..., speeds=...)``."""
    return cpus


@pytest.fixture
def chain_graph() -> Callable[..., OpGraph]:
    """:func:`tests.policy_helpers.chain`: ``chain_graph(4, fwd_s=..., bwd_s=..., out_bytes=...)``."""
    return chain


@pytest.fixture
def diamond_graph() -> Callable[..., OpGraph]:
    """:func:`tests.policy_helpers.diamond`: ``diamond_graph(edge_bytes=...)``."""
    return diamond
