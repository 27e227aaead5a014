"""Schedules: exact per-device orders, stages, deadlock fallback, warnings, and properties on random DAGs."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphs.ir import OpGraph
from placer.costmodel.schedules import (COSTED, SCHEDULES, build_schedule, find_deadlock, is_stage_contiguous,
                                        reset_schedule_warnings, stage_of_device, transfer_plan,
                                        virtual_stages)
from placer.costmodel.sim import get_simulator
from tests.graph_strategies import dag_edges
from tests.test_sim import cluster


def chain(n: int) -> OpGraph:
    ops = [dict(name=f"op{i}", fwd_s=1.0, bwd_s=2.0, out_bytes=8) for i in range(n)]
    return OpGraph.build(name=f"chain{n}", ops=ops, edges=[(f"op{i}", f"op{i + 1}") for i in range(n - 1)])


def blocks(sched, device: int) -> list[str]:
    """Compress a device's order to 'F<mb>'/'B<mb>' per op block, e.g. ['F0', 'F1', 'B0', ...]."""
    out = []
    for t in sched.tasks(device):
        out.append("U" if t.phase == "update" else f"{t.phase[0].upper()}{t.microbatch}.{t.op}")
    return out


def test_registry_and_bad_input():
    assert set(SCHEDULES) == {"none", "gpipe", "1f1b", "interleaved-1f1b", "dataflow"}
    g = chain(2)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("zigzag", g, [0, 0], 1, microbatches=1)
    with pytest.raises(ValueError, match="microbatches"):
        build_schedule("gpipe", g, [0, 0], 1, microbatches=0)
    with pytest.raises(ValueError, match="outside"):
        build_schedule("gpipe", g, [0, 3], 2, microbatches=1)


def test_dataflow_overlaps_micro_batches_that_in_order_lists_run_one_after_the_other():
    """Ops alternate between two devices (expert parallelism in miniature): in op-index order a device waits for
    the other's op of micro-batch 0 before it starts micro-batch 1; ``dataflow`` fills that wait with micro-batch 1."""
    g = chain(4)
    dev = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="needs the simulator"):
        build_schedule("dataflow", g, dev, 2, microbatches=2)
    sim = get_simulator(g, cluster(2))
    s = sim.schedule(dev, "dataflow", microbatches=2)
    assert blocks(s, 0)[:3] == ["F0.0", "F1.0", "F0.2"]  # micro-batch 1 starts while op 1 of 0 runs on dev1
    assert blocks(s, 0)[-1] == "U" and s.order == "dataflow"
    steps = {name: sim.run(dev, schedule=name, microbatches=2).step_time_s for name in ("gpipe", "1f1b", "dataflow")}
    assert steps["dataflow"] < min(steps["gpipe"], steps["1f1b"])


def test_none_is_forward_then_reverse_backward_per_microbatch():
    g = chain(3)
    s = build_schedule("none", g, [0, 1, 0], 2, microbatches=2)
    # dev0 owns ops 0 and 2: within each micro-batch forwards ascending, backwards descending, then one update
    assert blocks(s, 0) == ["F0.0", "F0.2", "B0.2", "B0.0", "F1.0", "F1.2", "B1.2", "B1.0", "U"]
    assert blocks(s, 1) == ["F0.1", "B0.1", "F1.1", "B1.1", "U"]


def test_gpipe_all_forwards_then_all_backwards():
    g = chain(2)
    s = build_schedule("gpipe", g, [0, 1], 2, microbatches=3)
    assert blocks(s, 0) == ["F0.0", "F1.0", "F2.0", "B0.0", "B1.0", "B2.0", "U"]
    assert s.order == "gpipe"


def test_1f1b_warmup_steady_cooldown_on_4_stages():
    g = chain(4)
    s = build_schedule("1f1b", g, [0, 1, 2, 3], 4, microbatches=5)
    assert list(s.stage_of_device) == [0, 1, 2, 3]
    # stage s: min(S - s - 1, M) warm-up forwards, then F/B pairs, then the remaining backwards (Megatron-LM)
    assert blocks(s, 0) == ["F0.0", "F1.0", "F2.0", "F3.0", "B0.0", "F4.0", "B1.0", "B2.0", "B3.0", "B4.0", "U"]
    assert blocks(s, 2) == ["F0.2", "F1.2", "B0.2", "F2.2", "B1.2", "F3.2", "B2.2", "F4.2", "B3.2", "B4.2", "U"]
    assert blocks(s, 3) == ["F0.3", "B0.3", "F1.3", "B1.3", "F2.3", "B2.3", "F3.3", "B3.3", "F4.3", "B4.3", "U"]


def test_interleaved_matches_megatron_for_two_chunks():
    g = chain(4)
    s = build_schedule("interleaved-1f1b", g, [0, 1, 0, 1], 2, microbatches=4)
    assert s.order == "interleaved-1f1b"
    assert list(s.chunks_per_device) == [2, 2] and list(s.stage_of_device) == [0, 1]
    # Megatron-LM interleaved, pipeline size 2, 2 chunks, 4 micro-batches. Rank 0 (chunks = ops 0 and 2):
    # warm-up 2*(2-0-1) + (2-1)*2 = 4 forwards (mb 0,1 of chunk 0 then of chunk 1), backwards chunk 1 first.
    assert blocks(s, 0) == ["F0.0", "F1.0", "F0.2", "F1.2", "F2.0", "B0.2", "F3.0", "B1.2", "F2.2", "B0.0",
                            "F3.2", "B1.0", "B2.2", "B3.2", "B2.0", "B3.0", "U"]
    # rank 1 (ops 1 and 3): warm-up 0*2 + 1*2 = 2
    assert blocks(s, 1) == ["F0.1", "F1.1", "F0.3", "B0.3", "F1.3", "B1.3", "F2.1", "B0.1", "F3.1", "B1.1",
                            "F2.3", "B2.3", "F3.3", "B3.3", "B2.1", "B3.1", "U"]


def test_interleaved_with_one_chunk_per_device_equals_1f1b():
    g = chain(4)
    a = build_schedule("interleaved-1f1b", g, [0, 0, 1, 1], 2, microbatches=4)
    b = build_schedule("1f1b", g, [0, 0, 1, 1], 2, microbatches=4)
    assert a.order == "1f1b" and a.name == "interleaved-1f1b"
    assert [blocks(a, d) for d in range(2)] == [blocks(b, d) for d in range(2)]


def test_1f1b_on_a_returning_placement_falls_back_to_gpipe(caplog):
    # dev0 -> dev1 -> dev0: dev0's second forward needs dev1's, which waits for dev0's first backward
    g = chain(3)
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        s = build_schedule("1f1b", g, [0, 1, 0], 2, microbatches=4)
    assert s.order == "gpipe" and "deadlock" in s.note
    assert any("gpipe" in r.getMessage() for r in caplog.records)
    assert find_deadlock(s, g, [0, 1, 0]) is None


def test_stage_by_dataflow_not_by_first_op():
    # op0 is an input living on dev1, but dev1 also consumes dev0's output: the pipeline is dev0 -> dev1.
    # Ranking by first op index would make dev1 stage 0 and that 1F1B order deadlocks.
    g = OpGraph.build(name="late", ops=[dict(name="x", kind="input"), dict(name="a"), dict(name="b")],
                      edges=[("x", "b"), ("a", "b")])
    assert list(stage_of_device(g, [1, 0, 1], 2)) == [0, 1]
    s = build_schedule("1f1b", g, [1, 0, 1], 2, microbatches=4)
    assert s.order == "1f1b" and find_deadlock(s, g, [1, 0, 1]) is None


def test_warning_when_fewer_microbatches_than_stages(caplog):
    g = chain(4)
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        build_schedule("gpipe", g, [0, 1, 2, 3], 4, microbatches=2)
    assert any("2 micro-batches < 4 pipeline stages" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        build_schedule("1f1b", g, [0, 1, 2, 3], 4, microbatches=4)
        build_schedule("none", g, [0, 1, 2, 3], 4, microbatches=1)
    assert not caplog.records


def test_a_search_over_placements_warns_once_per_kind(caplog):
    """RL's samples and the plan search build schedules for many placements: the same fill warning and the same
    fallback are logged once each, whichever placement (and whichever ops its note names)."""
    reset_schedule_warnings()
    g = chain(6)
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        for dev in ([0, 1, 2, 3, 3, 3], [0, 0, 1, 2, 3, 3], [0, 1, 1, 2, 2, 3]):
            build_schedule("gpipe", g, dev, 4, microbatches=2)
        for dev in ([0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]):
            assert build_schedule("1f1b", g, dev, 2, microbatches=4).order == "gpipe"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("never fills" in m for m in messages) == 1
    assert sum("deadlock" in m for m in messages) == 1, messages


def test_contiguity_chunks_and_transfers():
    g = chain(4)
    assert is_stage_contiguous(g, [0, 0, 1, 1])
    assert not is_stage_contiguous(g, [0, 1, 0, 1])
    level, stage, nchunks = virtual_stages(g, [0, 1, 0, 1], 3)
    assert list(level) == [0, 0, 1, 1] and list(nchunks) == [2, 2, 0] and stage[2] == -1
    fork = OpGraph.build(name="fork", ops=[dict(name="s", out_bytes=10), dict(name="a"), dict(name="b")],
                         edges=[("s", "a", 10), ("s", "b", 30)])
    (t,) = transfer_plan(fork, [0, 1, 1], 2)  # two readers on dev1: one transfer of the larger size
    assert (t.producer, t.src, t.dst, t.nbytes, t.consumers) == (0, 0, 1, 30, (1, 2))


# ---------------------------------------------------------------------- properties on random DAGs
@st.composite
def dag_and_placement(draw):
    n = draw(st.integers(1, 9))
    edges = draw(dag_edges(n, 14))
    d = draw(st.integers(1, 4))
    dev = draw(st.lists(st.integers(0, d - 1), min_size=n, max_size=n))
    g = OpGraph.build(name="rand", ops=[dict(name=f"o{i}", fwd_s=1.0, bwd_s=1.0) for i in range(n)],
                      edges=[(f"o{a}", f"o{b}", 4) for a, b in edges])
    return g, np.array(dev), d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=dag_and_placement(), name=st.sampled_from(sorted(SCHEDULES)), m=st.integers(1, 5))
def test_every_task_once_local_order_consistent_and_no_deadlock(case, name, m):
    g, dev, d = case
    sim = get_simulator(g, cluster(d)) if name in COSTED else None
    s = build_schedule(name, g, dev, d, microbatches=m, warn=False, sim=sim)
    tasks = [(dd, t) for dd in range(d) for t in s.tasks(dd)]
    work = [(t.op, t.microbatch, t.phase) for _, t in tasks if t.phase != "update"]
    assert sorted(work) == sorted((o, mb, p) for o in range(g.n) for mb in range(m) for p in ("fwd", "bwd"))
    assert all(dev[t.op] == dd for dd, t in tasks if t.phase != "update")
    preds, succs = g.predecessors(), g.successors()
    for dd in range(d):
        seq = s.tasks(dd)
        if not seq:
            assert dd not in dev
            continue
        assert seq[-1].phase == "update" and sum(t.phase == "update" for t in seq) == 1
        pos = {(t.op, t.microbatch, t.phase): i for i, t in enumerate(seq)}
        for (o, mb, ph), i in pos.items():
            if ph == "fwd":  # local inputs are computed earlier on this device
                assert all(pos[(int(p), mb, "fwd")] < i for p in preds[o] if dev[p] == dd)
            elif ph == "bwd":  # after its own forward and its local successors' backwards
                assert pos[(o, mb, "fwd")] < i
                assert all(pos[(int(q), mb, "bwd")] < i for q in succs[o] if dev[q] == dd)
    assert find_deadlock(s, g, dev) is None
