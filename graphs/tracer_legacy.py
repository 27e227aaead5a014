"""How placer traced a step before ``graph.meta["kept_whole"]`` existed (fx's default leaf rule, the loss appended
on the model's output): kept so that graphs recorded then rebuild as they were (``trace_model(..., legacy=True)``)."""

from __future__ import annotations

from typing import Any, Callable

import torch.fx as fx
from torch import nn

__all__ = ["legacy_trace_fx"]


class _StepTracer(fx.Tracer):
    """fx's default leaf rule; a module outside the traced root (e.g. a loss module) is inlined."""

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def legacy_trace_fx(model: nn.Module, loss_fn: Callable[[Any], Any]) -> fx.GraphModule:
    """Trace ``model`` then append ``loss_fn`` on its output proxies, so targets stay relative to ``model``."""
    tracer = _StepTracer()
    graph = tracer.trace(model)
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    graph.erase_node(out)
    loss = loss_fn(fx.node.map_arg(result, lambda n: fx.Proxy(n, tracer)))
    graph.output(tracer.create_arg(loss))
    graph.lint()
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Step")
