"""The ColocRL-style comparison table: layout, OOM / n/a cells, best and speed-up, files written and parseable."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from graphs.ir import OpCosts, OpGraph, Provenance
from placer.core.cluster import get_cluster
from placer.app.compare import CompareTable, compare, default_methods, simple_lower_bound_s
from placer.core.placement import Placement
from placer.core.result import StepResult

GiB = 1 << 30


def with_k80(g: OpGraph, factor: float = 8.0) -> OpGraph:
    c = g.cost("cpu")
    prov = Provenance(device="K80", threads=0, torch_version="", date="", method="estimated")
    return g.with_costs("K80", OpCosts(fwd_s=c.fwd_s / factor, bwd_s=c.bwd_s / factor, provenance=prov))


def fake_rnnlm(steps: int = 3) -> OpGraph:
    """embed -> two LSTM layers unrolled over ``steps`` (one colocation group per layer) -> proj -> loss."""
    ops = [dict(name="embed", module="embed", fwd_s=0.01, param_bytes=1000, out_bytes=4000)]
    edges = []
    for t in range(steps):
        for k in range(2):
            ops.append(dict(name=f"cell{k}_{t}", module=f"layers.{k}", fwd_s=0.1, param_bytes=4000,
                            out_bytes=2000, colocation=1000 + k))
            edges.append(("embed" if k == 0 else f"cell0_{t}", f"cell{k}_{t}"))
            if t:
                edges.append((f"cell{k}_{t - 1}", f"cell{k}_{t}"))
        ops += [dict(name=f"proj{t}", module="proj", fwd_s=0.05, param_bytes=8000, out_bytes=8000, colocation=2000),
                dict(name=f"loss{t}", module="loss", fwd_s=0.01, out_bytes=4)]
        edges += [(f"cell1_{t}", f"proj{t}"), (f"proj{t}", f"loss{t}")]
    return with_k80(OpGraph.build(name="rnnlm-fake", ops=ops, edges=edges))


def big_chain() -> OpGraph:
    """Four ops with 4 GiB of parameters each: 64 GiB resident with Adam, more than a 12 GiB K80 holds."""
    ops = [dict(name=f"o{i}", fwd_s=0.1, param_bytes=4 * GiB // 4, out_bytes=1000) for i in range(4)]
    return with_k80(OpGraph.build(name="big-chain", ops=ops, edges=[(f"o{i}", f"o{i + 1}") for i in range(3)]))


def test_compare_writes_colocrl_table(tmp_path):
    graphs = [fake_rnnlm(), big_chain()]
    table = compare(graphs, ["cpu+2gpu", "cpu+4gpu"], out_dir=tmp_path, methods=None)
    assert table.columns[:5] == ["single-cpu", "single-gpu", "scotch", "mincut", "expert"]
    assert set(default_methods()) >= {"metis", "m-etf", "heft", "pipedream-dp", "random"}
    assert [(r.graph, r.cluster) for r in table.rows] == [
        ("rnnlm-fake", "cpu+2gpu"), ("rnnlm-fake", "cpu+4gpu"), ("big-chain", "cpu+2gpu"), ("big-chain", "cpu+4gpu")]

    md = (tmp_path / "compare.md").read_text()
    head = md.splitlines()[0]
    assert head.startswith("| Graph | Cluster | Single-CPU | Single-GPU | Scotch | MinCut | Expert |")
    assert head.endswith("| Best | Speed-up | Efficiency |")
    assert len([ln for ln in md.splitlines() if ln.startswith("| ")]) == 1 + 4

    rows = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert len(rows) == 4
    big = [r for r in rows if r["graph"] == "big-chain"][0]
    assert big["single-gpu_s"] == "OOM"  # 16 GiB of weights x4 on one 12 GiB K80, as ColocRL's NMT on one GPU
    assert float(big["single-cpu_s"]) > 0  # the 64 GiB host holds it
    doc = json.loads((tmp_path / "compare.json").read_text())
    cell = doc["rows"][0]["cells"]["scotch"]
    assert cell["status"] == "ok" and cell["step_time_s"] == pytest.approx(table.rows[0].cells["scotch"].step_time_s)
    assert doc["rows"][2]["cells"]["single-gpu"] == {**doc["rows"][2]["cells"]["single-gpu"], "status": "oom",
                                                     "step_time_s": None}

    for r in table.rows:
        ok = {m: c.step_time_s for m, c in r.cells.items() if c.status == "ok"}
        assert r.best == min(ok, key=ok.get)
        ref = min(ok[m] for m in ("scotch", "mincut", "expert") if m in ok)
        assert r.speedup == pytest.approx(ref / ok[r.best] - 1)
        assert 0 < r.efficiency <= 1 + 1e-9  # the lower bound is never above the best step time
    assert "Step time" in table.to_rich().title


def test_extra_column_real_hook_and_na(tmp_path):
    g = fake_rnnlm()
    cl = get_cluster("cpu-2")

    def rl(graph, cluster, *, seed, budget_s):
        assert budget_s == 5.0
        return Placement.single(graph, 0)

    def measure(graph, placement):
        d = ("cpu:0", "cpu:1")
        return StepResult(step_time_s=1.5, source="engine", devices=d, busy_s=np.zeros(2),
                          peak_memory_bytes=np.zeros(2, dtype=np.int64), bytes_moved=np.zeros((2, 2), dtype=np.int64))

    t = compare([g], [cl], methods=["single-gpu", "scotch", "expert"], extra={"RL": rl}, real=measure,
                train_budget_s=5.0, out_dir=tmp_path, cost_kind="cpu")
    row = t.rows[0]
    assert t.columns == ["single-gpu", "scotch", "expert", "RL"]
    assert row.cells["single-gpu"].status == "n/a" and "no 'gpu' device" in row.cells["single-gpu"].detail
    assert row.cells["RL"].real_step_time_s == 1.5
    assert row.cells["scotch"].text().endswith("(1.5)")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "compare.csv").read_text())))
    assert rows[0]["RL_real_s"] == "1.5" and rows[0]["single-gpu_s"] == "n/a"


def test_hand_worked_speedup_and_lower_bound(tmp_path):
    # chain of 4 ops, 1 s each on one cpu core: on cpu-2 the bound is the 4 s critical path
    ops = [dict(name=f"o{i}", fwd_s=1.0, out_bytes=8) for i in range(4)]
    g = OpGraph.build(name="chain4", ops=ops, edges=[(f"o{i}", f"o{i + 1}") for i in range(3)])
    cl = get_cluster("cpu-2")
    assert simple_lower_bound_s(g, cl) == pytest.approx(4.0)
    t = compare([g], [cl], methods=["scotch", "round-robin"], out_dir=None, lower_bound=simple_lower_bound_s)
    row = t.rows[0]
    # round-robin alternates devices (3 transfers), Scotch keeps the chain whole or cuts it once: Scotch wins
    assert row.best == "scotch" and row.speedup == pytest.approx(0.0)
    assert row.efficiency == pytest.approx(4.0 / row.best_s)
    assert isinstance(t, CompareTable) and not (tmp_path / "compare.md").exists()


def test_unknown_method_and_graph_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown placement method 'nope'"):
        compare([fake_rnnlm()], ["cpu-2"], methods=["nope"], out_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown graph 'no-such-graph'"):
        compare(["no-such-graph"], ["cpu-2"], out_dir=tmp_path)
