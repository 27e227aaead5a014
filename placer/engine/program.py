"""Per-op programs compiled from a traced step's ``torch.fx`` graph, and the shape pass that describes values.

The engine runs a placed graph op by op, so every fx node (except ``output``) becomes an :class:`OpProgram`: a
callable plus the indices of the ops whose values it reads. The op <-> node contract of :mod:`graphs.trace`
(one op per node, ``graph.op_names[i] == node.name``, nodes in topological order) makes op ``i`` node ``i``.

:func:`describe_values` runs the whole step once on one micro-batch and records, for every op, the structure of
its output (a pytree of tensor leaves and constants): shapes and dtypes so that receivers can pre-allocate
buffers, ``requires_grad`` so that gradients are sent back only where autograd would compute them, and the values
of non-tensor leaves (``x.size(0)`` and the like). Those are treated as constants of the micro-batch shape: every
worker knows them without a transfer. A data-dependent Python scalar (``t.item()`` feeding another op) would be
wrong here, but fx cannot trace control flow on such values anyway.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property, partial
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from graphs.inplace import out_of_place, state_written
from graphs.strides import reshape_for_view

log = logging.getLogger(__name__)

__all__ = ["LeafMeta", "ValueMeta", "OpProgram", "StepProgram", "compile_step", "describe_values", "input_spec",
           "placeholder_values"]


@dataclass(frozen=True)
class LeafMeta:
    """One leaf of an op's output for one micro-batch."""

    is_tensor: bool
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    requires_grad: bool = False
    const: Any = None
    """The value of a non-tensor leaf (a constant of the micro-batch shape)."""

    @property
    def nbytes(self) -> int:
        if not self.is_tensor:
            return 0
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ValueMeta:
    """The structure of one op's output: a pytree spec and its leaves."""

    spec: TreeSpec
    leaves: tuple[LeafMeta, ...]
    container: str = "tree"
    """``leaf`` (the value is its only leaf), ``tuple`` / ``list`` (a flat one), or ``tree`` (anything else)."""

    def unflatten(self, leaves: list[Any]) -> Any:
        """The value rebuilt from its leaves (fast paths for the common shapes)."""
        if self.container == "leaf":
            return leaves[0]
        if self.container == "tuple":
            return tuple(leaves)
        if self.container == "list":
            return list(leaves)
        return tree_unflatten(leaves, self.spec)

    @cached_property
    def tensor_leaves(self) -> tuple[int, ...]:
        return tuple(k for k, leaf in enumerate(self.leaves) if leaf.is_tensor)

    @cached_property
    def grad_leaves(self) -> tuple[int, ...]:
        return tuple(k for k, leaf in enumerate(self.leaves) if leaf.is_tensor and leaf.requires_grad)

    @property
    def requires_grad(self) -> bool:
        return any(leaf.is_tensor and leaf.requires_grad for leaf in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


@dataclass(eq=False)
class OpProgram:
    """How to compute op ``index`` from the values of the ops it reads."""

    index: int
    name: str
    kind: str
    """``input`` (a placeholder), ``get_attr`` (a parameter or buffer) or ``compute`` (everything else)."""
    inputs: tuple[int, ...]
    """Producers read by this op, unique, in argument order."""
    run: Callable[[Sequence[Any]], Any]
    """``run(values)`` with ``values[k]`` the value of ``inputs[k]``; returns the op's output."""
    params: tuple[tuple[str, nn.Parameter], ...]
    """Trainable parameters the op uses directly (a module's, or the ``get_attr`` target)."""
    input_position: int = -1
    """Position among the step's inputs, for ``input`` ops."""
    attr: Any = None
    """The fetched attribute, for ``get_attr`` ops."""


@dataclass(eq=False)
class StepProgram:
    """A compiled step: one :class:`OpProgram` per op, plus what the engine needs to know about the model."""

    gm: fx.GraphModule
    ops: list[OpProgram]
    loss_op: int
    """The op whose output is the step's scalar loss."""
    param_names: dict[int, str]
    """``id(parameter) -> qualified name`` for every trainable parameter of ``gm``."""
    state_writes: tuple[tuple[int, torch.Tensor], ...] = ()
    """``(op, buffer)`` per buffer the step updates in place (``self.steps += 1``): the op whose value is the
    buffer at the step's end (:func:`graphs.inplace.state_written`). The engine runs in-place ops out of place,
    so it writes that value into the buffer after the step (:meth:`placer.engine.executor._Step.write_state`)."""

    @property
    def n(self) -> int:
        return len(self.ops)

    def placeholder_values(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """The step's ``inputs`` as its placeholders take them (``input_position`` indexes these): as given for
        fx, flattened by the input tree for torch.export's step (a dict batch is one input, several
        placeholders)."""
        return placeholder_values(inputs, input_spec(self.gm))

    def consumers(self) -> list[list[int]]:
        cons: list[list[int]] = [[] for _ in self.ops]
        for op in self.ops:
            for j in op.inputs:
                cons[j].append(op.index)
        return cons


def input_spec(gm: fx.GraphModule) -> TreeSpec | None:
    """torch.export's input tree of ``gm``, whose leaves its placeholders are; None for an fx step (one
    placeholder per input)."""
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None) if isinstance(codegen, fx.graph._PyTreeCodeGen) else None
    return None if info is None else info.in_spec


def placeholder_values(inputs: Sequence[Any], spec: TreeSpec | None) -> tuple[Any, ...]:
    """A step's ``inputs`` as its placeholders take them: as given, or flattened by ``spec``
    (:func:`input_spec`)."""
    return tuple(inputs) if spec is None else tuple(fx_pytree.tree_flatten_spec((tuple(inputs), {}), spec))


def _fetch_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_node(x: Any) -> bool:
    return isinstance(x, fx.Node)


def _make_runner(fn: Callable[..., Any], args: tuple, kwargs: dict, slot_of: dict[fx.Node, int]) -> Callable:
    """A closure calling ``fn`` with the node arguments replaced by input values.

    Flat argument lists (the common case) are filled by index; nested ones (``torch.cat([a, b])``) through
    a pytree template. Kept cheap because it runs once per op per micro-batch.
    """
    kw_nodes = any(_is_node(v) for v in tree_flatten(kwargs)[0])
    flat_args = all(_is_node(a) or not isinstance(a, (list, tuple, dict)) for a in args)
    if flat_args and not kw_nodes:
        template = list(args)
        where = [(pos, slot_of[a]) for pos, a in enumerate(args) if _is_node(a)]

        def run_flat(values: Sequence[Any]) -> Any:
            a = template.copy()
            for pos, slot in where:
                a[pos] = values[slot]
            return fn(*a, **kwargs)

        return run_flat

    arg_getters = [_getter(a, slot_of) for a in args]
    kw_getters = {k: _getter(v, slot_of) for k, v in kwargs.items()}

    def run_nested(values: Sequence[Any]) -> Any:
        return fn(*[g(values) for g in arg_getters], **{k: g(values) for k, g in kw_getters.items()})

    return run_nested


def _getter(a: Any, slot_of: dict[fx.Node, int]) -> Callable[[Sequence[Any]], Any]:
    """A function of the input values returning argument ``a`` (nested tuples, lists and dicts of nodes)."""
    if _is_node(a):
        slot = slot_of[a]
        return lambda values: values[slot]
    if isinstance(a, (tuple, list)) and any(_is_node(x) for x in tree_flatten(a)[0]):
        parts = [_getter(x, slot_of) for x in a]
        make = tuple if isinstance(a, tuple) else list
        return lambda values: make(p(values) for p in parts)
    if isinstance(a, dict) and any(_is_node(x) for x in tree_flatten(a)[0]):
        parts_d = {k: _getter(v, slot_of) for k, v in a.items()}
        return lambda values: {k: p(values) for k, p in parts_d.items()}
    return lambda values: a


def _call_method(name: str, obj: Any, *args: Any, **kwargs: Any) -> Any:
    return getattr(obj, name)(*args, **kwargs)


def _inplace_free(args: tuple, kwargs: dict, target: Any) -> tuple[tuple, dict, Any]:
    """Disable in-place variants: an op's inputs are autograd leaves here, which in-place ops may not modify."""
    if kwargs.get("inplace") is True:
        kwargs = {**kwargs, "inplace": False}
    return args, kwargs, target


def compile_step(gm: fx.GraphModule) -> StepProgram:
    """Compile every node of ``gm`` (except ``output``) into an :class:`OpProgram`, in graph order."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n: i for i, n in enumerate(nodes)}
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    loss = out_node.args[0]
    if not isinstance(loss, fx.Node):
        raise ValueError("the traced step must return the loss node itself")
    for mod in gm.modules():  # e.g. nn.ReLU(inplace=True): see _inplace_free
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    param_names = {id(p): name for name, p in gm.named_parameters()}
    ops: list[OpProgram] = []
    placeholder_pos = 0
    for i, node in enumerate(nodes):
        producers = tuple(dict.fromkeys(node.all_input_nodes))
        slot_of = {p: k for k, p in enumerate(producers)}
        inputs = tuple(index[p] for p in producers)
        params: tuple[tuple[str, nn.Parameter], ...] = ()
        if node.op == "placeholder":
            ops.append(OpProgram(index=i, name=node.name, kind="input", inputs=(), run=_no_run, params=(),
                                 input_position=placeholder_pos))
            placeholder_pos += 1
            continue
        if node.op == "get_attr":
            attr = _fetch_attr(gm, str(node.target))
            if isinstance(attr, nn.Parameter) and attr.requires_grad:
                params = ((param_names[id(attr)], attr),)
            ops.append(OpProgram(index=i, name=node.name, kind="get_attr", inputs=(), run=_no_run, params=params,
                                 attr=attr))
            continue
        args, kwargs, target = _inplace_free(tuple(node.args), dict(node.kwargs), node.target)
        if node.op == "call_module":
            mod = gm.get_submodule(str(target))
            fn: Callable[..., Any] = mod
            params = tuple((param_names[id(p)], p) for p in mod.parameters() if p.requires_grad)
        elif node.op == "call_function":  # an in-place op on a leaf input: its out-of-place twin instead
            fn = reshape_for_view(node.op, out_of_place(node.op, target), args)  # a received value is contiguous
        elif node.op == "call_method":
            twin = reshape_for_view(node.op, out_of_place(node.op, target), args)
            fn = twin if callable(twin) else partial(_call_method, str(twin))
        else:  # pragma: no cover - fx has no other node kinds
            raise ValueError(f"unsupported fx node {node.name!r} of kind {node.op!r}")
        ops.append(OpProgram(index=i, name=node.name, kind="compute", inputs=inputs,
                             run=_make_runner(fn, args, kwargs, slot_of), params=params))
    last = {target: index[n] for n in nodes if (target := state_written(n)) is not None}  # the last write wins
    return StepProgram(gm=gm, ops=ops, loss_op=index[loss], param_names=param_names,
                       state_writes=tuple((i, _fetch_attr(gm, target)) for target, i in last.items()))


def _no_run(values: Sequence[Any]) -> Any:  # pragma: no cover - inputs and attributes are not "run"
    raise RuntimeError("input and get_attr ops are not run")


def _container(v: Any) -> str:
    leaves, _ = tree_flatten(v)
    if len(leaves) == 1 and leaves[0] is v:
        return "leaf"
    if type(v) in (tuple, list) and len(v) == len(leaves) and all(a is b for a, b in zip(v, leaves)):
        return type(v).__name__
    return "tree"


def _leaf_meta(x: Any) -> LeafMeta:
    if isinstance(x, torch.Tensor):
        return LeafMeta(is_tensor=True, shape=tuple(x.shape), dtype=x.dtype, requires_grad=bool(x.requires_grad))
    return LeafMeta(is_tensor=False, const=x)


def describe_values(prog: StepProgram, inputs: Sequence[Any]) -> list[ValueMeta]:
    """Run the whole step once on ``inputs`` (one micro-batch) and describe every op's output.

    Buffers (BatchNorm running statistics) are restored afterwards so that the shape pass leaves no trace on
    the model; the autograd graph it builds is dropped.
    """
    buffers = {name: b.detach().clone() for name, b in prog.gm.named_buffers()}
    values: list[Any] = [None] * prog.n
    metas: list[ValueMeta] = []
    flat = prog.placeholder_values(inputs)
    try:
        for op in prog.ops:
            if op.kind == "input":
                v = flat[op.input_position]
            elif op.kind == "get_attr":
                v = op.attr
            else:
                v = op.run([values[j] for j in op.inputs])
            values[op.index] = v
            leaves, spec = tree_flatten(v)
            metas.append(ValueMeta(spec=spec, leaves=tuple(_leaf_meta(x) for x in leaves), container=_container(v)))
    finally:
        with torch.no_grad():
            for name, b in prog.gm.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
    return metas
