"""The simulator against properties (never below the lower bound, every task once, deterministic), an
independent time-ordered reference implementation, and the machine overheads declared in ``cluster.meta``."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphs.ir import OpGraph
from placer.core.cluster import Cluster, Device
from placer.core.placement import Placement
from placer.costmodel.bounds import colocation_bound_s, efficiency, lower_bound_s
from placer.costmodel.schedules import SCHEDULES
from placer.costmodel.sim import Simulator, simulate
from tests.test_sim import GiB, chain3, cluster, run
from tests.graph_strategies import dag_edges

# ---------------------------------------------------------------------- properties
@st.composite
def placed_dag(draw):
    n = draw(st.integers(1, 10))
    edges = draw(dag_edges(n, 16))
    d = draw(st.integers(1, 4))
    t = st.floats(0.0, 5.0, allow_nan=False)
    # a few ops share a colocation group (the placement below keeps each group on one device)
    coloc = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
    ops = [dict(name=f"o{i}", fwd_s=draw(t), bwd_s=draw(t), stash_bytes=draw(st.integers(0, 100)),
                param_bytes=draw(st.integers(0, 100)), colocation=coloc[i]) for i in range(n)]
    g = OpGraph.build(name="rand", ops=ops, edges=[(f"o{a}", f"o{b}", draw(st.integers(0, 5000))) for a, b in edges])
    speeds = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=d, max_size=d))
    c = cluster(d, latency_s=draw(st.sampled_from([0.0, 0.1])), bandwidth_Bps=draw(st.sampled_from([1e3, 1e30])),
                speeds=speeds)
    dev_of_group = draw(st.lists(st.integers(0, d - 1), min_size=n, max_size=n))
    return g, c, np.array(dev_of_group)[coloc]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=placed_dag(), name=st.sampled_from(sorted(SCHEDULES)), m=st.integers(1, 4),
       overhead=st.sampled_from([0.0, 0.05]))
def test_never_below_lower_bound_and_every_task_runs_once(case, name, m, overhead):
    g, c, dev = case
    r = simulate(g, c, dev, schedule=name, microbatches=m, timeline=True, dispatch_overhead_s=overhead)
    assert r.ok
    lb = lower_bound_s(g, c, microbatches=m, dispatch_overhead_s=overhead)
    assert lb >= colocation_bound_s(g, c, microbatches=m, dispatch_overhead_s=overhead)
    assert r.step_time_s >= lb * (1 - 1e-9) - 1e-12
    assert r.step_time_s >= r.critical_path_s * (1 - 1e-9) - 1e-12
    assert 0 <= efficiency(r, g, c, dispatch_overhead_s=overhead) <= 1 + 1e-9
    # every op once per micro-batch per phase, on its own device; device tracks never overlap
    work = [e for e in r.timeline if e.phase in ("fwd", "bwd")]
    assert sorted((g.index(e.op), e.microbatch, e.phase) for e in work) == sorted(
        (o, mb, p) for o in range(g.n) for mb in range(m) for p in ("bwd", "fwd"))
    assert all(e.track == c.devices[dev[g.index(e.op)]].name for e in work)
    for name_d in c.device_names:
        spans = sorted((e.start_s, e.end_s) for e in r.timeline if e.track == name_d)
        assert all(a[1] <= b[0] + 1e-9 for a, b in zip(spans, spans[1:]))
    # forward of an op starts after its inputs' forwards ended (same micro-batch)
    end = {(e.op, e.microbatch, e.phase): e.end_s for e in work}
    start = {(e.op, e.microbatch, e.phase): e.start_s for e in work}
    for a, b in g.edge_index.T:
        for mb in range(m):
            assert start[(g.op_names[b], mb, "fwd")] >= end[(g.op_names[a], mb, "fwd")] - 1e-9
            assert start[(g.op_names[a], mb, "bwd")] >= end[(g.op_names[b], mb, "bwd")] - 1e-9
    # busy time = all compute: M micro-batches of every op plus the updates
    assert r.busy_s.sum() == pytest.approx(sum(e.end_s - e.start_s for e in r.timeline if e.phase != "send"))


def test_simulator_is_deterministic_and_fast_path_matches_wrapper():
    rng = np.random.default_rng(0)
    ops = [dict(name=f"o{i}", fwd_s=float(rng.uniform(0, 1)), bwd_s=float(rng.uniform(0, 2)), out_bytes=100)
           for i in range(40)]
    edges = sorted({(int(a), int(b)) for a, b in rng.integers(0, 40, (80, 2)) if a < b})
    g = OpGraph.build(name="r40", ops=ops, edges=[(f"o{a}", f"o{b}") for a, b in edges])
    c = cluster(3, latency_s=0.01, bandwidth_Bps=1e4)
    sim = Simulator(g, c)
    for _ in range(5):
        p = rng.integers(0, 3, g.n)
        for name in SCHEDULES:
            a = sim.run(p, schedule=name, microbatches=3)
            b = simulate(g, c, Placement(p), schedule=name, microbatches=3)
            assert a.step_time_s == b.step_time_s
            assert np.array_equal(a.peak_memory_bytes, b.peak_memory_bytes)


# ---------------------------------------------------------------------- an independent, time-ordered reference
def reference_step(g: OpGraph, c: Cluster, dev: np.ndarray, sched, overhead_s: float) -> tuple[float, dict]:
    """A plain event-queue simulation of the same model, advancing time event by event (pure Python).

    The kernel processes tasks in dependency order rather than time order; this checks that it gets the same
    times (links are FIFO in the sender's task order, so it should)."""
    import heapq

    m_count = sched.microbatches
    speed = np.array([d.speed for d in c.devices])
    cost = g.cost("cpu")

    def per_mb(t, d):
        o = min(t / speed[d], overhead_s)
        return t / speed[d] if m_count == 1 else o + (t / speed[d] - o) / m_count

    preds, succs = g.predecessors(), g.successors()
    # one transfer per (producer, remote device), bytes = largest edge; gradient after the last local reader
    xbytes: dict[tuple[int, int], int] = {}
    readers: dict[tuple[int, int], int] = {}
    for (a, b), nb in zip(g.edge_index.T.tolist(), g.edge_bytes.tolist()):
        if dev[a] != dev[b]:
            key = (a, int(dev[b]))
            xbytes[key] = max(xbytes.get(key, 0), nb)
            readers[key] = readers.get(key, 0) + 1
    pending = {(k, mb): n for k, n in readers.items() for mb in range(m_count)}

    def xfer_s(src, dst, nb):
        return 0.0 if nb <= 0 else c.latency_s[src, dst] + nb / m_count / c.bandwidth_Bps[src, dst]

    have: dict[tuple, float] = {}  # availability keys -> time
    tasks = [sched.tasks(d) for d in range(c.num_devices)]
    ptr = [0] * c.num_devices
    running: list = [None] * c.num_devices
    link_free = np.zeros((c.num_devices, c.num_devices))
    events: list = []
    seq = 0
    now = 0.0
    starts: dict = {}

    def ready(t, d):
        if t.phase == "fwd":
            return all(("F", int(p), t.microbatch, d) in have for p in preds[t.op])
        if t.phase == "bwd":
            return ("F", t.op, t.microbatch, d) in have and all(
                ("B", int(s), t.microbatch) in have if dev[s] == d else ("G", t.op, int(dev[s]), t.microbatch) in have
                for s in succs[t.op])
        return True

    while True:
        progress = True
        while progress:
            progress = False
            for d in range(c.num_devices):
                if running[d] is None and ptr[d] < len(tasks[d]) and ready(tasks[d][ptr[d]], d):
                    t = tasks[d][ptr[d]]
                    dur = (per_mb(cost.fwd_s[t.op], d) if t.phase == "fwd" else
                           per_mb(cost.bwd_s[t.op], d) if t.phase == "bwd" else 0.0)
                    running[d] = t
                    starts[(d, t)] = now
                    heapq.heappush(events, (now + dur, seq, "done", d))
                    seq += 1
                    progress = True
        if not events:
            break
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            have[payload] = now
            continue
        d = payload
        t = running[d]
        running[d] = None
        ptr[d] += 1
        if t.phase == "fwd":
            have[("F", t.op, t.microbatch, d)] = now
            for q in sorted({int(dev[s]) for s in succs[t.op]} - {d}):
                xs = max(link_free[d, q], now)
                link_free[d, q] = xs + xfer_s(d, q, xbytes[(t.op, q)])
                heapq.heappush(events, (link_free[d, q], seq, "arrive", ("F", t.op, t.microbatch, q)))
                seq += 1
        elif t.phase == "bwd":
            have[("B", t.op, t.microbatch)] = now
            for p in preds[t.op]:
                p = int(p)
                if dev[p] == d:
                    continue
                pending[((p, d), t.microbatch)] -= 1
                if pending[((p, d), t.microbatch)] == 0:
                    q = int(dev[p])
                    xs = max(link_free[d, q], now)
                    link_free[d, q] = xs + xfer_s(d, q, xbytes[(p, d)])
                    heapq.heappush(events, (link_free[d, q], seq, "arrive", ("G", p, d, t.microbatch)))
                    seq += 1
    assert all(ptr[d] == len(tasks[d]) for d in range(c.num_devices)), "reference deadlocked"
    return now, starts


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=placed_dag(), name=st.sampled_from(sorted(SCHEDULES)), m=st.integers(1, 3),
       overhead=st.sampled_from([0.0, 0.05]))
def test_kernel_matches_time_ordered_reference(case, name, m, overhead):
    g, c, dev = case
    g = g.replace(param_bytes=np.zeros(g.n, dtype=np.int64))  # the reference has no update cost
    sim = Simulator(g, c, dispatch_overhead_s=overhead)
    sched = sim.schedule(dev, name, microbatches=m)
    r = sim.run(dev, schedule=sched, timeline=True)
    step, starts = reference_step(g, c, dev, sched, overhead)
    assert r.step_time_s == pytest.approx(step, rel=1e-9, abs=1e-12)
    got = {(e.track, e.op, e.microbatch, e.phase): e.start_s for e in r.timeline if e.phase in ("fwd", "bwd")}
    for (d, t), s0 in starts.items():
        if t.phase != "update":
            assert got[(c.devices[d].name, g.op_names[t.op], t.microbatch, t.phase)] == pytest.approx(s0, abs=1e-9)


# ---------------------------------------------------------------------- machine overheads (cluster.meta)
def overhead_cluster(d: int, **meta: float) -> Cluster:
    devs = [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=GiB) for i in range(d)]
    return Cluster.uniform("over", devs, bandwidth_Bps=1e6, latency_s=0.5, meta=meta)


def test_send_recv_and_step_overheads_on_a_chain():
    # a, b on dev0, c on dev1; 1 MB edges: a transfer is 0.5 + 1 = 1.5 s. Overheads: both devices start at 1.0
    # (multi-device step); b posts its message (+0.25) -> ends 4.25, arrives 5.75; dev1 waited, so it pays a
    # wake-up (+0.125): c fwd 5.875-8.875, c bwd + grad send 8.875-15.125, arrives 16.625; dev0 waited: +0.125,
    # b bwd 16.75-20.75, a bwd -22.75. Without overheads the same step is 21 s.
    g = chain3(edge_bytes=1_000_000)
    c = overhead_cluster(2, send_overhead_s=0.25, recv_overhead_s={"cpu": 0.125}, step_overhead_s=1.0)
    r = run(g, c, [0, 0, 1], timeline=True)
    assert r.step_time_s == pytest.approx(22.75)
    assert r.busy_s.tolist() == pytest.approx([10.375, 10.375])
    assert r.critical_path_s >= 21.0
    fwd_c = [e for e in r.timeline if e.op == "c" and e.phase == "fwd"][0]
    assert (fwd_c.start_s, fwd_c.end_s) == pytest.approx((5.75, 8.875))
    # one device: no message, no start-up cost
    assert run(g, c, [0, 0, 0]).step_time_s == pytest.approx(18.0)
    # a cluster that declares nothing keeps the plain model
    assert run(g, overhead_cluster(2), [0, 0, 1]).step_time_s == pytest.approx(21.0)


def test_wake_up_cost_only_when_the_receiver_waited():
    # a (dev0) -> c (dev1) <- b (dev1, 5 s): a's message (send 0.25, latency 0.5) is there at 1.75, long before
    # dev1 finishes b at 5: c runs 5-6 with no wake-up. Backward: c 6-7 then its gradient to a (+0.25 = 7.25),
    # arriving 7.75; b 7.25-8.25; dev0 idle since 1.25, so a pays the wake-up: 7.75 + 0.125 + 1 = 8.875.
    ops = [dict(name="a", fwd_s=1.0, bwd_s=1.0), dict(name="b", fwd_s=5.0, bwd_s=1.0),
           dict(name="c", fwd_s=1.0, bwd_s=1.0)]
    g = OpGraph.build(name="fork", ops=ops, edges=[("a", "c", 1), ("b", "c", 1)])
    c = overhead_cluster(2, send_overhead_s=0.25, recv_overhead_s=0.125)
    r = run(g, c, [0, 1, 1], timeline=True)
    fwd_c = [e for e in r.timeline if e.op == "c" and e.phase == "fwd"][0]
    assert (fwd_c.start_s, fwd_c.end_s) == pytest.approx((5.0, 6.0))
    assert r.step_time_s == pytest.approx(8.875)
    assert r.busy_s.tolist() == pytest.approx([2.25 + 0.125, 8.25])


def test_no_gradient_message_for_values_without_parameters_upstream():
    # x (an input: no parameter upstream) -> w (has parameters) on the other device: the activation moves,
    # no gradient comes back (autograd makes none), so no bytes back and no send cost after w's backward
    ops = [dict(name="x", fwd_s=1.0, bwd_s=0.0), dict(name="w", fwd_s=1.0, bwd_s=1.0, param_bytes=8)]
    g = OpGraph.build(name="inp", ops=ops, edges=[("x", "w", 1_000_000)])
    c = overhead_cluster(2, send_overhead_s=0.25)
    sim = Simulator(g, c, dispatch_overhead_s=0.0, memory_bandwidth_Bps=1e30)
    r = sim.run(np.array([0, 1]), optimizer="sgd")
    assert r.bytes_moved.tolist() == [[0, 1_000_000], [0, 0]]
    # x 0-1 (+0.25 send) -> arrives 2.75; w fwd 2.75-3.75, bwd 3.75-4.75, no send
    assert r.step_time_s == pytest.approx(4.75)


def test_bad_overhead_meta_is_one_line():
    with pytest.raises(ValueError, match="send_overhead_s"):
        Simulator(chain3(), overhead_cluster(2, send_overhead_s=-1.0))
