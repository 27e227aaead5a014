"""Tracing inside composite modules, modules kept whole, the symbolic batch, micro-batch refusal, default loss."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` factories

from graphs.build import build_graph, rebuild_traced  # noqa: E402
from graphs.microbatch import _run, check_microbatchable, find_batch_mixing  # noqa: E402
from graphs.loss import DEFAULT_LOSS  # noqa: E402
from graphs.trace import trace_model  # noqa: E402
from graphs.tracer import is_primitive  # noqa: E402
from placer.core.cluster import get_cluster  # noqa: E402
from placer.core.placement import Placement  # noqa: E402
from placer.costmodel.schedules import build_schedule  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402
from tests import fixtures_models as fm  # noqa: E402
from tests import fixtures_state as fst  # noqa: E402
from tests import fixtures_steps as fs  # noqa: E402


def _trace(factory, **kw):
    model, inputs, *rest = factory(**kw)
    return model, inputs, trace_model(model, inputs, rest[0] if rest else None, name=factory.__name__, meta={})


# ---------------------------------------------------------------------------------------------- inside composites


def test_transformer_encoder_lm_traces_to_per_layer_ops():
    model, inputs, traced = _trace(fm.encoder_lm)
    g = traced.graph
    assert g.meta["trace"] == "fx" and g.meta["kept_whole"] == {} and g.meta["microbatchable"] is True
    assert "TransformerEncoder" not in g.op_kinds and "TransformerEncoderLayer" not in g.op_kinds
    for layer in range(fm.LM_LAYERS):
        prefix = f"encoder.layers.{layer}"
        attention = [i for i, p in enumerate(g.module_paths) if p == f"{prefix}.self_attn" and g.op_kinds[i] !=
                     "get_attr"]
        assert attention, f"no attention op in layer {layer}"
        assert g.op_kinds[g.module_paths.index(f"{prefix}.linear1")] == "Linear"  # the MLP, one op per Linear
        assert g.op_kinds[g.module_paths.index(f"{prefix}.linear2")] == "Linear"
        assert sum(p in (f"{prefix}.norm1", f"{prefix}.norm2") for p in g.module_paths) == 2
    assert g.op_kinds.count("Embedding") == 1 and g.module_paths[g.op_kinds.index("Embedding")] == "embed"
    assert g.n > 60  # fx's own leaf rule gave 7 ops, the encoder one of them
    torch.testing.assert_close(traced.gm(*inputs), model(*inputs))
    half = tuple(x[:3] for x in inputs)  # the batch is symbolic: the graph runs at any batch size
    torch.testing.assert_close(traced.gm(*half), model(*half))


def test_leaf_rule_is_the_primitive_layers():
    for m in (nn.Linear(2, 2), nn.Conv2d(1, 1, 1), nn.LayerNorm(2), nn.Embedding(3, 2), nn.LSTMCell(2, 2),
              nn.LSTM(2, 2), nn.Dropout(), nn.ReLU(), nn.BatchNorm1d(2)):
        assert is_primitive(m), type(m).__name__
    for m in (nn.Sequential(), nn.ModuleList(), nn.MultiheadAttention(4, 2), fm.MLP(),
              nn.TransformerEncoderLayer(4, 2)):
        assert not is_primitive(m), type(m).__name__


def test_module_fx_cannot_enter_is_kept_whole_and_recorded():
    g = build_graph("tests.fixtures_models:kept_whole", profile=None)  # export fails too: fx's graph is used
    traced = rebuild_traced(g.meta)
    assert traced.graph.op_names == g.op_names and g.meta["trace"] == "fx"
    torch.manual_seed(0)  # as build_graph seeds the factory: the same parameters and inputs
    model, (x,) = fm.kept_whole()
    assert list(g.meta["kept_whole"]) == ["inner"] and "export: " in g.meta["trace_note"]
    why = g.meta["kept_whole"]["inner"]
    assert "control flow" in why and "\n" not in why
    assert g.op_kinds[g.module_paths.index("inner")] == "DataBranch"  # one op, the module whole
    assert g.op_kinds[g.module_paths.index("pre")] == "Linear"
    torch.testing.assert_close(traced.gm(x), model(x).pow(2).mean())


def test_shipped_benchmarks_keep_their_ops():
    pytest.importorskip("graphs.models")
    for name in ("rnnlm", "nmt"):
        g = build_graph(name, profile=None)
        legacy = rebuild_traced({"source": g.meta["source"], "trace": "fx"})  # no kept_whole: the old tracer
        assert g.op_names == legacy.graph.op_names
        assert g.meta["microbatchable"] is True and g.meta["loss"] == "the model's output (a scalar)"


# ---------------------------------------------------------------------------------------------- micro-batching


def test_hard_coded_batch_is_found_and_refused_everywhere(tmp_path):
    g = build_graph("tests.fixtures_models:hard_coded_batch", profile=None)
    assert g.meta["microbatchable"] is False and g.meta["microbatch_op"] == "view"
    cluster = get_cluster("cpu-2")
    pl = Placement(np.array([0, 0, 1, 1, 1]))
    for call in (lambda: check_microbatchable(g, 4),
                 lambda: build_schedule("gpipe", g, pl, 2, microbatches=4),
                 lambda: Simulator(g.replace(costs=_zero_costs(g)), cluster).run(pl, schedule="1f1b",
                                                                                 microbatches=4)):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and "'view'" in msg and "4 micro-batches" in msg
    from graphs.grouping import coarsen

    with pytest.raises(ValueError, match="'view'"):  # the simulator on the coarse graph refuses too
        check_microbatchable(coarsen(g, 2)[1], 2)
    check_microbatchable(g, 1)  # one micro-batch is the whole batch: fine
    build_schedule("none", g, pl, 2, microbatches=1)
    from placer.io.document import save_placement
    from placer.io.loaders import stage_modules

    path = save_placement(tmp_path / "p.json", g, cluster, pl, method="test", schedule="gpipe", microbatches=2)
    model, inputs = fm.hard_coded_batch()
    with pytest.raises(ValueError, match="'view'"):
        stage_modules(model, path, example_inputs=inputs)


def _zero_costs(g):
    from graphs.ir import OpCosts, Provenance

    prov = Provenance(device="cpu", threads=1, torch_version="", date="", method="estimated", note="test")
    return {"cpu": OpCosts(fwd_s=np.full(g.n, 1e-3), bwd_s=np.full(g.n, 1e-3), provenance=prov)}


def test_batch_mixing_reshape_and_failures_named():
    _, inputs, traced = _trace(fm.pairs)
    assert traced.graph.meta["microbatch_op"] == "reshape"

    class Baked(nn.Module):
        def forward(self, x):
            return x.reshape(6, 2, 4).mean(1)  # the example's batch, written in: fails on any other

    traced = trace_model(Baked(), (torch.randn(6, 8),), name="b", meta={})
    assert traced.graph.meta["microbatch_op"] == "reshape"
    assert "fails on a micro-batch" in traced.graph.meta["microbatch_why"]


def test_a_batch_on_dim_1_is_not_split_along_time():
    """nn.GRU's default layout puts the batch on dim 1: a micro-batch along dim 0 is half the time steps, and
    the GRU's final state on it is neither the batch's nor a sum of it. The check passed it as "unknown" (a
    batch reduction) and the engine split the sequence."""
    _, inputs, traced = _trace(fs.sequence_first)
    meta = traced.graph.meta
    assert meta["microbatchable"] is False and meta["microbatch_op"] == "rnn", meta
    assert "not on dim 0" in meta["microbatch_why"] and "batch_first" in meta["microbatch_why"]


def test_attention_over_a_sequence_first_batch_is_not_split_along_time():
    """Copies of one micro-batch hide attention across dim 0 (duplicated keys change no weight); the example's
    own samples show it. The check passed nn.TransformerEncoder with batch_first=False, and the engine split the
    sequence."""
    _, inputs, traced = _trace(fs.sequence_first_attention)
    meta = traced.graph.meta
    assert meta["microbatchable"] is False, meta
    assert "batch_first" in meta["microbatch_why"] and "copies" in meta["microbatch_why"], meta
    with pytest.raises(ValueError, match="cannot be split into 2 micro-batches"):
        check_microbatchable(traced.graph, 2)


def test_an_input_shared_by_all_samples_is_named_in_the_refusal():
    """Position ids of shape (1, T) beside a (B, T) batch: the batch has no common split, and the refusal said
    "the example batch (8) has no micro-batch", as if 8 could not be split."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 1)

        def forward(self, x, pos):
            return self.fc(x + pos).pow(2).mean()

    traced = trace_model(Shared(), (torch.randn(8, 6), torch.arange(6.0)[None]), name="s", meta={})
    why = traced.graph.meta["microbatch_why"]
    assert traced.graph.meta["microbatchable"] is False
    assert "input 1 has 1 rows on dim 0 beside 8 of input 0" in why and "(1, T)" in why, why


@pytest.mark.parametrize("factory", [fm.mlp, fm.sized, fm.lstm, fm.inplace_bn, fm.encoder_lm, fm.nn_transformer,
                                     fs.keyed_batch, fst.buffer_updates, fs.loss_in_a_dict, fm.mlp_squared_loss,
                                     fs.vit_like,  # views of parameters: the check itself crashed on them
                                     fs.reductions,  # a token count, a variance, a norm: reductions, not mixing
                                     fs.padded_attention])  # -inf scores: equal where both are -inf
def test_per_sample_models_are_microbatchable(factory):
    _, inputs, traced = _trace(factory)
    assert traced.graph.meta["microbatchable"] is True, traced.graph.meta
    assert find_batch_mixing(traced.gm, inputs) is None


def test_ids_sorted_across_the_batch_are_not_mixing():
    """Tokens sorted by expert id (Qwen2-MoE, OLMoE): on copies of a micro-batch the order and the positions
    differ, but the rows come back to their samples. The check took the sort for mixing, so those models were
    never pipelined."""
    _, inputs, traced = _trace(fs.tokens_sorted_by_expert)
    assert traced.graph.meta["trace"] == "fx" and traced.graph.meta["microbatchable"] is True, traced.graph.meta


def test_the_check_reads_uninitialised_memory_as_zeros():
    """``new_empty`` filled slice by slice (DeepSeek-V3's attention under torch.export): what is not written yet
    differed between the check's runs, and the check named the op reading it. Deterministic mode fills such
    memory with NaN; the check's runs see zeros."""
    _, inputs, traced = _trace(fs.filled_empty)
    assert traced.graph.meta["microbatchable"] is True
    seen = {}
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert _run(traced.gm, inputs, lambda n, v: seen.__setitem__(n.name, v)) is None
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(seen["new_empty"], torch.zeros(8, 8))


def test_dropout_and_batchnorm_do_not_count_as_mixing():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    traced = trace_model(model, (torch.randn(8, 4),), name="s", meta={})
    assert traced.graph.meta["microbatchable"] is True
    # attention dropout inside F.multi_head_attention_forward (one op): random, not mixing
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.3, batch_first=True).train()
    traced = trace_model(layer, (torch.randn(4, 5, 8),), name="l", meta={})
    assert traced.graph.meta["microbatchable"] is True and traced.graph.meta["kept_whole"] == {}


# ---------------------------------------------------------------------------------------------- default loss


def test_default_loss_is_mean_of_squares_and_not_zero_after_layernorm():
    model, inputs, traced = _trace(fm.nn_transformer)
    g = traced.graph
    assert g.meta["loss"] == DEFAULT_LOSS
    assert g.meta["trace"] == "fx" and g.meta["kept_whole"] == {}
    with torch.no_grad():
        out = model(*inputs)
    assert abs(float(out.mean())) < 1e-5  # the old default: ~0 for a LayerNorm-ended model
    loss = traced.gm(*inputs)
    torch.testing.assert_close(loss, out.pow(2).mean())
    assert float(loss.detach()) > 0.5
    model, x = fm.mlp_squared_loss()[:2]
    assert trace_model(model, x, lambda o: o.sum(), name="m", meta={}).graph.meta["loss"] == \
        "given by the model's factory"


def test_inputs_split_along_dim_0_in_containers_and_every_tensor_moves_to_a_device():
    from graphs.batch import batched_tensors, check_split, input_batches, inputs_to, split_inputs

    batch = ({"ids": torch.arange(8).reshape(4, 2), "scale": torch.tensor(2.0)}, [torch.ones(4, 3)], None)
    assert input_batches(batch) == [("input 0['ids']", 4), ("input 1[0]", 4)]
    part = split_inputs(batch, 2, 1)
    assert part[0]["ids"].tolist() == [[4, 5], [6, 7]] and part[0]["scale"] is batch[0]["scale"]
    assert part[1][0].shape == (2, 3) and part[2] is None
    assert [t.shape for t in batched_tensors(batch)] == [(4, 2), (4, 3)]
    for uneven in (lambda: check_split(batch, 3), lambda: split_inputs(batch, 3, 0)):  # the splitter checks too
        with pytest.raises(ValueError, match=r"input 0\['ids'\] has batch 4, not divisible into 3"):
            uneven()
    moved = inputs_to(batch, "meta")  # a 0-d tensor too (the GPU worker's inputs)
    assert moved[0]["scale"].device.type == "meta" and moved[1][0].device.type == "meta" and moved[2] is None
