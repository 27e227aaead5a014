"""Crashed, hung and out-of-memory workers give failed results within the timeout, and no process survives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from graphs.build import build_graph
from placer.core.cluster import get_cluster
from placer.engine import EngineConfig, Measurer
from placer.core.placement import Placement

pytestmark = pytest.mark.slow

CPU2 = get_cluster("cpu-2")
ROOT = Path(__file__).resolve().parents[1]


def _gone(pids, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def setup():
    graph = build_graph("placer.engine.toy:chain", profile=None)
    half = np.array([0 if i < graph.n // 2 else 1 for i in range(graph.n)])
    with Measurer(graph, CPU2, config=EngineConfig(timeout_s=60)) as m:
        assert m.measure(Placement(half), steps=1, warmup=0).ok
        yield graph, Placement(half), m


@pytest.mark.parametrize("fault,timeout_s,expect", [
    ("crash", 30.0, "crashed"),
    ("hang", 3.0, "hung"),
    ("oom", 30.0, "out of memory"),
])
def test_fault_gives_failed_result_and_workers_restart(setup, fault, timeout_s, expect):
    graph, pl, m = setup
    if not m.worker_pids:  # restarted lazily by the previous case
        assert m.measure(pl, steps=1, warmup=0).ok
    old = list(m.worker_pids)
    t0 = time.monotonic()
    res = m.measure(pl, steps=1, warmup=0, timeout_s=timeout_s, _fault=fault)
    elapsed = time.monotonic() - t0
    assert not res.ok and expect in res.failure and "\n" not in res.failure
    assert elapsed < timeout_s + 5
    assert res.step_time_s == float("inf")
    if fault == "oom":
        assert res.oom and res.oom_device == 1
    assert _gone(old), "old workers survived the failure"
    # the measurer recovers: fresh workers, a good measurement
    ok = m.measure(pl, steps=1, warmup=0)
    assert ok.ok, ok.failure
    assert not set(old) & set(m.worker_pids)


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def test_workers_die_with_their_parent(tmp_path):
    """A parent killed with SIGKILL (no atexit, no close) takes its workers with it."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from graphs.build import build_graph
        from placer.core.cluster import get_cluster
        from placer.engine import Measurer
        from placer.core.placement import Placement
        if __name__ == "__main__":
            g = build_graph("placer.engine.toy:chain", profile=None)
            m = Measurer(g, get_cluster("cpu-2"))
            assert m.measure(Placement.single(g), steps=1, warmup=0).ok
            print(" ".join(map(str, m.worker_pids)), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr[-2000:]
    assert _gone(pids, 10.0)


def test_worker_killed_from_outside(setup):
    """SIGKILL a worker in the middle of a long measurement: a failed result at once, then a clean restart;
    a worker killed while idle is replaced before the next measurement."""
    graph, pl, m = setup
    if not m.worker_pids:
        assert m.measure(pl, steps=1, warmup=0).ok
    victim = m.worker_pids[1]
    killer = threading.Timer(1.0, os.kill, args=(victim, signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    res = m.measure(pl, steps=100_000, warmup=0, timeout_s=60)  # would take minutes
    killer.join()
    assert not res.ok and "crashed" in res.failure
    assert time.monotonic() - t0 < 15
    assert _gone([victim])
    assert m.measure(pl, steps=1, warmup=0).ok
    idle_victim = m.worker_pids[0]
    os.kill(idle_victim, signal.SIGKILL)
    assert _gone([idle_victim])
    assert m.measure(pl, steps=1, warmup=0).ok


def test_close_leaves_no_process(setup):
    """Runs last in this module: closes the shared measurer."""
    graph, pl, m = setup
    assert m.measure(pl, steps=1, warmup=0).ok
    pids = list(m.worker_pids)
    me = psutil.Process()
    assert len(pids) == 2 and {c.pid for c in me.children(recursive=True)} >= set(pids)
    m.close()
    assert _gone(pids, 2.0)
    assert not {c.pid for c in me.children(recursive=True)} & set(pids)
    assert not [c for c in me.children(recursive=True) if "placer-worker" in " ".join(_cmdline(c))]
    m.close()  # idempotent
