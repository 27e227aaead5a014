"""Tracing models to OpGraphs: the op ↔ fx-node contract, unrolling, colocation, errors, build/rebuild."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` factories

from graphs.build import build_graph, load_factory, parse_profile_spec, rebuild_traced  # noqa: E402
from graphs.ir import OpGraph  # noqa: E402
from graphs.microbatch import MICROBATCH_KEYS  # noqa: E402
from graphs.trace import TraceError, trace_model  # noqa: E402
from tests import fixtures_models as fm  # noqa: E402
from tests import fixtures_steps as fs  # noqa: E402

F32 = 4


def _trace(factory, **kw):
    model, inputs, *rest = factory(**kw)
    return trace_model(model, inputs, rest[0] if rest else None, name=factory.__name__, meta={})


def _check_contract(traced):
    nodes = [n for n in traced.gm.graph.nodes if n.op != "output"]
    assert traced.graph.op_names == tuple(n.name for n in nodes)  # one op per node, same names, same order
    for i, node in enumerate(nodes):
        assert traced.node_of_op(i) is node
        assert traced.op_index(node.name) == i
    output = next(n for n in traced.gm.graph.nodes if n.op == "output")
    assert output.args[0].name == traced.graph.op_names[-1]  # the last op is the loss


# ---------------------------------------------------------------------------------------------- MLP, by hand


def test_mlp_from_factory_path_matches_hand_worked_graph():
    g = build_graph("tests.fixtures_models:mlp", profile=None)
    assert g.name == "mlp"
    assert g.meta == {"source": {"factory": "tests.fixtures_models:mlp", "seed": 0}, "trace": "fx",
                      "kept_whole": {}, "loss": "mean of squares: output.pow(2).mean()", "microbatchable": True}
    assert g.op_names == ("x", "fc1", "act", "fc2", "pow_1", "mean")  # the default loss: mean of squares
    assert g.op_kinds == ("input", "Linear", "ReLU", "Linear", "pow", "mean")
    assert g.module_paths == ("", "fc1", "act", "fc2", "", "")
    b, i, h, o = fm.MLP_BATCH, fm.MLP_IN, fm.MLP_HIDDEN, fm.MLP_OUT
    assert g.out_shapes == ((b, i), (b, h), (b, h), (b, o), (b, o), ())
    assert g.out_bytes.tolist() == [b * i * F32, b * h * F32, b * h * F32, b * o * F32, b * o * F32, F32]
    assert g.param_bytes.tolist() == [0, (i * h + h) * F32, 0, (h * o + o) * F32, 0, 0]
    assert g.edge_index.tolist() == [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert g.edge_bytes.tolist() == [128, 256, 256, 48, 48]
    assert len(set(g.colocation.tolist())) == 6  # nothing shared
    assert not g.costs


def test_explicit_loss_fn_is_traced_as_last_ops():
    traced = _trace(fm.mlp_squared_loss)
    _check_contract(traced)
    assert traced.graph.op_kinds[-2:] == ("pow", "sum")
    model, inputs, loss_fn = fm.mlp_squared_loss()
    traced = trace_model(model, inputs, loss_fn, name="m", meta={})
    torch.testing.assert_close(traced.gm(*inputs), loss_fn(model(*inputs)))


# ---------------------------------------------------------------------------------------------- unrolling


def test_unrolled_lstm_ops_colocation_and_tuple_edges():
    layers, steps, width, batch = 2, 3, 16, 4
    traced = _trace(fm.lstm, width=width, layers=layers, steps=steps, batch=batch)
    g = traced.graph
    _check_contract(traced)
    cells = [i for i, k in enumerate(g.op_kinds) if k == "LSTMCell"]
    assert len(cells) == layers * steps
    assert [g.module_paths[i] for i in cells] == [f"cells.{t % layers}" for t in range(layers * steps)]
    # every call of one cell shares a group; the two layers are in different groups
    for layer in range(layers):
        assert len({int(g.colocation[i]) for i in cells[layer::layers]}) == 1
    assert g.colocation[cells[0]] != g.colocation[cells[1]]
    # parameters are counted at the first call only: 4 gates × (W_ih, W_hh, b_ih, b_hh)
    per_cell = (2 * 4 * width * width + 2 * 4 * width) * F32
    assert [int(g.param_bytes[i]) for i in cells] == [per_cell, per_cell] + [0] * (len(cells) - 2)
    heads = [i for i, k in enumerate(g.op_kinds) if k == "Linear"]
    assert len(heads) == steps and len({int(g.colocation[i]) for i in heads}) == 1
    # a cell's (h, c) tuple feeds getitem: the edge carries both tensors
    succ = g.successors()
    src = cells[0]
    e = [j for j in range(g.num_edges) if g.edge_index[0, j] == src]
    assert {g.op_kinds[int(g.edge_index[1, j])] for j in e} == {"getitem"}
    assert {int(g.edge_bytes[j]) for j in e} == {2 * batch * width * F32}
    assert g.out_bytes[src] == 2 * batch * width * F32 and g.out_shapes[src] == (batch, width)
    assert len(succ[src]) == 2


def test_get_attr_joins_every_reader_and_shared_module_calls_share_a_group():
    traced = _trace(fm.tied)
    g = traced.graph
    _check_contract(traced)
    scale = g.index("scale")
    assert g.op_kinds[scale] == "get_attr" and g.param_bytes[scale] == 8 * F32 and g.module_paths[scale] == ""
    readers = sorted(int(d) for s, d in g.edge_index.T if s == scale)
    assert [g.op_kinds[r] for r in readers] == ["mul", "add"]  # x * scale first, ... + scale last
    assert {int(g.colocation[i]) for i in [scale, *readers]} == {int(g.colocation[scale])}
    fcs = [i for i, k in enumerate(g.op_kinds) if k == "Linear"]
    assert len(fcs) == 2 and g.colocation[fcs[0]] == g.colocation[fcs[1]]
    assert g.param_bytes[fcs[0]] == (64 + 8) * F32 and g.param_bytes[fcs[1]] == 0
    # everything else is a group of its own
    others = [i for i in range(g.n) if i not in (scale, *readers, *fcs)]
    assert len({int(g.colocation[i]) for i in others}) == len(others)


def test_benchmark_small_configs_unroll():
    models = pytest.importorskip("graphs.models")
    g = build_graph("rnnlm", profile=None)
    cfg = models.CONFIGS["rnnlm"]["small"]
    assert g.name == "rnnlm-small" and g.meta["trace"] == "fx"
    assert g.meta["source"] == {"benchmark": "rnnlm", "config": "small", "overrides": {}, "seed": 0}
    assert sum(k == "LSTMCell" for k in g.op_kinds) == cfg.layers * cfg.seq_len
    g2 = build_graph("rnnlm", overrides={"seq_len": 2}, profile=None)
    assert sum(k == "LSTMCell" for k in g2.op_kinds) == cfg.layers * 2
    assert g2.meta["source"]["overrides"] == {"seq_len": 2}


# ---------------------------------------------------------------------------------------------- export and errors


def test_export_fallback_when_fx_fails():
    traced = _trace(fm.shape_branch)
    g = traced.graph
    _check_contract(traced)
    assert g.meta["trace"] == "export" and g.meta["trace_note"].startswith("fx: TraceError: ")
    # export kept the batch dynamic but guarded it (`if x.shape[0] > 2`): micro-batches of 1 would branch otherwise
    assert g.meta["microbatchable"] is False and "guarded the batch size >= 3" in g.meta["microbatch_why"]
    assert "linear" in g.op_kinds and "mul" in g.op_kinds
    assert g.module_paths[g.op_kinds.index("linear")] == "fc"
    assert {g.module_paths[i] for i, k in enumerate(g.op_kinds) if k == "get_attr"} == {"fc"}
    model, (x,) = fm.shape_branch()
    traced = trace_model(model, (x,), name="s", meta={})
    torch.testing.assert_close(traced.gm(x), model(x).pow(2).mean())


def test_a_torch_compiled_model_is_traced_as_the_module_it_compiles():
    """``torch.compile(model)``: fx failed on the wrapper ("missing the required forward function") and the
    eager run compiled the model first; the module it wraps is traced, op by op with its own module paths."""
    model, inputs = fm.mlp()
    traced = trace_model(torch.compile(model), inputs, name="c", meta={})
    plain = trace_model(model, inputs, name="p", meta={})
    assert traced.graph.meta["trace"] == "fx" and "trace_note" not in traced.graph.meta
    assert traced.graph.op_names == plain.graph.op_names and traced.graph.module_paths == plain.graph.module_paths


def test_untraceable_model_gives_one_line_error_naming_both_tracers():
    # the model really defeats both tracers on their own
    model, (x,) = fm.untraceable()
    with pytest.raises(TraceError):
        trace_model(model, (x,), name="u", meta={}, method="fx")
    with pytest.raises(TraceError):
        trace_model(model, (x,), name="u", meta={}, method="export")
    with pytest.raises(ValueError) as err:
        build_graph("tests.fixtures_models:untraceable", profile=None)
    msg = str(err.value)
    assert isinstance(err.value, TraceError)
    assert "\n" not in msg and len(msg) < 600
    assert msg.startswith("cannot trace model DataBranch: fx: ")
    assert "control flow" in msg and "; export: " in msg and "fixtures_models.py" in msg


def test_model_failing_on_its_inputs_is_a_value_error():
    model, _ = fm.mlp()
    with pytest.raises(ValueError, match="fails on its example inputs") as err:
        trace_model(model, (torch.randn(2, 5),), name="m", meta={})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path, match", [
    ("no_colon", "must look like"),
    ("tests.fixtures_models:", "must look like"),
    ("tests.no_such_module:mlp", "cannot import module 'tests.no_such_module'"),
    ("tests.fixtures_models:nope", "has no attribute 'nope'"),
    ("tests.fixtures_models:NOT_CALLABLE", "is not callable"),
])
def test_load_factory_errors(path, match):
    with pytest.raises(ValueError, match=match) as err:
        load_factory(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path, match", [
    ("tests.fixtures_models:returns_model_only", r"must return \(model, example_inputs\)"),
    ("tests.fixtures_models:raises", "factory exploded"),
    ("tests.fixtures_models:exits", "failed: SystemExit: 3"),
    ("tests.fixtures_models:no_grad_layer", "would train 'frozen.weight', which the model's own step does not"),
])
def test_bad_factories(path, match):
    with pytest.raises(ValueError, match=match):
        build_graph(path, profile=None)


def test_profile_spec():
    assert parse_profile_spec("cpu") == ("cpu", 1)
    assert parse_profile_spec("cpu:3") == ("cpu", 3)
    assert parse_profile_spec("cuda") == ("cuda", 1)
    for bad in ("gpu", "cpu:", "cpu:0", "cpu:x"):
        with pytest.raises(ValueError, match="profile must be|threads must be"):
            parse_profile_spec(bad)


# ---------------------------------------------------------------------------------------------- build / rebuild


def test_build_graph_round_trips_and_rebuilds(tmp_path):
    g = build_graph("tests.fixtures_models:lstm", profile="cpu")
    assert "cpu" in g.costs
    path = tmp_path / "g.json"
    g.save(path)
    loaded = OpGraph.load(path)
    assert loaded.content_hash == g.content_hash
    traced = rebuild_traced(loaded.meta)
    assert traced.graph.op_names == g.op_names
    assert traced.graph.replace(meta={}).content_hash == g.replace(costs={}, stash_bytes=np.zeros(g.n),
                                                                    temp_bytes=np.zeros(g.n), flops=np.zeros(g.n),
                                                                    meta={}).content_hash
    # same seed, same parameters: the rebuilt step gives the loss of a second rebuild exactly
    again = rebuild_traced(loaded.meta)
    assert traced.gm(*traced.example_inputs).item() == again.gm(*again.example_inputs).item()
    with pytest.raises(ValueError, match="no 'source'"):
        rebuild_traced({"trace": "fx"})


def test_rebuild_keeps_the_recorded_microbatch_finding_without_running_the_step_again(monkeypatch):
    """Every engine worker rebuilds the graph's model: the finding recorded at build time is kept (the check runs
    the step twice), for a graph that splits and one that does not."""
    import graphs.trace

    split = build_graph("tests.fixtures_steps:keyed_batch", profile=None)
    mixing = build_graph("tests.fixtures_models:shape_branch", profile=None)
    assert split.meta["microbatchable"] is True and mixing.meta["microbatchable"] is False

    def fail(*_):
        raise AssertionError("the micro-batch check ran again")

    monkeypatch.setattr(graphs.trace, "microbatch_meta", fail)
    for g in (split, mixing):
        meta = rebuild_traced(g.meta).graph.meta
        assert {k: meta.get(k) for k in MICROBATCH_KEYS} == {k: g.meta.get(k) for k in MICROBATCH_KEYS}
    with pytest.raises(AssertionError, match="ran again"):  # a graph without the record (built before it) checks
        rebuild_traced({k: v for k, v in split.meta.items() if k != "microbatchable"})


def test_the_loss_field_of_a_dict_output_is_the_step_loss_and_other_outputs_need_a_loss_fn():
    from graphs.loss import LOSS_FIELD, traced_default_loss

    model, (x,) = fs.loss_in_a_dict()
    traced = trace_model(model, (x,), name="dict_out")
    assert traced.graph.meta["loss"] == LOSS_FIELD
    assert traced.gm(x).item() == pytest.approx(model(x)["loss"].item())
    assert traced_default_loss(traced.graph.meta)(model(x)).item() == pytest.approx(model(x)["loss"].item())
    with pytest.raises(ValueError, match="returns tuple, not a tensor.*give the factory a third item, loss_fn"):
        trace_model(*fs.tuple_output(), name="tuple_out")


def test_a_list_of_ints_input_is_a_constant_for_fx_and_flattened_by_export():
    """torch.export flattens the list into placeholders and returned ``(loss,)``, refused then; the loss now comes
    out alone, and the engine feeds the placeholders the flattened inputs (``StepProgram.placeholder_values``)."""
    model, inputs = fm.list_input()
    traced = trace_model(model, inputs, name="ids")  # fx: the ids are the example's, as any Python value input
    assert traced.graph.meta["trace"] == "fx" and traced.gm(*inputs).item() == pytest.approx(model(*inputs).item())
    exported = trace_model(model, inputs, name="ids", method="export")
    assert exported.gm(*inputs).item() == pytest.approx(model(*inputs).item())
    assert {"inputs_0_0", "inputs_0_1", "inputs_0_2", "inputs_0_3"} <= set(exported.graph.op_names)


def test_python_value_inputs_trace_as_the_example_has_them():
    """None for an optional mask, a flag and a count reach forward as values: fx made them placeholders, so
    ``mask is not None`` held for None and the trace failed (then torch.export's fallback said something else)."""
    model, inputs = fs.plain_python_inputs()
    eager = model(*inputs).item()
    traced = trace_model(model, inputs, name="plain")
    assert traced.graph.meta["trace"] == "fx" and traced.graph.meta["microbatchable"] is True
    assert traced.gm(*inputs).item() == pytest.approx(eager)
    assert [n for n in traced.graph.op_names if n.startswith("mul")] == ["mul", "mul_1", "mul_2"]  # 3 repeats


def test_a_branch_on_a_value_read_from_data_is_refused_not_baked_in():
    with pytest.raises(TraceError, match="control flow"):
        trace_model(*fs.item_branch(), name="item_branch")


def test_control_flow_on_buffers_traces_with_their_values():
    """Buffers are graph nodes now; an init flag, a repeat count and a threshold read from them are still known
    while tracing (they do not depend on the inputs), as they were when fx answered buffers with tensors."""
    model, (x,) = fs.buffer_flags()
    traced = trace_model(model, (x,), name="flags")
    assert traced.gm(x).item() == pytest.approx(model(x).item())
    assert [n for n in traced.graph.op_names if n.startswith(("mul", "add"))] == ["mul", "mul_1", "add"]


def test_rebuild_keeps_export_method():
    g = build_graph("tests.fixtures_models:shape_branch", profile=None)
    traced = rebuild_traced(g.meta)
    assert traced.graph.meta["trace"] == "export" and traced.graph.op_names == g.op_names


def test_a_trainer_gets_the_loss_the_step_was_traced_with():
    from graphs.loss import traced_default_loss
    from graphs.trace import record_values, trace_model
    from tests import fixtures_models

    model, (x,) = fixtures_models.mlp()
    traced = trace_model(model, (x,), name="mlp")
    loss, _ = record_values(traced.gm, (x,))
    out = model(x)
    assert out.dim() > 0  # the default loss applies
    assert traced_default_loss(traced.graph.meta)(out).item() == pytest.approx(loss.item())
    assert traced_default_loss({})(out).item() == pytest.approx(out.mean().item())  # a graph from before meta["loss"]
