"""Plans: best schedule x micro-batches per placement (``schedule="auto"``), memory per schedule and M."""

from __future__ import annotations

import math

import numpy as np
import pytest

from graphs.ir import OpGraph
from placer.core.placement import Placement
from graphs.microbatch import batch_size
from placer.costmodel.plans import (AUTO, allowed_microbatches, best_plan, check_schedule, run_plan,
                                    schedule_choices)
from placer.costmodel.schedules import SCHEDULES, is_stage_contiguous
from placer.costmodel.sim import Simulator
from tests.policy_helpers import chain, cpus

MiB = 1 << 20


def _exhaustive(sim: Simulator, dev: np.ndarray) -> float:
    """The fastest of every schedule x M that best_plan may choose (``dataflow`` only off stage chains)."""
    names = [s for s in SCHEDULES if s != "dataflow" or not is_stage_contiguous(sim.graph, dev)]
    return min(sim.run(dev, schedule=s, microbatches=m).step_time_s for s in names
               for m in allowed_microbatches(sim.graph))


@pytest.mark.parametrize("dev", [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 0, 1],
                                 [0, 0, 1, 1, 0, 0, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2]])
def test_best_plan_is_the_fastest_of_all_schedules_and_microbatches(dev):
    g = chain(8, fwd_s=[1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 1e-3, 2e-3, 1e-3], out_bytes=4 * MiB)
    sim = Simulator(g, cpus(4, bandwidth_Bps=4e9, latency_s=2e-5))
    dev = np.array(dev)
    plan, res = best_plan(sim, dev)
    assert res.ok and res.step_time_s == pytest.approx(_exhaustive(sim, dev), rel=1e-9)
    assert (plan.schedule, plan.microbatches) == (res.schedule, res.microbatches)
    assert res.step_time_s == sim.run(dev, schedule=plan.schedule, microbatches=plan.microbatches).step_time_s
    assert list(plan.device_of_op) == list(dev) and len(plan.virtual_stages) == 4
    if len(set(dev.tolist())) == 1:  # one device: no pipeline, and none x1 is the fastest
        assert plan.label == "none x1" and res.extra["plans_simulated"] == 1
    else:  # a pipeline of a chain gains from micro-batches
        assert plan.microbatches > 1
    assert run_plan(sim, dev, schedule=AUTO).step_time_s == res.step_time_s


def test_dataflow_is_searched_off_stage_chains_only():
    """Devices taking turns along the chain: in-order lists serialise micro-batches and ``dataflow`` wins. A
    chain of contiguous stages keeps torch.distributed.pipelining's orders even where dataflow would be faster,
    unless asked alone."""
    g = chain(8, fwd_s=[1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 1e-3, 2e-3, 1e-3], out_bytes=4 * MiB)
    sim = Simulator(g, cpus(4, bandwidth_Bps=4e9, latency_s=2e-5))
    plan, res = best_plan(sim, np.array([0, 1, 2, 0, 1, 2, 0, 1]))
    assert plan.schedule == "dataflow" and res.schedule_ran == "dataflow"
    stages = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    plan, res = best_plan(sim, stages)
    faster = sim.run(stages, schedule="dataflow", microbatches=8).step_time_s
    assert plan.schedule != "dataflow" and faster < res.step_time_s
    assert best_plan(sim, stages, schedules=["dataflow"])[0].schedule == "dataflow"


def test_ties_go_to_the_simpler_schedule_then_fewer_microbatches():
    g = chain(2, fwd_s=1e-3)
    sim = Simulator(g, cpus(2, latency_s=0.0))
    dev = np.array([0, 1])
    # two stages of one op each: gpipe and 1f1b run the same times for M = 2, so gpipe (simpler) wins
    plan, res = best_plan(sim, dev, microbatches=[2])
    assert sim.run(dev, schedule="1f1b", microbatches=2).step_time_s == res.step_time_s
    assert plan.label == "gpipe x2"
    # restricted to 1f1b: the schedules argument is honoured
    assert best_plan(sim, dev, schedules=["1f1b"], microbatches=[2])[0].label == "1f1b x2"


def _stash_chain(n: int = 4, stash_mib: int = 64) -> OpGraph:
    return chain(n, fwd_s=1e-3, stash_bytes=stash_mib * MiB, out_bytes=MiB)


def test_memory_per_schedule_and_microbatches():
    """GPipe stashes all M micro-batches; 1F1B at most (stages - stage) in flight on a device."""
    g = _stash_chain(4, 64)  # 2 ops of 64 MiB stash per device
    sim = Simulator(g, cpus(2, memory_bytes=1 << 40))
    dev = np.array([0, 0, 1, 1])
    for m in (2, 4, 8):
        gp = sim.run(dev, schedule="gpipe", microbatches=m).peak_memory_bytes
        fb = sim.run(dev, schedule="1f1b", microbatches=m).peak_memory_bytes
        assert gp[0] == pytest.approx(128 * MiB, rel=1e-6)  # all M micro-batches of 128 MiB / M
        assert fb[0] == pytest.approx(2 * 128 * MiB / m, rel=1e-6)  # stage 0 of 2: two in flight
        assert fb[1] == pytest.approx(128 * MiB / m, rel=1e-6)  # the last stage: one
    # memory between the two: gpipe is OOM, 1f1b fits, and the search picks a feasible plan
    tight = Simulator(g, cpus(2, memory_bytes=100 * MiB))
    assert tight.run(dev, schedule="gpipe", microbatches=8).oom
    assert tight.run(dev, schedule="1f1b", microbatches=8).ok
    assert tight.run(dev, schedule="none", microbatches=1).oom
    plan, res = best_plan(tight, dev)
    assert res.ok and plan.schedule != "gpipe"


def test_gradient_accumulation_only_when_nothing_else_fits():
    g = _stash_chain(4, 64)
    sim = Simulator(g, cpus(2, memory_bytes=200 * MiB))  # one device: 256 MiB stash does not fit whole
    dev = np.zeros(4, dtype=np.int64)
    assert sim.run(dev).oom
    plan, res = best_plan(sim, dev)
    assert res.ok and plan.label == "none x2"  # the smallest M that fits
    roomy = Simulator(g, cpus(2, memory_bytes=1 << 40))
    assert best_plan(roomy, dev)[0].label == "none x1"


def test_nothing_fits_gives_the_least_bad_oom():
    g = _stash_chain(4, 64)
    sim = Simulator(g, cpus(2, memory_bytes=MiB))
    plan, res = best_plan(sim, np.array([0, 0, 1, 1]))
    assert res.oom and math.isinf(res.step_time_s)
    assert res.failure.startswith("out of memory")


def test_allowed_microbatches_follow_the_batch_and_the_microbatch_record():
    ops = [dict(name="x", kind="input", out_shape=(12, 3)), dict(name="y", fwd_s=1e-3, out_shape=(12, 5))]
    g = OpGraph.build(name="b12", ops=ops, edges=[("x", "y")])
    assert batch_size(g) == 12
    assert allowed_microbatches(g) == (1, 2, 3, 4, 6, 12)
    assert allowed_microbatches(g, cap=4) == (1, 2, 3, 4)
    refused = OpGraph.build(name="b12", ops=ops, edges=[("x", "y")],
                            meta={"microbatchable": False, "microbatch_op": "y"})
    assert allowed_microbatches(refused) == (1,)
    sim = Simulator(refused, cpus(2))
    assert best_plan(sim, np.array([0, 1]))[0].microbatches == 1
    assert allowed_microbatches(chain(3)) == (1, 2, 4, 8)  # no input shapes: unknown batch


def test_bad_schedule_names_are_one_line_errors():
    assert schedule_choices() == [*SCHEDULES, "auto"]
    assert check_schedule("auto") == "auto"
    sim = Simulator(chain(2), cpus(2))
    with pytest.raises(ValueError, match="unknown schedule 'zero'; choose one of none, gpipe, 1f1b, "
                                         "interleaved-1f1b, dataflow, auto"):
        run_plan(sim, np.array([0, 1]), schedule="zero")


def test_placement_document_records_the_chosen_plan(tmp_path):
    from placer.io.document import load_placement, save_placement

    g = chain(4, fwd_s=1e-3, out_bytes=MiB)
    c = cpus(2)
    p = Placement(np.array([0, 0, 1, 1]))
    res = run_plan(Simulator(g, c), p, schedule=AUTO)
    path = save_placement(tmp_path / "p.json", g, c, p, method="test", schedule=AUTO, predicted=res)
    sched = load_placement(path, g, c).doc["schedule"]  # validated against the schema on load
    assert sched == {"name": res.schedule, "microbatches": res.microbatches, "stages": [0, 1],
                     "virtual_stages": [1, 1], "recompute": [], "chosen_by": "auto"}
    assert res.microbatches > 1
    with pytest.raises(ValueError, match="schedule 'auto' needs the predicted or measured result"):
        save_placement(tmp_path / "q.json", g, c, p, method="test", schedule=AUTO)


# ---------------------------------------------------------------------------------------------- memory-tight clusters
def test_h100x8_tight_preset_is_tight_for_gpt_1_3b():
    """One device cannot hold the step; for the memory-balanced split GPipe x4 is OOM where 1F1B x4 fits."""
    from graphs.data import load_benchmark_graph
    from placer.core.cluster import get_cluster
    from placer.costmodel.tight import balanced_split

    g, c = load_benchmark_graph("gpt-1.3b"), get_cluster("h100x8-tight")
    sim = Simulator(g, c)
    assert sim.run(np.zeros(g.n, dtype=np.int64)).oom
    dev = balanced_split(g, get_cluster("h100x8"), 4)
    assert np.all(np.diff(dev) >= 0) and np.unique(dev).size == 8  # contiguous, every device used
    assert sim.run(dev, schedule="gpipe", microbatches=4).oom
    assert sim.run(dev, schedule="1f1b", microbatches=4).ok
    plan, res = best_plan(sim, dev)
    assert res.ok and plan.schedule != "gpipe"


@pytest.mark.parametrize("name", ["gpt-paper", "moe-paper", "inception_v3-paper"])
def test_memory_tight_gives_the_property_per_graph(name):
    from graphs.data import load_benchmark_graph
    from placer.core.cluster import get_cluster
    from placer.costmodel.tight import memory_tight, tight_report

    g, base = load_benchmark_graph(name), get_cluster("h100x8")
    rep = tight_report(base, g)
    assert not rep.single_fits and rep.one_f1b_fits and not rep.gpipe_fits
    tight = memory_tight(base, g)
    assert {d.memory_bytes for d in tight.devices} == {rep.capacity_bytes}
    assert tight.name == f"h100x8-tight[{name}]" and [d.kind for d in tight.devices] == ["H100"] * 8


def test_mixed_preset_has_both_gpu_kinds_and_their_costs():
    from graphs.data import load_benchmark_graph
    from placer.core.cluster import get_cluster

    c = get_cluster("mixed")
    assert [d.kind for d in c.devices] == ["A100"] * 4 + ["H100"] * 4
    assert {d.memory_bytes for d in c.devices} == {80 << 30}
    sim = Simulator(load_benchmark_graph("gpt-paper"), c)
    a100, h100 = sim.fwd_s[0].sum(), sim.fwd_s[4].sum()
    assert h100 < a100  # each device is timed with its own kind's costs


def test_best_plan_uses_measured_microbatch_costs_cheaper_than_division():
    # Measured per-micro-batch costs below the divided rule (caches: an 8th of the batch runs faster per sample)
    # must not be pruned by the work bound: the bound uses the simulator's own per-micro-batch times.
    import dataclasses

    g = chain(8, fwd_s=[1e-3, 2e-3, 1e-3, 3e-3, 1e-3, 1e-3, 2e-3, 1e-3], out_bytes=4 * MiB)
    c = g.costs["cpu"]
    fast = {m: (c.fwd_s / m * 0.6, c.bwd_s / m * 0.6) for m in (2, 4, 8)}
    g = dataclasses.replace(g, costs={"cpu": dataclasses.replace(c, microbatch_s=fast)})
    sim = Simulator(g, cpus(2, bandwidth_Bps=4e9, latency_s=2e-5))
    dev = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    plan, res = best_plan(sim, dev)
    assert res.step_time_s == pytest.approx(_exhaustive(sim, dev), rel=1e-9)
    assert plan.microbatches > 1


def test_compare_with_auto_scores_each_method_with_its_own_plan():
    from placer.app.compare import compare

    g = chain(8, fwd_s=1e-3, out_bytes=MiB)
    c = cpus(2, bandwidth_Bps=4e9, latency_s=2e-5)
    table = compare([g], [c], methods=["single", "expert"], schedule="auto", out_dir=None)
    row = table.rows[0]
    sim = Simulator(g, c)
    for cell in row.cells.values():
        plan, res = best_plan(sim, cell.placement)
        assert cell.step_time_s == res.step_time_s and cell.plan == plan.label
        assert cell.text().endswith(plan.label)
    assert row.cells["single"].plan == "none x1"
    assert 0 < row.efficiency <= 1.0  # the bound covers every micro-batch count the plans may use
    assert "_plan" in table.to_csv().splitlines()[0] and "best schedule x micro-batches" in table.to_markdown()
    with pytest.raises(ValueError, match="unknown schedule 'fastest'"):
        compare([g], [c], methods=["single"], schedule="fastest", out_dir=None)


def test_engine_backends_measure_the_plan_the_simulator_chooses(monkeypatch):
    import envs.rewards as rewards
    from envs.problem import build_problem
    from tests.policy_helpers import SimMeasurer

    monkeypatch.setattr(rewards, "load_measurer_class", lambda: SimMeasurer)
    g = chain(8, fwd_s=1e-3, out_bytes=MiB)
    g = g.replace(meta={**g.meta, "source": {"factory": "fake:fake"}})
    c = cpus(2, bandwidth_Bps=4e9, latency_s=2e-5)
    session = rewards.EngineSession(build_problem(g, c, 8), timeout_s=10, steps=1, warmup=0, schedule=AUTO,
                                    microbatches=1)
    p = Placement(np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    got = session.measure_placement(p)
    plan, res = best_plan(Simulator(g, c), p)
    assert plan.microbatches > 1 and (got.schedule, got.microbatches) == (plan.schedule, plan.microbatches)
    assert got.source == "engine" and got.step_time_s == pytest.approx(res.step_time_s)
