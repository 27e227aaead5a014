"""In-place updates as data dependencies of a traced step (:func:`thread_inplace_updates`): the tracer
(:mod:`graphs.tracer`) runs it on every graph it records, so a buffer's update (``self.mean.mul_(0.5)``) is ordered
before the buffer's later reads by every schedule, in the simulator and on the engine's workers."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

__all__ = ["thread_inplace_updates"]


def _updates_in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x.copy_(y)``: a tensor method that changes its tensor and returns it. (fx's proxies have
    no ``__iadd__``: ``x += y`` traces as ``x = x + y``. An update through a view, ``x[:, 0].add_(1)``, is not
    ordered before later reads of ``x``: a known limit.)"""
    if node.op != "call_method" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = str(node.target)
    return name.endswith("_") and not name.startswith("_")


def thread_inplace_updates(graph: fx.Graph) -> None:
    """Make the order of in-place updates a data dependency: every later reader of a tensor an op updated in
    place (a buffer's running mean, ``self.mean.mul_(0.5)``) reads that op's result instead (the same tensor).
    Without it nothing orders the update before the reads, and a schedule may run them first: the step reads
    the old value (the engine did, for every placement). A buffer read again by another ``get_attr`` counts as
    the same tensor."""
    latest: dict[Any, fx.Node] = {}  # the tensor (a buffer's target, or the node that made it) -> its last update
    tensor_of: dict[fx.Node, Any] = {}

    def key(a: fx.Node) -> Any:
        return tensor_of.get(a, ("attr", a.target) if a.op == "get_attr" else a)

    for node in list(graph.nodes):
        if latest:
            node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: latest.get(key(a), a))
        if _updates_in_place(node):
            latest[key(node.args[0])] = node
            tensor_of[node] = key(node.args[0])
