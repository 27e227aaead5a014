"""Tracing models to OpGraphs: the op ↔ fx-node contract, unrolling, colocation, errors, build/rebuild."""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` factories

from graphs.build import build_graph, load_factory, parse_profile_spec, rebuild_traced  # noqa: E402
from graphs.ir import OpGraph  # noqa: E402
from graphs.microbatch import MICROBATCH_KEYS  # noqa: E402
from graphs.profile import profile  # noqa: E402
from graphs.trace import TraceError, buffers_restored, trace_model  # noqa: E402
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


def test_in_place_buffer_updates_are_kept_and_ordered_before_their_readers():
    """fx answered ``self.scale`` with the tensor itself, so ``self.scale.mul_(0.5)`` ran once while tracing and
    was not in the step; and nothing ordered an update before the buffer's later reads. Both are now ops of the
    graph, and the readers consume the update."""
    model, (x,) = fs.buffer_updates()
    eager = copy.deepcopy(model)(x).item()  # the first step's loss, buffers updated during it
    traced = trace_model(model, (x,), name="buffers")
    nodes = {n.name: n for n in traced.gm.graph.nodes}
    assert {"mul_", "add_"} <= set(nodes)
    readers = {u.name for n in ("mul_", "add_") for u in nodes[n].users}
    assert readers and readers <= {"mul", "sub"}, readers  # h * scale and ... - total read the updated values
    assert traced.gm(x).item() == pytest.approx(eager, rel=1e-6)
    assert {"mul_", "add_"} <= set(traced.graph.op_names)


def test_augmented_and_reassigned_buffers_are_updated_by_the_step_as_in_eager():
    """``self.steps += 1`` traced as ``steps = steps + 1`` (fx's proxies have no ``__iadd__``) and
    ``self.ema = 0.9 * self.ema + ...`` left the module holding a Proxy: the step's loss was a Proxy and tracing
    failed, and no step would have kept the buffers' updates. Both are now in-place updates of the buffer, so two
    traced steps give eager's two losses and buffers; tracing leaves the model's own buffer tensors as built. Each
    update shares its buffer's colocation group: on another device (or pipeline stage) it would update a copy."""
    model, (x,) = fs.buffer_assignments()
    built = {k: (b, b.clone()) for k, b in model.named_buffers()}
    eager = copy.deepcopy(model)
    want = [eager(x).item() for _ in range(2)]
    traced = trace_model(model, (x,), name="assignments")
    for k, b in model.named_buffers():
        assert b is built[k][0] and torch.equal(b, built[k][1]), k
    assert {"add_", "mul_", "copy_"} <= set(traced.graph.op_names)
    group = dict(zip(traced.graph.op_names, traced.graph.colocation))  # an update runs where its buffer lives
    assert group["steps"] == group["add_"] and group["ema"] == group["ema_1"] == group["copy_"] != group["steps"]
    assert [traced.gm(x).item() for _ in range(2)] == pytest.approx(want, rel=1e-6)
    after = dict(eager.named_buffers())
    for k, b in traced.gm.named_buffers():
        torch.testing.assert_close(b, after[k], msg=k)


def test_a_step_that_writes_its_batch_in_place_is_traced_on_the_batch_as_given():
    """``x.mul_(2)`` on an input: tracing, the batch-mixing check and profiling run the step many times; each run
    wrote the example batch again, so the traced loss was not eager's on the user's batch and the micro-batch check
    called a per-sample model batch-mixing. Now each run gets the batch as given and the caller's is unchanged."""
    model, (batch,) = fs.input_written_in_place()
    given = {k: v.clone() for k, v in batch.items()}
    want = copy.deepcopy(model)({k: v.clone() for k, v in batch.items()}).item()
    traced = trace_model(model, (batch,), name="writes")
    profile(traced, warmup=1, repeats=2)
    for k, v in batch.items():
        assert torch.equal(v, given[k]), k
    assert traced.graph.meta["microbatchable"] is True, traced.graph.meta.get("microbatch_why")
    with buffers_restored(traced.gm, traced.example_inputs):
        assert traced.gm(*traced.example_inputs).item() == pytest.approx(want, rel=1e-6)
    assert torch.equal(batch["x"], given["x"])


def test_a_torch_autocast_block_in_forward_is_traced_with_its_precision():
    """fx records the ops of a ``torch.autocast`` block, not the precision they run in: the traced step ran the
    block in float32 (loss 0.0534560 against eager's 0.0534426 on this example; on a GPU other costs too). fx now
    refuses such a step, pointing at the user's line, and torch.export keeps the block under its autocast."""
    model, (x,) = fs.autocast_block()
    want = model(x).item()
    traced = trace_model(model, (x,), name="autocast")
    assert traced.graph.meta["trace"] == "export"
    assert "torch.autocast('cpu') in forward" in traced.graph.meta["trace_note"]
    assert "(at forward, fixtures_steps.py:" in traced.graph.meta["trace_note"]  # the user's line, not the tracer's
    assert traced.gm(x).item() == want  # bfloat16 inside the block, as in eager


@pytest.mark.parametrize("factory, finding", [
    (fs.custom_backward, "would not train 'a.weight', which the model's own step does"),
    (fs.activation_hook, "computes another gradient for 'a.weight' than the model's own step"),
])
def test_a_step_whose_gradients_tracing_cannot_keep_is_refused(factory, finding):
    """A custom ``torch.autograd.Function`` and a gradient hook registered in ``forward``: both tracers keep
    neither, and the traced step was silently another (``a`` untrained; ``a``'s gradient twice eager's). The
    build compares the traced step's gradients with the model's own and refuses in one line. (The hook's model
    failed before that: the first eager run had gradients off, and a hook cannot be registered then.)"""
    model, inputs = factory()
    with pytest.raises(ValueError, match="tracing keeps neither") as err:
        trace_model(model, inputs, name="grads")
    assert finding in str(err.value) and "\n" not in str(err.value)


def test_a_buffer_set_to_another_shape_is_the_steps_value_and_the_model_keeps_its_own(caplog):
    """``self.last = h.detach()`` into a buffer built empty: no in-place update can hold it, so the step reads the
    value as fx traced it (before, the module was left holding a Proxy) and the user is told it is not kept."""

    class Last(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.register_buffer("last", torch.zeros(0))

        def forward(self, x):
            self.last = self.a(x).detach()
            return (self.a(x) * self.last).mean()

    model, x = Last(), torch.randn(4, 8)
    built = model.last
    traced = trace_model(model, (x,), name="last")
    assert traced.graph.meta["trace"] == "fx" and "copy_" not in traced.graph.op_names
    assert model.last is built and built.shape == (0,)
    assert traced.gm(x).item() == pytest.approx(Last.forward(copy.deepcopy(model), x).item())
    assert "forward sets buffer 'last' to a tensor (4, 16)" in caplog.text


def test_an_in_place_method_on_a_view_nothing_else_reads_stays_an_fx_op():
    """``fc(x).view(b, 2, 8).relu_()``: the view is its tensor's last form, so fx's record is the step (only an
    update of a view whose tensor is read after it sends the model to torch.export)."""

    class LastView(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)

        def forward(self, x):
            h = self.a(x).view(x.size(0), 2, 8)
            h.relu_()
            return self.b(h.flatten(1)).pow(2).mean()

    model, x = LastView(), torch.randn(4, 8)
    traced = trace_model(model, (x,), name="last_view")
    assert traced.graph.meta["trace"] == "fx" and "relu_" in traced.graph.op_names
    assert traced.gm(x).item() == pytest.approx(model(x).item())


def test_a_no_grad_block_in_forward_computes_no_gradients_in_the_traced_step():
    """fx records a ``torch.no_grad()`` block's ops, not the grad mode: the EMA buffer's update took the
    activation's gradient, so the traced step's gradients were not eager's and the buffer, now part of the
    autograd graph, failed the second backward. The block's inputs are now detached: two traced steps give
    eager's losses and gradients. Updating a buffer through a view beside such a block is refused in one line
    (functionalizing the export would drop the block)."""
    model, (x,) = fs.ema_no_grad()
    eager = copy.deepcopy(model)
    traced = trace_model(model, (x,), name="ema")
    assert traced.graph.meta["trace"] == "fx"
    for _ in range(2):
        want, got = eager(x), traced.gm(x)
        want.backward()
        got.backward()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        grads = dict(eager.named_parameters())
        for name, p in traced.gm.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, msg=name)
    with pytest.raises(TraceError, match=r"updates a tensor in place .* beside a torch.no_grad\(\) block"):
        trace_model(type(model)(through_view=True), (x,), name="ema_view")


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
