"""Activation recomputation (a plan's ``recompute`` devices): the simulator keeps only each segment's inputs and
pays its forward again before its backward; ``best_plan`` recomputes only where memory asks for it; the bound stays
below every such plan; the engine (both backends) and the trainers' stages compute the same step with it."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.build import build_graph
from placer.core.cluster import get_cluster
from placer.core.placement import Placement
from graphs.data import load_benchmark_graph
from placer.costmodel.bounds import memory_fits
from placer.costmodel.plans import best_plan, plan_lower_bound_s
from placer.costmodel.sim import Simulator, simulate
from placer.costmodel.tight import memory_tight
from placer.io.document import placement_from_document, placement_to_json
from tests.test_bounds import _loss_chain
from tests.test_sim import cluster

SPLIT = [0, 0, 0, 1, 1]  # x, w1, w2 | w3, loss


def test_a_recomputing_device_holds_its_segments_inputs_and_runs_their_forward_again():
    # gpipe x2: device 0 runs x, w1, w2 as one segment per micro-batch. Without recomputation both micro-batches'
    # stash is held (2 x (400 + 400)); with it only the segments' inputs (the batch: no bytes here) plus one
    # segment's stash brought back (800) at a time. Its busy time grows by the segment's forward per micro-batch
    # (2 x (0.5 + 1 + 1)).
    g, c = _loss_chain(stash=800, layers=3), cluster(2, memory_bytes=10**6)
    kw = dict(schedule="gpipe", microbatches=2, dispatch_overhead_s=0.0)
    plain, redo = simulate(g, c, SPLIT, **kw), simulate(g, c, SPLIT, recompute=[0], **kw)
    assert plain.peak_memory_bytes[0] == 1600 and redo.peak_memory_bytes[0] == 800
    assert redo.peak_memory_bytes[1] == plain.peak_memory_bytes[1]
    assert redo.busy_s[0] - plain.busy_s[0] == pytest.approx(5.0) and redo.busy_s[1] == plain.busy_s[1]
    assert redo.step_time_s > plain.step_time_s and redo.recompute == (0,) and plain.recompute == ()
    assert redo.schedule_label == "gpipe x2 +recompute 0"
    with pytest.raises(ValueError, match="recompute names device 5"):
        simulate(g, c, SPLIT, recompute=[5], **kw)


def test_best_plan_recomputes_only_on_the_devices_memory_asks_for():
    g = _loss_chain(stash=800, layers=3)
    roomy = Simulator(g, cluster(2, memory_bytes=10**6))
    plan, res = best_plan(roomy, SPLIT, schedules=["gpipe"], microbatches=[2])
    assert plan.recompute == () and res.ok
    # 1000 B: device 0 needs 1600 B without recomputation, 800 B with it; device 1 (w3, loss) fits either way
    tight = Simulator(g, cluster(2, memory_bytes=1000))
    assert tight.run(SPLIT, schedule="gpipe", microbatches=2).oom
    plan, res = best_plan(tight, SPLIT, schedules=["gpipe"], microbatches=[2])
    assert res.ok and plan.recompute == (0,) and plan.label == "gpipe x2 +recompute 0"
    assert plan.to_json()["recompute"] == [0]
    _, off = best_plan(tight, SPLIT, schedules=["gpipe"], microbatches=[2], recompute=False)
    assert off.oom


def test_the_bound_admits_the_micro_batch_counts_that_only_recomputation_fits():
    # Inception-V3 on its memory-tight cluster: one micro-batch's stash of M = 1, 2, 4 is more than the cluster
    # holds, so no plan without recomputation fits there; with it they are in, and the bound can only go down
    # (random plans with recomputation against it: tests/test_bounds.py)
    graph = load_benchmark_graph("inception_v3-paper")
    c = memory_tight(get_cluster("h100x8"), graph)
    assert [memory_fits(graph, c, microbatches=m, recompute=False) for m in (1, 2, 4)] == [False] * 3
    assert all(memory_fits(graph, c, microbatches=m) for m in (2, 4))
    with_redo, without = plan_lower_bound_s(graph, c), plan_lower_bound_s(graph, c, recompute=False)
    assert with_redo < without
    dev = np.repeat(np.arange(8), -(-graph.n // 8))[:graph.n]
    sim = Simulator(graph, c)
    dev = sim.device_array(Placement(dev).colocated(graph))
    plan, res = best_plan(sim, dev, schedules=["1f1b"], microbatches=[32])  # an even split by op count
    assert sim.run(dev, schedule="1f1b", microbatches=32).oom
    assert res.ok and plan.recompute and res.step_time_s >= with_redo


def test_the_engine_and_the_trainers_stages_compute_the_same_step_when_recomputing():
    import torch

    from placer.engine import EngineConfig, Measurer

    torch.manual_seed(0)
    graph = build_graph("gpt", profile=None)
    cpu2 = get_cluster("cpu-2")
    dev = np.zeros(graph.n, dtype=np.int64)
    dev[graph.n // 2:] = 1
    pl = Placement(dev).colocated(graph)
    with Measurer(graph, cpu2, config=EngineConfig(timeout_s=180)) as m:
        for backend in ("ops", "pipelining"):
            base = m.run_step(pl, schedule="1f1b", microbatches=2, backend=backend)
            redo = m.run_step(pl, schedule="1f1b", microbatches=2, backend=backend, recompute=(0, 1))
            assert redo.result.ok and redo.result.recompute == (0, 1)
            assert redo.loss == pytest.approx(base.loss, rel=1e-6)
            assert base.grads.keys() == redo.grads.keys() and base.grads
            for k in base.grads:
                torch.testing.assert_close(redo.grads[k], base.grads[k], rtol=1e-5, atol=1e-7)
        plain = m.measure(pl, schedule="1f1b", microbatches=2, steps=1, warmup=0)
        held = m.measure(pl, schedule="1f1b", microbatches=2, steps=1, warmup=0, recompute=(0,))
        assert held.peak_memory_bytes[0] < plain.peak_memory_bytes[0]  # the ops backend's own accounting
    # the placement JSON carries the devices (tests/test_loaders.py: the trainers' stages on them checkpoint)
    doc = placement_to_json(graph, cpu2, pl, method="even-layers", seed=0, schedule="1f1b", microbatches=2,
                            measured=held)
    assert doc["schedule"]["recompute"] == [0]
    bad = {**doc, "schedule": {**doc["schedule"], "recompute": [2]}}
    with pytest.raises(ValueError, match="schedule.recompute names device 2"):
        placement_from_document(bad, graph, cpu2)
