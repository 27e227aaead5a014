"""Placement JSON: schema round-trip and a one-line error for every mismatch."""

import json

import numpy as np
import pytest

from graphs.ir import OpGraph
from placer.core.cluster import get_cluster
from placer.io.document import contiguous_stages, load_placement, module_devices, save_placement
from placer.core.placement import Placement
from placer.core.result import StepResult


def chain():
    ops = [dict(name="x", kind="input", out_bytes=8),
           dict(name="l1", kind="Linear", module="enc.l1", param_bytes=16, fwd_s=1.0),
           dict(name="relu", kind="relu", module="enc", fwd_s=0.1),
           dict(name="l2", kind="Linear", module="dec.l2", param_bytes=16, fwd_s=1.0),
           dict(name="loss", kind="CrossEntropyLoss", module="loss", fwd_s=0.1)]
    return OpGraph.build(name="chain", ops=ops, edges=[("x", "l1"), ("l1", "relu"), ("relu", "l2"), ("l2", "loss")])


def ok_result(t, devices):
    d = len(devices)
    return StepResult(step_time_s=t, source="sim", devices=devices, busy_s=np.zeros(d),
                      peak_memory_bytes=np.zeros(d), bytes_moved=np.zeros((d, d)))


@pytest.fixture
def saved(tmp_path):
    g, c = chain(), get_cluster("cpu-2")
    p = Placement([0, 0, 0, 1, 1])
    path = save_placement(tmp_path / "placement.json", g, c, p, method="expert", seed=3,
                          predicted=ok_result(0.25, c.device_names))
    return g, c, p, path


def test_round_trip(saved):
    g, c, p, path = saved
    loaded = load_placement(path, g, c)
    assert loaded.placement == p
    doc = loaded.doc
    assert doc["schema"] == "placer.placement/v1"
    assert doc["modules"] == {"dec.l2": 1, "enc": 0, "enc.l1": 0, "loss": 1}
    assert doc["stages"] == [{"device": 0, "first_op": "x", "last_op": "relu"},
                             {"device": 1, "first_op": "l2", "last_op": "loss"}]
    assert doc["predicted"] == {"step_time_s": 0.25, "source": "sim:cpu-2", "failure": None}
    assert doc["measured"] is None and doc["provenance"]["seed"] == 3
    text = path.read_text()
    assert text == json.dumps(json.loads(text), indent=1, sort_keys=True) + "\n"  # sorted keys


def test_non_contiguous_has_no_stages():
    g = chain()
    assert contiguous_stages(g, Placement([0, 1, 0, 1, 1])) is None
    assert module_devices(g, Placement([0, 1, 0, 1, 1]))["enc.l1"] == 1


def edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("mutate, match", [
    (lambda d: d["graph"].update(hash="0" * 16), "made for graph 'chain'"),
    (lambda d: d["ops"].pop("l2"), "no device for op 'l2'"),
    (lambda d: d["ops"].update(bogus=0), "unknown op 'bogus'"),
    (lambda d: d.update(devices=["cpu:0", "cuda:7"]), "do not match cluster 'cpu-2'"),
    (lambda d: d["ops"].update(l2=5), "op 'l2' is on device 5"),
    (lambda d: d.update(schema="v0"), "invalid at schema"),
    (lambda d: d["schedule"].update(name="zigzag"), "invalid at schedule/name"),
    (lambda d: d["modules"].update(enc=7), "module 'enc' is on device 7, but only 2 devices"),
    (lambda d: d["stages"][1].update(device=2), "stage 1 is on device 2"),
    (lambda d: d["schedule"].update(recompute=[3]), "schedule.recompute names device 3"),
    (lambda d: d["schedule"].update(stages=[0, 7]), "schedule.stages .* is not one entry per device"),
    (lambda d: d["schedule"].update(virtual_stages=[1]), "schedule.virtual_stages .* is not one entry per device"),
    (lambda d: d.update(devices=["cpu:0", "cpu:0"]), "list a device twice"),
    (lambda d: d.update(ops={}), "places no op"),
    (lambda d: d["predicted"].update(step_time_s=float("nan")), "predicted.step_time_s is nan, not a finite"),
])
def test_mismatches_are_one_line_errors(saved, mutate, match):
    g, c, _, path = saved
    edit(path, mutate)
    with pytest.raises(ValueError, match=match) as e:
        load_placement(path, g, c)
    assert "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="cannot read placement file"):
        load_placement(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_placement(bad)
    bad.write_bytes(b'{"schema": "\xff\xfe"}')
    with pytest.raises(ValueError, match="bad.json is not UTF-8 text"):
        load_placement(bad)
    with pytest.raises(ValueError, match="/dev/zero: more than 256 MiB, too large for a placement file"):
        load_placement("/dev/zero")  # an endless input is refused, not read until memory runs out


def test_invalid_placement_is_refused_on_save(tmp_path):
    g, c = chain(), get_cluster("cpu-2")
    with pytest.raises(ValueError, match="placed on device 2"):
        save_placement(tmp_path / "p.json", g, c, Placement([0, 0, 2, 1, 1]), method="x")
