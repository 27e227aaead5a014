"""The loss of a traced step when the model's factory gives none (:func:`graphs.trace.trace_model` chooses it
from the model's eager output), and how a trainer gets the same loss back from a graph's ``meta["loss"]``."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

__all__ = ["DEFAULT_LOSS", "LOSS_FIELD", "default_loss", "loss_field", "traced_default_loss", "default_loss_for"]

DEFAULT_LOSS = "mean of squares: output.pow(2).mean()"
"""The default loss, as graph meta records it (``meta["loss"]``)."""


def default_loss(output: Any) -> torch.Tensor:
    """The loss when a factory gives none and the output is not a scalar: the mean of the output's squares,
    well-defined for any float output and not ~0 for one that ends in LayerNorm (whose mean is ~0)."""
    return output.pow(2).mean()


def _legacy_default_loss(output: Any) -> torch.Tensor:
    """The default loss of graphs built before ``meta["loss"]`` existed."""
    return output.mean()


def traced_default_loss(meta: Mapping[str, Any]) -> Callable[[Any], Any]:
    """The loss a graph's step applied to its model's output when the factory gave none, as :func:`trace_model`
    chose it: the output itself when it is a scalar, its ``loss`` field where the step took that, else
    :func:`default_loss` (graphs built before ``meta["loss"]`` existed: the mean). What a trainer running the
    placed model itself must use."""
    if meta.get("loss") == LOSS_FIELD:
        return loss_field
    mean = default_loss if "loss" in meta else _legacy_default_loss
    return lambda out: out if isinstance(out, torch.Tensor) and out.dim() == 0 else mean(out)


def _identity(output: Any) -> Any:
    return output


LOSS_FIELD = "the model's output field: output['loss'] (output.loss)"
"""``meta["loss"]`` of a step whose model returns its loss in a field (Hugging Face's ``ModelOutput``, a dict)."""


def loss_field(output: Any) -> Any:
    """``output["loss"]``, or ``output.loss`` for an output that is not a mapping (a dataclass)."""
    return output["loss"] if isinstance(output, Mapping) else output.loss


def default_loss_for(output: Any, legacy: bool, model_name: str) -> tuple[Callable[[Any], Any], str]:
    """The loss of a step whose factory gave none, from the model's eager output, and how meta records it: a
    scalar output is the loss; another tensor gets :func:`default_loss`; a dict or dataclass with a scalar
    ``loss`` (Hugging Face models given labels) gives that field; anything else is a one-line ``ValueError``."""
    if isinstance(output, torch.Tensor):
        if output.dim() == 0:
            return _identity, "the model's output (a scalar)"
        return (_legacy_default_loss if legacy else default_loss), DEFAULT_LOSS
    try:
        field = loss_field(output)
    except (KeyError, AttributeError, TypeError):
        field = None
    if isinstance(field, torch.Tensor) and field.dim() == 0:
        return loss_field, LOSS_FIELD
    raise ValueError(f"model {model_name} returns {type(output).__name__}, not a tensor, and no scalar 'loss' in "
                     "it: give the factory a third item, loss_fn(output) -> the scalar loss")
