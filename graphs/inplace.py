"""In-place updates as data dependencies of a traced step (:func:`thread_inplace_updates`): the tracer
(:mod:`graphs.tracer`) runs it on every graph it records, so a buffer's update (``self.mean.mul_(0.5)``) is ordered
before the buffer's later reads by every schedule, in the simulator and on the engine's workers. The tracer also
records the updates ``forward`` writes as Python statements (:func:`with_in_place_operators`,
:func:`state_writes_recorded`): ``self.steps += 1``, ``self.ema = 0.9 * self.ema + ...``."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn

__all__ = ["IN_PLACE_OPERATORS", "activations_out_of_place", "copied", "out_of_place", "refuse_updates_through_views",
           "state_writes_recorded", "state_written", "thread_inplace_updates", "updated_state", "updates_in_place",
           "with_in_place_operators", "written_args"]

log = logging.getLogger(__name__)


def _in_place_name(name: str) -> bool:
    """``add_``, ``relu_``: the in-place variant's name (not ``__iadd__``, not ``_private_``)."""
    return name.endswith("_") and not name.startswith("_")


def written_args(node: fx.Node) -> list[Any]:
    """The arguments an ATen op node writes (its schema's write aliases: ``fill_``'s ``self``, ``copy_``'s
    ``self``); empty for any other node."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.is_mutable:
        return []
    return [arg for spec, arg in zip(schema.arguments, node.args)
            if spec.alias_info is not None and spec.alias_info.is_write]


def updates_in_place(node: fx.Node) -> bool:
    """``x.add_(y)``, ``x.copy_(y)``, ``torch.relu_(x)``: a tensor method or torch function that changes its
    (first) tensor and returns it. (The tracer records ``buffer += y`` and ``self.buffer = value`` in ``forward``
    as such methods; one through a view is refused, :func:`refuse_updates_through_views`.)"""
    if node.op not in ("call_method", "call_function") or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
    return _in_place_name(name) and (node.op == "call_method" or getattr(torch, name, None) is node.target)


def state_written(node: fx.Node) -> str | None:
    """The module attribute (``"layer.ema"``) that ``node`` updates in place: an in-place method on it or on its
    update (the tracer's ``steps.add_(1)``, ``ema.copy_(value)``), or an ATen op writing its first argument
    (torch.export's ``aten.copy_`` write-back of a buffer); None for every other node."""
    if updates_in_place(node):
        return updated_state(node)
    base = next(iter(written_args(node)), None)
    return str(base.target) if isinstance(base, fx.Node) and base.op == "get_attr" else None


def _first_value(values: Mapping[fx.Node, Sequence[Any]] | None, node: fx.Node) -> Any:
    """``node``'s traced value on the first example (None when not traced)."""
    return next(iter(values.get(node) or ()), None) if values else None


def refuse_updates_through_views(graph: fx.Graph, values: Mapping[fx.Node, Sequence[Any]]) -> None:
    """``RuntimeError`` where an in-place method updates a view of another tensor (``h[:, 0].add_(1)``,
    ``h.narrow(1, 2, 3).mul_(3)``; ``values``: each node's traced values, the example's first) that is read after
    it, itself or through another view (a view whose base nothing else reads, ``fc(x).view(b, -1).relu_()``, is
    its tensor's last form: fine as it is). fx records an update of the view alone, which
    :func:`thread_inplace_updates` cannot order before the readers of ``h``, and the engine runs in-place methods
    out of place, so ``h``'s readers never saw it (the step was silently another one, on one device too).
    Refused, the model is traced by torch.export, which functionalizes such updates (:mod:`graphs.exporter`)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        view = _first_value(values, node.args[0]) if updates_in_place(node) else None
        if not (isinstance(view, torch.Tensor) and view._base is not None):
            continue
        # The tensor, or another view of it made before the update, read after it (a later read of the view
        # itself reads the update: thread_inplace_updates).
        base = view._base
        aliases = [n for n in graph.nodes if order[n] < order[node] and n is not node.args[0]
                   and isinstance(v := _first_value(values, n), torch.Tensor) and (v is base or v._base is base)]
        if any(order[u] > order[node] for n in aliases for u in n.users):
            raise RuntimeError(f"{node.target} through a view ({node.args[0].name}) updates the tensor it views, "
                               "which fx records as an update of the view alone")


def updated_state(node: fx.Node) -> str | None:
    """The module attribute (``"layer.ema"``) that ``node``'s value is, directly or through in-place updates of
    it (``self.ema.mul_(0.9).add_(y)``); None for any other value."""
    while updates_in_place(node):
        node = node.args[0]
    return str(node.target) if node.op == "get_attr" else None


def thread_inplace_updates(graph: fx.Graph, values: Mapping[fx.Node, Sequence[Any]] | None = None) -> None:
    """Make the order of in-place updates a data dependency: every later reader of a tensor an op updated in
    place (a buffer's running mean, ``self.mean.mul_(0.5)``) reads that op's result instead (the same tensor).
    Without it nothing orders the update before the reads, and a schedule may run them first: the step reads
    the old value (the engine did, for every placement). A buffer read again by another ``get_attr`` counts as
    the same tensor; with the traced ``values``, so does any node whose value is the very tensor an earlier node's
    is (``batch["ids"]`` read twice from the input dict, ``x.contiguous()`` of a contiguous ``x``), and an update
    through a view is refused first (:func:`refuse_updates_through_views`)."""
    same: dict[int, fx.Node] = {}  # id of a traced tensor -> the first node whose value it is
    if values is not None:
        refuse_updates_through_views(graph, values)
        for n in graph.nodes:
            if isinstance(v := _first_value(values, n), torch.Tensor):
                same.setdefault(id(v), n)
    latest: dict[Any, fx.Node] = {}  # the tensor (a buffer's target, or the node that made it) -> its last update
    tensor_of: dict[fx.Node, Any] = {}

    def key(a: fx.Node) -> Any:
        if a in tensor_of or a.op == "get_attr":
            return tensor_of.get(a, ("attr", a.target))
        found = same.get(id(_first_value(values, a))) if same else None
        return a if found is None or found is a else key(found)

    for node in list(graph.nodes):
        if latest:
            node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: latest.get(key(a), a))
        if updates_in_place(node):
            latest[key(node.args[0])] = node
            tensor_of[node] = key(node.args[0])


def copied(dst: torch.Tensor, src: Any, non_blocking: bool = False) -> torch.Tensor:
    """``dst.copy_(src)`` out of place, differentiable: ``src`` in ``dst``'s dtype, device and shape. The engine
    runs a buffer's ``copy_`` so (run in place, the update would also change the value an earlier reader on
    another device has not been sent yet), and a functionalized export's ``aten.copy`` (no autograd formula)."""
    value = src.to(dtype=dst.dtype, device=dst.device) if isinstance(src, torch.Tensor) else \
        torch.as_tensor(src, dtype=dst.dtype, device=dst.device)
    return value.expand_as(dst).clone()


def out_of_place(op: str, target: Any) -> Any:
    """The out-of-place twin of an in-place node's target: a tensor method's name (``"add_"`` -> ``"add"``), a
    torch function (``torch.relu_`` -> ``torch.relu``), an ATen op (``aten.index_put_.default`` ->
    ``aten.index_put.default``, as torch.export records ``out[mask] = y``); :func:`copied` for ``copy_``, which
    has no twin; ``target`` itself for every other. A tensor received from another device or pipeline stage is
    an autograd leaf, which an in-place op may not modify; run out of place, the op returns what its readers
    read (:func:`thread_inplace_updates`)."""
    if (op == "call_method" and target == "copy_") or target is torch.ops.aten.copy_.default:
        return copied
    if op == "call_method":
        name = str(target)
        return name[:-1] if _in_place_name(name) and hasattr(torch.Tensor, name[:-1]) else target
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
        packet = getattr(getattr(torch.ops, target.namespace), name[:-1], None) if _in_place_name(name) else None
        return getattr(packet, target._overloadname, target) if packet is not None else target
    name = getattr(target, "__name__", "")
    if _in_place_name(name) and getattr(torch, name, None) is target:
        return getattr(torch, name[:-1], target)
    return target


def activations_out_of_place(gm: fx.GraphModule) -> None:
    """Every in-place update in ``gm`` of a tensor that is not module state run out of place
    (:func:`out_of_place`; a buffer's update stays in place, so the buffer keeps it): what a pipeline stage runs,
    whose inputs from the previous stage are autograd leaves (``torch.relu_(h)`` on one failed the stage)."""
    changed = False
    for node in gm.graph.nodes:
        if node.op in ("call_method", "call_function") and state_written(node) is None:
            twin = out_of_place(node.op, node.target)
            if twin != node.target:
                node.target, node.op = twin, "call_function" if callable(twin) else node.op
                changed = True
    if changed:
        gm.recompile()


# ``t += y`` on a tensor is ``t.add_(y)``; fx's proxies have no ``__iadd__``, so Python falls back to ``t = t + y``.
# On module state (``self.steps += 1``, ``self.ema *= 0.9``) that drops the update from the step: the buffer
# never changes on the engine's workers. The tracer records those as the in-place methods they are.
IN_PLACE_OPERATORS = {"__iadd__": "add_", "__isub__": "sub_", "__imul__": "mul_", "__itruediv__": "div_",
                      "__ifloordiv__": "floor_divide_", "__imod__": "remainder_", "__ipow__": "pow_",
                      "__iand__": "bitwise_and_", "__ior__": "bitwise_or_", "__ixor__": "bitwise_xor_",
                      "__ilshift__": "bitwise_left_shift_", "__irshift__": "bitwise_right_shift_"}


def _describe_value(v: Any) -> str:
    return f"tensor {tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__


def _in_place_operator(method: str) -> Callable[[fx.Proxy, Any], Any]:
    """The proxy's ``__iadd__`` (etc.) for ``method``: in place on module state, else ``NotImplemented``."""
    def update(self: fx.Proxy, other: Any) -> Any:
        vals = self.__dict__.get("_vals")
        if (vals is None or not isinstance(vals[0], torch.Tensor) or vals[0].requires_grad
                or updated_state(self.node) is None):
            return NotImplemented  # an activation (or a parameter): out of place, as fx traces it
        return self.tracer.create_proxy("call_method", method, (self, other), {})
    return update


def with_in_place_operators(proxy_cls: type[fx.Proxy]) -> type[fx.Proxy]:
    """Class decorator: the tracer's proxy class (one that keeps its traced values as ``_vals``) with the
    operators of :data:`IN_PLACE_OPERATORS`."""
    for dunder, method in IN_PLACE_OPERATORS.items():
        setattr(proxy_cls, dunder, _in_place_operator(method))
    return proxy_cls


@contextlib.contextmanager
def state_writes_recorded(tracer: fx.Tracer) -> Iterator[None]:
    """``self.buffer = value`` in ``forward``, ``value`` traced: the step's update of the buffer, recorded as
    ``buffer.copy_(value)`` (the buffer object stays; its later reads then read the update, as for any in-place
    update); after ``self.buffer += y`` (Python assigns the result back), nothing more. Without it fx left the
    module holding a Proxy, and the update was not in the step. A value of another shape or dtype (a cache of
    the last activation) is the step's value as fx traced it, not kept between steps (warned); tracing puts
    the module's own buffer back (:func:`graphs.trace.buffers_restored`)."""
    orig = nn.Module.__setattr__

    def setattr_(module: nn.Module, name: str, value: Any) -> None:
        buffers = module.__dict__.get("_buffers")
        if not (getattr(tracer, "recording", True) and isinstance(value, fx.Proxy) and buffers is not None
                and buffers.get(name) is not None):
            return orig(module, name, value)
        try:
            path = tracer.path_of_module(module)
        except NameError:  # a module outside the traced root
            return orig(module, name, value)
        target = f"{path}.{name}" if path else name
        if updated_state(value.node) == target:
            return None
        now, new = buffers[name], value.__dict__.get("_vals", [None])[0]
        if not (isinstance(new, torch.Tensor) and new.shape == now.shape and new.dtype == now.dtype):
            log.warning("forward sets buffer %r to a %s: the step reads it, but it is not kept between steps (a "
                        "buffer keeps its shape and dtype: %s)", target, _describe_value(new), _describe_value(now))
            return orig(module, name, value)
        tracer.create_proxy("call_method", "copy_", (tracer.create_proxy("get_attr", target, (), {}), value), {})
        return None

    nn.Module.__setattr__ = setattr_  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__setattr__ = orig  # type: ignore[method-assign]
