"""Inception-V3 (Szegedy et al., CVPR 2016, "Rethinking the Inception Architecture for Computer Vision").

ColocRL's convolutional benchmark (Mirhoseini et al., ICML 2017, section 4: batch 32, 299×299 ImageNet images).
Written here from the paper's figures 5-7 and table 1 (torchvision is not a dependency), with the module names
of the common TF-slim / torchvision layout so placements read familiarly. No auxiliary classifier: at 299×299
the model has 23,834,568 parameters (the published 23.8M without the aux head).

Every convolution is a ``BasicConv2d`` = ``Conv2d`` (no bias) → ``BatchNorm2d(eps=0.001)`` → ``ReLU``; the
Inception blocks run their branches in parallel and concatenate them on the channel axis — the branch
parallelism is what a placer can exploit. ``forward`` ends in a ``CrossEntropyLoss`` module and returns the
scalar loss. Inputs: ``images`` float ``(batch, 3, image_size, image_size)``, ``labels`` int64 ``(batch,)``.

Layout (module paths, in execution order; ``X.conv`` / ``X.bn`` / ``X.relu`` under every BasicConv2d ``X``)::

    Conv2d_1a_3x3, Conv2d_2a_3x3, Conv2d_2b_3x3, maxpool1,    stem: 299 → 147 → 147 → 73
    Conv2d_3b_1x1, Conv2d_4a_3x3, maxpool2                    stem: 73 → 71 → 35
    Mixed_5b, Mixed_5c, Mixed_5d     InceptionA (35×35)       branches branch1x1, branch5x5_{1,2},
                                                              branch3x3dbl_{1,2,3}, branch_pool(_avg)
    Mixed_6a                         InceptionB (35 → 17)     branch3x3, branch3x3dbl_{1,2,3}, branch_pool
    Mixed_6b .. Mixed_6e             InceptionC (17×17)       factorised 7×7: branch7x7_{1,2,3},
                                                              branch7x7dbl_{1..5}, branch_pool(_avg)
    Mixed_7a                         InceptionD (17 → 8)      branch3x3_{1,2}, branch7x7x3_{1..4}, branch_pool
    Mixed_7b, Mixed_7c               InceptionE (8×8)         expanded 3×3: branch3x3_{1,2a,2b},
                                                              branch3x3dbl_{1,2,3a,3b}, branch_pool(_avg)
    avgpool, dropout, fc, loss       head: global average pool, dropout, 1000-way linear, softmax + NLL

``layer_of_module`` exists for interface symmetry with the recurrent models and always returns ``None``:
Inception-V3 has no LSTM layers (ColocRL's expert placement puts it on one GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from graphs.models._common import build_seeded

__all__ = [
    "InceptionV3Config", "InceptionV3", "PAPER", "SMALL", "MIN_IMAGE_SIZE", "SMALL_IMAGE_SIZE", "build",
    "layer_of_module",
]

MIN_IMAGE_SIZE = 75
"""Smallest input side that survives the five stride-2 reductions (74 leaves a 0×0 map after Mixed_7a)."""

SMALL_IMAGE_SIZE = 107
"""Smallest side whose 8×8-stage maps are 2×2 rather than 1×1. At 75 the last blocks see 1×1 maps, and in
training mode BatchNorm rejects a micro-batch of one image there (one value per channel); at 107 any
micro-batch size works, which the pipelined engine needs."""


@dataclass(kw_only=True, frozen=True)
class InceptionV3Config:
    """Sizes of one Inception-V3 training step."""

    batch: int
    """Images per step (ColocRL: 32)."""
    image_size: int
    """Input height = width in pixels (paper: 299; at least 75)."""
    num_classes: int = 1000
    """Output classes of ``fc`` (ImageNet: 1000)."""
    width_mult: float = 1.0
    """Multiplier on every convolution's output channels (1.0 = the paper's widths); rounded, at least 1."""
    dropout: float = 0.2
    """Dropout probability before ``fc`` (TF-slim's Inception-V3 keeps 0.8); 0.0 keeps the op but is exact."""
    bn_eps: float = 0.001
    """BatchNorm epsilon (TF-slim's value)."""

    def __post_init__(self) -> None:
        for name in ("batch", "image_size", "num_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"inception_v3 config: {name} must be a positive int, got {value!r}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"inception_v3 config: image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        if not self.width_mult > 0:
            raise ValueError(f"inception_v3 config: width_mult must be > 0, got {self.width_mult!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"inception_v3 config: dropout must be in [0, 1), got {self.dropout!r}")
        if not self.bn_eps > 0:
            raise ValueError(f"inception_v3 config: bn_eps must be > 0, got {self.bn_eps!r}")


PAPER = InceptionV3Config(batch=32, image_size=299)
"""ColocRL's Inception-V3: batch 32 at 299×299, 1000 classes, the paper's widths (23.8M parameters)."""

SMALL = InceptionV3Config(batch=2, image_size=SMALL_IMAGE_SIZE, num_classes=10, width_mult=0.125, dropout=0.0)
"""For tests: every block of the paper model at 1/8 width on 107×107 images, 10 classes, exact (no dropout)."""


class BasicConv2d(nn.Module):
    """Conv2d without bias → BatchNorm2d → ReLU (the bias is redundant before BatchNorm)."""

    def __init__(self, in_ch: int, out_ch: int, *, eps: float, **conv_kwargs: object) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, bias=False, **conv_kwargs)  # type: ignore[arg-type]
        self.bn = nn.BatchNorm2d(out_ch, eps=eps)
        self.relu = nn.ReLU()
        self.out_channels = out_ch

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


class _Widths:
    """Scales the paper's channel counts by ``width_mult`` and builds BasicConv2d with the config's eps."""

    def __init__(self, config: InceptionV3Config) -> None:
        self.mult = config.width_mult
        self.eps = config.bn_eps

    def __call__(self, channels: int) -> int:
        return max(1, round(channels * self.mult))

    def conv(self, in_ch: int, paper_out_ch: int, **conv_kwargs: object) -> BasicConv2d:
        return BasicConv2d(in_ch, self(paper_out_ch), eps=self.eps, **conv_kwargs)


class InceptionA(nn.Module):
    """35×35 block (paper fig. 5; the 5×5 branch kept as in the released model).

    Branches: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1.
    """

    def __init__(self, in_ch: int, pool_features: int, w: _Widths) -> None:
        super().__init__()
        self.branch1x1 = w.conv(in_ch, 64, kernel_size=1)
        self.branch5x5_1 = w.conv(in_ch, 48, kernel_size=1)
        self.branch5x5_2 = w.conv(self.branch5x5_1.out_channels, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = w.conv(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(self.branch3x3dbl_1.out_channels, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = w.conv(self.branch3x3dbl_2.out_channels, 96, kernel_size=3, padding=1)
        self.branch_pool_avg = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = w.conv(in_ch, pool_features, kernel_size=1)
        self.out_channels = sum(m.out_channels for m in (self.branch1x1, self.branch5x5_2, self.branch3x3dbl_3,
                                                         self.branch_pool))

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(self.branch_pool_avg(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35→17 grid reduction (paper fig. 10): stride-2 3×3 | 1×1→3×3→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, in_ch: int, w: _Widths) -> None:
        super().__init__()
        self.branch3x3 = w.conv(in_ch, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = w.conv(in_ch, 64, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(self.branch3x3dbl_1.out_channels, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = w.conv(self.branch3x3dbl_2.out_channels, 96, kernel_size=3, stride=2)
        self.branch_pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.out_channels = self.branch3x3.out_channels + self.branch3x3dbl_3.out_channels + in_ch

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, bd, self.branch_pool(x)], dim=1)


class InceptionC(nn.Module):
    """17×17 block with 7×7 factorised into 1×7 and 7×1 (paper fig. 6); ``c7`` is the inner width."""

    def __init__(self, in_ch: int, c7: int, w: _Widths) -> None:
        super().__init__()
        self.branch1x1 = w.conv(in_ch, 192, kernel_size=1)
        self.branch7x7_1 = w.conv(in_ch, c7, kernel_size=1)
        self.branch7x7_2 = w.conv(w(c7), c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = w.conv(w(c7), 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = w.conv(in_ch, c7, kernel_size=1)
        self.branch7x7dbl_2 = w.conv(w(c7), c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = w.conv(w(c7), c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = w.conv(w(c7), c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = w.conv(w(c7), 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool_avg = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = w.conv(in_ch, 192, kernel_size=1)
        self.out_channels = 4 * w(192)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(bd))))
        bp = self.branch_pool(self.branch_pool_avg(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """17→8 grid reduction: 1×1→stride-2 3×3 | 1×1→1×7→7×1→stride-2 3×3 | stride-2 max pool."""

    def __init__(self, in_ch: int, w: _Widths) -> None:
        super().__init__()
        self.branch3x3_1 = w.conv(in_ch, 192, kernel_size=1)
        self.branch3x3_2 = w.conv(w(192), 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = w.conv(in_ch, 192, kernel_size=1)
        self.branch7x7x3_2 = w.conv(w(192), 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = w.conv(w(192), 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = w.conv(w(192), 192, kernel_size=3, stride=2)
        self.branch_pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.out_channels = w(320) + w(192) + in_ch

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, self.branch_pool(x)], dim=1)


class InceptionE(nn.Module):
    """8×8 block with expanded filter banks (paper fig. 7): the 3×3 outputs split into parallel 1×3 and 3×1."""

    def __init__(self, in_ch: int, w: _Widths) -> None:
        super().__init__()
        self.branch1x1 = w.conv(in_ch, 320, kernel_size=1)
        self.branch3x3_1 = w.conv(in_ch, 384, kernel_size=1)
        self.branch3x3_2a = w.conv(w(384), 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = w.conv(w(384), 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = w.conv(in_ch, 448, kernel_size=1)
        self.branch3x3dbl_2 = w.conv(w(448), 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = w.conv(w(384), 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = w.conv(w(384), 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool_avg = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.branch_pool = w.conv(in_ch, 192, kernel_size=1)
        self.out_channels = w(320) + 4 * w(384) + w(192)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        bp = self.branch_pool(self.branch_pool_avg(x))
        return torch.cat([b1, b3, bd, bp], dim=1)


class InceptionV3(nn.Module):
    """Stem → 3×A → B → 4×C → D → 2×E → global avg pool → dropout → fc → cross-entropy (no aux head)."""

    def __init__(self, config: InceptionV3Config) -> None:
        super().__init__()
        self.config = config
        w = _Widths(config)
        self.Conv2d_1a_3x3 = w.conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = w.conv(w(32), 32, kernel_size=3)
        self.Conv2d_2b_3x3 = w.conv(w(32), 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = w.conv(w(64), 80, kernel_size=1)
        self.Conv2d_4a_3x3 = w.conv(w(80), 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(w(192), 32, w)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, w)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, w)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, w)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, w)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, w)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, w)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, w)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, w)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, w)
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, w)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=config.dropout)
        self.fc = nn.Linear(self.Mixed_7c.out_channels, config.num_classes)
        self.loss = nn.CrossEntropyLoss()

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of classifying ``images`` (batch, 3, H, W) against ``labels`` (batch,)."""
        x = self.maxpool1(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(images))))
        x = self.maxpool2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6a(x)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.loss(self.fc(self.dropout(x)), labels)

    @torch.no_grad()
    def init_parameters(self, generator: torch.Generator) -> None:
        """Conv and fc weights: normal with std 0.1 (the TF-slim/torchvision release), truncated at ±2σ like TF's
        ``truncated_normal``; fc bias 0; BatchNorm scale 1, shift 0, fresh running statistics.
        Draws come from ``generator`` only."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.1, a=-0.2, b=0.2, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1, counter 0


def example_inputs(config: InceptionV3Config, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random standard-normal ``images`` and uniform ``labels`` in ``[0, num_classes)``."""
    images = torch.randn(config.batch, 3, config.image_size, config.image_size, generator=generator)
    labels = torch.randint(0, config.num_classes, (config.batch,), generator=generator)
    return images, labels


def build(config: InceptionV3Config, *, seed: int = 0) -> tuple[InceptionV3, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``)."""
    return build_seeded(InceptionV3, config, example_inputs, seed)


def layer_of_module(path: str) -> int | None:  # noqa: ARG001 - same signature as the recurrent models
    """Always ``None``: Inception-V3 has no LSTM layers."""
    return None
