"""The lower bounds with updates and memory (placer.costmodel.bounds): hand values, and never above a simulated
step -- random DAGs under every schedule, and the shipped graphs' baseline and random plans, memory-tight
clusters included."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphs.data import load_benchmark_graph
from graphs.ir import OpGraph
from placer import baselines
from placer.core.cluster import get_cluster
from placer.costmodel.bounds import (bound_terms_s, colocation_bound_s, critical_path_s, fill_drain_bound_s,
                                     lower_bound_s, memory_fits, memory_time_bound_s, work_bound_s)
from placer.costmodel.plans import allowed_microbatches, best_plan, plan_bound, plan_lower_bound_s
from placer.costmodel.schedules import SCHEDULES
from placer.costmodel.sim import Simulator, simulate
from placer.costmodel.tight import memory_tight
from tests.test_sim import chain3, cluster
from tests.graph_strategies import dag_edges


def _loss_chain(params: int = 0, stash: int = 0, layers: int = 1) -> OpGraph:
    """x -> w1 -> ... -> loss: one sink; each ``w`` holds ``params`` parameter bytes and stashes ``stash`` bytes
    per step."""
    ws = [f"w{k + 1}" for k in range(layers)]
    ops = [dict(name="x", fwd_s=1.0, bwd_s=0.0, kind="input")]
    ops += [dict(name=w, fwd_s=2.0, bwd_s=4.0, param_bytes=params, stash_bytes=stash) for w in ws]
    ops += [dict(name="loss", fwd_s=1.0, bwd_s=1.0)]
    names = ["x", *ws, "loss"]
    return OpGraph.build(name="loss_chain", ops=ops, edges=[(u, v, 8) for u, v in zip(names, names[1:])])


def test_update_counts_with_an_optimizer():
    # one device: forwards, backwards (x has no gradient), then Adam's update of w's parameters (7 bytes touched
    # per parameter byte at the CPU's 10 GB/s, dispatch 0): the bound with the optimizer is the step exactly
    g, c = _loss_chain(params=10**9), cluster(1, memory_bytes=10**11)
    r = simulate(g, c, [0, 0, 0], dispatch_overhead_s=0.0)
    upd = 7 * 10**9 / 10e9
    without = lower_bound_s(g, c, dispatch_overhead_s=0.0)
    assert r.step_time_s == pytest.approx(without + upd)
    assert lower_bound_s(g, c, dispatch_overhead_s=0.0, optimizer="adam") == pytest.approx(r.step_time_s)
    assert lower_bound_s(g, c, dispatch_overhead_s=0.0, optimizer="sgd") == pytest.approx(without + 3 / 7 * upd)


def test_memory_excludes_micro_batch_counts_that_cannot_fit():
    # three layers of 100 B parameters (x4 with Adam's states) and 800 B stash each, two devices of 1000 B:
    # M = 1: one layer alone needs 400 + 800; M = 2: a layer fits (400 + 400) but the three need 2400 > 2000;
    # M = 4: 3 x (400 + 200) = 1800, the argument excludes nothing
    g = _loss_chain(params=100, stash=800, layers=3)
    slow = {"dispatch_overhead_s": {"cpu": 0.5}}  # each micro-batch pays 0.5 s per op: more M, a longer step
    c = dataclasses.replace(cluster(2, memory_bytes=1000), meta=slow)
    # (plans without activation recomputation: recompute=False; with it only the one-layer argument holds)
    no = dict(recompute=False)
    assert [memory_fits(g, c, microbatches=m, **no) for m in (1, 2, 4)] == [False, False, True]
    assert [memory_fits(g, c, microbatches=m) for m in (1, 2, 4)] == [False, True, True]
    for dev in itertools.product(range(2), repeat=g.n):  # every plan with M = 1 or 2 is indeed out of memory
        for name, m in itertools.product(SCHEDULES, (1, 2)):
            assert simulate(g, c, list(dev), schedule=name, microbatches=m).oom
    bound = plan_lower_bound_s(g, c, [1, 2, 4], **no)
    assert bound == pytest.approx(lower_bound_s(g, c, microbatches=4, optimizer="adam"))
    assert bound > plan_lower_bound_s(g, dataclasses.replace(cluster(2, memory_bytes=10**6), meta=slow), [1, 2, 4],
                                      **no)
    assert plan_lower_bound_s(g, c, [1, 2], **no) == float("inf")
    assert plan_lower_bound_s(g, c, [1]) == float("inf")
    # where the bound comes from: M = 4, the largest of its terms there; nothing when no count fits
    terms = bound_terms_s(g, c, microbatches=4, optimizer="adam", **no)
    assert plan_bound(g, c, [1, 2, 4], **no) == (bound, 4, max(terms, key=terms.get))
    assert plan_bound(g, c, [1, 2], **no) == (float("inf"), None, "")
    # without Adam's two state copies (SGD) M = 2 is not excluded: 3 x (200 + 400) = 1800
    assert memory_fits(g, c, microbatches=2, optimizer="sgd", **no)


def test_colocation_terms_through_the_loss_round_trip():
    # chain a -> b -> c, M = 2 halves every op (no overhead): for a, the first backward can only start after its
    # micro-batch's round trip a, b, c, c, b (0.5+1+1.5+3+2 = 8), then both of a's backwards (2 x 1): 10, above
    # a's own work (3) and the critical path 9
    g, c = chain3(), cluster(3)
    assert colocation_bound_s(g, c, microbatches=2, dispatch_overhead_s=0.0) == pytest.approx(
        max(10.0, 1.5 + 9.0 + 3.0))  # c: head 1.5, its work 2 x 4.5, then b's and a's backwards 3


def test_fill_and_drain_hand_values_and_where_it_binds():
    # stem s -> six parallel ops -> t on six devices: work 14; the six devices' first ops have heads 0, 1 x 5 and
    # last backwards tails 0, 1 x 5: (14 + 5 + 5) / 6 = 4 (fewer devices: more per device)
    ops = [dict(name="s", fwd_s=1.0, bwd_s=1.0)] + [dict(name=f"p{k}", fwd_s=1.0, bwd_s=1.0) for k in range(6)]
    ops += [dict(name="t", fwd_s=0.0, bwd_s=0.0)]
    g = OpGraph.build(name="fan", ops=ops, edges=[("s", f"p{k}") for k in range(6)] + [(f"p{k}", "t")
                                                                                    for k in range(6)])
    assert fill_drain_bound_s(g, cluster(6), dispatch_overhead_s=0.0) == pytest.approx(4.0)
    assert fill_drain_bound_s(g, cluster(2), dispatch_overhead_s=0.0) == pytest.approx(8.0)  # (14 + 1 + 1) / 2
    # eight devices: using all eight would add t (head 2, tail 2); the best count is seven, (14 + 6 + 6) / 7
    assert fill_drain_bound_s(g, cluster(8), dispatch_overhead_s=0.0) == pytest.approx(26.0 / 7.0)
    # Inception-V3 on eight H100s with M = 8: the devices that hold late ops idle while the stem runs, which
    # neither the spread work nor one chain nor one op sees
    graph, c = load_benchmark_graph("inception_v3-paper"), get_cluster("h100x8")
    fill = fill_drain_bound_s(graph, c, microbatches=8)
    assert fill > 1.01 * max(work_bound_s(graph, c, microbatches=8), critical_path_s(graph, c, microbatches=8),
                             colocation_bound_s(graph, c, microbatches=8))
    assert lower_bound_s(graph, c, microbatches=8) == fill


def test_memory_time_hand_value_where_memory_serialises_the_micro_batches():
    # six layers (800 B stash each, 1 B of parameters: x4 with Adam) on six devices of 210 B, M = 4: one micro-batch
    # of stash fits (24 + 6 x 200 <= 1260) but hardly two, so the plans that fit run the micro-batches nearly one
    # after another. Per micro-batch w runs 0.5 + 1, the loss 0.25 + 0.25; w_k's stash is held for its forward and
    # the chain to its backward: 1, 2.5, 4, 5.5, 7, 8.5 (w6 first), 28.5 x 800 B over 1260 - 24 B free
    # (for plans that do not recompute activations; with recomputation allowed, each op's stash may instead
    # cost its forward again: the bound is then the least over that trade, between the work bound and this)
    g, c = _loss_chain(params=1, stash=800, layers=6), cluster(6, memory_bytes=210)
    kw = dict(microbatches=4, dispatch_overhead_s=0.0, optimizer="adam", recompute=False)
    assert memory_fits(g, c, microbatches=4)
    assert memory_time_bound_s(g, c, **kw) == pytest.approx(28.5 * 800 / 1236)
    traded = memory_time_bound_s(g, c, **{**kw, "recompute": True})
    assert work_bound_s(g, c, microbatches=4, dispatch_overhead_s=0.0, optimizer="adam") < traded
    assert traded < memory_time_bound_s(g, c, **kw)
    terms = bound_terms_s(g, c, **kw)
    assert max(terms, key=terms.get) == "memory x time" and lower_bound_s(g, c, **kw) == terms["memory x time"]
    rng = np.random.default_rng(0)
    steps = [simulate(g, c, rng.integers(0, 6, g.n), schedule=name, microbatches=4, dispatch_overhead_s=0.0,
                      optimizer="adam") for _ in range(150) for name in SCHEDULES]
    steps.append(simulate(g, c, [0, 0, 1, 2, 3, 4, 5, 5], microbatches=4, dispatch_overhead_s=0.0, optimizer="adam"))
    assert steps[-1].ok and steps[-1].step_time_s == pytest.approx(39.0)  # 4 x (the chain 9.75), one at a time
    assert all(r.step_time_s >= terms["memory x time"] for r in steps if r.ok)
    assert lower_bound_s(g, c, microbatches=4, dispatch_overhead_s=0.0) < terms["memory x time"]  # needs adam's


@st.composite
def tight_dag(draw):
    """A random DAG with one sink (the loss), parameters, stash and temporaries, on 1-3 devices of small memory."""
    n = draw(st.integers(2, 8))
    edges = {(i, n - 1) for i in range(n - 1)}  # every op feeds the loss: one sink
    edges |= set(draw(dag_edges(n - 1, 10)))
    t = st.floats(0.0, 3.0, allow_nan=False)
    coloc = draw(st.lists(st.integers(0, n - 1), min_size=n, max_size=n))
    ops = [dict(name=f"o{i}", fwd_s=draw(t), bwd_s=draw(t), stash_bytes=draw(st.integers(0, 400)),
                temp_bytes=draw(st.integers(0, 100)), param_bytes=draw(st.integers(0, 100)), colocation=coloc[i],
                kind="input" if i == 0 and draw(st.booleans()) else "op") for i in range(n)]
    g = OpGraph.build(name="tight", ops=ops, edges=[(f"o{a}", f"o{b}", draw(st.integers(0, 50)))
                                                   for a, b in sorted(edges)])
    d = draw(st.integers(1, 3))
    c = cluster(d, memory_bytes=draw(st.integers(300, 3000)), latency_s=draw(st.sampled_from([0.0, 0.1])),
                speeds=draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=d, max_size=d)))
    dev = np.array(draw(st.lists(st.integers(0, d - 1), min_size=n, max_size=n)))[coloc]
    return g, c, dev


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tight_dag(), name=st.sampled_from(sorted(SCHEDULES)), m=st.integers(1, 4),
       overhead=st.sampled_from([0.0, 0.05]), redo=st.lists(st.integers(0, 2), max_size=3))
def test_never_above_a_simulated_step_and_memory_is_a_necessary_condition(case, name, m, overhead, redo):
    g, c, dev = case
    redo = sorted({d for d in redo if d < c.num_devices})  # the devices that recompute activations
    r = simulate(g, c, dev, schedule=name, microbatches=m, dispatch_overhead_s=overhead, optimizer="adam",
                 recompute=redo)
    if not memory_fits(g, c, microbatches=m, optimizer="adam", recompute=bool(redo)):
        assert r.oom
    if r.ok:
        lb = lower_bound_s(g, c, microbatches=m, dispatch_overhead_s=overhead, optimizer="adam")
        assert r.step_time_s >= lb * (1 - 1e-9) - 1e-12


@pytest.mark.parametrize("graph_name", ["gpt-paper", "inception_v3-paper"])
@pytest.mark.parametrize("cluster_name", ["h100x8", "mixed", "memory-tight"])
def test_shipped_graphs_baseline_and_random_plans_respect_the_plan_bound(graph_name, cluster_name):
    graph = load_benchmark_graph(graph_name)
    c = get_cluster(cluster_name) if cluster_name != "memory-tight" else memory_tight(get_cluster("h100x8"), graph)
    sim = Simulator(graph, c)
    bound = plan_lower_bound_s(graph, c)
    assert 0 < bound < float("inf")
    rng = np.random.default_rng(0)
    places = [baselines.place(m, graph, c, seed=0).device_of_op for m in ("even-layers", "pipedream-dp", "heft")]
    places += [rng.integers(0, c.num_devices, graph.n) for _ in range(2)]
    fixed = sim.graph.colocation
    ok = 0
    for dev in places:
        dev = np.asarray(dev)[np.unique(fixed, return_index=True)[1][np.unique(fixed, return_inverse=True)[1]]]
        _, res = best_plan(sim, dev)
        if res.ok:
            ok += 1
            assert res.step_time_s >= bound * (1 - 1e-9)
            assert memory_fits(graph, c, microbatches=res.microbatches)
    assert ok >= 1
    if cluster_name == "memory-tight" and graph_name == "inception_v3-paper":
        # M = 1, 2, 4 cannot fit any plan without recomputation there; with it, only M = 1 is still out (one op's
        # stash of the whole batch)
        assert [m for m in allowed_microbatches(graph)
                if not memory_fits(graph, c, microbatches=m, recompute=False)] == [1, 2, 4]
        assert [m for m in allowed_microbatches(graph) if not memory_fits(graph, c, microbatches=m)] == [1]
