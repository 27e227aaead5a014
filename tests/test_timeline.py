"""Timeline output: the Chrome/Perfetto trace parses and has one track per device and link; the Gantt PNG exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphs.ir import OpGraph
from placer.core.cluster import Cluster, Device
from placer.core.result import StepResult
from placer.costmodel.sim import simulate
from placer.io.timeline import chrome_trace, plot_gantt, to_chrome_trace, tracks


@pytest.fixture(scope="module")
def result() -> StepResult:
    ops = [dict(name=f"op{i}", fwd_s=1e-3, bwd_s=2e-3, out_bytes=100_000) for i in range(3)]
    g = OpGraph.build(name="chain", ops=ops, edges=[("op0", "op1"), ("op1", "op2")])
    devs = [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=1 << 30) for i in range(3)]
    c = Cluster.uniform("c3", devs, bandwidth_Bps=1e9, latency_s=20e-6)
    return simulate(g, c, np.array([0, 1, 2]), schedule="1f1b", microbatches=4, timeline=True)


def test_chrome_trace_round_trip(result, tmp_path):
    path = to_chrome_trace(result, tmp_path / "t" / "timeline.json")
    data = json.loads(path.read_text())
    names = {e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"cpu:0", "cpu:1", "cpu:2", "cpu:0->cpu:1", "cpu:1->cpu:0", "cpu:1->cpu:2", "cpu:2->cpu:1"}
    spans = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(result.timeline)
    # 3 ops x 4 micro-batches x 2 phases + 3 updates + 2 links x 2 directions x 4 micro-batches
    assert len(spans) == 24 + 3 + 16
    assert {e["args"]["microbatch"] for e in spans} == {-1, 0, 1, 2, 3}
    last = max(e["ts"] + e["dur"] for e in spans)
    assert last == pytest.approx(result.step_time_s * 1e6)
    assert tracks(result)[:3] == ["cpu:0", "cpu:1", "cpu:2"]
    assert chrome_trace(result)["otherData"]["schedule"] == "1f1b"


def test_gantt_png(result, tmp_path):
    path = plot_gantt(result, tmp_path / "timeline.png", title="1f1b, 3 stages")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000


def test_no_timeline_is_a_clear_error(tmp_path):
    r = StepResult(step_time_s=1.0, source="sim", devices=("cpu:0",), busy_s=np.ones(1),
                   peak_memory_bytes=np.zeros(1, dtype=np.int64), bytes_moved=np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="timeline=True"):
        to_chrome_trace(r, tmp_path / "x.json")
    with pytest.raises(ValueError, match="timeline=True"):
        plot_gantt(r, tmp_path / "x.png")
