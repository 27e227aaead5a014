"""A result names the order that actually ran: a 1F1B order that would deadlock runs GPipe's, and the simulator's
and the engine's :class:`StepResult` both say so (issue #19 item 4); the fallback is warned once per process."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from graphs.build import build_graph
from placer.core.cluster import get_cluster
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.costmodel.schedules import build_schedule
from placer.costmodel.sim import simulate
from placer.engine.ordering import device_tasks

CPU2 = get_cluster("cpu-2")


@pytest.fixture(scope="module")
def toy():
    return build_graph("placer.engine.toy:chain")


def returning(graph) -> Placement:
    """Device 0, then device 1, then device 0 again along the chain: 1F1B's order deadlocks on it."""
    n = graph.n
    dev = np.zeros(n, dtype=np.int64)
    dev[n // 3: 2 * n // 3] = 1
    pl = Placement(dev)
    assert build_schedule("1f1b", graph, pl, 2, microbatches=4, warn=False).order == "gpipe"
    return pl


def test_simulated_fallback_is_labelled(toy):
    r = simulate(toy, CPU2, returning(toy), schedule="1f1b", microbatches=4)
    assert r.ok and r.schedule == "1f1b" and r.order == "gpipe"
    assert "deadlock" in r.schedule_note
    assert r.schedule_label == "1f1b x4 (ran gpipe order: 1f1b would deadlock)"
    again = StepResult.from_json(r.to_json())
    assert (again.schedule, again.order, again.schedule_note) == (r.schedule, "gpipe", r.schedule_note)


def test_no_fallback_no_label(toy):
    r = simulate(toy, CPU2, Placement(np.arange(toy.n) * 2 // toy.n), schedule="1f1b", microbatches=4)
    assert r.order == "1f1b" and r.schedule_ran == "1f1b" and r.schedule_note == ""
    assert r.schedule_label == "1f1b x4"
    assert StepResult.from_json(r.to_json()).schedule_ran == ""  # same as requested: stored as ""


def test_fallback_warned_once_for_sim_and_engine(toy, caplog):
    pl = returning(toy)
    with caplog.at_level(logging.WARNING, logger="placer.costmodel.schedules"):
        simulate(toy, CPU2, pl, schedule="1f1b", microbatches=4)
        _, order, note = device_tasks(toy, pl, 2, schedule="1f1b", microbatches=4)
        simulate(toy, CPU2, pl, schedule="1f1b", microbatches=4)
    assert order == "gpipe" and "deadlock" in note
    assert sum("gpipe order" in r.getMessage() for r in caplog.records) == 1


def test_old_result_json_without_the_field_reads():
    r = StepResult.failed("x", source="sim", devices=("cpu:0",), schedule="gpipe", microbatches=2)
    d = r.to_json()
    del d["schedule_ran"], d["schedule_note"]
    assert StepResult.from_json(d).schedule_label == "gpipe x2"


@pytest.mark.slow
def test_engine_fallback_is_labelled(toy, one_thread):
    from placer.engine import EngineConfig, Measurer  # noqa: PLC0415

    pl = returning(toy)
    with Measurer(toy, CPU2, config=EngineConfig(timeout_s=120)) as m:
        r = m.measure(pl, schedule="1f1b", microbatches=4, steps=2, warmup=1)
        bad = m.measure(pl, schedule="1f1b", microbatches=4, steps=1, warmup=0, _fault="error")
    assert not bad.ok and bad.order == "gpipe"  # a failed step names its order too
    assert r.ok, r.failure
    assert r.source == "engine" and r.schedule == "1f1b" and r.order == "gpipe" and "deadlock" in r.schedule_note
    assert r.schedule_label.startswith("1f1b x4 (ran gpipe order")


def test_placement_document_names_the_order_that_ran(toy, tmp_path):
    from placer.io.document import placement_to_json, validate_document  # noqa: PLC0415

    pl = returning(toy)
    r = simulate(toy, CPU2, pl, schedule="1f1b", microbatches=4)
    doc = placement_to_json(toy, CPU2, pl, method="test", schedule="1f1b", microbatches=4, predicted=r)
    validate_document(doc)
    assert doc["predicted"]["schedule_ran"] == "gpipe" and "deadlock" in doc["predicted"]["schedule_note"]
    half = Placement(np.arange(toy.n) * 2 // toy.n)
    ok = simulate(toy, CPU2, half, schedule="1f1b", microbatches=4)
    doc = placement_to_json(toy, CPU2, half, method="test", schedule="1f1b", microbatches=4, predicted=ok)
    assert "schedule_ran" not in doc["predicted"]
