"""Tiny user-model factories whose training step is unusual (``tests.fixtures_steps:<name>``): a batch given as a
dict or a tokenizer's UserDict, buffers updated or branched on in ``forward``, Python-value inputs, a loss in an
output field, a batch not on dim 0, views of parameters, reductions over the batch. Same convention as
:mod:`tests.fixtures_models`."""

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


class _ViewWrites(nn.Module):
    """``h`` written through views, then read: by item assignment (``h[:, 0] = 0``, ``h[:, 1:3] *= 2``: fx cannot
    record it, so the tracer keeps the module whole and torch.export traces ``fill_`` / ``mul_`` through views of
    ``h``) or, with ``methods``, by in-place methods of views (``h[:, 0].add_(1)``, ``h.narrow(1, 2, 3).mul_(3)``,
    which fx recorded as updates of the views alone)."""

    def __init__(self, methods: bool) -> None:
        super().__init__()
        self.methods = methods
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.methods:
            h[:, 0].add_(1.0)
            h.narrow(1, 2, 3).mul_(3.0)
        else:
            h[:, 0] = 0.0
            h[:, 1:3] *= 2.0
        return self.c(torch.relu(self.b(h)) + h).pow(2).mean()


def item_assignment() -> tuple[nn.Module, tuple[Tensor]]:
    return _ViewWrites(methods=False), (torch.randn(8, 8),)


def view_update() -> tuple[nn.Module, tuple[Tensor]]:
    return _ViewWrites(methods=True), (torch.randn(8, 8),)


class _InPlaceFunctions(nn.Module):
    """``torch.relu_(h)`` (a torch function, not a method) whose tensor is read after it; with ``routing``, also a
    dispatch written by boolean-mask assignment (``out[sel] = expert(x[sel])``, as MoE layers route tokens: fx
    cannot trace it, and torch.export records a chain of ``index_put_`` into a tensor that needs no gradient until
    its first write)."""

    def __init__(self, routing: bool) -> None:
        super().__init__()
        self.routing = routing
        self.a, self.e0, self.e1, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        torch.relu_(h)
        if not self.routing:
            return self.o(self.e0(h) + h).pow(2).mean()
        sel = torch.arange(x.size(0)) % 2 == 0
        out = torch.zeros_like(h)
        out[sel] = self.e0(h[sel])
        out[~sel] = self.e1(h[~sel])
        return self.o(out + h).pow(2).mean()


def in_place_function() -> tuple[nn.Module, tuple[Tensor]]:
    return _InPlaceFunctions(routing=False), (torch.randn(8, 8),)


def mask_routing() -> tuple[nn.Module, tuple[Tensor]]:
    return _InPlaceFunctions(routing=True), (torch.randn(8, 8),)


class _EmaNoGrad(nn.Module):
    """An exponential moving average of an activation kept in a buffer, updated under ``torch.no_grad()`` (as
    momentum encoders and VQ codebooks keep theirs) and read by the step; with ``through_view``, also a buffer
    updated through a view (``self.count[:2].add_(1)``)."""

    def __init__(self, through_view: bool = False) -> None:
        super().__init__()
        self.through_view = through_view
        self.a, self.o = nn.Linear(8, 8), nn.Linear(8, 1)
        self.register_buffer("ema", torch.zeros(8))
        self.register_buffer("count", torch.zeros(8))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        if self.through_view:
            self.count[:2].add_(1.0)
        with torch.no_grad():
            self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)
        return self.o(h + self.ema + self.count).pow(2).mean()


def ema_no_grad() -> tuple[nn.Module, tuple[Tensor]]:
    return _EmaNoGrad(), (torch.randn(8, 8),)


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


class _BufferAssignments(_BufferUpdates):
    """The same updates written the other ways ``forward`` keeps state: augmented assignment (``+=``, ``*=``: in
    place on a tensor, but fx's proxies have no ``__iadd__``, so it traced as ``x = x + y`` and the buffer was
    never updated) and reassignment of a buffer to a new tensor (an exponential moving average), each read
    after the update; a step counter too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ema", torch.zeros(16))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        self.steps += 1
        self.scale *= 0.5
        self.total += h.detach().mean(0)
        self.ema = 0.9 * self.ema + 0.1 * h.detach().pow(2).mean(0)
        return self.b(h * self.scale - self.total + self.ema / self.steps).pow(2).mean()


def buffer_assignments() -> tuple[nn.Module, tuple[Tensor]]:
    return _BufferAssignments(), (torch.randn(8, 8),)


class _InputWrites(nn.Module):
    """``forward`` rescales its batch in place (``x.mul_``, ``sub_``; the ids of a dict batch too): tracing,
    the batch-mixing check and profiling each run the step, and each run scaled the example batch again, so the
    traced loss was not the user's and the check saw micro-batches that disagreed ("splits samples apart")."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(10, 8), nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, batch: dict) -> Tensor:
        x = batch["x"]
        x.mul_(2.0).sub_(1.0)
        batch["ids"].remainder_(10)
        return self.b(torch.tanh(self.a(x + self.emb(batch["ids"])))).pow(2).mean()


def input_written_in_place() -> tuple[nn.Module, tuple[dict]]:
    return _InputWrites(), ({"x": torch.randn(8, 8), "ids": torch.randint(0, 40, (8,))},)


class _AutocastBlock(nn.Module):
    """Mixed precision inside ``forward``: a ``torch.autocast`` block runs the first layer in bfloat16. fx records
    the block's ops but not autocast, so the traced step ran them in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = torch.relu(self.a(x))
        return self.b(h.float()).pow(2).mean()


def autocast_block() -> tuple[nn.Module, tuple[Tensor]]:
    return _AutocastBlock(), (torch.randn(8, 8),)


class _ReversedGradient(torch.autograd.Function):
    """Identity forward, negated gradient (domain-adversarial training's gradient reversal)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return -grad


class _GradientChanges(nn.Module):
    """Gradients that are not the autograd of the forward ops: a custom ``torch.autograd.Function`` (both tracers
    record its forward, so the traced step trained ``a`` not at all, fx's no-grad detach cutting it off) or a hook
    registered on an activation in ``forward`` (dropped by torch.export: ``a``'s gradient twice eager's)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.b = nn.Linear(16, 2)  # first: the parameter whose gradient differs is not the model's first
        self.a = nn.Linear(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.a(x))
        if self.how == "function":
            h = _ReversedGradient.apply(h)
        else:
            h.register_hook(lambda g: g * 0.5)
        return self.b(h).pow(2).mean()


def custom_backward() -> tuple[nn.Module, tuple[Tensor]]:
    return _GradientChanges("function"), (torch.randn(8, 8),)


def activation_hook() -> tuple[nn.Module, tuple[Tensor]]:
    return _GradientChanges("hook"), (torch.randn(8, 8),)


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
