"""Link calibration: the least-squares fit, and a real 2-process gloo run (slow)."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from placer.engine.calibrate import calibrate_cluster, chain_message_costs, fit_link
from placer.costmodel.sim import Simulator


def test_fit_recovers_latency_and_bandwidth():
    sizes = [1_000, 100_000, 1_000_000, 10_000_000]
    one_way = [50e-6 + s / 2e9 for s in sizes]  # 50 us + 2 GB/s
    lat, bw, r2 = fit_link(sizes, one_way)
    assert lat == pytest.approx(50e-6) and bw == pytest.approx(2e9) and r2 == pytest.approx(1.0)


def test_fit_clamps_to_a_valid_link():
    lat, bw, _ = fit_link([1_000, 2_000], [2e-3, 1e-3])  # noisy: time falls with size
    assert lat >= 0 and bw > 0
    lat, _, _ = fit_link([1_000, 1_000_000], [0.0, 1e-3])  # would give a negative intercept
    assert lat == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 devices"):
        calibrate_cluster(1)
    with pytest.raises(ValueError, match="two distinct"):
        calibrate_cluster(2, sizes_bytes=[1024])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_two_gloo_workers():
    t0 = time.monotonic()
    c = calibrate_cluster(2, sizes_bytes=(1 << 10, 1 << 20, 1 << 22), repeats=20, matmul_n=128, matmul_iters=5,
                          timeout_s=60, engine_steps=3)
    assert time.monotonic() - t0 < 60
    assert c.device_names == ("cpu:0", "cpu:1")
    assert c.latency_s[0, 1] > 0 and c.latency_s[0, 1] == c.latency_s[1, 0] and c.latency_s[0, 1] < 0.05
    assert c.bandwidth_Bps[0, 1] > 1e6
    assert all(d.speed > 0 for d in c.devices)
    assert c.meta["source"] == "calibrated" and "0-1" in c.meta["one_way_median_s"]
    assert c.meta["blocking_one_way_median_s"]["0-1"] > 0
    # a receiver that waited 2-6 ms for a send: its wake-up, measured (a sleeping receiver is never early)
    assert c.latency_s[0, 1] * 0.5 < c.meta["waited_receive_s"]["0-1"] < 0.05
    assert 0 <= c.meta["message_wakeup_s"] < 0.05
    # the engine's message and step costs land in meta, where the simulator reads them
    for key in ("send_overhead_s", "recv_overhead_s"):
        assert 0 <= c.meta[key]["cpu"] < 0.05
    assert 0 <= c.meta["step_overhead_s"] < 0.5
    assert c.meta["engine_chain"]["placements"]["alternate"]["messages"] > 0
    sim = Simulator(_tiny_graph(), c)
    assert sim.send_overhead_s.tolist() == [c.meta["send_overhead_s"]["cpu"]] * 2
    assert not multiprocessing.active_children()


def _tiny_graph():
    from graphs.ir import OpGraph

    return OpGraph.build(name="t", ops=[dict(name="a", fwd_s=1.0, bwd_s=1.0)], edges=[])


def test_chain_message_costs_hand_worked():
    # single 0.5 ms. Wire: 50 us + 500 B at 10 MB/s = 100 us; send: (busy alternate - busy single) / 20 messages
    # = (1.0 - 0.5) / 20 = 25 us, so 125 us per message. Unexplained per split: 2.45 - 3 x 0.125 = 2.075,
    # 3.5 - 10 x 0.125 = 2.25, 5.0 - 20 x 0.125 = 2.5 ms -> step overhead = the median, 2.25 ms
    ms = 1e-3
    got = {"single": dict(step_s=0.5 * ms, busy_s=0.5 * ms, messages=0, bytes=0, first_task_s=0.0),
           "halves": dict(step_s=2.95 * ms, busy_s=0.6 * ms, messages=3, bytes=1500, first_task_s=2.0 * ms),
           "quarters": dict(step_s=4.0 * ms, busy_s=0.8 * ms, messages=10, bytes=5000, first_task_s=0.1 * ms),
           "alternate": dict(step_s=5.5 * ms, busy_s=1.0 * ms, messages=20, bytes=10_000, first_task_s=3.0 * ms)}
    out = chain_message_costs(got, latency_s=50e-6, bandwidth_Bps=10e6)
    assert out["send_overhead_s"] == pytest.approx(25e-6)
    assert out["per_message_s"] == pytest.approx(125e-6)
    assert out["step_overhead_s"] == pytest.approx(2.25 * ms)
    assert out["recv_overhead_s"] == 0.0
    # a measured wake-up per waited message comes off first: 2.075 - 3 x 0.025, 2.25 - 10 x 0.025, ... -> 2.0 ms
    out = chain_message_costs(got, latency_s=50e-6, bandwidth_Bps=10e6, wakeup_s=25e-6)
    assert out["recv_overhead_s"] == pytest.approx(25e-6) and out["step_overhead_s"] == pytest.approx(2.0 * ms)
    # a wire slower than the steps allow: nothing is left for the fixed cost, clamped at 0
    out = chain_message_costs(got, latency_s=1e-3, bandwidth_Bps=10e6)
    assert out["step_overhead_s"] == 0.0 and out["send_overhead_s"] == pytest.approx(25e-6)


def test_engine_op_costs_read_the_single_device_timeline():
    import numpy as np

    from envs.synthetic import layered_dag
    from placer.engine.calibrate import engine_op_costs
    from placer.core.result import StepResult, TimelineEvent

    g = layered_dag(2, 3, seed=1)

    class FakeMeasurer:  # what a Measurer returns for Single: one fwd and one bwd event per op, plus the rest
        def __init__(self, ok=True):
            self.ok = ok

        def measure(self, placement, *, steps, warmup):
            assert set(placement.device_of_op.tolist()) == {0}
            if not self.ok:
                return StepResult.failed("worker cpu:0 crashed", source="engine", devices=("cpu:0", "cpu:1"))
            ev = [TimelineEvent(track="cpu:0", op=name, microbatch=0, phase=phase, start_s=0.0,
                                end_s=(i + 1) * (1e-3 if phase == "fwd" else 2e-3))
                  for i, name in enumerate(g.op_names) for phase in ("fwd", "bwd")]
            ev.append(TimelineEvent(track="cpu:0", op="update", microbatch=-1, phase="update", start_s=0, end_s=1))
            ev.append(TimelineEvent(track="cpu:0->cpu:1", op=g.op_names[0], microbatch=0, phase="send",
                                    start_s=0, end_s=5))
            return StepResult(step_time_s=1.0, source="engine", devices=("cpu:0", "cpu:1"), busy_s=np.ones(2),
                              peak_memory_bytes=np.zeros(2), bytes_moved=np.zeros((2, 2)), timeline=tuple(ev))

    got = engine_op_costs(g, FakeMeasurer())
    cost = got.cost("cpu")
    assert np.allclose(cost.fwd_s, 1e-3 * np.arange(1, g.n + 1))
    assert np.allclose(cost.bwd_s, 2e-3 * np.arange(1, g.n + 1))
    assert cost.provenance.method == "measured" and "engine in situ" in cost.provenance.note
    assert got.op_names == g.op_names and got.default_cost_kind == "cpu"
    with pytest.raises(RuntimeError, match="single-device run failed: worker cpu:0 crashed"):
        engine_op_costs(g, FakeMeasurer(ok=False))
