"""Tests for graphs.models: the three ColocRL benchmark models, their configs and the registry."""

from __future__ import annotations

import math
from functools import cache

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, symbolic_trace

from graphs.models import CONFIGS, LAYER_OF_MODULE, MODELS, build_model, inception_v3, nmt, rnnlm

COLOCRL = ("inception_v3", "nmt", "rnnlm")  # gpt and moe are tested in tests/test_models_lm.py
ALL = [(name, config) for name in COLOCRL for config in ("small", "paper")]


@cache
def _built(name: str, config: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], GraphModule]:
    """Build and trace once per (model, config): the paper models take about a second each to initialise."""
    model, inputs, loss_fn = build_model(name, config)
    assert loss_fn is None
    return model, inputs, symbolic_trace(model)


def _cell_nodes(gm: GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.LSTMCell)]


def _lstm_steps(name: str, cfg: object) -> int:
    if name == "rnnlm":
        return cfg.layers * cfg.seq_len  # type: ignore[attr-defined]
    if name == "nmt":
        return cfg.layers * (cfg.src_len + cfg.tgt_len)  # type: ignore[attr-defined]
    return 0


# --- building and tracing ---------------------------------------------------------------------------------------

def test_registry_names() -> None:
    assert set(MODELS) == set(CONFIGS) == set(LAYER_OF_MODULE) == {*COLOCRL, "gpt", "moe"}
    assert all(set(CONFIGS[name]) == {"paper", "small"} for name in COLOCRL)


@pytest.mark.parametrize(("name", "config"), ALL)
def test_builds_and_traces_with_one_cell_op_per_layer_and_step(name: str, config: str) -> None:
    model, inputs, gm = _built(name, config)
    assert model.training
    cfg = CONFIGS[name][config]
    # RNNLM small 2×4 = 8, NMT small 2×(4+4) = 16; paper: 2×35 = 70 and 2×(30+30) = 120.
    assert len(_cell_nodes(gm)) == _lstm_steps(name, cfg)
    assert {"small": {"rnnlm": 8, "nmt": 16}, "paper": {"rnnlm": 70, "nmt": 120}}[config].get(name, 0) \
        == len(_cell_nodes(gm))
    # The loss is one placeable module op per step (per model for Inception), not a loss_fn outside the graph.
    losses = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "loss"]
    steps = {"rnnlm": getattr(cfg, "seq_len", 0), "nmt": getattr(cfg, "tgt_len", 0), "inception_v3": 1}[name]
    assert len(losses) == steps
    assert all(t.shape[0] == cfg.batch for t in inputs)


def test_inception_has_94_convolutions_and_no_aux_head() -> None:
    _, _, gm = _built("inception_v3", "small")
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)]
    # Stem 5 + 3×InceptionA 7 + InceptionB 4 + 4×InceptionC 10 + InceptionD 6 + 2×InceptionE 9 = 94.
    assert len(convs) == 94
    assert not any("Aux" in name for name, _ in gm.named_modules())


# --- parameter counts, worked by hand ----------------------------------------------------------------------------

def _lstm_cell_params(n_in: int, hidden: int) -> int:
    return 4 * hidden * (n_in + hidden) + 2 * 4 * hidden  # W_ih, W_hh, b_ih, b_hh


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_rnnlm_parameter_counts() -> None:
    # small: embedding 200·64 + two cells (64 → 64) + projection 64·200 + 200.
    assert _n_params(_built("rnnlm", "small")[0]) == 12_800 + 2 * _lstm_cell_params(64, 64) + 13_000 == 92_360
    # paper = Zaremba et al.'s large model, which they report as 66M parameters.
    expected = 10_000 * 1500 + 2 * _lstm_cell_params(1500, 1500) + 1500 * 10_000 + 10_000
    assert _n_params(_built("rnnlm", "paper")[0]) == expected == 66_034_000


def test_nmt_parameter_counts() -> None:
    # small: two embeddings, four cells, attention W_a (64·64) and W_c (128·64), projection.
    expected = 2 * 12_800 + 4 * _lstm_cell_params(64, 64) + 64 * 64 + 128 * 64 + 13_000
    assert _n_params(_built("nmt", "small")[0]) == expected == 184_008


def test_inception_v3_paper_parameter_count() -> None:
    n = _n_params(_built("inception_v3", "paper")[0])
    assert n == 23_834_568  # torchvision's inception_v3(aux_logits=False)
    assert abs(n - 23.8e6) / 23.8e6 < 0.02


# --- forward / backward (small configs) -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_small_forward_backward_gives_finite_loss_and_every_gradient(name: str) -> None:
    model, inputs, _ = build_model(name, "small")
    loss = model(*inputs)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in model.parameters())  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "vocab"), [("rnnlm", 200), ("nmt", 200)])
def test_initial_loss_is_near_uniform_guess(name: str, vocab: int) -> None:
    # Small uniform init → near-uniform softmax → cross-entropy ≈ ln(vocab) = 5.298 for 200 words.
    model, inputs, _ = build_model(name, "small")
    assert model(*inputs).item() == pytest.approx(math.log(vocab), abs=0.05)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_traced_graph_matches_eager_and_accepts_a_micro_batch(name: str) -> None:
    model, inputs, _ = build_model(name, "small")
    gm = symbolic_trace(model)
    assert torch.equal(gm(*inputs), model(*inputs))
    half = tuple(t[: t.shape[0] // 2] for t in inputs)  # no batch size is baked into the trace
    assert torch.equal(gm(*half), model(*half))
    one = tuple(t[:1] for t in inputs)  # a micro-batch of one must work too (BatchNorm needs > 1 value)
    assert torch.isfinite(gm(*one))


def test_inception_minimum_image_size() -> None:
    model, (images, labels), _ = build_model("inception_v3", "small", image_size=inception_v3.MIN_IMAGE_SIZE)
    assert torch.isfinite(model(images, labels))  # 75×75 is the smallest that runs (74 is rejected below)


# --- the layer/time wavefront -----------------------------------------------------------------------------------

def _cell_ancestors(gm: GraphModule) -> dict[torch.fx.Node, int]:
    """Number of LSTMCell ops each LSTMCell op transitively depends on."""
    cells = set(_cell_nodes(gm))
    anc: dict[torch.fx.Node, frozenset[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        acc: frozenset[torch.fx.Node] = frozenset()
        for inp in node.all_input_nodes:
            acc |= anc[inp] | ({inp} if inp in cells else frozenset())
        anc[node] = acc
    return {c: len(anc[c]) for c in cells}


def test_rnnlm_cells_form_a_grid() -> None:
    gm = symbolic_trace(build_model("rnnlm", "small", seq_len=3, layers=3)[0])
    counts = _cell_ancestors(gm)
    for layer in range(3):
        per_step = [n for n in _cell_nodes(gm) if n.target == f"layers.{layer}"]
        # Cell (l, t) depends on exactly the cells (l' ≤ l, t' ≤ t) other than itself.
        assert [counts[n] for n in per_step] == [(layer + 1) * (t + 1) - 1 for t in range(3)]


def test_nmt_decoder_keeps_the_wavefront() -> None:
    gm = symbolic_trace(build_model("nmt", "small", src_len=3, tgt_len=4)[0])
    counts = _cell_ancestors(gm)
    for layer in range(2):
        dec = [n for n in _cell_nodes(gm) if n.target == f"decoder.{layer}"]
        # Decoder (l, t): decoder cells (l' ≤ l, t' ≤ t) + encoder layers ≤ l (3 steps each). Input feeding
        # (attention output into decoder layer 0) would make layer 0 depend on layer 1 and break this.
        assert [counts[n] for n in dec] == [(layer + 1) * (t + 1) - 1 + (layer + 1) * 3 for t in range(4)]


# --- layer_of_module for the expert placer -------------------------------------------------------------------------

def test_layer_of_module() -> None:
    assert rnnlm.layer_of_module("layers.1") == 1
    assert rnnlm.layer_of_module("layers.10.weight_ih") == 10
    assert rnnlm.layer_of_module("layers") is None
    assert rnnlm.layer_of_module("proj") is None
    assert nmt.layer_of_module("encoder.0") == 0
    assert nmt.layer_of_module("decoder.1") == 1
    assert nmt.layer_of_module("attention.score") is None
    assert nmt.layer_of_module("embed_src") is None
    assert inception_v3.layer_of_module("Mixed_5b.branch1x1.conv") is None
    assert rnnlm.expert_layer_of_module("embed", 2) == 0
    assert rnnlm.expert_layer_of_module("loss", 2) == 1
    assert nmt.expert_layer_of_module("attention.combine", 4) == 3
    assert nmt.expert_layer_of_module("embed_tgt", 4) == 0
    assert nmt.expert_layer_of_module("", 4) is None


@pytest.mark.parametrize(("name", "module"), [("rnnlm", rnnlm), ("nmt", nmt)])
def test_expert_rule_covers_every_traced_module(name: str, module: object) -> None:
    _, _, gm = _built(name, "small")
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    layers = CONFIGS[name]["small"].layers
    assert all(module.expert_layer_of_module(t, layers) is not None for t in targets)  # type: ignore[attr-defined]
    assert {module.layer_of_module(t) for t in targets} == {None, 0, 1}  # type: ignore[attr-defined]


# --- determinism ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_seed_same_model_and_inputs_and_global_rng_untouched(name: str) -> None:
    rng_before = torch.get_rng_state()
    m1, x1, _ = build_model(name, "small", seed=7)
    m2, x2, _ = build_model(name, "small", seed=7)
    m3, x3, _ = build_model(name, "small", seed=8)
    assert torch.equal(torch.get_rng_state(), rng_before)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    assert any(not torch.equal(s1[k], s3[k]) for k in s1 if s1[k].is_floating_point())
    assert any(not torch.equal(a, b) for a, b in zip(x1, x3))


# --- configuration and errors -----------------------------------------------------------------------------------

def test_overrides_replace_fields() -> None:
    model, (tokens, targets), _ = build_model("rnnlm", "small", batch=3, seq_len=5, vocab=50, hidden=16)
    assert tokens.shape == targets.shape == (3, 5)
    assert int(tokens.max()) < 50 and model.proj.out_features == 50 and model.layers[1].hidden_size == 16
    assert len(_cell_nodes(symbolic_trace(model))) == 10
    images, _ = build_model("inception_v3", "small", image_size=80)[1]
    assert images.shape == (2, 3, 80, 80)


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        (("resnet",), {}, "valid models: gpt, inception_v3, moe, nmt, rnnlm"),
        (("rnnlm", "huge"), {}, "valid configs: paper, small"),
        (("nmt", "small"), {"seq_len": 3}, "valid: batch, src_len, tgt_len"),
        (("rnnlm", "small"), {"hidden": 0}, "hidden must be a positive int"),
        (("rnnlm", "small"), {"batch": 2.5}, "batch must be a positive int"),
        (("inception_v3", "small"), {"image_size": 74}, "image_size must be >= 75"),
        (("inception_v3", "small"), {"dropout": 1.0}, "dropout must be in [0, 1)"),
        (("rnnlm", "small"), {"seed": "x"}, "seed must be an int"),
    ],
)
def test_bad_input_gives_one_line_value_error(args: tuple, kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model(*args, **kwargs)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
