"""MoE: a DeepSeek-style mixture-of-experts decoder, each expert a module of its own (placing experts = expert
parallelism).

Dai et al. (2024), "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language Models":
the :mod:`graphs.models.gpt` decoder whose first ``dense_layers`` blocks keep a dense MLP and whose other blocks
replace it by a mixture of experts: a router (``Linear`` → ``softmax`` over the ``experts`` routed experts →
``topk``), routed experts that are small MLPs, and an always-active shared expert. As in DeepSeekMoE the top-k
gate values are the router's softmax probabilities, not renormalised over the k chosen experts. No auxiliary
load-balancing loss: it changes no op cost and the step's loss stays the cross-entropy.

**Dispatch is dense**: every routed expert computes on every token, and its output is multiplied by its gate
(zero unless the expert is among the token's top k) before the sum. Alternatives: dispatch by index
(``torch.where(top_i == e)``, ``x[tokens]``, ``index_add``) traces under torch.fx and gives the same loss, but
its expert inputs change shape with the data — checked on 2026-12-03, two micro-batches of 2 × 16 tokens gave
expert 0 7 and 6 tokens, expert 3 29 and 20 — so the engine's receive buffers (sized from one micro-batch) and
the profiled costs (from one batch) would not hold; capacity-based dispatch (GShard) keeps shapes static but
adds dispatch and combine einsums as large as the experts themselves. Dense dispatch is static, traceable
and batch-size independent (routing is per token), at the price of ``experts / top_k`` times the routed
experts' top-k compute — every expert op costs as much as the others, which is what a placer balances anyway.

Layout: :mod:`graphs.models.gpt`'s, with ``blocks.<i>.moe`` instead of ``blocks.<i>.mlp`` for ``i >=
dense_layers``::

    blocks.<i>.moe.router        nn.Linear(width, experts, bias=False)
    blocks.<i>.moe.experts.<e>   Expert: fc Linear(width, expert_width), act GELU, proj Linear, × its gate
    blocks.<i>.moe.shared        MLP(width, shared_width), on every token

``layer_of_module`` maps ``blocks.<i>`` (and below) to ``i``; ``expert_of_module`` maps
``blocks.<i>.moe.experts.<e>`` (and below) to ``(i, e)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from graphs.models._common import build_seeded
from graphs.models.gpt import GPT, MLP, Block, GPTConfig, _check_positive, example_inputs, layer_of_module

__all__ = ["MoEConfig", "MoEDecoder", "MoE", "Expert", "SMALL", "MEDIUM", "PAPER", "build", "layer_of_module",
           "expert_of_module"]

_EXPERT_RE = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)(?:\.|$)")


@dataclass(kw_only=True, frozen=True)
class MoEConfig(GPTConfig):
    """Sizes of one MoE decoder training step: a GPT's (``layers`` counts the dense blocks too; ``mlp_ratio`` sizes
    the dense blocks' MLP) plus the experts'."""

    MODEL: ClassVar[str] = "moe"

    dense_layers: int
    """The first blocks, with a dense MLP (DeepSeekMoE: 1); the other ``layers - dense_layers`` are MoE."""
    experts: int
    """Routed experts per MoE block."""
    expert_width: int
    """Hidden width of each routed expert's MLP."""
    shared_width: int
    """Hidden width of the shared expert's MLP (DeepSeekMoE 16B: 2 shared experts, here one twice as wide)."""
    top_k: int = 2
    """Experts each token is routed to."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("moe", self, ("experts", "expert_width", "shared_width", "top_k"))
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) \
                or not 0 <= self.dense_layers < self.layers:
            raise ValueError(f"moe config: dense_layers must be an int in [0, layers) = [0, {self.layers}), "
                             f"got {self.dense_layers!r}")
        if self.top_k > self.experts:
            raise ValueError(f"moe config: top_k {self.top_k} exceeds experts {self.experts}")


SMALL = MoEConfig(batch=8, seq_len=16, vocab=512, width=32, layers=5, heads=2, dense_layers=1, experts=4,
                  expert_width=32, shared_width=64)
"""For tests: 1 dense + 4 MoE blocks of 4 experts, milliseconds per step; batch 8 = 4 micro-batches of 2."""

MEDIUM = MoEConfig(batch=12, seq_len=128, vocab=32_000, width=384, layers=10, heads=6, dense_layers=2, experts=8,
                   expert_width=256, shared_width=512)
"""Real runs on this machine: 2 dense + 8 MoE blocks of 8 experts, a 32k vocabulary; one step takes 3.2 s on one
core (eager; the profiled traced step 3.5 s: 1.3 s forward, 2.2 s backward, thread time; 2026-12-03). Forward +
backward, an expert takes 17 ms, a block 0.24 s, the head and loss 1.6 s."""

PAPER = MoEConfig(batch=4, seq_len=1024, vocab=102_400, width=1024, layers=14, heads=16, dense_layers=1,
                  experts=8, expert_width=704, shared_width=1408)
"""A small DeepSeekMoE: DeepSeekMoE 16B's proportions (first block dense, expert width 0.6875·d, shared experts
twice an expert, 100k vocabulary of 102,400 tokens, 64-wide heads) at half its width (1024) and half its depth
(14 blocks, which divides by neither 4 nor 8), with 8 routed experts instead of 64 (dense dispatch computes all
of them) and a 1,024-token context: 0.47B parameters, batch 4 = 4 micro-batches of 1. Its whole step needs
~24 GB here, so the shipped graph's costs are estimated from a profiled 2-block slice (``graphs/data/
__main__.py``): 83 s per step on one core (29 s forward, 54 s backward)."""


class Expert(MLP):
    """One routed expert: its MLP's output scaled by its gate (zero for tokens not routed to it)."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(x) * gate


class MoE(nn.Module):
    """Router → top-k gates; shared expert + sum of gated routed experts (dense dispatch)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k = config.top_k
        self.router = nn.Linear(config.width, config.experts, bias=False)
        self.experts = nn.ModuleList(Expert(config.width, config.expert_width) for _ in range(config.experts))
        self.shared = MLP(config.width, config.shared_width)

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.router(x), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)  # per token: its top-k probabilities, else 0
        out = self.shared(x)
        for e, expert in enumerate(self.experts):
            out = out + expert(x, gates[..., e:e + 1])
        return out


class MoEDecoder(GPT):
    """:class:`~graphs.models.gpt.GPT` with MoE feed-forward layers after the first ``dense_layers`` blocks."""

    def __init__(self, config: MoEConfig) -> None:
        blocks = [Block(config) if i < config.dense_layers else Block(config, MoE(config), ffn_name="moe")
                  for i in range(config.layers)]
        super().__init__(config, blocks=blocks)  # the embeddings, head and GPT-2's init, experts included


def build(config: MoEConfig, *, seed: int = 0) -> tuple[MoEDecoder, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``)."""
    return build_seeded(MoEDecoder, config, example_inputs, seed)


def expert_of_module(path: str) -> tuple[int, int] | None:
    """``(block, expert)`` of ``blocks.<i>.moe.experts.<e>`` or anything under it; ``None`` otherwise."""
    match = _EXPERT_RE.match(path)
    return (int(match.group(1)), int(match.group(2))) if match else None
