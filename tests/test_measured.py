"""placer.app.measured: the plans the demo and bench_plan_real measure (simulation side; test_demo runs them)."""

from __future__ import annotations

import pytest

from graphs.data import load_benchmark_graph
from placer import baselines
from placer.app.measured import PlanRow, contiguous_splits, even_split, plan_row, winning_plan
from placer.core.cluster import get_cluster
from placer.core.placement import Placement
from placer.costmodel.plans import best_plan
from placer.costmodel.sim import Simulator
from placer.engine.command import DEFAULT_OPTIMIZER
from placer.io.document import contiguous_stages
from placer.io.parts import model_part_fqns


@pytest.fixture(scope="module")
def medium():
    graph = load_benchmark_graph("gpt-medium")
    return graph, Simulator(graph, get_cluster("cpu-2"))


def test_even_split_is_torchtitans_default(medium):
    graph, sim = medium
    p = even_split(graph, sim.cluster)
    assert model_part_fqns(graph, contiguous_stages(graph, p)) == [
        ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "blocks.2", "blocks.3"],
        ["blocks.4", "blocks.5", "blocks.6", "blocks.7", "ln_f", "head", "loss"]]


def test_plan_row_takes_the_plan_searchs_schedule(medium):
    graph, sim = medium
    single = plan_row(sim, "Single", "all on cpu:0", Placement.single(graph))
    assert (single.schedule, single.microbatches) == ("none", 1)
    row = plan_row(sim, "even split", "even-layers", even_split(graph, sim.cluster))
    plan, res = best_plan(sim, row.placement, optimizer=DEFAULT_OPTIMIZER)
    assert (row.schedule, row.microbatches, row.sim_s) == (plan.schedule, plan.microbatches, res.step_time_s)
    assert row.schedule in ("gpipe", "1f1b") and row.sim_s < single.sim_s  # gpt medium pipelines on two cores
    assert row.real_s == float("inf") and row.to_json()["real_rounds_s"] == []


def test_winning_plan_is_no_slower_than_any_candidate(medium):
    graph, sim = medium
    label, placement = winning_plan(sim)
    best = best_plan(sim, placement, optimizer=DEFAULT_OPTIMIZER)[1].step_time_s
    splits = contiguous_splits(graph)
    assert len(splits) == 12  # between the 13 model parts of gpt: tok_emb, pos_emb, 8 blocks, ln_f, head, loss
    for _, p in splits[::3] + [("even-layers", baselines.place("even-layers", graph, sim.cluster, seed=0))]:
        assert best <= best_plan(sim, p, optimizer=DEFAULT_OPTIMIZER)[1].step_time_s
    single = best_plan(sim, Placement.single(graph), optimizer=DEFAULT_OPTIMIZER)[1].step_time_s
    assert best < 0.7 * single, label  # the head outweighs two blocks: a pipeline wins by far in simulation


def test_plan_row_median():
    row = PlanRow(name="x", label="y", placement=Placement.single(load_benchmark_graph("gpt-small")),
                  schedule="none", microbatches=1, sim_s=1.0, real_rounds_s=[3.0, 1.0, 2.0])
    assert row.real_s == 2.0
