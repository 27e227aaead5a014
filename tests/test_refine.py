"""Plan refinement: local search over placements scored by their best plan."""

from __future__ import annotations

import numpy as np

from placer.costmodel.plans import best_plan
from placer.costmodel.refine import (INFEASIBLE_S, balanced_runs, default_starts, group_start, isolated_start,
                                      refine)
from placer.costmodel.sim import Simulator
from tests.policy_helpers import chain, cpus

MiB = 1 << 20


def _sim(memory_bytes: int = 1 << 40) -> Simulator:
    # an uneven chain: the compute-balanced cut is not at op 4, and a bad split is easy to improve
    fwd = [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 3e-3, 3e-3]
    return Simulator(chain(8, fwd_s=fwd, out_bytes=MiB, stash_bytes=32 * MiB), cpus(2, memory_bytes=memory_bytes))


def test_refine_improves_a_bad_split_and_never_returns_worse_than_its_starts():
    sim = _sim()
    bad = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    start = best_plan(sim, bad)[1].step_time_s
    got = refine(sim, {"bad": bad}, default=False, budget_s=30.0, max_evals=300)
    assert got.result.ok and got.result.step_time_s < 0.7 * start
    assert list(got.plan.device_of_op) == [0, 0, 0, 0, 0, 0, 1, 1]  # 6 ms | 6 ms of forward
    assert got.start == "bad" and got.start_step_s == start and got.evaluations <= 301
    # the plan it returns is the plan best_plan gives its placement
    again = best_plan(sim, got.plan.device_of_op)[1]
    assert again.step_time_s == got.result.step_time_s
    # with the default starts too, it is at least as good as every start
    full = refine(sim, {"bad": bad}, budget_s=30.0, max_evals=300)
    starts = [best_plan(sim, d)[1].step_time_s for d in default_starts(sim).values()]
    assert full.result.step_time_s <= min(starts + [start])


def test_refine_is_deterministic_for_an_evaluation_budget():
    sim = _sim()
    a = refine(sim, {"rr": np.arange(8) % 2}, budget_s=60.0, max_evals=120, seed=3)
    b = refine(sim, {"rr": np.arange(8) % 2}, budget_s=60.0, max_evals=120, seed=3)
    assert np.array_equal(a.plan.device_of_op, b.plan.device_of_op) and a.plan.label == b.plan.label


def test_refine_walks_from_an_oom_start_to_a_plan_that_fits():
    sim = _sim(memory_bytes=200 * MiB)  # 256 MiB of stash: one device cannot hold it, two can
    one = np.zeros(8, dtype=np.int64)
    assert best_plan(sim, one)[1].oom or best_plan(sim, one)[0].microbatches > 1
    got = refine(sim, {"one": one}, default=False, budget_s=30.0, max_evals=200)
    assert got.result.ok and got.result.step_time_s < INFEASIBLE_S


def test_balanced_runs_and_the_interleaved_start():
    sim = _sim()
    assert list(balanced_runs(sim, [0, 1])) == [0, 0, 0, 0, 0, 0, 1, 1]  # 6 ms | 6 ms of forward
    starts = default_starts(sim)
    assert set(starts) == {"balanced-1", "balanced-2", "interleaved-2x2", "interleaved-2x3", "interleaved-2x4",
                           "memory-balanced-2"}
    assert list(starts["interleaved-2x2"]) == [0, 0, 0, 1, 1, 1, 0, 1]  # 4 chunks of 3 ms, chunk j on device j mod 2
    # a device twice as fast gets twice the share: 9 of the 12 units (4.5 ms there, 3 ms on the slow one)
    fast = Simulator(sim.graph, cpus(2, speeds=[2.0, 1.0]))
    assert list(balanced_runs(fast, [0, 1])) == [0, 0, 0, 0, 0, 0, 0, 1]
    assert list(balanced_runs(fast, [1, 0])) == [1, 1, 1, 1, 0, 0, 0, 0]  # slow first: 4 units | 8: 4 ms each


def test_interleaved_starts_over_the_fastest_devices_leave_the_slow_ones_out():
    # two fast and two slow devices: the interleaved starts come over the 2 fastest and over all 4
    sim = Simulator(_sim().graph, cpus(4, speeds=[1.0, 4.0, 1.0, 4.0]))
    starts = default_starts(sim)
    assert {"balanced-1", "balanced-2", "balanced-4", "interleaved-2x2", "interleaved-4x2"} <= set(starts)
    assert set(starts["interleaved-2x3"].tolist()) == {1, 3}  # the fast pair alone, six chunks alternating
    assert list(starts["interleaved-2x2"]) == [1, 1, 1, 3, 3, 3, 1, 3]
    assert set(starts["interleaved-4x3"].tolist()) == {0, 1, 3}  # over all four, the slow ones get small chunks


def test_starts_that_split_a_colocation_group_are_repaired():
    from graphs.ir import OpGraph

    ops = [dict(name=f"op{i}", fwd_s=1e-3, out_bytes=MiB, colocation=0 if i in (0, 5) else i) for i in range(6)]
    g = OpGraph.build(name="shared", ops=ops, edges=[(f"op{i}", f"op{i + 1}") for i in range(5)])
    sim = Simulator(g, cpus(2))
    got = refine(sim, {"split": np.array([0, 0, 0, 1, 1, 1])}, budget_s=30.0, max_evals=50)
    dev = got.plan.device_of_op
    assert got.result.ok and dev[0] == dev[5]


def _two_recurrent_layers(tail: list[dict], tail_edges: list[tuple[str, str]]) -> Simulator:
    """Two recurrent layers unrolled over 4 steps (a0 b0 a1 b1 ..., each layer one colocation group, 3 ms of work
    per step), then ``tail`` after b3, on two equal CPUs."""
    from graphs.ir import OpGraph

    ops, edges = [], []
    for t in range(4):
        ops += [dict(name=f"a{t}", fwd_s=1e-3, bwd_s=2e-3, out_bytes=MiB, colocation=100),
                dict(name=f"b{t}", fwd_s=1e-3, bwd_s=2e-3, out_bytes=MiB, colocation=200)]
        edges += [(f"a{t}", f"b{t}")] + ([(f"a{t - 1}", f"a{t}"), (f"b{t - 1}", f"b{t}")] if t else [])
    return Simulator(OpGraph.build(name="rnn2", ops=ops + tail, edges=edges + tail_edges), cpus(2))


def test_recurring_shared_layers_get_a_device_each():
    # in the traced order a0 b0 a1 b1 ... a contiguous split puts a0 and b0 on one device and the groups follow
    # their first op, so it collapses onto one device; the group start gives each layer a device (the loss follows
    # its producer), a wavefront pipeline (on this toy the finest interleaved start happens to be the same
    # placement; on nmt-paper it is not, see benchmarks/bench_plan.py)
    sim = _two_recurrent_layers([dict(name="loss", fwd_s=1e-4, bwd_s=1e-4)], [("b3", "loss")])
    assert list(group_start(sim)) == [0, 1] * 4 + [1]
    assert "groups-2" in default_starts(sim)
    one = best_plan(sim, np.zeros(sim.graph.n, dtype=np.int64))[1].step_time_s
    got = refine(sim, budget_s=30.0, max_evals=100)
    assert got.start == "groups-2" and got.result.step_time_s < 0.8 * one
    assert group_start(_sim()) is None  # no group of several ops: no such start


def test_the_group_start_keeps_ops_with_their_producer_only_up_to_a_fair_share():
    # the two layers (12 ms of work each), then three 3 ms ops in a chain after b3: 33 ms over two equal devices is
    # 16.5 ms each. h0 follows its producer (b's device, 15 ms); h1 would take it to 18 ms, so it goes to a's
    # device, which ends at 15 ms; h2 follows h1 there (18 ms on either device, so no move)
    sim = _two_recurrent_layers([dict(name=f"h{j}", fwd_s=1e-3, bwd_s=2e-3, out_bytes=MiB) for j in range(3)],
                                [("b3", "h0"), ("h0", "h1"), ("h1", "h2")])
    assert list(group_start(sim)) == [0, 1] * 4 + [1, 0, 0]


def test_the_group_start_leaves_a_device_whose_memory_is_full():
    # two parameter-heavy ops after b3 (no work, so the fair share keeps both with their producer): b's device
    # holds one of them (its parameters x 4 for Adam's states) but not two, so the second goes to a's device, and
    # the start fits where the memory-blind one (both on b's device) is out of memory
    heavy = [dict(name=f"h{j}", fwd_s=0.0, bwd_s=0.0, out_bytes=MiB, param_bytes=32 * MiB) for j in range(2)]
    roomy = _two_recurrent_layers(heavy, [("b3", "h0"), ("h0", "h1")])
    assert list(group_start(roomy)) == [0, 1] * 4 + [1, 1]
    tight = Simulator(roomy.graph, cpus(2, memory_bytes=160 * MiB))  # the layers hold nothing; 128 MiB per op
    dev = group_start(tight)
    assert list(dev) == [0, 1] * 4 + [1, 0]
    assert best_plan(tight, dev)[1].ok
    assert best_plan(tight, [0, 1] * 4 + [1, 1])[1].oom


def test_the_isolated_start_gives_the_heaviest_op_a_device_of_its_own():
    # a vocabulary projection near the end (9 of 20 ms): every split puts other ops beside it, this start does
    # not; the other ops are cut into v chunks per remaining device, in op order, cycling over them
    fwd = [1e-3] * 10 + [9e-3, 1e-3]
    sim = Simulator(chain(12, fwd_s=fwd, out_bytes=MiB), cpus(4, speeds=[1.0, 2.0, 1.0, 1.0]))
    starts = default_starts(sim)
    assert {"isolated-3x4", "isolated-3x8"} <= set(starts)
    got = isolated_start(sim, 1)
    assert got[10] == 1 and list(np.flatnonzero(got == 1)) == [10]  # alone, on the fastest device
    assert list(np.delete(got, 10)) == [0, 0, 0, 0, 2, 2, 2, 3, 3, 3, 3]  # 11 ops: 4 | 3 | 4 (halves at the cuts)
    assert list(isolated_start(sim, 2)) == [0, 0, 2, 2, 3, 0, 0, 2, 2, 3, 1, 3]  # v = 2: 6 chunks, j on j mod 3
    assert "isolated-1x4" not in default_starts(Simulator(sim.graph, cpus(2)))  # two devices: the split starts
