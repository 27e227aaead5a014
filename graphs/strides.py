"""Views that hold only for the strides seen when tracing, run as reshapes where a step is split.

torch.export writes ``x.reshape(shape)`` as ``aten.view(x, shape)`` wherever the traced ``x``'s strides allow a
view. Hugging Face's attention reshapes ``scaled_dot_product_attention``'s output after a transpose: the output
is laid out like the query, which is itself a transposed view, so the traced reshape is a view. A value that
crosses to another device or pipeline stage arrives contiguous, the ops after it lay their outputs out
differently, and the view fails ("view size is not compatible with input tensor's size and stride": BART on
every split placement); T5's exported step failed on its own batch, the fake attention output's strides not being
the kernel's. A reshape is that same view where one exists and a copy where not, with the same values and
gradients, so export's graph (:func:`graphs.exporter.trace_export`), the op engine
(:func:`placer.engine.program.compile_step`) and the pipeline stages (:func:`placer.engine.stages.split_stages`)
run it instead (:func:`views_reshaped`, :func:`reshape_for_view`). The engine runs in-place
ops out of place and the tracer refuses updates through views (:mod:`graphs.inplace`), so no op relies on the
view sharing its base's storage. ``x.view(dtype)`` reinterprets the bytes and is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

__all__ = ["reshape_for_view", "views_reshaped"]

_VIEWS = {torch.ops.aten.view.default: torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default: torch.ops.aten.reshape.default}


def reshape_for_view(op: str, target: Any, args: tuple) -> Any:
    """The target a split step runs for a node: ``aten.reshape`` for ``aten.view`` / ``aten._unsafe_view``,
    the method ``"reshape"`` for ``x.view(*shape)`` (not for ``x.view(dtype)``); ``target`` itself otherwise."""
    if op == "call_method":
        if target == "view" and not any(isinstance(a, torch.dtype) for a in args[1:]):
            return "reshape"
        return target
    return _VIEWS.get(target, target) if op == "call_function" else target


def views_reshaped(gm: fx.GraphModule) -> None:
    """Every shape view of ``gm`` as a reshape (:func:`reshape_for_view`), in place: a pipeline stage's inputs
    arrive contiguous."""
    changed = False
    for node in gm.graph.nodes:
        twin = reshape_for_view(node.op, node.target, tuple(node.args))
        if twin != node.target:
            node.target = twin
            changed = True
    if changed:
        gm.recompile()
