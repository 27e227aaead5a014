"""Tiny user-model factories whose ``forward`` writes state in place or runs under a mode or gradient of its own
(``tests.fixtures_state:<name>``): buffers updated in place or reassigned, item assignment and updates through
views, in-place torch functions, an input batch written in place, a ``torch.no_grad()`` or ``torch.autocast``
block, a custom autograd backward, a hook on an activation. What tracing must keep, refuse, or hand to
torch.export. Same convention as :mod:`tests.fixtures_models`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


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
