"""What every benchmark model's ``build`` shares."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


def build_seeded(model_cls: Callable[[Any], nn.Module], config: Any,
                 example_inputs: Callable[[Any, torch.Generator], tuple[Tensor, ...]],
                 seed: int) -> tuple[nn.Module, tuple[Tensor, ...], None]:
    """The model (training mode), its example inputs, and ``None`` (the loss is computed inside ``forward``).

    Built on the meta device and initialised from a local generator: no default init consumes (or changes) the
    global RNG, and the parameters depend on ``seed`` alone.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    model.init_parameters(generator)
    return model, example_inputs(config, generator), None
