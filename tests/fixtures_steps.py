"""Tiny user-model factories whose training step is unusual (``tests.fixtures_steps:<name>``): a batch given as a
dict (unpacked into keyword arguments too) or a tokenizer's UserDict, buffers branched on in ``forward``,
Python-value inputs, a loss in an output field, a batch not on dim 0, views of parameters, reductions over the
batch. Steps that write state in place or run under a mode of their own: :mod:`tests.fixtures_state`. Same
convention as :mod:`tests.fixtures_models`."""

from __future__ import annotations

import collections
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


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


class _Unpacked(nn.Module):
    """``model(**batch)``, as Hugging Face trainers call a model, around a model taking keyword arguments; it
    also asks ``"labels" in batch`` and walks ``batch.items()``. fx could not unpack a dict input (its proxy's
    ``keys()`` is a node, which cannot be iterated) and torch.export returned the loss in a tuple and kept the
    batch size static for a dict: such a step could not be traced at all."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _KeywordModel()

    def forward(self, batch: dict) -> Tensor:
        if "token_type_ids" in batch:  # absent: a key test on the dict, not on data
            raise ValueError("no token types here")
        return self.model(**{k: v for k, v in batch.items()})


class _KeywordModel(_KeyedBatch):
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})


def unpacked_batch() -> tuple[nn.Module, tuple[dict]]:
    return _Unpacked(), keyed_batch()[1]


class Encoding(collections.UserDict):
    """A tokenizer's output as Hugging Face's ``BatchEncoding`` is one: a ``UserDict`` whose fields also read as
    attributes, with attributes of its own (torch's pytree took it for one leaf: nothing in it was split)."""

    def __init__(self, data: dict, n_sequences: int = 1) -> None:
        super().__init__(data)
        self.n_sequences = n_sequences

    def __getattr__(self, name: str) -> Any:
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None


class _EncodedBatch(_KeyedBatch):
    def forward(self, batch: Encoding) -> Tensor:
        assert batch.n_sequences == 1
        return super().forward({"input_ids": batch.input_ids, "attention_mask": batch["attention_mask"],
                                "labels": batch.labels})


def encoded_batch() -> tuple[nn.Module, tuple[Encoding]]:
    """:func:`keyed_batch` given as an :class:`Encoding`."""
    _, (batch,) = keyed_batch()
    return _EncodedBatch(), (Encoding(batch),)


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


class _SequenceFirstAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)  # batch_first=False: (time, batch, width)
        self.encoder, self.out = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.encoder(x)).pow(2).mean()


def sequence_first_attention() -> tuple[nn.Module, tuple[Tensor]]:
    """Attention with the batch on dim 1 and no positional encoding: over copies of half the sequence it gives
    the half's result (duplicated keys keep the softmax's weights), so only distinct samples show dim 0 is time."""
    return _SequenceFirstAttention(), (torch.randn(6, 4, 8),)


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


class _ViewAfterTransposes(nn.Module):
    """``.view`` of a value that is contiguous only because of the layout of an earlier one: ``t`` is a transpose,
    ``t * 2`` keeps its layout, transposing back is contiguous, so the view holds in eager. When ``t`` arrives
    from another device it is contiguous, the transpose back is not, and the view failed there."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        t = self.a(x).transpose(0, 1)
        u = (t * 2).transpose(0, 1)
        return self.b(u.view(x.shape[0] * 2, 4)).pow(2).mean()


def view_after_transposes() -> tuple[nn.Module, tuple[Tensor]]:
    return _ViewAfterTransposes(), (torch.randn(8, 8),)


class _TokensSortedByExpert(nn.Module):
    """An MoE layer's dispatch without data-dependent shapes: rows sorted by their expert id (integers: the
    copies' order and positions differ from a micro-batch's), run, and put back in their places."""

    def __init__(self) -> None:
        super().__init__()
        self.router, self.expert = nn.Linear(8, 3), nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        order = self.router(x).argmax(-1).argsort(stable=True)
        y = self.expert(x[order])
        return y[order.argsort()].pow(2).mean()


def tokens_sorted_by_expert() -> tuple[nn.Module, tuple[Tensor]]:
    return _TokensSortedByExpert(), (torch.randn(8, 8),)


class _FilledEmpty(nn.Module):
    """``new_empty``, then every slice of it written: its memory before the writes is anything."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        out = h.new_empty(x.shape[0], 8)
        out = out.index_copy(1, torch.arange(4), h).index_copy(1, torch.arange(4, 8), h * 2)
        return out.pow(2).mean()


def filled_empty() -> tuple[nn.Module, tuple[Tensor]]:
    return _FilledEmpty(), (torch.randn(8, 8),)


class _AllFrozen(nn.Module):
    """Every parameter frozen: a step with a loss and nothing to train (evaluation through the training path)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def all_frozen() -> tuple[nn.Module, tuple[Tensor]]:
    return _AllFrozen(), (torch.randn(8, 8),)
