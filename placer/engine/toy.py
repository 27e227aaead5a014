"""Small models for the engine's tests and benchmarks, as ``graphs.build`` factories (``placer.engine.toy:NAME``).

Each factory takes no argument and returns ``(model, example_inputs, None)``; ``model(*inputs)`` is the scalar
loss and every input has the batch on dim 0. ``graphs.build`` seeds torch before calling a factory, so default
initialisation is reproducible in every worker.

- :func:`branchy`: the awkward cases in one graph — fan-out/fan-in, a module called twice (shared parameters,
  one colocation group), an ``LSTMCell`` with a tuple output unpacked by ``getitem``, a shape-derived Python int
  (``x.size(0)``) flowing between ops, ``torch.cat`` over a list, and an integer target tensor.
- :func:`bn_net`: BatchNorm (micro-batches change the statistics; compare with a micro-batched reference).
- :func:`chain`: ``depth`` equal ``Linear + tanh`` layers, the balanced pipeline of the GPipe benchmark.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Branchy", "BNNet", "Chain", "branchy", "bn_net", "chain", "chain_bench"]


class Branchy(nn.Module):
    def __init__(self, width: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.left = nn.Linear(width, width)
        self.right = nn.Linear(width, width)
        self.shared = nn.Linear(width, width)
        self.cell = nn.LSTMCell(width, width)
        self.head = nn.Linear(3 * width, classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        a = self.shared(torch.relu(self.left(h)))
        b = self.shared(torch.sigmoid(self.right(h)))  # second call of a shared module
        hc = self.cell(a + b)
        s, c = hc[0], hc[1]
        s2, _ = self.cell(h, (s, c))
        n = x.size(0)  # a shape-derived int consumed by a later op
        flat = torch.cat([s2, a * b, c], dim=1).reshape(n, -1)
        return self.loss(self.head(flat), y)


class BNNet(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.loss(self.fc2(torch.relu(self.bn(self.fc1(x)))), y)


class Chain(nn.Module):
    def __init__(self, width: int, depth: int, in_width: int | None = None) -> None:
        super().__init__()
        widths = [in_width or width] + [width] * (depth - 1)
        self.layers = nn.ModuleList(nn.Linear(w, width) for w in widths)

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return ((x - target) ** 2).mean()


def branchy() -> tuple[nn.Module, tuple[Tensor, ...], None]:
    x = torch.randn(8, 16)
    y = torch.randint(0, 5, (8,))
    return Branchy(), (x, y), None


def bn_net() -> tuple[nn.Module, tuple[Tensor, ...], None]:
    return BNNet(), (torch.randn(8, 16), torch.randint(0, 4, (8,))), None


def chain() -> tuple[nn.Module, tuple[Tensor, ...], None]:
    """4 layers of width 16, batch 8: tiny, for tests."""
    return Chain(16, 4), (torch.randn(8, 16), torch.randn(8, 16)), None


def chain_bench() -> tuple[nn.Module, tuple[Tensor, ...], None]:
    """8 layers of width 512, batch 4096: the balanced pipeline of the GPipe benchmark. 1 MB weights stay in
    cache, so a micro-batch (512 rows at M=8) is still compute-bound (a layer's forward is ~3 ms per micro-batch:
    the measured 0.62 s single-device step over 8 layers x 3 passes x 8 micro-batches), and the pipeline's own
    limit (the bubble) is what the benchmark sees. With batch 2048 the two stages' busy times summed to ~10% more
    than the single-device step (per-task engine work and transfers) and GPipe reached 1.48-1.58; with 4096 the
    excess is ~3% and GPipe 1.56-1.76 per round, median 1.64-1.66 (``benchmarks/bench_engine.py``).

    Balanced means equal work on both halves. The first layer computes no input gradient (its input is data) and
    the second stage also runs the loss, so the first layer takes an 896-wide input: its forward plus weight
    gradient (2 x 1.75 units) cost a hidden layer's forward plus both gradients (3 x 1 unit) plus an estimated
    0.5 unit for the loss. The measured median stage busy times confirm it: 512 inputs [0.152, 0.165] s (batch
    2048), 896 inputs [0.322, 0.315] and [0.325, 0.324] s (batch 4096)."""
    return Chain(512, 8, in_width=896), (torch.randn(4096, 896), torch.randn(4096, 512)), None
