"""RNNLM: a stacked-LSTM word language model, statically unrolled over time.

The model of Zaremba et al. (2014), "Recurrent Neural Network Regularization", as used by ColocRL
(Mirhoseini et al., ICML 2017, section 4: "Recurrent Neural Language Model (RNNLM) with multiple LSTM layers",
citing Zaremba et al. 2014 and Jozefowicz et al. 2016). Every LSTM layer is one :class:`torch.nn.LSTMCell`
called once per time step, so ``torch.fx.symbolic_trace`` yields ``layers × seq_len`` cell ops laid out on a
grid: cell (l, t) needs (l-1, t) and (l, t-1) only. That grid is the layer/time wavefront that lets ColocRL's
expert placement (one LSTM layer per device) overlap layers, and it is why the recurrence is unrolled here
rather than run by the fused ``nn.LSTM``.

Layout (module paths; each is one leaf module, called as noted)::

    embed        nn.Embedding(vocab, embed)     once, on the whole (batch, seq_len) token block
    layers.<l>   nn.LSTMCell                    LSTM layer l (0-based), once per time step
    proj         nn.Linear(hidden, vocab)       output projection, once per time step (weights shared)
    loss         nn.CrossEntropyLoss            softmax + NLL, once per time step; the T losses are averaged

``layer_of_module`` maps ``layers.<l>`` (and paths below it) to ``l``; ``expert_layer_of_module`` adds
ColocRL's expert rule (embedding with the first layer, projection and softmax with the top layer).

Why the projection and loss run per time step rather than once on the stacked hidden states: the softmax over
the vocabulary is the single most expensive op of the step (nearly 30% of the FLOPs in the paper config).
Per time step it becomes ``seq_len`` independent ops, each ready as soon as the top layer has produced step t,
so a placer can spread the softmax over devices and overlap it with the recurrence still running below. One
big op on the stacked states could only start after the last time step and would sit whole on one device.
The mean of the per-step batch-mean losses equals the token-mean cross-entropy, so the loss is unchanged.

Inputs are batch-first (batch on dim 0 for every input) so micro-batching splits every input the same way:
``tokens`` and ``targets`` are int64 of shape ``(batch, seq_len)``; ``forward`` returns the scalar loss.
Dropout (Zaremba et al. use it between layers) is left out: it would make a placed run differ from the
single-device run it is checked against, and its cost is negligible next to the cells and the softmax.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graphs.models._common import build_seeded

__all__ = ["RNNLMConfig", "RNNLM", "PAPER", "SMALL", "build", "layer_of_module", "expert_layer_of_module"]

_LAYER_RE = re.compile(r"^layers\.(\d+)(?:\.|$)")


@dataclass(kw_only=True, frozen=True)
class RNNLMConfig:
    """Sizes of one RNNLM training step."""

    batch: int
    """Sequences per step (ColocRL: 64)."""
    seq_len: int
    """Unrolled time steps T; the graph has ``layers × seq_len`` LSTMCell ops."""
    vocab: int
    """Vocabulary size: rows of the embedding, columns of the softmax."""
    hidden: int
    """LSTM hidden (and cell) units per layer."""
    embed: int
    """Word-embedding width (the input width of layer 0)."""
    layers: int = 2
    """Stacked LSTM layers (ColocRL: 2)."""
    init_scale: float = 0.04
    """Parameters start uniform in ``[-init_scale, init_scale]`` (Zaremba et al.'s large model: 0.04)."""

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "vocab", "hidden", "embed", "layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"rnnlm config: {name} must be a positive int, got {value!r}")
        if not self.init_scale > 0:
            raise ValueError(f"rnnlm config: init_scale must be > 0, got {self.init_scale!r}")


PAPER = RNNLMConfig(batch=64, seq_len=35, vocab=10_000, hidden=1500, embed=1500, layers=2)
"""ColocRL's RNNLM: batch 64 and 2 LSTM layers are from the paper (section 4, Table 1); the paper gives no widths,
so hidden/embedding 1500, 35 unrolled steps and a 10k vocabulary are Zaremba et al.'s (2014) "large" PTB model
(66M parameters), the first work it cites. Jozefowicz et al.'s (2016) One-Billion-Word models (800k vocabulary,
8192-unit LSTMs) are far beyond one CPU core (their softmax alone costs ~50× this one), so they are not used."""

SMALL = RNNLMConfig(batch=8, seq_len=4, vocab=200, hidden=64, embed=64, layers=2, init_scale=0.1)
"""For tests: same structure, 2 layers × 4 steps = 8 LSTMCell ops, milliseconds per step."""


class RNNLM(nn.Module):
    """Embedding → ``layers`` stacked LSTMCells unrolled over ``seq_len`` → per-step projection → loss."""

    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.embed)
        self.layers = nn.ModuleList(
            nn.LSTMCell(config.embed if layer == 0 else config.hidden, config.hidden)
            for layer in range(config.layers)
        )
        self.proj = nn.Linear(config.hidden, config.vocab)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``tokens`` (batch, seq_len) against ``targets`` (batch, seq_len)."""
        seq_len = self.config.seq_len
        emb = self.embed(tokens)
        # None lets LSTMCell start from zeros sized to the (micro-)batch it is given: no batch size is baked in.
        states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.layers)
        total: Tensor | None = None
        for t in range(seq_len):
            x = emb[:, t]
            for layer, cell in enumerate(self.layers):
                state = states[layer]
                h, c = cell(x) if state is None else cell(x, state)
                states[layer] = (h, c)
                x = h
            step_loss = self.loss(self.proj(x), targets[:, t])
            total = step_loss if total is None else total + step_loss
        assert total is not None  # seq_len >= 1 is validated by the config
        return total / seq_len

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """Uniform ``[-init_scale, init_scale]`` for every parameter (Zaremba et al. 2014), from ``generator`` only."""
        for param in self.parameters():
            param.uniform_(-self.config.init_scale, self.config.init_scale, generator=generator)


def example_inputs(config: RNNLMConfig, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random ``(tokens, targets)`` of shape ``(batch, seq_len)``; targets are tokens shifted left by one."""
    stream = torch.randint(0, config.vocab, (config.batch, config.seq_len + 1), generator=generator)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def build(config: RNNLMConfig, *, seed: int = 0) -> tuple[RNNLM, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``)."""
    return build_seeded(RNNLM, config, example_inputs, seed)


def layer_of_module(path: str) -> int | None:
    """LSTM layer index (0-based) of ``layers.<l>`` or anything under it; ``None`` for every other module."""
    match = _LAYER_RE.match(path)
    return int(match.group(1)) if match else None


def expert_layer_of_module(path: str, num_layers: int) -> int | None:
    """ColocRL's expert rule: the LSTM layer a module goes with.

    ``embed`` goes with layer 0, ``proj`` and ``loss`` with the top layer ``num_layers - 1``; ``None`` for
    paths that are none of these (e.g. the root ``""``).
    """
    layer = layer_of_module(path)
    if layer is not None:
        return layer
    head = path.split(".", 1)[0]
    if head == "embed":
        return 0
    if head in ("proj", "loss"):
        return num_layers - 1
    return None
