"""``torch.no_grad()`` (and ``torch.autocast``, :func:`refuse_autocast`) in ``forward``: fx records the ops of a
``with torch.no_grad():`` block, not the grad mode they ran under, so the traced step computed gradients through
it. An exponential moving average of an activation kept in a buffer (``with torch.no_grad():
self.ema.mul_(0.9).add_(h.mean(0), alpha=0.1)``, as momentum encoders and VQ codebooks keep theirs) then made the
buffer part of the autograd graph: other gradients than eager's, and a second backward that failed. The tracer
(:mod:`graphs.tracer`) evaluates every node as it records it, inside the user's block, so it knows the grad mode:
:func:`detached_inputs` feeds a node recorded with gradients off the detached value of every traced tensor that
needs a gradient, and what the block computes then needs none, as in eager. (A module called inside the block
keeps its own parameters' gradients: tracing refuses the step that would train them,
:func:`graphs.trace._gradient_mismatch`.)"""

from __future__ import annotations

import builtins
from typing import Any

import torch
import torch.fx as fx

__all__ = ["detached_inputs", "refuse_autocast"]

_METADATA = frozenset({"detach", builtins.getattr, "size", "dim", "numel", "stride", "is_contiguous"})
"""Targets that read no gradient (``x.dtype``, ``x.size(1)`` in a block): their inputs need no detach."""


def detached_inputs(tracer: fx.Tracer, kind: str, target: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of a node being recorded, with every proxy of a tensor that needs a gradient replaced by
    its ``detach()`` when gradients are off (the traced values, ``_vals``, say which need one); unchanged else.
    ``RuntimeError`` for a node recorded under ``torch.autocast`` (:func:`refuse_autocast`)."""
    if kind not in ("call_function", "call_method", "call_module") or target in _METADATA:
        return args, kwargs
    refuse_autocast()
    if torch.is_grad_enabled():
        return args, kwargs
    cache: dict[fx.Node, fx.Proxy] = tracer.__dict__.setdefault("_detached", {})

    def detach(a: Any) -> Any:
        value = next(iter(a.__dict__.get("_vals") or ()), None) if isinstance(a, fx.Proxy) else None
        if not (isinstance(value, torch.Tensor) and value.requires_grad):
            return a
        if a.node not in cache:
            cache[a.node] = tracer.create_proxy("call_method", "detach", (a,), {})
        return cache[a.node]

    return fx.node.map_aggregate((args, kwargs), detach)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def refuse_autocast() -> None:
    """``RuntimeError`` when an op is being recorded inside ``torch.autocast`` (a block in ``forward``): fx records
    the ops, not the precision autocast runs them in, so the traced step would run in full precision (another step
    than eager's: other values, other costs). torch.export keeps such a block, run under its autocast, as one op."""
    on = [d for d in _AUTOCAST_DEVICES if torch.is_autocast_enabled(d)]
    if on:
        raise RuntimeError(f"torch.autocast({on[0]!r}) in forward: fx records its ops, not the precision they run in")
