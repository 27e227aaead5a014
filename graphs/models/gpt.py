"""GPT: a decoder-only transformer language model (GPT-2's layout), written so that torch.fx sees every op.

Radford et al. (2019), "Language Models are Unsupervised Multitask Learners" (GPT-2): token + learned position
embedding, ``layers`` pre-LayerNorm blocks of causal self-attention and a GELU MLP with residual connections, a
final LayerNorm and a vocabulary head; the loss (next-token cross-entropy) is computed inside ``forward`` so the
softmax over the vocabulary is an op of the traced graph, as in :mod:`graphs.models.rnnlm`.

Attention is spelt out (``qkv`` Linear, ``split``, ``view``/``transpose`` into heads, ``matmul``, scale, causal
mask, ``softmax``, ``matmul``, ``proj`` Linear) instead of ``nn.MultiheadAttention`` or
``F.scaled_dot_product_attention``: fx keeps a torch.nn module whole, and a placer can only move what the graph
shows. Every reshape takes the batch and sequence sizes from the input at run time (``x.size(0)``,
``x.size(1)``: ``size`` ops in the graph), so one traced step runs any micro-batch size. Sequences are always
``seq_len`` tokens long: the position ids and the causal mask are buffers of that length, used whole.

Layout (module paths)::

    tok_emb               nn.Embedding(vocab, width)
    pos_emb               nn.Embedding(seq_len, width)       on the ``positions`` buffer (0..seq_len-1)
    blocks.<i>.ln_1       nn.LayerNorm(width)
    blocks.<i>.attn.qkv   nn.Linear(width, 3·width)          the causal ``mask`` is a buffer of attn
    blocks.<i>.attn.proj  nn.Linear(width, width)
    blocks.<i>.ln_2       nn.LayerNorm(width)
    blocks.<i>.mlp.fc     nn.Linear(width, mlp_ratio·width)
    blocks.<i>.mlp.act    nn.GELU (tanh approximation, as GPT-2)
    blocks.<i>.mlp.proj   nn.Linear(mlp_ratio·width, width)
    ln_f                  nn.LayerNorm(width)
    head                  nn.Linear(width, vocab, bias=False)
    loss                  nn.CrossEntropyLoss                 on the (batch·seq_len, vocab) logits

The head is **not** tied to ``tok_emb`` (GPT-2 ties them). Tied, they would be one colocation group, so the
first and the last pipeline stage could never be on different devices; untied, they are the two ends of the
imbalance this benchmark is for: the embedding holds most of the parameters and does almost no work, the head
does several blocks' worth of work. ``layer_of_module`` maps ``blocks.<i>`` (and below) to ``i``.

No dropout (placed runs must equal the single-device step, see :mod:`graphs.models.rnnlm`). Inputs are int64
``tokens`` and ``targets`` of shape ``(batch, seq_len)``; ``forward`` returns the scalar mean loss.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from graphs.models._common import build_seeded

__all__ = ["GPTConfig", "GPT", "Block", "CausalSelfAttention", "MLP", "SMALL", "MEDIUM", "PAPER", "XL_1_3B",
           "build", "layer_of_module", "example_inputs", "init_transformer"]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)(?:\.|$)")


def _check_positive(model: str, config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{model} config: {name} must be a positive int, got {value!r}")


@dataclass(kw_only=True, frozen=True)
class GPTConfig:
    """Sizes of one GPT training step (:class:`graphs.models.moe.MoEConfig` extends it)."""

    MODEL: ClassVar[str] = "gpt"
    """The model's name in error messages."""

    batch: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence (the context length; also the rows of ``pos_emb``)."""
    vocab: int
    """Vocabulary size: rows of ``tok_emb``, columns of the head and the softmax."""
    width: int
    """Model width d (embedding and residual stream)."""
    layers: int
    """Transformer blocks."""
    heads: int
    """Attention heads per block; ``width`` must divide by it."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of ``width`` (GPT-2: 4)."""
    init_std: float = 0.02
    """Weights start normal with this std (GPT-2: 0.02); residual output projections are scaled down by
    sqrt(2·layers) as in GPT-2."""

    def __post_init__(self) -> None:
        _check_positive(self.MODEL, self, ("batch", "seq_len", "vocab", "width", "layers", "heads", "mlp_ratio"))
        if self.width % self.heads:
            raise ValueError(f"{self.MODEL} config: width {self.width} must divide by heads {self.heads}")
        if not self.init_std > 0:
            raise ValueError(f"{self.MODEL} config: init_std must be > 0, got {self.init_std!r}")


SMALL = GPTConfig(batch=8, seq_len=16, vocab=256, width=32, layers=2, heads=2)
"""For tests: 2 blocks, milliseconds per step; batch 8 splits into 4 micro-batches of 2."""

MEDIUM = GPTConfig(batch=16, seq_len=128, vocab=16_384, width=512, layers=8, heads=8)
"""Real runs on this machine: one training step takes 3.5 s on one core (eager; the profiled traced step 2.9 s:
1.0 s forward, 1.8 s backward, thread time; 2026-12-03). Forward + backward, a block takes 0.26 s (far above the
~3 ms a cross-worker message costs here), the head and loss 1.15 s: four and a half blocks."""

PAPER = GPTConfig(batch=2, seq_len=1024, vocab=50_257, width=768, layers=12, heads=12)
"""GPT-2 small (124M parameters tied, 163M here with the head untied): 12 blocks, width 768, 12 heads, 50,257 tokens,
1,024-token context. Batch 2, set by this machine's memory: profiling holds the activations of about two steps
(12.4 GB peak at batch 2; batch 4 passed 19 GB of the 23 and was stopped), and 2 is the smallest batch that still
splits into micro-batches. Measured 2026-12-03 on one core: 16.8 s per step (eager; the traced step 6.7 s
forward, 10.6 s backward, thread time), build + profile 138-189 s. GPT-2 itself trained with 512 sequences per step."""

XL_1_3B = GPTConfig(batch=4, seq_len=1024, vocab=50_257, width=2048, layers=24, heads=16)
"""The ~1.3B variant (GPT-3 XL's depth and width, Brown et al. 2020; 16 heads of 128): 1.42B parameters with
the head untied. Its step does not fit this machine (parameters and gradients alone are 11 GB), so its shipped
graph is traced on the meta device with costs estimated from a profiled one-block slice (``graphs/data/
__main__.py``); batch 4 = 4 micro-batches of 1, for the GPU clusters it is meant for."""


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with every step an op of the traced graph."""

    def __init__(self, width: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        # Additive mask (0 on and below the diagonal, -inf above). Used whole, not sliced to the input's length:
        # fx hands modules real buffers, which a slice bound taken from the input (a proxy) cannot index.
        self.register_buffer("mask", _causal_mask(seq_len), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        batch, seq = x.size(0), x.size(1)  # from the input, never the config: any micro-batch runs
        q, k, v = self.qkv(x).split(self.width, dim=2)
        q = q.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale + self.mask
        y = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.proj(y.transpose(1, 2).contiguous().view(batch, seq, self.width))


class MLP(nn.Module):
    """Linear → GELU → Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, config: GPTConfig, ffn: nn.Module | None = None, ffn_name: str = "mlp") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.width)
        self.attn = CausalSelfAttention(config.width, config.heads, config.seq_len)
        self.ln_2 = nn.LayerNorm(config.width)
        self.ffn_name = ffn_name
        # The feed-forward part is registered under its own name (``mlp``, or ``moe`` in graphs.models.moe).
        self.add_module(ffn_name, ffn if ffn is not None else MLP(config.width, config.mlp_ratio * config.width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + getattr(self, self.ffn_name)(self.ln_2(x))


class GPT(nn.Module):
    """Embeddings → blocks → final LayerNorm → vocabulary head → cross-entropy."""

    def __init__(self, config: GPTConfig, blocks: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab, config.width)
        self.pos_emb = nn.Embedding(config.seq_len, config.width)
        self.register_buffer("positions", torch.arange(config.seq_len), persistent=False)
        self.blocks = nn.ModuleList(blocks if blocks is not None else [Block(config) for _ in range(config.layers)])
        self.ln_f = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``tokens`` (batch, seq) against ``targets`` (batch, seq)."""
        x = self.tok_emb(tokens) + self.pos_emb(self.positions)  # (batch, seq, width) + (seq, width)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        # flatten(0, 1) merges batch and time without naming the batch size.
        return self.loss(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """GPT-2's initialisation from ``generator`` only (see :func:`init_transformer`)."""
        init_transformer(self, self.config.init_std, self.config.layers, generator)


def _causal_mask(seq_len: int) -> Tensor:
    return torch.full((seq_len, seq_len), float("-inf")).triu(1)


@torch.no_grad()
def init_transformer(model: nn.Module, std: float, layers: int, generator: torch.Generator) -> None:
    """Linear and Embedding weights normal(0, ``std``), biases 0, LayerNorm 1/0; the output projection of every
    residual branch (``*.proj`` and expert ``*.proj``) with ``std / sqrt(2·layers)`` (GPT-2). Buffers (masks,
    positions) are recomputed: the model was built on the meta device and ``to_empty`` left them unset."""
    residual_std = std / math.sqrt(2 * layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, residual_std if name.endswith(".proj") else std, generator=generator)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.reset_parameters()
        elif isinstance(module, CausalSelfAttention):
            module.mask.copy_(_causal_mask(module.mask.shape[0]))
    positions = getattr(model, "positions", None)
    if isinstance(positions, Tensor):
        positions.copy_(torch.arange(positions.shape[0]))


def example_inputs(config: GPTConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random ``(tokens, targets)`` of shape ``(batch, seq_len)``; targets are tokens shifted left by one."""
    stream = torch.randint(0, config.vocab, (config.batch, config.seq_len + 1), generator=generator)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def build(config: GPTConfig, *, seed: int = 0) -> tuple[GPT, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``)."""
    return build_seeded(GPT, config, example_inputs, seed)


def layer_of_module(path: str) -> int | None:
    """Block index of ``blocks.<i>`` or anything under it; ``None`` for embeddings, ``ln_f``, head and loss."""
    match = _BLOCK_RE.match(path)
    return int(match.group(1)) if match else None
