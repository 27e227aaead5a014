"""Trace an ``nn.Module`` training step into an :class:`~graphs.ir.OpGraph` (structure only, no costs).

The step is ``loss_fn(model(*example_inputs))``. It is traced with ``torch.fx`` by :mod:`graphs.tracer`:
primitive layers (Linear, Conv, LayerNorm, Embedding, LSTMCell...) are one op each, composite modules
(containers, ``nn.TransformerEncoder`` and its layers, ``MultiheadAttention``, user modules) are traced into, a
module whose inside fx cannot trace is kept whole (``meta["kept_whole"]``: path → why), and the batch dimension
stays symbolic. Recurrent models written with ``nn.LSTMCell`` in a Python loop unroll over time: their loop runs
at trace time, exactly as TensorFlow's static unroll did for ColocRL (Mirhoseini et al., ICML 2017). Where fx
cannot trace the model at all, or keeps a composite module whole, ``torch.export.export`` is tried with a dynamic
batch dimension (``Dim.AUTO``; a model that bakes its batch in is exported static); its graph is ATen-level and
is mapped to ops the same way. ``meta["trace"]`` says which tracer ran (``fx`` / ``export``).

Every new graph records whether it can be split into micro-batches, found by running it
(:mod:`graphs.microbatch`: ``meta["microbatchable"]``, and ``microbatch_op`` / ``microbatch_why`` when not),
and which loss it traced (``meta["loss"]``). Graphs built before these records (no ``kept_whole`` in their meta)
are rebuilt with the earlier tracer (``legacy=True``: fx's own leaf rule, static export), so their op names hold.

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
  a ``get_attr`` of a parameter joins the groups of every op reading it (a pipeline stage owns its parameters:
  a root-level parameter read in two far-apart places cannot be split between stages); every other op is its own
  group.
"""

from __future__ import annotations

import contextlib
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

from graphs.batch import inputs_restored
from graphs.exporter import STEP_PREFIX as _STEP_PREFIX, trace_export
from graphs.inplace import state_written
from graphs.ir import OpGraph
from graphs.loss import DEFAULT_LOSS, default_loss, default_loss_for, traced_default_loss
from graphs.microbatch import microbatch_meta
from graphs.tracer import is_primitive, trace_step
from graphs.tracer_legacy import legacy_trace_fx

log = logging.getLogger(__name__)

__all__ = ["TraceError", "TracedModel", "trace_model", "record_values", "value_bytes", "buffers_restored",
           "default_loss", "DEFAULT_LOSS", "traced_default_loss"]  # the last three from graphs.loss, for trainers

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d) + os.sep
                  for d in ("graphs", "placer"))  # the tracer's own frames: not where the user's code failed


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


# ---------------------------------------------------------------------------------------------- running


@contextlib.contextmanager
def buffers_restored(module: nn.Module, inputs: Sequence[Any] = ()) -> Iterator[None]:
    """Put every buffer (e.g. BatchNorm running statistics) back as it was: tracing and profiling run the
    step, but must leave the model exactly as built, so a rebuild from ``meta`` is identical. The step's
    ``inputs`` too (:func:`graphs.batch.inputs_restored`: a step that writes its batch in place)."""
    saved = [(m, name, b, b.detach().clone()) for m in module.modules() for name, b in m._buffers.items()
             if b is not None]
    try:
        with inputs_restored(inputs):
            yield
    finally:
        with torch.no_grad():
            for m, name, b, copy in saved:  # ``self.ema = ...`` in forward put another tensor there
                m._buffers[name] = b
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
              and not f.filename.startswith(_OWN_DIRS) and not f.filename.endswith("contextlib.py")]
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
    state_ops: dict[str, int] = {}  # a module attribute -> the first of its reads and in-place updates
    src, dst, edge_bytes = [], [], []
    for i, node in enumerate(nodes):
        params: list[nn.Parameter] = []
        # A buffer's update runs where the buffer lives: on another device (or pipeline stage) it would update a
        # received copy, and the buffer would never change there.
        state = str(node.target) if node.op == "get_attr" else state_written(node)
        if state is not None:
            union(i, state_ops.setdefault(state, i))
        if node.op == "call_module":
            params = list(gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            attr = _fetch_attr(gm, node.target)
            if isinstance(attr, nn.Parameter):
                params = [attr]
                for u in node.users:  # every reader: torch's pipeline stages cannot share a parameter
                    if u.name in index:
                        union(i, index[u.name])
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
        meta=dict(meta),
    )


# ---------------------------------------------------------------------------------------------- entry point


def _composite_kept_whole(model: nn.Module, kept: Mapping[str, str]) -> str | None:
    """The first module fx kept whole that holds other modules (tracing lost the ops inside it)."""
    return next((p for p in kept if not is_primitive(model.get_submodule(p))
                 and any(True for _ in model.get_submodule(p).children())), None)


def _gradient_mismatch(model: nn.Module, gm: fx.GraphModule, inputs: tuple,
                       loss_fn: Callable[[Any], Any]) -> str | None:
    """Why the traced step's gradients are not the model's own step's, or None: a parameter trained by one step
    and not the other (a ``torch.no_grad()`` block or ``.detach()`` in ``forward`` that symbolic tracing does not
    keep; a ``torch.autograd.Function`` whose own backward both tracers replace by the autograd of its forward), or
    another gradient (that Function again, a gradient hook registered in ``forward``). Both steps start from the
    same random state; a difference that the traced step also shows against itself on another one is dropout's
    randomness, not a finding."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params or {id(p) for p in gm.parameters()} != {id(p) for p in model.parameters()}:
        return None  # nothing to train, or parameters the trace does not share: nothing to compare
    rng = torch.random.get_rng_state()

    def grads(step: Callable[[], Any], seed: int | None = None) -> tuple:
        if seed is None:
            torch.random.set_rng_state(rng)
        else:
            torch.manual_seed(seed)
        with buffers_restored(model, inputs):  # backward before the buffers are put back (bumps versions)
            loss = step()
            if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
                return (None,) * len(params)
            return torch.autograd.grad(loss, params, allow_unused=True)

    try:
        eager, traced = grads(lambda: loss_fn(model(*inputs))), grads(lambda: gm(*inputs))
        names = {id(p): n for n, p in model.named_parameters()}
        for p, e, t in zip(params, eager, traced):
            if e is None and t is not None:
                return (f"the traced step would train {names[id(p)]!r}, which the model's own step does not "
                        "(torch.no_grad() or .detach() in forward, which tracing does not keep); set "
                        "requires_grad=False on it instead")
            if e is not None and t is None:
                return (f"the traced step would not train {names[id(p)]!r}, which the model's own step does "
                        f"({_NOT_KEPT})")
        diff = [(_relative(t, e), k) for k, (e, t) in enumerate(zip(eager, traced)) if e is not None]
        worst, k = max(diff, key=lambda x: x[0], default=(0.0, -1))  # the first of the largest
        if worst <= 1e-2:
            return None
        again = grads(lambda: gm(*inputs), seed=int(torch.randint(1 << 30, ())))[k]
        if _relative(again, traced[k]) > worst / 10:
            return None  # the traced step differs from itself: randomness (dropout) drawn otherwise
        return (f"the traced step computes another gradient for {names[id(params[k])]!r} than the model's own "
                f"step (relative difference {worst:.2g}: {_NOT_KEPT})")
    except Exception:  # a check, not a second trace: a step it cannot run here is judged elsewhere
        log.debug("gradient comparison of %s skipped", type(model).__name__, exc_info=True)
        return None
    finally:
        torch.random.set_rng_state(rng)


_NOT_KEPT = ("a torch.autograd.Function with its own backward, or a gradient hook registered in forward: tracing "
             "keeps neither")


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` over all elements (float64)."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _attempt(how: str, model: nn.Module, loss_fn: Callable[[Any], Any], inputs: tuple,
             legacy: bool) -> tuple[fx.GraphModule, dict[str, str]]:
    if how == "export":
        return trace_export(model, loss_fn, inputs, legacy=legacy), {}
    return (legacy_trace_fx(model, loss_fn), {}) if legacy else trace_step(model, inputs, loss_fn)


def trace_model(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    *,
    name: str,
    meta: Mapping[str, Any] | None = None,
    method: Literal["auto", "fx", "export"] = "auto",
    legacy: bool = False,
    check_grads: bool = True,
    microbatch_record: Mapping[str, Any] | None = None,
) -> TracedModel:
    """Trace one training step of ``model`` into a :class:`TracedModel` (graph without costs).

    ``loss_fn`` maps the model's output to the scalar loss; when None the output itself is the loss if it is
    already a scalar tensor (the benchmark models), else :func:`graphs.loss.default_loss_for`'s choice.
    ``method="auto"`` tries fx, then torch.export (also when fx kept a composite module whole); the one used is
    ``graph.meta["trace"]``. ``legacy`` traces as placer did before ``meta["kept_whole"]`` existed (rebuilding
    such graphs). Raises :class:`TraceError` (one line) when no method works, ``ValueError`` when the model
    fails on its own inputs or, with ``check_grads`` (one more eager and traced backward), when the traced step's
    gradients are not the model's own step's (:func:`_gradient_mismatch`).
    ``microbatch_record``: a graph's recorded :func:`graphs.microbatch.microbatch_meta`, kept (rebuilding).
    """
    if method not in ("auto", "fx", "export"):
        raise ValueError(f"trace method must be 'auto', 'fx' or 'export', got {method!r}")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the module it compiles, not compiled here
    model_name = type(model).__name__
    try:
        with buffers_restored(model, inputs):  # autograd on, as in training (a forward may register a hook)
            output = model(*inputs)
    except Exception as e:  # the user's model, any error
        raise ValueError(f"model {model_name} fails on its example inputs: {_describe(e)}") from None
    loss_note = "given by the model's factory"
    if loss_fn is None:
        loss_fn, loss_note = default_loss_for(output, legacy, model_name)
    del output

    errors: list[str] = []
    found: tuple[str, fx.GraphModule, dict[str, str], dict[str, Any]] | None = None
    for how in (("fx", "export") if method == "auto" else (method,)):
        try:
            with buffers_restored(model, inputs):
                gm, kept = _attempt(how, model, loss_fn, inputs, legacy)
            with buffers_restored(gm, inputs):
                loss, values = record_values(gm, inputs)
            out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            if not isinstance(out, fx.Node):  # e.g. export's (loss,) for inputs it flattened: the engine needs one
                raise TraceError(f"the traced step returns {type(out).__name__} {out}, not the loss node itself")
        except Exception as e:  # tracing user code: anything can go wrong
            errors.append(f"{how}: {_describe(e)}")
            log.debug("%s tracing of %s failed", how, model_name, exc_info=True)
            continue
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.is_floating_point()):
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"model {model_name}: the step's loss must be a float scalar tensor, got {shape}")
        composite = _composite_kept_whole(model, kept) if method == "auto" and how == "fx" else None
        found = (how, gm, kept, values) if found is None or not composite else found
        if composite is None:
            break
        errors.append(f"fx kept {composite!r} whole ({kept[composite]})")
    if found is None:
        raise TraceError(f"cannot trace model {model_name}: " + "; ".join(errors))
    how, gm, kept, values = found
    mismatch = _gradient_mismatch(model, gm, inputs, loss_fn) if check_grads else None
    if mismatch is not None:
        raise ValueError(f"model {model_name}: {mismatch}")
    record = {**dict(meta or {}), "trace": how}
    if not legacy:
        record.update(kept_whole=dict(kept), loss=loss_note)
        if errors:
            record["trace_note"] = "; ".join(errors)
        with buffers_restored(gm, inputs):  # rebuilding: the graph's record, not the step run twice again
            record.update(microbatch_meta(gm, inputs) if microbatch_record is None else microbatch_record)
    graph = _build_graph(gm, values, name=name, method=how, meta=record)
    if errors:
        log.info("traced %s with %s (%s)", model_name, how, errors[0])
    return TracedModel(graph=graph, gm=gm, example_inputs=inputs)
