"""Tiny user-model factories for the tracing and profiling tests (``tests.fixtures_models:<name>``).

Each factory follows the user-model convention of :mod:`graphs.build`: no arguments, returns ``(model,
example_inputs)`` or ``(model, example_inputs, loss_fn)``.
"""

from __future__ import annotations

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


def sized() -> tuple[nn.Module, tuple[Tensor]]:
    return Sized(), (torch.randn(3, 4),)


def returns_model_only() -> nn.Module:
    """A broken factory: wrong return shape."""
    return MLP()


def raises() -> tuple[nn.Module, tuple[Tensor]]:
    raise RuntimeError("factory exploded")


NOT_CALLABLE = 42
