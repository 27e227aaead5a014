"""Tests for the language-model benchmarks ``gpt`` and ``moe`` (issue #18): per-layer ops, a loss equal to the
eager model's, micro-batch invariance of the traced step, experts as separate placeable modules, and a random
placement on two engine workers that trains exactly like one process under gpipe and 1f1b."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch

from graphs.build import build_graph, rebuild_traced
from graphs.models import CONFIGS, LAYER_OF_MODULE, build_model, gpt, moe
from graphs.trace import TracedModel, trace_model

LM = ("gpt", "moe")


@cache
def _traced(name: str) -> TracedModel:
    model, inputs, _ = build_model(name, "small")
    return trace_model(model, inputs, name=f"{name}-small", method="fx")


def _ffn(name: str, block: int) -> str:
    return "moe" if name == "moe" and block >= CONFIGS["moe"]["small"].dense_layers else "mlp"


# --- registry and configs ---------------------------------------------------------------------------------------

def test_configs_and_parameter_counts() -> None:
    assert set(CONFIGS["gpt"]) == {"small", "medium", "paper", "1.3b"}
    assert set(CONFIGS["moe"]) == {"small", "medium", "paper"}
    p = CONFIGS["gpt"]["paper"]
    assert (p.layers, p.width, p.heads, p.vocab, p.seq_len) == (12, 768, 12, 50_257, 1024)  # GPT-2
    xl = CONFIGS["gpt"]["1.3b"]
    assert (xl.layers, xl.width, xl.heads) == (24, 2048, 16)
    for config in CONFIGS["moe"].values():  # a depth that no 4- or 8-way layer split divides
        assert config.layers % 4 and config.layers % 8 and 0 < config.dense_layers < config.layers
    # GPT-2 small by hand, head untied: embeddings + 12 blocks of 12·d² + 13·d + final LayerNorm + head.
    d, v, t = 768, 50_257, 1024
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    with torch.device("meta"):
        model = gpt.GPT(p)
    assert sum(q.numel() for q in model.parameters()) == v * d + t * d + 12 * block + 2 * d + d * v == 163_037_184


def test_layer_and_expert_of_module() -> None:
    assert LAYER_OF_MODULE["gpt"]("blocks.3.attn.qkv") == 3
    assert LAYER_OF_MODULE["gpt"]("blocks") is None and LAYER_OF_MODULE["gpt"]("head") is None
    assert LAYER_OF_MODULE["moe"]("blocks.12.moe.experts.7.fc") == 12
    assert moe.expert_of_module("blocks.2.moe.experts.3.proj") == (2, 3)
    assert moe.expert_of_module("blocks.2.moe.experts.3") == (2, 3)
    assert moe.expert_of_module("blocks.2.moe.shared.fc") is None
    assert moe.expert_of_module("blocks.2.moe.router") is None


@pytest.mark.parametrize(("overrides", "fragment"), [
    ({"heads": 5}, "width 32 must divide by heads 5"),
    ({"dense_layers": 5}, "dense_layers must be an int in [0, layers)"),
    ({"top_k": 5}, "top_k 5 exceeds experts 4"),
    ({"experts": 0}, "experts must be a positive int"),
])
def test_bad_moe_config_is_a_one_line_error(overrides: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model("moe", "small", **overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# --- tracing ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LM)
def test_traces_with_fx_into_per_layer_attention_and_mlp_ops(name: str) -> None:
    graph = _traced(name).graph
    assert graph.meta["trace"] == "fx"
    cfg = CONFIGS[name]["small"]
    ops = list(zip(graph.op_kinds, graph.module_paths))
    for i in range(cfg.layers):
        attn = [k for k, p in ops if p.startswith(f"blocks.{i}.attn")]
        # qkv and proj Linears, the two attention matmuls and the softmax are ops of their own in every block.
        assert sorted(k for k in attn if k in ("Linear", "matmul", "softmax")) == \
            ["Linear", "Linear", "matmul", "matmul", "softmax"]
        ffn = [k for k, p in ops if p.startswith(f"blocks.{i}.{_ffn(name, i)}")]
        assert ffn.count("GELU") >= 1 and ffn.count("Linear") >= 2
    kinds = dict((p, k) for k, p in ops)
    assert kinds["tok_emb"] == "Embedding" and kinds["head"] == "Linear" and kinds["loss"] == "CrossEntropyLoss"
    # The batch size is read from the input at run time, never baked into a reshape.
    assert graph.op_kinds.count("size") >= cfg.layers


@pytest.mark.parametrize("name", LM)
def test_step_loss_equals_eager_and_starts_near_uniform(name: str) -> None:
    model, inputs, _ = build_model(name, "small")
    traced = _traced(name)
    eager = model(*inputs)
    assert torch.equal(traced.gm(*inputs), eager)
    # Small init: near-uniform softmax, cross-entropy ≈ ln(vocab); not the ~0 of a mean over LayerNorm outputs.
    assert float(eager.detach()) == pytest.approx(math.log(CONFIGS[name]["small"].vocab), abs=0.1)


@pytest.mark.parametrize("name", LM)
def test_traced_step_runs_any_micro_batch_with_the_same_per_sample_loss(name: str) -> None:
    model, (tokens, targets), _ = build_model(name, "small")
    gm = _traced(name).gm
    batch = tokens.shape[0]
    with torch.no_grad():
        full = gm(tokens, targets)
        quarters = [gm(tokens[q:q + batch // 4], targets[q:q + batch // 4]) for q in range(0, batch, batch // 4)]
        per_sample = [gm(tokens[i:i + 1], targets[i:i + 1]) for i in range(batch)]
        eager = [model(tokens[i:i + 1], targets[i:i + 1]) for i in range(batch)]
    assert len(quarters) == 4 and len({float(q) for q in quarters}) == 4  # four different micro-batches
    torch.testing.assert_close(torch.stack(quarters).mean(), full, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.stack(per_sample), torch.stack(eager), rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(per_sample).mean(), full, rtol=1e-5, atol=0)


# --- experts ----------------------------------------------------------------------------------------------------

def test_experts_are_separate_placeable_modules() -> None:
    cfg = CONFIGS["moe"]["small"]
    graph = _traced("moe").graph
    groups: dict[tuple[int, int], set[int]] = {}
    for path, kind, group in zip(graph.module_paths, graph.op_kinds, graph.colocation.tolist()):
        owner = moe.expert_of_module(path)
        if owner is not None:
            groups.setdefault(owner, set()).add(group)
            assert kind in ("Linear", "GELU", "mul")
    moe_blocks = range(cfg.dense_layers, cfg.layers)
    assert set(groups) == {(i, e) for i in moe_blocks for e in range(cfg.experts)}
    # Every expert's ops (fc, act, proj, the gate multiply) are its own colocation groups: no group is shared
    # with another expert, the shared expert or the router, so each expert can go to any device.
    owners: dict[int, tuple[int, int]] = {}
    for owner, gs in groups.items():
        assert len(gs) == 4
        for g in gs:
            assert owners.setdefault(g, owner) == owner
    others = {g for p, g in zip(graph.module_paths, graph.colocation.tolist()) if moe.expert_of_module(p) is None}
    assert not others & set(owners)
    assert not any(p.startswith(f"blocks.{i}.moe") for p in graph.module_paths for i in range(cfg.dense_layers))


def test_routing_sends_each_token_to_top_k_experts() -> None:
    model, (tokens, _), _ = build_model("moe", "small")
    layer = model.blocks[CONFIGS["moe"]["small"].dense_layers].moe
    x = model.tok_emb(tokens)
    seen: list[torch.Tensor] = []
    hooks = [e.register_forward_hook(lambda m, args, out: seen.append(args[1])) for e in layer.experts]
    with torch.no_grad():
        layer(x)
    for h in hooks:
        h.remove()
    gates = torch.cat(seen, dim=-1)  # (batch, seq, experts): each expert's gate per token
    assert ((gates > 0).sum(-1) == 2).all()  # top-2 of 4
    probs = torch.softmax(layer.router(x), -1)
    torch.testing.assert_close(gates.sum(-1), probs.topk(2, -1).values.sum(-1))  # not renormalised (DeepSeekMoE)


# --- profiling and the engine -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", LM)
def test_small_config_profiles(name: str) -> None:
    graph = build_graph(name, config="small", profile="cpu")
    cost = graph.cost("cpu")
    linear = np.array([k == "Linear" for k in graph.op_kinds])
    assert (cost.fwd_s[linear] > 0).all() and (cost.bwd_s[linear] > 0).all()
    assert (graph.flops[linear] > 0).all()
    assert cost.provenance.method == "measured"


def _random_placement(graph, seed: int):
    from placer.core.placement import Placement

    rng = np.random.default_rng(seed)
    devices = rng.integers(0, 2, size=int(graph.colocation.max()) + 1)[graph.colocation]
    devices[graph.colocation == graph.colocation[-1]] = 1 - devices[0]  # both devices take part
    return Placement(devices)


@pytest.mark.slow
def test_random_placement_trains_like_one_process_with_gpipe_and_1f1b() -> None:
    from placer.core.cluster import get_cluster
    from placer.engine import EngineConfig, Measurer, reference_step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graphs = {name: build_graph(name, profile=None) for name in LM}
        with Measurer(graphs["gpt"], get_cluster("cpu-2"), config=EngineConfig(timeout_s=180)) as m:
            for seed, (name, graph) in enumerate(graphs.items()):
                if m.graph is not graph:
                    m.switch_graph(graph)
                traced = rebuild_traced(graph.meta)
                ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs)  # one batch, no split
                placement = _random_placement(graph, seed)
                assert len(placement.devices_used()) == 2
                for schedule in ("gpipe", "1f1b"):
                    out = m.run_step(placement, schedule=schedule, microbatches=4, update=False)
                    assert out.result.ok, out.result.failure
                    assert out.result.bytes_moved.sum() > 0
                    assert out.loss == pytest.approx(ref_loss, rel=1e-5)
                    assert set(out.grads) == set(ref_grads)
                    for param, g in ref_grads.items():
                        torch.testing.assert_close(out.grads[param], g, rtol=1e-4, atol=1e-6,
                                                   msg=lambda s: f"{name} {schedule} {param}: {s}")  # noqa: B023
    finally:
        torch.set_num_threads(threads)
