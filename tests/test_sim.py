"""Simulator: hand-worked step times (chain, diamond, fork-join), pipelines, memory, OOM, and properties.

Unless a test says otherwise: parameters are 0 (so the update costs 0), dispatch overhead is 0, and a transfer of
``b`` bytes takes ``latency + b / M / bandwidth`` on a FIFO link.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

from graphs.ir import OpCosts, OpGraph, Provenance
from placer.costmodel.bounds import colocation_bound_s, critical_path_s, efficiency, lower_bound_s, work_bound_s
from placer.core.cluster import Cluster, Device
from placer.core.placement import Placement
from placer.costmodel.schedules import build_schedule
from placer.costmodel.sim import Simulator, simulate

GiB = 1 << 30


def cluster(d: int, *, latency_s: float = 0.0, bandwidth_Bps: float = 1e30, memory_bytes: int = GiB,
            speeds: list[float] | None = None, kind: str = "cpu") -> Cluster:
    devs = [Device(name=f"cpu:{i}", kind=kind, memory_bytes=memory_bytes, speed=(speeds or [1.0] * d)[i])
            for i in range(d)]
    return Cluster.uniform(f"test{d}", devs, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def run(g, c, placement, **kw):
    kw.setdefault("dispatch_overhead_s", 0.0)
    r = simulate(g, c, np.asarray(placement), **kw)
    assert r.ok, r.failure
    return r


# ---------------------------------------------------------------------- chain a -> b -> c
def chain3(edge_bytes: int = 0) -> OpGraph:
    ops = [dict(name="a", fwd_s=1.0, bwd_s=2.0), dict(name="b", fwd_s=2.0, bwd_s=4.0),
           dict(name="c", fwd_s=3.0, bwd_s=6.0)]
    return OpGraph.build(name="chain3", ops=ops, edges=[("a", "b", edge_bytes), ("b", "c", edge_bytes)])


def test_chain_one_device():
    # forwards 1+2+3, backwards 6+4+2: 18 s, all busy
    r = run(chain3(), cluster(1), [0, 0, 0])
    assert r.step_time_s == pytest.approx(18.0)
    assert r.busy_s.tolist() == pytest.approx([18.0])
    assert r.critical_path_s == pytest.approx(18.0)
    assert r.bytes_moved.sum() == 0


def test_chain_two_devices_without_and_with_transfer_cost():
    g = chain3(edge_bytes=1_000_000)
    # free transfers (latency 0, infinite bandwidth): still a chain, 18 s; busy a+b on dev0 = 9, c = 9
    r = run(g, cluster(2), [0, 0, 1])
    assert r.step_time_s == pytest.approx(18.0)
    assert r.busy_s.tolist() == pytest.approx([9.0, 9.0])
    # 1 MB at 1 MB/s + 0.5 s latency = 1.5 s forward (b -> c) and 1.5 s for the gradient back: 21 s
    r = run(g, cluster(2, latency_s=0.5, bandwidth_Bps=1e6), [0, 0, 1])
    assert r.step_time_s == pytest.approx(21.0)
    assert r.critical_path_s == pytest.approx(21.0)
    assert r.bytes_moved.tolist() == [[0, 1_000_000], [1_000_000, 0]]


def test_device_speed_scales_compute():
    r = run(chain3(), cluster(1, speeds=[2.0]), [0, 0, 0])
    assert r.step_time_s == pytest.approx(9.0)


# ---------------------------------------------------------------------- diamond s -> {l, r} -> t
def diamond(edge_bytes: int = 0) -> OpGraph:
    ops = [dict(name="s", fwd_s=1.0, bwd_s=1.0), dict(name="l", fwd_s=4.0, bwd_s=4.0),
           dict(name="r", fwd_s=2.0, bwd_s=2.0), dict(name="t", fwd_s=1.0, bwd_s=1.0)]
    return OpGraph.build(name="diamond", ops=ops, edges=[("s", "l", edge_bytes), ("s", "r", edge_bytes),
                                                         ("l", "t", edge_bytes), ("r", "t", edge_bytes)])


def test_diamond_one_device():
    assert run(diamond(), cluster(1), [0, 0, 0, 0]).step_time_s == pytest.approx(16.0)  # 2 * (1+4+2+1)


def test_diamond_two_devices_free_transfers():
    # s [0,1] dev0; l [1,5] dev0 || r [1,3] dev1; t [5,6] dev0. Backward on dev0: t [6,7], l [7,11];
    # r's backward on dev1 [7,9], its gradient reaches s at 9; s [11,12]. Step 12, busy 12 and 4.
    r = run(diamond(), cluster(2), [0, 0, 1, 0])
    assert r.step_time_s == pytest.approx(12.0)
    assert r.busy_s.tolist() == pytest.approx([12.0, 4.0])
    assert r.critical_path_s == pytest.approx(12.0)  # s, l, t forward then back


def test_diamond_two_devices_with_transfers():
    # each transfer: 1.5 s latency + 500 B / 1000 B/s = 2 s.
    # fwd: s [0,1]; s->dev1 [1,3]; r [3,5]; r->dev0 [5,7]; l [1,5]; t waits for r: [7,8].
    # bwd: t [8,9]; grad of r's output dev0->dev1 [9,11]; l [9,13]; r [11,13]; grad of s's output [13,15];
    # s [15,16]. Step 16 = the critical path (s, r, t forward and back with four transfers).
    r = run(diamond(500), cluster(2, latency_s=1.5, bandwidth_Bps=1000.0), [0, 0, 1, 0])
    assert r.step_time_s == pytest.approx(16.0)
    assert r.critical_path_s == pytest.approx(16.0)
    assert r.bytes_moved.tolist() == [[0, 1000], [1000, 0]]


# ---------------------------------------------------------------------- fork-join: dedup and FIFO links
def fork_join() -> OpGraph:
    ops = [dict(name="src", fwd_s=1.0, bwd_s=1.0), dict(name="a", fwd_s=2.0, bwd_s=2.0),
           dict(name="b", fwd_s=2.0, bwd_s=2.0), dict(name="c", fwd_s=2.0, bwd_s=2.0),
           dict(name="join", fwd_s=1.0, bwd_s=1.0)]
    edges = [("src", "a", 1000), ("src", "b", 3000), ("src", "c", 1000),
             ("a", "join", 3000), ("b", "join", 1000), ("c", "join", 1000)]
    return OpGraph.build(name="forkjoin", ops=ops, edges=edges)


def test_fork_join_one_send_per_remote_device_and_fifo_links():
    # a, b on dev1; src, c, join on dev0; bandwidth 1000 B/s, no latency.
    # fwd: src [0,1]; src's output goes once to dev1 with the larger edge, 3000 B: [1,4]; a [4,6]; a->dev0 3 s
    #      [6,9]; b [6,8]; b->dev0 queues behind a on the link: [9,10]; c [1,3]; join [10,11].
    # bwd: join [11,12]; grads back to dev1 in input order: a's [12,15], b's [15,16]; c [12,14];
    #      dev1 runs b first (reverse op order): [16,18], then a [18,20]; src's gradient (3000 B) leaves after
    #      the last of its dev1 readers: [20,23]; src [23,24]. Step 24.
    r = run(fork_join(), cluster(2, bandwidth_Bps=1000.0), [0, 1, 1, 0, 0])
    assert r.step_time_s == pytest.approx(24.0)
    # dev0 -> dev1: src 3000 + gradients of a 3000 and b 1000; dev1 -> dev0: a 3000 + b 1000 + src's gradient 3000
    assert r.bytes_moved.tolist() == [[0, 7000], [7000, 0]]
    assert r.extra["transfers"] == 3
    # without queueing and device contention the longest chain is src, a, join forward and back: 20 s
    assert r.critical_path_s == pytest.approx(20.0)


def test_timeline_events_match_the_hand_schedule():
    r = run(fork_join(), cluster(2, bandwidth_Bps=1000.0), [0, 1, 1, 0, 0], timeline=True)
    ev = {(e.track, e.op, e.phase): (e.start_s, e.end_s) for e in r.timeline}
    assert ev[("cpu:1->cpu:0", "b", "send")] == pytest.approx((9.0, 10.0))
    assert ev[("cpu:1->cpu:0", "grad:src", "send")] == pytest.approx((20.0, 23.0))
    assert ev[("cpu:0", "join", "fwd")] == pytest.approx((10.0, 11.0))
    assert ev[("cpu:1", "a", "bwd")] == pytest.approx((18.0, 20.0))
    assert ev[("cpu:0", "update", "update")] == pytest.approx((24.0, 24.0))
    assert sum(e.phase in ("fwd", "bwd") for e in r.timeline) == 10


# ---------------------------------------------------------------------- pipelines
def balanced_chain(d: int, *, stash_bytes: int = 0) -> OpGraph:
    ops = [dict(name=f"op{i}", fwd_s=1.0, bwd_s=2.0, stash_bytes=stash_bytes) for i in range(d)]
    return OpGraph.build(name=f"chain{d}", ops=ops, edges=[(f"op{i}", f"op{i + 1}") for i in range(d - 1)])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("d,m", [(2, 1), (2, 4), (4, 4), (4, 8), (3, 6)])
def test_bubble_fraction_on_balanced_chain(schedule, d, m):
    # each stage does M micro-batches of (1 + 2)/M s; the pipeline fills and drains over D-1 slots each way:
    # step = (M + D - 1) * 3 / M, so bubble = 1 - busy/step = (D - 1)/(M + D - 1) (GPipe; 1F1B has the same)
    r = run(balanced_chain(d), cluster(d), list(range(d)), schedule=schedule, microbatches=m)
    assert r.step_time_s == pytest.approx((m + d - 1) * 3.0 / m)
    assert 1 - r.busy_s.max() / r.step_time_s == pytest.approx((d - 1) / (m + d - 1))


def test_memory_peaks_gpipe_vs_1f1b():
    # stash 800 B per op (full batch) = 100 B per micro-batch with M = 8. GPipe keeps all 8 micro-batches on every
    # stage: 800 B. 1F1B keeps min(S - s, M): 4, 3, 2, 1 micro-batches -> 400, 300, 200, 100 B.
    g, c = balanced_chain(4, stash_bytes=800), cluster(4)
    assert run(g, c, [0, 1, 2, 3], schedule="gpipe", microbatches=8).peak_memory_bytes.tolist() == [800] * 4
    assert run(g, c, [0, 1, 2, 3], schedule="1f1b", microbatches=8).peak_memory_bytes.tolist() == [400, 300, 200, 100]
    # 'none' runs micro-batches one after another: one in flight
    assert run(g, c, [0, 1, 2, 3], schedule="none", microbatches=8).peak_memory_bytes.tolist() == [100] * 4


def test_interleaved_beats_gpipe_on_a_returning_placement():
    # chain on dev0, dev1, dev0, dev1: 1f1b falls back to gpipe; interleaved runs two chunks per device.
    g, c = balanced_chain(4), cluster(2)
    gp = run(g, c, [0, 1, 0, 1], schedule="gpipe", microbatches=4)
    il = run(g, c, [0, 1, 0, 1], schedule="interleaved-1f1b", microbatches=4)
    # GPipe by hand (0.25 s forwards, 0.5 s backwards per micro-batch): forwards end at 3.25 on dev1; each
    # micro-batch's backward chain op3, op2, op1, op0 alternates devices, so consecutive micro-batches overlap by
    # one slot: 3.25 + 4 * 0.5 + 3 * (4 - 1) * 0.5 = 9.75
    assert gp.step_time_s == pytest.approx(9.75)
    assert il.extra["schedule_order"] == "interleaved-1f1b"
    assert il.step_time_s < gp.step_time_s
    assert il.busy_s.tolist() == pytest.approx([6.0, 6.0])


def test_dispatch_overhead_per_microbatch():
    # one op, t_fwd = 1 ms, t_bwd = 2 ms, overhead 0.1 ms, M = 4: each micro-batch costs o + (t - o)/M
    g = OpGraph.build(name="one", ops=[dict(name="x", fwd_s=1e-3, bwd_s=2e-3)], edges=[])
    r = simulate(g, cluster(1), [0], schedule="none", microbatches=4, dispatch_overhead_s=1e-4)
    per_mb = (1e-4 + 0.9e-3 / 4) + (1e-4 + 1.9e-3 / 4)
    assert r.step_time_s == pytest.approx(4 * per_mb)  # = 3 ms + 3 * 2 * 0.1 ms
    assert r.step_time_s == pytest.approx(3.6e-3)


def test_update_time_from_parameter_bytes():
    # 1 MB of parameters; Adam touches 7 bytes per parameter byte at 1 GB/s: 7 ms (+0 overhead); SGD 3 ms (the
    # weights and gradients fit in a CPU core's cache, so the passes add no weight traffic)
    g = OpGraph.build(name="p", ops=[dict(name="x", fwd_s=1.0, bwd_s=1.0, param_bytes=1_000_000)], edges=[])
    sim = Simulator(g, cluster(1), dispatch_overhead_s=0.0, memory_bandwidth_Bps=1e9)
    assert sim.run([0], optimizer="adam").step_time_s == pytest.approx(2.007)
    assert sim.run([0], optimizer="sgd").step_time_s == pytest.approx(2.003)
    # memory: params + grads + Adam's two moments = 4 MB; SGD 2 MB
    assert sim.run([0], optimizer="adam").peak_memory_bytes.tolist() == [4_000_000]
    assert sim.run([0], optimizer="sgd").peak_memory_bytes.tolist() == [2_000_000]


# ---------------------------------------------------------------------- memory and OOM
def test_oom_names_device_and_bytes():
    g = OpGraph.build(name="m", ops=[dict(name="a", fwd_s=1.0, param_bytes=200, stash_bytes=300),
                                     dict(name="b", fwd_s=1.0, stash_bytes=10)], edges=[("a", "b")])
    c = cluster(2, memory_bytes=1000)
    # Adam on dev0: 200 * (1 + 1 + 2) = 800 + stash 300 = 1100 > 1000
    r = simulate(g, c, [0, 1])
    assert r.oom and r.oom_device == 0 and not r.ok and r.step_time_s == float("inf")
    assert "cpu:0" in r.failure and "out of memory" in r.failure
    assert r.peak_memory_bytes.tolist() == [1100, 10]
    # SGD: 400 + 300 = 700 fits
    assert simulate(g, c, [0, 1], optimizer="sgd").ok


def test_gpipe_ooms_where_1f1b_fits():
    g, c = balanced_chain(2, stash_bytes=800), cluster(2, memory_bytes=600)
    # M = 8: GPipe holds 800 B on each stage; 1F1B 2/8 * 800 = 200 and 100
    assert simulate(g, c, [0, 1], schedule="gpipe", microbatches=8, dispatch_overhead_s=0.0).oom
    assert simulate(g, c, [0, 1], schedule="1f1b", microbatches=8, dispatch_overhead_s=0.0).ok


def test_input_op_holds_its_batch_and_temporaries_count():
    g = OpGraph.build(name="in", ops=[dict(name="x", kind="input", out_bytes=1000),
                                      dict(name="y", fwd_s=1.0, stash_bytes=100, temp_bytes=50)],
                      edges=[("x", "y")])
    # x's batch (1000) and y's stash (100) are both held while y runs with 50 B of temporaries
    assert run(g, cluster(1), [0, 0]).peak_memory_bytes.tolist() == [1150]


# ---------------------------------------------------------------------- errors and cost kinds
def test_invalid_placement_and_missing_cost_kind():
    g, c = chain3(), cluster(2)
    with pytest.raises(ValueError, match="placement has 2 ops"):
        simulate(g, c, [0, 1])
    with pytest.raises(ValueError, match="device 5"):
        simulate(g, c, [0, 1, 5])
    coloc = OpGraph.build(name="co", ops=[dict(name="a", fwd_s=1.0, colocation=0),
                                          dict(name="b", fwd_s=1.0, colocation=0)], edges=[("a", "b")])
    with pytest.raises(ValueError, match="colocation group"):
        simulate(coloc, c, Placement([0, 1]))
    k80 = cluster(1, kind="K80")
    with pytest.raises(ValueError, match="no op costs for device kind 'K80'"):
        simulate(g, k80, [0, 0, 0])
    assert simulate(g, k80, [0, 0, 0], cost_kind={"K80": "cpu"}).step_time_s == pytest.approx(18.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        simulate(g, c, [0, 0, 0], schedule="pipedream")
    with pytest.raises(ValueError, match="unknown optimizer"):
        simulate(g, c, [0, 0, 0], optimizer="lion")


def test_heterogeneous_kinds_use_their_own_costs():
    prov = Provenance(device="x", threads=1, torch_version="", date="", method="estimated")
    g = chain3().with_costs("K80", OpCosts(fwd_s=[0.1, 0.2, 0.3], bwd_s=[0.2, 0.4, 0.6], provenance=prov))
    c = Cluster(name="mix", devices=(Device(name="cpu:0", kind="cpu", memory_bytes=GiB),
                                     Device(name="gpu:0", kind="K80", memory_bytes=GiB)),
                bandwidth_Bps=np.full((2, 2), 1e30), latency_s=np.zeros((2, 2)))
    assert run(g, c, [1, 1, 1]).step_time_s == pytest.approx(1.8)
    assert run(g, c, [0, 0, 1]).step_time_s == pytest.approx(1 + 2 + 0.3 + 0.6 + 4 + 2)
    # lower bound: fastest device per op -> critical path 1.8; work spread: min over lam of ... <= 1.8
    assert lower_bound_s(g, c) == pytest.approx(1.8)


def test_schedule_object_and_warning_once(caplog):
    g, c = balanced_chain(4), cluster(4)
    sched = build_schedule("gpipe", g, [0, 1, 2, 3], 4, microbatches=4, warn=False)
    sim = Simulator(g, c, dispatch_overhead_s=0.0)
    assert sim.run([0, 1, 2, 3], schedule=sched).step_time_s == pytest.approx(7 * 0.75)
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        for _ in range(3):
            sim.run([0, 1, 2, 3], schedule="1f1b", microbatches=2)
    assert sum("pipeline stages" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------- bounds
def test_lower_bound_and_efficiency_hand_values():
    g, c = chain3(), cluster(2)
    # chain: critical path 18; work 18 over 2 equal devices = 9
    assert critical_path_s(g, c) == pytest.approx(18.0)
    assert work_bound_s(g, c) == pytest.approx(9.0)
    assert lower_bound_s(g, c) == pytest.approx(18.0)
    # diamond on 2 devices: critical path 12 (s, l, t) vs work 16 / 2 = 8; the 2-device run is optimal
    r = run(diamond(), cluster(2), [0, 0, 1, 0])
    assert efficiency(r, diamond(), cluster(2), dispatch_overhead_s=0.0) == pytest.approx(1.0)
    # speeds 1 and 3: total work / total speed = 18 / 4
    assert work_bound_s(g, cluster(2, speeds=[1.0, 3.0])) == pytest.approx(4.5)
    # M micro-batches: one micro-batch's chain must still run: 18 / 4 with M = 4 and no overhead
    assert critical_path_s(g, c, microbatches=4, dispatch_overhead_s=0.0) == pytest.approx(4.5)


def test_colocation_bound_hand_values():
    # x -> p1, p2 -> y; p1 and p2 share a module (one colocation group) that does 8 of the 12 units of work
    ops = [dict(name="x", fwd_s=1.0, bwd_s=1.0), dict(name="p1", fwd_s=2.0, bwd_s=2.0, colocation=9),
           dict(name="p2", fwd_s=2.0, bwd_s=2.0, colocation=9), dict(name="y", fwd_s=1.0, bwd_s=1.0)]
    g = OpGraph.build(name="shared", ops=ops, edges=[("x", "p1"), ("x", "p2"), ("p1", "y"), ("p2", "y")])
    c = cluster(2)
    # critical path x, p1, y forward and back: 8; work 12 / 2 = 6; the group: x's forward before it (1), its own
    # 8, x's backward after it (1) = 10
    assert critical_path_s(g, c) == pytest.approx(8.0)
    assert colocation_bound_s(g, c) == pytest.approx(10.0)
    assert lower_bound_s(g, c) == pytest.approx(10.0)
    assert run(g, c, [0, 1, 1, 0]).step_time_s >= 10.0
