"""Tiny user-model factories for the tracing and profiling tests (``tests.fixtures_models:<name>``).

Each factory follows the user-model convention of :mod:`graphs.build`: no arguments, returns ``(model,
example_inputs)`` or ``(model, example_inputs, loss_fn)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F

MLP_BATCH, MLP_IN, MLP_HIDDEN, MLP_OUT = 4, 8, 16, 3


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(MLP_IN, MLP_HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(MLP_HIDDEN, MLP_OUT)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp() -> tuple[nn.Module, tuple[Tensor]]:
    """2-layer MLP, batch 4, 8 → 16 → 3; the loss is the default ``output.mean()``."""
    return MLP(), (torch.randn(MLP_BATCH, MLP_IN),)


def mlp_squared_loss() -> tuple[nn.Module, tuple[Tensor], object]:
    """The MLP with an explicit loss function (three-tuple form)."""
    return MLP(), (torch.randn(MLP_BATCH, MLP_IN),), lambda out: (out ** 2).sum()


class UnrolledLSTM(nn.Module):
    """``layers`` LSTMCells unrolled over ``steps`` time steps, then a shared Linear head per step."""

    def __init__(self, width: int, layers: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.cells = nn.ModuleList(nn.LSTMCell(width, width) for _ in range(layers))
        self.head = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        states: list[tuple[Tensor, Tensor] | None] = [None] * len(self.cells)
        total = None
        for t in range(self.steps):
            h = x[:, t]
            for layer, cell in enumerate(self.cells):
                state = states[layer]
                h, c = cell(h) if state is None else cell(h, state)
                states[layer] = (h, c)
            y = self.head(h).pow(2).mean()
            total = y if total is None else total + y
        return total


def lstm(width: int = 16, layers: int = 2, steps: int = 3, batch: int = 4) -> tuple[nn.Module, tuple[Tensor]]:
    """A small unrolled LSTM: ``layers × steps`` LSTMCell calls (output is already the scalar loss)."""
    return UnrolledLSTM(width, layers, steps), (torch.randn(batch, steps, width),)


def lstm_heavy() -> tuple[nn.Module, tuple[Tensor]]:
    """An LSTMCell-dominated step (~tens of ms on one core) for the backward-coverage check."""
    return lstm(width=256, layers=2, steps=6, batch=64)


class TiedWeights(nn.Module):
    """A parameter read through ``get_attr`` by functional ops, and a module shared by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x * self.scale)
        return self.fc(F.relu(y)) + self.scale


def tied() -> tuple[nn.Module, tuple[Tensor]]:
    return TiedWeights(), (torch.randn(2, 8),)


class ShapeBranch(nn.Module):
    """fx cannot trace ``if x.shape[0] > 2`` (a Proxy in control flow); torch.export specialises it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] > 2:
            x = x * 2
        return self.fc(x)


def shape_branch() -> tuple[nn.Module, tuple[Tensor]]:
    return ShapeBranch(), (torch.randn(3, 4),)


class DataBranch(nn.Module):
    """Control flow on tensor *values*: neither fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


def untraceable() -> tuple[nn.Module, tuple[Tensor]]:
    return DataBranch(), (torch.randn(3, 4),)


class KeptWhole(nn.Module):
    """A traceable model holding a module fx cannot trace inside (control flow on tensor values)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.inner = DataBranch()

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(torch.relu(self.pre(x))).sum(-1)


def kept_whole() -> tuple[nn.Module, tuple[Tensor]]:
    return KeptWhole(), (torch.randn(4, 4),)


class InplaceBN(nn.Module):
    """In-place ReLU, an in-place add and BatchNorm running statistics: profiling must not change them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.bn(self.conv(x)))
        y += 1.0
        return y


def inplace_bn() -> tuple[nn.Module, tuple[Tensor]]:
    return InplaceBN(), (torch.randn(2, 3, 8, 8),)


class Sized(nn.Module):
    """Integer ops (``x.shape[0]``) next to tensor views of an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        y = self.fc(x).reshape(n, 2, 2)
        return y[:, 0] * 2


def sized() -> tuple[nn.Module, tuple[Tensor], object]:
    """``Sized`` with the mean of its output as the loss (the op list the profiling tests name)."""
    return Sized(), (torch.randn(3, 4),), lambda out: out.mean()


def returns_model_only() -> nn.Module:
    """A broken factory: wrong return shape."""
    return MLP()


def raises() -> tuple[nn.Module, tuple[Tensor]]:
    raise RuntimeError("factory exploded")


class _ListInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, idx: list) -> Tensor:
        return self.emb(torch.tensor(idx)).sum()


def list_input() -> tuple[nn.Module, tuple[list]]:
    """Token ids as a Python list: fx takes it as a constant (a Python value input); torch.export flattens the
    list and returns ``(loss,)``, a step the engine cannot run."""
    return _ListInput(), ([1, 2, 3, 4],)


class _NoGradLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.head = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.head(x)


def no_grad_layer() -> tuple[nn.Module, tuple[Tensor]]:
    """A layer frozen by ``torch.no_grad()`` inside ``forward`` (fx's trace drops the block)."""
    return _NoGradLayer(), (torch.randn(8, 4),)


def exits() -> tuple[nn.Module, tuple[Tensor]]:
    """A factory that ends the process (a script's ``sys.exit`` reached through its import or its call)."""
    import sys

    sys.exit(3)


NOT_CALLABLE = 42


# ---------------------------------------------------------------------------------------------- transformers (#18)

LM_VOCAB, LM_WIDTH, LM_LAYERS, LM_BATCH, LM_SEQ = 100, 32, 4, 8, 12


class EncoderLM(nn.Module):
    """A language model on ``nn.TransformerEncoder``: token embedding, ``layers`` encoder layers, vocabulary
    projection. fx's own leaf rule made the whole encoder one op."""

    def __init__(self, vocab: int = LM_VOCAB, width: int = LM_WIDTH, layers: int = LM_LAYERS) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self.head(self.encoder(self.embed(tokens)))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _next_tokens(vocab: int, batch: int, seq: int) -> tuple[Tensor, Tensor]:
    """Random token sequences and their next tokens (targets are an input: a loss closing over the whole
    batch's targets could not be split into micro-batches)."""
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def encoder_lm() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The encoder LM on random tokens; the model returns its next-token cross-entropy."""
    return EncoderLM(), _next_tokens(LM_VOCAB, LM_BATCH, LM_SEQ)


class Seq2SeqTransformer(nn.Module):
    """``nn.Transformer`` (encoder-decoder, batch first) on float sequences: its output ends in LayerNorm."""

    def __init__(self, width: int = LM_WIDTH) -> None:
        super().__init__()
        self.net = nn.Transformer(width, 4, 2, 2, 2 * width, dropout=0.0, batch_first=True)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.net(src, tgt)


def nn_transformer() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """``nn.Transformer`` with the default loss (its mean output is ~0: LayerNorm)."""
    return Seq2SeqTransformer(), (torch.randn(LM_BATCH, 10, LM_WIDTH), torch.randn(LM_BATCH, 6, LM_WIDTH))


HARD_BATCH = 4


class HardCodedBatch(nn.Module):
    """Reshapes with the example's batch size written in: runs on a smaller batch, but mixes its samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x).view(HARD_BATCH, -1)  # (B, 2, 8) → (4, 16 B / 4): rows are samples only when B == 4
        return y.pow(2).mean()


def hard_coded_batch() -> tuple[nn.Module, tuple[Tensor]]:
    return HardCodedBatch(), (torch.randn(HARD_BATCH, 2, 8),)


class Pairs(nn.Module):
    """Adds each sample to its neighbour through a reshape: micro-batches of one sample cannot compute it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x)
        return y.reshape(2, -1, 8).sum(0).pow(2).mean()


def pairs() -> tuple[nn.Module, tuple[Tensor]]:
    return Pairs(), (torch.randn(4, 8),)


# ---------------------------------------------------------------------------------------------- Hugging Face

HF_VOCAB, HF_WIDTH, HF_LAYERS, HF_BATCH, HF_SEQ = 1000, 64, 2, 8, 16


class CausalLMStep(nn.Module):
    """A Hugging Face model (``lm``) and its cross-entropy on ``targets``: one logit row per target token."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        logits = self.lm(tokens).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def _hf_lm(model: nn.Module) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """A model built from a config (no weights, nothing downloaded), in training mode, on random tokens."""
    model.train()
    return CausalLMStep(model), _next_tokens(HF_VOCAB, HF_BATCH, HF_SEQ)


def hf_gpt2() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face GPT-2 from a tiny config (2 layers, 64 wide, vocabulary 1,000)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=HF_VOCAB, n_positions=64, n_embd=HF_WIDTH, n_layer=HF_LAYERS, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return _hf_lm(GPT2LMHeadModel(cfg))


def hf_llama() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face Llama from a tiny config (2 layers, 64 wide, vocabulary 1,000)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=HF_VOCAB, hidden_size=HF_WIDTH, intermediate_size=2 * HF_WIDTH,
                      num_hidden_layers=HF_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, use_cache=False)
    return _hf_lm(LlamaForCausalLM(cfg))


def hf_bert() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """Hugging Face BERT (masked-LM head) from a tiny config; cross-entropy on every position."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=HF_VOCAB, hidden_size=HF_WIDTH, num_hidden_layers=HF_LAYERS, num_attention_heads=4,
                     intermediate_size=2 * HF_WIDTH, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return _hf_lm(BertForMaskedLM(cfg))


class _KeyedBatch(nn.Module):
    """Takes the batch as one dict (as many trainers' models do), with a mask and integer labels in it."""

    def __init__(self, vocab: int = 50, width: int = 16) -> None:
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(vocab, width), nn.Linear(width, width), nn.Linear(width, vocab)

    def forward(self, batch: dict) -> Tensor:
        x = self.emb(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)
        logits = self.head(torch.tanh(self.fc(x)))
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def keyed_batch() -> tuple[nn.Module, tuple[dict]]:
    """A dict batch (token ids, mask, labels; batch 8 on dim 0 of each): micro-batches split every tensor in it."""
    ids = torch.randint(0, 50, (8, 6))
    mask = (torch.rand(8, 6) > 0.2).float()
    return _KeyedBatch(), ({"input_ids": ids, "attention_mask": mask, "labels": ids.roll(1, dims=1)},)


class _OneKey(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, batch: dict) -> Tensor:
        return self.fc2(torch.relu(self.fc1(batch["x"]))).pow(2).mean()


def one_key_dict() -> tuple[nn.Module, tuple[dict]]:
    """The batch as a dict holding a single tensor: one input, one tensor, and stage 0 fed that tensor must still
    rebuild the dict."""
    return _OneKey(), ({"x": torch.randn(8, 4)},)


class _BufferUpdates(nn.Module):
    """Buffers updated in place in ``forward`` and read after the update: one scaled by a constant (an update
    that reads no proxy), one accumulating the batch mean (an update from data), each read by the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)
        self.register_buffer("scale", torch.ones(16))
        self.register_buffer("total", torch.zeros(16))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        self.scale.mul_(0.5)
        self.total.add_(h.detach().mean(0))
        return self.b(h * self.scale - self.total).pow(2).mean()


def buffer_updates() -> tuple[nn.Module, tuple[Tensor]]:
    return _BufferUpdates(), (torch.randn(8, 8),)


class _ItemBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if h.mean().item() > 0:  # a branch on the data: no graph holds both sides
            h = h * 2
        return self.b(h).mean()


def item_branch() -> tuple[nn.Module, tuple[Tensor]]:
    return _ItemBranch(), (torch.randn(8, 4),)


class _Outputs(nn.Module):
    """Returns its loss in a field (as Hugging Face models given labels do) or, with ``kind="tuple"``, two
    tensors and no loss."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Any:
        y = self.fc(x)
        loss = y.pow(2).mean()
        return {"logits": y, "loss": loss} if self.kind == "dict" else (y, loss)


def loss_in_a_dict() -> tuple[nn.Module, tuple[Tensor]]:
    return _Outputs("dict"), (torch.randn(8, 4),)


def tuple_output() -> tuple[nn.Module, tuple[Tensor]]:
    return _Outputs("tuple"), (torch.randn(8, 4),)


class _SequenceFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.out = nn.GRU(8, 8), nn.Linear(8, 2)  # batch_first=False: inputs are (time, batch, width)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h[-1]).pow(2).mean()


def sequence_first() -> tuple[nn.Module, tuple[Tensor]]:
    """The batch on dim 1, as nn.GRU's default layout has it: dim 0 (time) is no batch to split."""
    return _SequenceFirst(), (torch.randn(6, 4, 8),)


class _PlainInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor, mask: Tensor | None = None, relu: bool = False, repeats: int = 1) -> Tensor:
        h = self.a(x)
        if mask is not None:
            h = h * mask
        if relu:
            h = torch.relu(h)
        for _ in range(repeats):
            h = h * 0.5
        return self.b(h).pow(2).mean()


def plain_python_inputs() -> tuple[nn.Module, tuple[Any, ...]]:
    """Inputs that are Python values, not tensors: no mask (None), a flag, a count."""
    return _PlainInputs(), (torch.randn(8, 4), None, True, 3)


class _ViTLike(nn.Module):
    """A CLS token and a position table sliced to the input's length: views of parameters in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 16, 8) * 0.1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos[:, : x.shape[1] + 1]
        return self.fc(h[:, 0]).pow(2).mean()


def vit_like() -> tuple[nn.Module, tuple[Tensor]]:
    return _ViTLike(), (torch.randn(4, 6, 8),)


class _Reductions(nn.Module):
    """A loss divided by the token count, plus terms over the batch (a variance, a norm): reductions the
    micro-batch check cannot judge, not layers that mix samples."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = self.fc(x)
        ce = F.cross_entropy(h, labels.clamp(min=0), reduction="none") * (labels != -100)
        return ce.sum() / (labels != -100).sum() + 0.01 * h.var(0).mean() + 0.001 * h.norm()


def reductions() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    labels = torch.randint(0, 5, (8,))
    labels[::3] = -100
    return _Reductions(), (torch.randn(8, 4), labels)


class _PaddedAttention(nn.Module):
    """Self-attention with a key padding mask (-inf scores where a key is padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 1)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        h, _ = self.attn(x, x, x, key_padding_mask=pad)
        return self.fc(h).pow(2).mean()


def padded_attention() -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    pad = torch.zeros(4, 5, dtype=torch.bool)
    pad[:, -2:] = True
    return _PaddedAttention(), (torch.randn(4, 5, 8), pad)


class _BufferFlags(nn.Module):
    """Control flow on buffers (an init flag, a repeat count, a threshold): known while tracing, unlike data."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("initialized", torch.tensor(True))
        self.register_buffer("repeats", torch.tensor(2))
        self.register_buffer("threshold", torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if not self.initialized:
            h = h * 0
        for _ in range(int(self.repeats)):
            h = h * 0.5
        if self.threshold.item() > 0:
            h = h + 1
        return h.pow(2).mean()


def buffer_flags() -> tuple[nn.Module, tuple[Tensor]]:
    return _BufferFlags(), (torch.randn(8, 4),)
