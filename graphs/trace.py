"""Trace an ``nn.Module`` training step into an :class:`~graphs.ir.OpGraph` (structure only, no costs).

The step is ``loss_fn(model(*example_inputs))``. It is traced with ``torch.fx`` over leaf modules (the torch.nn
built-ins, fx's default), so recurrent models written with ``nn.LSTMCell`` in a Python loop unroll over time:
their loop runs at trace time, exactly as TensorFlow's static unroll did for ColocRL (Mirhoseini et al.,
ICML 2017). Where fx cannot trace (shape-dependent Python control flow, ``torch.zeros(x.shape[0], ...)``...)
``torch.export.export`` is tried; its graph is ATen-level and is mapped to ops the same way.

**The op ↔ node contract** (relied on by the execution engine):

* ``traced.gm`` is a ``torch.fx.GraphModule`` computing the whole step and returning the scalar loss.
* There is exactly one op per node of ``traced.gm.graph`` except the final ``output`` node, in the graph's
  order (which is topological), and ``graph.op_names[i] == node.name``. The last op produces the loss.
  :meth:`TracedModel.node_of_op` and :meth:`TracedModel.op_index` convert between the two.
* Op kinds: ``placeholder`` → ``input``; ``call_module`` → the module class name (``LSTMCell``, ``Linear``);
  ``call_function`` / ``call_method`` → the function or method name (``add``, ``getitem``, ATen packet names
  such as ``linear`` for exported graphs); ``get_attr`` → ``get_attr``.
* Module paths are relative to the user's model (what a trainer calls ``model.get_submodule``): the target
  of ``call_module``; the innermost module recorded in ``node.meta["nn_module_stack"]`` for functions and
  methods; the owner of the attribute for ``get_attr``; '' at top level.
* Parameter bytes count each parameter once, at its first user; an edge per (producer, consumer) pair carries
  all bytes of the producer's output (a tuple such as LSTMCell's ``(h, c)`` counts whole).
* Colocation: ops sharing a parameter (every call of one parameterised module, tied weights) share a group;
  a ``get_attr`` of a parameter joins its first consumer's group; every other op is its own group.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_leaves

from graphs.ir import OpGraph

log = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedModel", "trace_model", "record_values", "value_bytes", "default_loss",
           "buffers_restored"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_STEP_PREFIX = "model"  # attribute name of the user model inside the export wrapper


class TraceError(ValueError):
    """Neither torch.fx nor torch.export could trace the model (one-line message naming both causes)."""


@dataclass(eq=False)
class TracedModel:
    """A traced training step: its op graph (no costs) and the GraphModule that computes it."""

    graph: OpGraph
    """One op per node of ``gm.graph`` except ``output``; op names are the node names."""
    gm: fx.GraphModule
    """The step: ``gm(*example_inputs)`` returns the scalar loss."""
    example_inputs: tuple[Any, ...]
    """Inputs the step was traced and shape-propagated with."""
    _nodes: dict[str, fx.Node] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._nodes = {n.name: n for n in self.gm.graph.nodes if n.op != "output"}
        if tuple(self._nodes) != self.graph.op_names:
            raise ValueError("TracedModel: graph op names do not match the GraphModule's nodes")

    def node_of_op(self, i: int) -> fx.Node:
        """The fx node computing op ``i``."""
        return self._nodes[self.graph.op_names[i]]

    def op_index(self, node_name: str) -> int:
        """Index of the op computed by fx node ``node_name``."""
        return self.graph.index(node_name)


def default_loss(output: Any) -> torch.Tensor:
    """The loss when a factory gives none: ``output.mean()``."""
    return output.mean()


def _identity(output: Any) -> Any:
    return output


# ---------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Put every buffer (e.g. BatchNorm running statistics) back as it was: tracing and profiling run the
    step, but must leave the model exactly as built, so a rebuild from ``meta`` is identical."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


class _Recorder(fx.Interpreter):
    """Runs a GraphModule, keeping every node's output by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "output":
            self.values[n.name] = out
        return out


def record_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[Any, dict[str, Any]]:
    """Run the step once (autograd on); return the loss and each node's output value by node name."""
    rec = _Recorder(gm)
    loss = rec.run(*inputs)
    return loss, rec.values


def value_bytes(value: Any) -> int:
    """Total bytes of all tensors in a (possibly nested) value."""
    return sum(t.numel() * t.element_size() for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _first_shape(value: Any) -> tuple[int, ...]:
    for t in tree_leaves(value):
        if isinstance(t, torch.Tensor):
            return tuple(t.shape)
    return ()


# ---------------------------------------------------------------------------------------------- fx


class _StepTracer(fx.Tracer):
    """fx's default leaf rule; a module outside the traced root (e.g. a loss module) is inlined."""

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


def _trace_fx(model: nn.Module, loss_fn: Callable[[Any], Any]) -> fx.GraphModule:
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


# ---------------------------------------------------------------------------------------------- export


class _Step(nn.Module):
    """``loss_fn(model(*inputs))`` as one module, for torch.export."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.__dict__["_loss_fn"] = loss_fn  # not registered: a loss module's internals are inlined

    def forward(self, *inputs: Any) -> Any:
        return self.__dict__["_loss_fn"](self.model(*inputs))


def _trace_export(model: nn.Module, loss_fn: Callable[[Any], Any], inputs: tuple) -> fx.GraphModule:
    torch_log = logging.getLogger("torch")
    old_level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    noise = io.StringIO()  # export dumps partial graphs to stderr on failure; keep them out of the user's way
    try:
        with contextlib.redirect_stderr(noise):
            ep = torch.export.export(_Step(model, loss_fn), tuple(inputs))
    finally:
        torch_log.setLevel(old_level)
        if noise.getvalue():
            log.debug("torch.export stderr:\n%s", noise.getvalue())
    gm = ep.module()
    # Input guards are a call_module with no users; they are not part of the step's computation.
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards") and not node.users:
            gm.graph.erase_node(node)
            if hasattr(gm, node.target):
                delattr(gm, node.target)
    # Same calling convention as the fx path: flat positional inputs in, the loss node itself out (export
    # wraps both in pytree specs). Only possible when every input is a plain tensor.
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out = output.args[0]
    if all(isinstance(x, torch.Tensor) for x in inputs) and isinstance(flat_out, (tuple, list)) \
            and len(flat_out) == 1:
        gm.graph.set_codegen(fx.graph.CodeGen())
        output.args = (flat_out[0],)
    gm.recompile()
    return gm


def _strip(path: str, method: str) -> str:
    """Module path relative to the user model (the export wrapper adds a ``model.`` prefix)."""
    if method == "fx":
        return path
    if path == _STEP_PREFIX:
        return ""
    return path[len(_STEP_PREFIX) + 1:] if path.startswith(_STEP_PREFIX + ".") else ""


# ---------------------------------------------------------------------------------------------- errors


def _one_line(text: str, limit: int = 160) -> str:
    first = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _user_frame(exc: BaseException) -> str:
    """`` (at forward, file.py:12)`` for the innermost frame of user code in the traceback, if any."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_TORCH_DIR)
              and not f.filename.endswith(("graphs/trace.py", "contextlib.py"))]
    if frames:
        f = frames[-1]
        return f" (at {f.name}, {os.path.basename(f.filename)}:{f.lineno})"
    m = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', str(exc))
    if m:
        file, line, func = m[-1]
        return f" (at {func}, {os.path.basename(file)}:{line})"
    return ""


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(str(exc))}{_user_frame(exc)}".replace(";", ",")


# ---------------------------------------------------------------------------------------------- ops


def _kind(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "get_attr"
    if node.op == "call_module":
        return type(gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return str(node.target)
    packet = getattr(node.target, "overloadpacket", None)  # ATen OpOverload (exported graphs)
    if packet is not None:
        return str(getattr(packet, "__name__", packet)).split(".")[-1]
    return str(getattr(node.target, "__name__", node.target))


def _module_path(node: fx.Node, method: str) -> str:
    if node.op == "call_module":
        path = str(node.target)
    elif node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
    elif node.op in ("call_function", "call_method"):
        stack = node.meta.get("nn_module_stack") or {}
        path = str(list(stack.values())[-1][0]) if stack else ""
    else:
        return ""
    return _strip(path, method)


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _build_graph(gm: fx.GraphModule, values: Mapping[str, Any], *, name: str, method: str,
                 meta: Mapping[str, Any]) -> OpGraph:
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    index = {n.name: i for i, n in enumerate(nodes)}
    out_bytes = [value_bytes(values[n.name]) for n in nodes]
    param_bytes = [0] * len(nodes)
    parent = list(range(len(nodes)))  # union-find over ops for colocation

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    first_user: dict[int, int] = {}  # id(parameter) -> first op using it
    src, dst, edge_bytes = [], [], []
    for i, node in enumerate(nodes):
        params: list[nn.Parameter] = []
        if node.op == "call_module":
            params = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            attr = _fetch_attr(gm, node.target)
            if isinstance(attr, nn.Parameter):
                params = [attr]
                users = [index[u.name] for u in node.users if u.name in index]
                if users:
                    union(i, min(users))
        for p in params:
            if id(p) in first_user:
                union(i, first_user[id(p)])
            else:
                first_user[id(p)] = i
                param_bytes[i] += p.numel() * p.element_size()
        for producer in dict.fromkeys(node.all_input_nodes):  # unique, in argument order
            src.append(index[producer.name])
            dst.append(i)
            edge_bytes.append(out_bytes[index[producer.name]])
    roots: dict[int, int] = {}
    colocation = [roots.setdefault(find(i), len(roots)) for i in range(len(nodes))]
    return OpGraph(
        name=name,
        op_names=[n.name for n in nodes],
        op_kinds=[_kind(n, gm) for n in nodes],
        module_paths=[_module_path(n, method) for n in nodes],
        out_shapes=[_first_shape(values[n.name]) for n in nodes],
        out_bytes=out_bytes,
        param_bytes=param_bytes,
        stash_bytes=[0] * len(nodes),
        temp_bytes=[0] * len(nodes),
        flops=[0.0] * len(nodes),
        colocation=colocation,
        edge_index=[src, dst],
        edge_bytes=edge_bytes,
        meta={**dict(meta), "trace": method},
    )


# ---------------------------------------------------------------------------------------------- entry point


def trace_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    name: str,
    meta: Mapping[str, Any] | None = None,
    method: Literal["auto", "fx", "export"] = "auto",
) -> TracedModel:
    """Trace one training step of ``model`` into a :class:`TracedModel` (graph without costs).

    ``loss_fn`` maps the model's output to the scalar loss; when None the output itself is the loss if it is
    already a scalar tensor (the benchmark models), else ``output.mean()``. ``method="auto"`` tries fx, then
    torch.export; the one used is recorded as ``graph.meta["trace"]``. Raises :class:`TraceError` (one line)
    when no method works, ``ValueError`` when the model fails on its own inputs.
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"trace method must be 'auto', 'fx' or 'export', got {method!r}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model_name = type(model).__name__
    try:
        with torch.no_grad(), buffers_restored(model):
            output = model(*inputs)
    except Exception as e:  # the user's model, any error
        raise ValueError(f"model {model_name} fails on its example inputs: {_describe(e)}") from None
    if loss_fn is None:
        scalar = isinstance(output, torch.Tensor) and output.dim() == 0
        loss_fn = _identity if scalar else default_loss

    errors: list[str] = []
    for how in (("fx", "export") if method == "auto" else (method,)):
        try:
            with buffers_restored(model):
                gm = _trace_fx(model, loss_fn) if how == "fx" else _trace_export(model, loss_fn, inputs)
            with buffers_restored(gm):
                loss, values = record_values(gm, inputs)
        except Exception as e:  # tracing user code: anything can go wrong
            errors.append(f"{how}: {_describe(e)}")
            log.debug("%s tracing of %s failed", how, model_name, exc_info=True)
            continue
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"model {model_name}: the step's loss must be a float scalar tensor, got {shape}")
        graph = _build_graph(gm, values, name=name, method=how, meta=meta or {})
        if errors:
            log.info("traced %s with torch.export (%s)", model_name, errors[0])
        return TracedModel(graph=graph, gm=gm, example_inputs=inputs)
    raise TraceError(f"cannot trace model {model_name}: " + "; ".join(errors))
