"""Costs per micro-batch size: measured times win over dividing the full batch's, interpolation between measured
sizes, old graphs unchanged, and the JSON form (written only when present, loaded back-compatibly)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graphs.data import load_benchmark_graph
from graphs.ir import OpCosts, OpGraph, Provenance
from placer.core.cluster import Cluster, Device
from placer.costmodel.bounds import critical_path_s
from placer.costmodel.sim import Simulator, microbatch_costs_s, simulate

PROV = Provenance(device="cpu", threads=1, torch_version="x", date="2026-12-03", method="measured")
FULL_F, FULL_B = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])


def chain3(microbatch_s: dict | None = None) -> OpGraph:
    costs = {"cpu": OpCosts(fwd_s=FULL_F, bwd_s=FULL_B, provenance=PROV, microbatch_s=microbatch_s or {})}
    ops = [dict(name=n) for n in "abc"]
    return OpGraph.build(name="chain3", ops=ops, edges=[("a", "b", 0), ("b", "c", 0)], costs=costs)


def one_device(speed: float = 1.0) -> Cluster:
    return Cluster.uniform("one", [Device(name="cpu:0", kind="cpu", memory_bytes=1 << 30, speed=speed)],
                           bandwidth_Bps=1e30, latency_s=0.0)


def step_s(g: OpGraph, m: int, *, overhead_s: float = 0.0, speed: float = 1.0) -> float:
    r = simulate(g, one_device(speed), np.zeros(3, np.int64), schedule="gpipe" if m > 1 else "none",
                 microbatches=m, dispatch_overhead_s=overhead_s)
    assert r.ok, r.failure
    return r.step_time_s


def test_measured_microbatch_costs_replace_the_division():
    f2, b2 = np.array([0.7, 1.2, 1.9]), np.array([1.1, 2.5, 3.3])
    g = chain3({2: (f2, b2)})
    # one device runs both micro-batches back to back: 2 x (sum of measured forward + backward)
    assert step_s(g, 2) == pytest.approx(2 * (f2.sum() + b2.sum()))
    assert step_s(g, 2, speed=2.0) == pytest.approx((f2.sum() + b2.sum()))
    assert step_s(chain3(), 2) == pytest.approx(FULL_F.sum() + FULL_B.sum())  # no measurement: t / M each
    assert step_s(g, 1) == step_s(chain3(), 1)  # the full batch is untouched


def test_interpolated_in_samples_between_measured_sizes_and_divided_beyond():
    f4, b4 = np.array([0.5, 0.6, 0.9]), np.array([0.6, 1.2, 1.8])
    c = chain3({4: (f4, b4)}).costs["cpu"]
    # M = 2 is half the batch: a third of the way from batch/4 (0.25) to the full batch (1.0)
    f, b = microbatch_costs_s(c, 0.0, 2)
    assert f == pytest.approx(f4 + (FULL_F - f4) / 3)
    assert b == pytest.approx(b4 + (FULL_B - b4) / 3)
    # M = 8 is below every measured size: batch/4's time halved, the dispatch overhead paid once
    f, b = microbatch_costs_s(c, 0.1, 8)
    assert f == pytest.approx(0.1 + (f4 - 0.1) / 2)
    assert b == pytest.approx(0.1 + (b4 - 0.1) / 2)


def test_graph_without_microbatch_costs_keeps_the_dispatch_rule():
    g = chain3()
    o = 0.25
    per_mb = sum(o + (t - o) / 4 for t in np.r_[FULL_F, FULL_B])
    assert step_s(g, 4, overhead_s=o) == pytest.approx(4 * per_mb)


def test_bounds_use_the_same_microbatch_times():
    f2, b2 = np.array([0.7, 1.2, 1.9]), np.array([1.1, 2.5, 3.3])
    g = chain3({2: (f2, b2)})
    assert critical_path_s(g, one_device(), microbatches=2, dispatch_overhead_s=0.0) == pytest.approx(
        f2.sum() + b2.sum())


def test_json_round_trip_and_old_files_load_unchanged():
    f2, b2 = np.array([0.7, 1.2, 1.9]), np.array([1.1, 2.5, 3.3])
    g = chain3({2: (f2, b2)})
    back = OpGraph.from_json(json.loads(json.dumps(g.to_json())))
    assert back.content_hash == g.content_hash
    assert back.costs["cpu"].microbatch_s[2][0].tolist() == f2.tolist()
    # a cost set without per-micro-batch times writes no key, so the files and hashes of older graphs stay
    plain = chain3().to_json()
    assert "microbatch_s" not in plain["costs"]["cpu"]
    assert OpGraph.from_json(plain).costs["cpu"].microbatch_s == {}
    shipped = load_benchmark_graph("inception_v3-small")
    assert OpGraph.from_json(shipped.to_json()).content_hash == shipped.content_hash


@pytest.mark.parametrize("bad", [{1: (FULL_F, FULL_B)}, {2: (FULL_F[:2], FULL_B[:2])},
                                 {2: (-FULL_F, FULL_B)}])
def test_bad_microbatch_costs_are_one_line_errors(bad):
    with pytest.raises(ValueError) as e:
        OpCosts(fwd_s=FULL_F, bwd_s=FULL_B, provenance=PROV, microbatch_s=bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["rnnlm-small", "nmt-small", "gpt-small"])
def test_shipped_small_graphs_carry_measured_microbatch_costs(name):
    c = load_benchmark_graph(name).costs["cpu"]
    assert sorted(c.microbatch_s) == [2, 4, 8]
    per_step = [c.step_s.sum()] + [m * (f.sum() + b.sum()) for m, (f, b) in c.microbatch_s.items()]
    # a step cut into M micro-batches costs more than the full batch (fixed per-op costs), never less than half
    assert all(0.5 * per_step[0] < t for t in per_step[1:])
    assert per_step[-1] > per_step[0]


def test_weight_traffic_is_charged_per_microbatch_pass_on_cpu_only():
    from tests.policy_helpers import chain, cpus

    g = chain(4, fwd_s=1e-3, param_bytes=40_000_000)
    dev = np.zeros(4, np.int64)

    def step(cluster: Cluster, m: int) -> float:
        sim = Simulator(g, cluster, memory_bandwidth_Bps=20e9)
        return sim.run(dev, schedule="gpipe" if m > 1 else "none", microbatches=m).step_time_s

    off = cpus(1)
    off = Cluster.uniform("off", off.devices, bandwidth_Bps=1e9, latency_s=0.0,
                          meta={"param_traffic_per_microbatch": {"cpu": 0.0}})
    per_pass_s = 5.0 * 4 * 40_000_000 / 20e9  # PARAM_TRAFFIC_PER_MICROBATCH["cpu"] x parameter bytes / bandwidth
    for m in (1, 2, 4):
        assert step(cpus(1), m) - step(off, m) == pytest.approx(m * per_pass_s, rel=1e-6)
    gpu = cpus(1, kind="H100")
    g_gpu = g.replace(costs={"H100": g.costs["cpu"]})
    assert simulate(g_gpu, gpu, dev).step_time_s == pytest.approx(
        simulate(g_gpu, Cluster.uniform("o", gpu.devices, bandwidth_Bps=1e9, latency_s=0.0,
                                        meta={"param_traffic_per_microbatch": 0.0}), dev).step_time_s)
    small = chain(4, fwd_s=1e-3, param_bytes=200_000)  # 1.6 MB of weights and gradients: they stay in cache
    assert Simulator(small, cpus(1)).microbatch_s(4)[0].tolist() == Simulator(small, off).microbatch_s(4)[0].tolist()
    with pytest.raises(ValueError, match="param_traffic_per_microbatch must be a finite number >= 0"):
        Cluster.uniform("bad", off.devices, bandwidth_Bps=1e9, latency_s=0.0,
                        meta={"param_traffic_per_microbatch": {"cpu": -1}})
