"""The single-process training step the engine must reproduce (tests and the overhead benchmark use it)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from graphs.batch import split_inputs

__all__ = ["reference_step"]


def reference_step(gm: torch.nn.Module, inputs: Sequence[Any], *, microbatches: int = 1,
                   lr: float | None = None) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain eager step of ``gm`` (model + loss): mean of ``microbatches`` micro-batch losses, gradients
    accumulated; with ``lr`` also one SGD update. Returns ``(loss, grads, params)`` keyed by parameter name.

    With one micro-batch this is ordinary training; with ``M`` it equals the engine's micro-batched step
    (they differ from the full batch only for batch-dependent ops such as BatchNorm).
    """
    for p in gm.parameters():
        p.grad = None
    total = 0.0
    for m in range(microbatches):
        loss = gm(*split_inputs(inputs, microbatches, m))
        if loss.requires_grad:  # a model with nothing to train (every parameter frozen) has no backward
            (loss / microbatches).backward()
        total += float(loss.detach()) / microbatches
    grads = {n: p.grad.detach().clone() for n, p in gm.named_parameters() if p.grad is not None}
    if lr is not None:
        with torch.no_grad():
            for p in gm.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    params = {n: p.detach().clone() for n, p in gm.named_parameters()}
    return total, grads, params
