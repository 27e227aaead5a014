"""OpGraph: construction, validation errors, JSON round-trip, derived quantities."""

import json

import numpy as np
import pytest

from graphs.ir import OpCosts, OpGraph, Provenance, toposort_order


def diamond(**over):
    ops = [
        dict(name="x", kind="input", out_bytes=100, fwd_s=0.0),
        dict(name="a", kind="Linear", out_bytes=40, param_bytes=8, fwd_s=1.0, bwd_s=2.0),
        dict(name="b", kind="relu", out_bytes=40, fwd_s=3.0, bwd_s=1.0),
        dict(name="c", kind="add", out_bytes=4, fwd_s=0.5, bwd_s=0.5),
    ]
    for name, fields in over.items():
        next(o for o in ops if o["name"] == name).update(fields)
    return OpGraph.build(name="diamond", ops=ops, edges=[("x", "a"), ("x", "b"), ("a", "c"), ("b", "c")])


def test_build_and_accessors():
    g = diamond()
    assert g.n == 4 and g.num_edges == 4
    assert g.index("c") == 3
    assert [p.tolist() for p in g.predecessors()] == [[], [0], [0], [1, 2]]
    assert [s.tolist() for s in g.successors()] == [[1, 2], [3], [3], []]
    assert g.depth().tolist() == [0, 1, 1, 2]
    # longest path x -> b -> c: (0) + (3+1) + (0.5+0.5) = 5.0
    assert g.critical_path_s() == pytest.approx(5.0)
    # edge bytes default to the producer's output
    assert g.edge_bytes.tolist() == [100, 100, 40, 40]


def test_immutable():
    g = diamond()
    with pytest.raises(ValueError):
        g.out_bytes[0] = 5
    with pytest.raises(AttributeError):  # a frozen dataclass
        g.name = "other"


def test_round_trip_keeps_hash(tmp_path):
    g = diamond()
    path = tmp_path / "g.json"
    g.save(path)
    h = OpGraph.load(path)
    assert h.content_hash == g.content_hash
    assert h.op_names == g.op_names
    assert np.array_equal(h.edge_index, g.edge_index)
    assert np.allclose(h.cost("cpu").fwd_s, g.cost("cpu").fwd_s)
    # the hash depends on content
    assert diamond(b=dict(fwd_s=3.5)).content_hash != g.content_hash


def test_tampered_file_is_rejected(tmp_path):
    d = diamond().to_json()
    d["ops"]["out_bytes"][0] = 1
    path = tmp_path / "g.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hash mismatch"):
        OpGraph.load(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "other"}', "unsupported graph schema"),
        ('{"schema": "placer.opgraph/v1", "name": "x"}', "missing field 'ops'"),
    ],
)
def test_malformed_json_is_one_line(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        OpGraph.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.__setitem__("costs", 5), "malformed field"),
    (lambda d: d.__setitem__("costs", {"cpu": [1, 2]}), "malformed field"),
    (lambda d: d["costs"]["cpu"].__setitem__("microbatch_s", [1]), "malformed field"),
    (lambda d: d["ops"]["out_bytes"].__setitem__(0, 10**30), "malformed field: Python int too large"),
    (lambda d: d["edges"]["src"].__setitem__(0, 10**30), "malformed field: Python int too large"),
])
def test_ill_typed_or_oversized_fields_are_one_line(tmp_path, edit, match):
    d = diamond().to_json()
    d.pop("hash", None)
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=match) as e:
        OpGraph.load(path)
    assert "\n" not in str(e.value)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot read graph file"):
        OpGraph.load(tmp_path / "nope.json")


def test_duplicate_name():
    with pytest.raises(ValueError, match="duplicate op name 'a'"):
        OpGraph.build(name="g", ops=[dict(name="a"), dict(name="a")], edges=[])


def test_cycle_or_unsorted_edge_names_ops():
    with pytest.raises(ValueError, match="'b' -> 'a' goes against the topological order"):
        OpGraph.build(name="g", ops=[dict(name="a"), dict(name="b")], edges=[("a", "b"), ("b", "a")])
    with pytest.raises(ValueError, match="self-loop on op 'a'"):
        OpGraph.build(name="g", ops=[dict(name="a")], edges=[("a", "a")])


def test_toposort_detects_cycle():
    assert toposort_order(3, [(2, 1), (1, 0)]) == [2, 1, 0]
    with pytest.raises(ValueError, match="cyclic: op 'q'"):
        toposort_order(3, [(0, 1), (1, 2), (2, 1)], names=["p", "q", "r"])


def test_negative_costs_and_sizes_name_the_op():
    with pytest.raises(ValueError, match="op 'b' has negative or NaN fwd_s"):
        diamond(b=dict(fwd_s=-1.0))
    with pytest.raises(ValueError, match="op 'a' has negative or NaN param_bytes"):
        diamond(a=dict(param_bytes=-8))
    with pytest.raises(ValueError, match="op 'c' has negative or NaN bwd_s"):
        diamond(c=dict(bwd_s=float("nan")))


def test_inconsistent_shapes():
    g = diamond()
    with pytest.raises(ValueError, match="out_bytes: expected 4 values"):
        g.replace(out_bytes=[1, 2, 3])
    bad = OpCosts(fwd_s=[1.0], bwd_s=[1.0], provenance=g.cost().provenance)
    with pytest.raises(ValueError, match=r"costs\['gpu'\]: expected 4 values"):
        g.with_costs("gpu", bad)
    with pytest.raises(ValueError, match="outside"):
        g.replace(edge_index=[[0], [9]], edge_bytes=[1])


def test_costs_by_kind_and_provenance():
    g = diamond()
    prov = Provenance(device="V100", threads=0, torch_version="x", date="2026-11-25", method="estimated")
    g2 = g.with_costs("V100", OpCosts(fwd_s=np.zeros(4), bwd_s=np.zeros(4), provenance=prov))
    assert set(g2.costs) == {"cpu", "V100"}
    assert g2.cost("V100").provenance.method == "estimated"
    with pytest.raises(KeyError, match="no costs for device kind 'K80'"):
        g2.cost("K80")
    with pytest.raises(ValueError, match="must be 'measured' or 'estimated'"):
        Provenance(device="cpu", threads=1, torch_version="x", date="d", method="guessed")
