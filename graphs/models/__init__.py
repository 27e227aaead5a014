"""The benchmark models of ColocRL (Mirhoseini et al., ICML 2017) in plain PyTorch, by name.

Three models, each with a ``paper`` configuration (ColocRL's batch sizes; widths from the cited works where the
paper gives none — see each config's docstring) and a ``small`` one for tests:

- ``rnnlm``: 2-layer LSTM language model (:mod:`graphs.models.rnnlm`),
- ``nmt``: 2-layer attentional LSTM encoder-decoder (:mod:`graphs.models.nmt`),
- ``inception_v3``: Inception-V3 without the auxiliary head (:mod:`graphs.models.inception_v3`);

and two of today's workloads, with a ``medium`` configuration too (a few seconds per step on one core):

- ``gpt``: GPT-2-style decoder-only transformer (:mod:`graphs.models.gpt`; also ``1.3b``),
- ``moe``: DeepSeekMoE-style mixture-of-experts decoder, one module per expert (:mod:`graphs.models.moe`).

Convention shared with user models given as ``pkg.module:factory``: a builder returns ``(model,
example_inputs, loss_fn)``, and ``model(*example_inputs)`` returns the **scalar training loss** — the loss
(a ``nn.CrossEntropyLoss`` module) is computed inside ``forward`` so that the softmax is an op of the traced
graph and can be placed, as ColocRL placed it. ``loss_fn`` is therefore ``None`` (the default loss, the mean of
the output, is the loss itself). Targets are part of ``example_inputs``; every input has the batch on dim 0.
All trace with ``torch.fx.symbolic_trace``; the recurrent ones unroll over their fixed number of steps.

Building is deterministic and side-effect free: parameters and inputs come from a local ``torch.Generator``
seeded with ``seed``, so the same seed gives identical tensors and the global RNG state is never touched.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import Tensor, nn

from graphs.models import gpt, inception_v3, moe, nmt, rnnlm

__all__ = ["MODELS", "CONFIGS", "LAYER_OF_MODULE", "build_model", "resolve_config"]

ModelBuilder = Callable[..., tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor] | None]]

MODELS: dict[str, ModelBuilder] = {
    "rnnlm": rnnlm.build,
    "nmt": nmt.build,
    "inception_v3": inception_v3.build,
    "gpt": gpt.build,
    "moe": moe.build,
}
"""Builder per model name; each is called as ``builder(config, seed=seed)``."""

CONFIGS: dict[str, dict[str, Any]] = {
    "rnnlm": {"paper": rnnlm.PAPER, "small": rnnlm.SMALL},
    "nmt": {"paper": nmt.PAPER, "small": nmt.SMALL},
    "inception_v3": {"paper": inception_v3.PAPER, "small": inception_v3.SMALL},
    "gpt": {"paper": gpt.PAPER, "small": gpt.SMALL, "medium": gpt.MEDIUM, "1.3b": gpt.XL_1_3B},
    "moe": {"paper": moe.PAPER, "small": moe.SMALL, "medium": moe.MEDIUM},
}
"""Named configurations per model (frozen dataclasses; ``dataclasses.replace`` makes variants)."""

LAYER_OF_MODULE: dict[str, Callable[[str], int | None]] = {
    "rnnlm": rnnlm.layer_of_module,
    "nmt": nmt.layer_of_module,
    "inception_v3": inception_v3.layer_of_module,
    "gpt": gpt.layer_of_module,
    "moe": moe.layer_of_module,
}
"""Per model: module path → 0-based LSTM layer (transformer block for ``gpt`` and ``moe``) index, or ``None``."""


def resolve_config(name: str, config: str = "small", **overrides: Any) -> Any:
    """The named configuration of model ``name`` with ``overrides`` replacing its fields.

    Raises a one-line ``ValueError`` for an unknown model, configuration or field, or an invalid value.
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(sorted(CONFIGS))}")
    if config not in CONFIGS[name]:
        raise ValueError(f"unknown config {config!r} for model {name!r}; valid configs: "
                         f"{', '.join(sorted(CONFIGS[name]))}")
    base = CONFIGS[name][config]
    fields = [f.name for f in dataclasses.fields(base)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown override(s) {', '.join(unknown)} for model {name!r}; valid: {', '.join(fields)}")
    try:
        return dataclasses.replace(base, **overrides)
    except ValueError as exc:  # the config's own validation, already one line
        raise ValueError(str(exc).splitlines()[0]) from None


def build_model(
    name: str, config: str = "small", *, seed: int = 0, **overrides: Any
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[..., Tensor] | None]:
    """Build benchmark model ``name`` in configuration ``config`` (``paper`` or ``small``).

    ``overrides`` replace configuration fields, e.g. ``build_model("rnnlm", "paper", seq_len=10, vocab=2000)``.
    Returns ``(model, example_inputs, loss_fn)`` with ``model(*example_inputs)`` the scalar training loss and
    ``loss_fn`` ``None``. The model is in training mode. Same ``seed`` → identical parameters and inputs.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cfg = resolve_config(name, config, **overrides)
    return MODELS[name](cfg, seed=seed)
