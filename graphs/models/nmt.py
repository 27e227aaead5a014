"""NMT: an attentional LSTM encoder-decoder, statically unrolled over source and target steps.

ColocRL's "Attentional Neural Machine Translation" benchmark (Mirhoseini et al., ICML 2017, section 4, citing
Bahdanau et al. 2015 and Wu et al. 2016): a stacked-LSTM encoder over the source sentence, a stacked-LSTM
decoder over the target sentence (teacher forcing), attention from the decoder over all encoder outputs, and a
softmax over the target vocabulary. Each LSTM layer is one :class:`torch.nn.LSTMCell` called once per step, so
``torch.fx.symbolic_trace`` yields ``layers × (src_len + tgt_len)`` cell ops on two grids (the layer/time
wavefront ColocRL's expert placement exploits); decoder layer l starts from encoder layer l's final state.

Attention is Luong et al.'s (2015) "general" score with the attentional hidden state
``h~_t = tanh(W_c [c_t; h_t])`` computed from the top decoder layer's output ``h_t``, *without* input feeding:
feeding ``h~_{t-1}`` back into decoder layer 0 would chain every time step through the attention and the top
layer, destroying the wavefront that makes "one LSTM layer per device" worthwhile. Attention, projection and
loss therefore hang off the top layer once per target step, like the softmax of the RNNLM.

Layout (module paths; leaf modules unless noted)::

    embed_src          nn.Embedding(vocab, embed)   source embedding, once on the (batch, src_len) block
    embed_tgt          nn.Embedding(vocab, embed)   target embedding, once on the (batch, tgt_len) block
    encoder.<l>        nn.LSTMCell                  encoder LSTM layer l (0-based), once per source step
    decoder.<l>        nn.LSTMCell                  decoder LSTM layer l (0-based), once per target step
    attention          LuongAttention (not a leaf)  once per target step; fx traces into it:
    attention.score    nn.Linear(hidden, hidden)      W_a of the general score (no bias)
    attention.combine  nn.Linear(2·hidden, hidden)    W_c producing the attentional hidden state (no bias)
    proj               nn.Linear(hidden, vocab)     output projection, once per target step (weights shared)
    loss               nn.CrossEntropyLoss          softmax + NLL, once per target step; the losses are averaged

The encoder outputs of the top layer are stacked once (``torch.stack``) into the attention memory.
``layer_of_module`` maps ``encoder.<l>`` and ``decoder.<l>`` to ``l``; ``expert_layer_of_module`` adds
ColocRL's expert rule (embeddings with the first layer; attention, projection and softmax with the top layer).

Inputs are batch-first int64 tensors: ``src`` ``(batch, src_len)``, ``tgt_in`` and ``tgt_out`` ``(batch,
tgt_len)`` (decoder input and next-token labels); ``forward`` returns the scalar loss. No dropout, for the same
reason as in :mod:`graphs.models.rnnlm` (placed runs must match single-device runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graphs.models._common import build_seeded

__all__ = ["NMTConfig", "NMT", "LuongAttention", "PAPER", "SMALL", "build", "layer_of_module",
           "expert_layer_of_module"]

_LAYER_RE = re.compile(r"^(?:encoder|decoder)\.(\d+)(?:\.|$)")


@dataclass(kw_only=True, frozen=True)
class NMTConfig:
    """Sizes of one NMT training step."""

    batch: int
    """Sentence pairs per step (ColocRL: 64)."""
    src_len: int
    """Unrolled encoder steps (source tokens per sentence)."""
    tgt_len: int
    """Unrolled decoder steps (target tokens per sentence)."""
    vocab: int
    """Vocabulary size of each language (source embedding rows, target embedding rows, softmax columns)."""
    hidden: int
    """LSTM hidden (and cell) units per layer; also the attention width."""
    embed: int
    """Word-embedding width of both languages (input width of encoder and decoder layer 0)."""
    layers: int = 2
    """Stacked LSTM layers in the encoder and, equally many, in the decoder (ColocRL: 2)."""
    init_scale: float = 0.1
    """Parameters start uniform in ``[-init_scale, init_scale]`` (Luong et al. 2015 and the TF NMT recipes)."""

    def __post_init__(self) -> None:
        for name in ("batch", "src_len", "tgt_len", "vocab", "hidden", "embed", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"nmt config: {name} must be a positive int, got {value!r}")
        if not self.init_scale > 0:
            raise ValueError(f"nmt config: init_scale must be > 0, got {self.init_scale!r}")


PAPER = NMTConfig(batch=64, src_len=30, tgt_len=30, vocab=32_000, hidden=1024, embed=1024, layers=2)
"""ColocRL's NMT: batch 64 and 2 layers are from the paper (section 4, Table 1), which trains on WMT14
English-German but gives no widths. Widths 1024 and the 32k word-piece vocabulary are Wu et al.'s (2016) GNMT,
which ColocRL cites for this model; 30 source and 30 target steps are the sentence length of Bahdanau et al.'s
(2015) RNNsearch-30. Larger lengths only add steps (the cost grows linearly)."""

SMALL = NMTConfig(batch=8, src_len=4, tgt_len=4, vocab=200, hidden=64, embed=64, layers=2)
"""For tests: same structure, 2 × 4 encoder + 2 × 4 decoder = 16 LSTMCell ops, milliseconds per step."""


class LuongAttention(nn.Module):
    """Luong et al. (2015) "general" attention.

    ``score(h_t, h_s) = h_s · W_a h_t`` over the source positions s, softmax, context ``c_t``, then the
    attentional hidden state ``h~_t = tanh(W_c [c_t; h_t])``.
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, hidden, bias=False)
        self.combine = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, query: Tensor, memory: Tensor) -> Tensor:
        """``h~_t`` (batch, hidden) for ``query`` (batch, hidden) over ``memory`` (batch, src_len, hidden)."""
        scores = torch.bmm(memory, self.score(query).unsqueeze(2)).squeeze(2)
        weights = torch.softmax(scores, dim=1)
        context = torch.bmm(weights.unsqueeze(1), memory).squeeze(1)
        return torch.tanh(self.combine(torch.cat([context, query], dim=1)))


class NMT(nn.Module):
    """Stacked-LSTM encoder-decoder with Luong attention, unrolled; ``forward`` returns the mean token loss."""

    def __init__(self, config: NMTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_src = nn.Embedding(config.vocab, config.embed)
        self.embed_tgt = nn.Embedding(config.vocab, config.embed)
        self.encoder = nn.ModuleList(
            nn.LSTMCell(config.embed if layer == 0 else config.hidden, config.hidden)
            for layer in range(config.layers)
        )
        self.decoder = nn.ModuleList(
            nn.LSTMCell(config.embed if layer == 0 else config.hidden, config.hidden)
            for layer in range(config.layers)
        )
        self.attention = LuongAttention(config.hidden)
        self.proj = nn.Linear(config.hidden, config.vocab)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, src: Tensor, tgt_in: Tensor, tgt_out: Tensor) -> Tensor:
        """Mean cross-entropy of predicting ``tgt_out`` from ``src`` and the shifted target ``tgt_in``."""
        cfg = self.config
        src_emb = self.embed_src(src)
        tgt_emb = self.embed_tgt(tgt_in)

        # Encoder grid. None lets LSTMCell start from zeros sized to the (micro-)batch it is given.
        states: list[tuple[Tensor, Tensor] | None] = [None] * cfg.layers
        top_outputs: list[Tensor] = []
        for t in range(cfg.src_len):
            x = src_emb[:, t]
            for layer, cell in enumerate(self.encoder):
                state = states[layer]
                h, c = cell(x) if state is None else cell(x, state)
                states[layer] = (h, c)
                x = h
            top_outputs.append(x)
        memory = torch.stack(top_outputs, dim=1)

        # Decoder grid, each layer starting from its encoder twin's final state (Sutskever et al. 2014).
        total: Tensor | None = None
        for t in range(cfg.tgt_len):
            x = tgt_emb[:, t]
            for layer, cell in enumerate(self.decoder):
                h, c = cell(x, states[layer])
                states[layer] = (h, c)
                x = h
            logits = self.proj(self.attention(x, memory))
            step_loss = self.loss(logits, tgt_out[:, t])
            total = step_loss if total is None else total + step_loss
        assert total is not None  # tgt_len >= 1 is validated by the config
        return total / cfg.tgt_len

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """Uniform ``[-init_scale, init_scale]`` for every parameter, drawn from ``generator`` only."""
        for param in self.parameters():
            param.uniform_(-self.config.init_scale, self.config.init_scale, generator=generator)


def example_inputs(config: NMTConfig, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Random ``(src, tgt_in, tgt_out)``; ``tgt_out`` is ``tgt_in`` shifted left by one (teacher forcing)."""
    src = torch.randint(0, config.vocab, (config.batch, config.src_len), generator=generator)
    tgt = torch.randint(0, config.vocab, (config.batch, config.tgt_len + 1), generator=generator)
    return src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous()


def build(config: NMTConfig, *, seed: int = 0) -> tuple[NMT, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``)."""
    return build_seeded(NMT, config, example_inputs, seed)


def layer_of_module(path: str) -> int | None:
    """LSTM layer index (0-based) of ``encoder.<l>`` / ``decoder.<l>`` or anything under them; else ``None``."""
    match = _LAYER_RE.match(path)
    return int(match.group(1)) if match else None


def expert_layer_of_module(path: str, num_layers: int) -> int | None:
    """ColocRL's expert rule: the LSTM layer a module goes with.

    Encoder and decoder layer l go with layer l; ``embed_src`` and ``embed_tgt`` with layer 0; ``attention``
    (and its children), ``proj`` and ``loss`` with the top layer ``num_layers - 1``; ``None`` otherwise.
    """
    layer = layer_of_module(path)
    if layer is not None:
        return layer
    head = path.split(".", 1)[0]
    if head in ("embed_src", "embed_tgt"):
        return 0
    if head in ("attention", "proj", "loss"):
        return num_layers - 1
    return None
