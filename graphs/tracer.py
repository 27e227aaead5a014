"""The torch.fx tracer of :mod:`graphs.trace`: inside composite modules, primitive layers as leaves, the batch
dimension symbolic.

* **Leaves** (:func:`is_primitive`): every ``torch.nn`` / ``torch.ao.nn`` module is one op (Linear, Conv*,
  LayerNorm, BatchNorm, Embedding, LSTMCell, LSTM, Dropout, activations, pooling...) *except* the composites in
  :data:`COMPOSITE_MODULES` (containers, the Transformer family, MultiheadAttention), which are traced into like
  user modules. :data:`LEAF_CLASS_NAMES` adds primitive layers of other libraries (Hugging Face's ``Conv1D``, a
  Linear layer).
* **Concrete values alongside the trace**: every node is also evaluated on the example inputs and on a batch of
  another size. A non-tensor result that is the same for both batches (``x.dim()``, ``x.is_nested``,
  ``x.size(-1)``, a dtype) is a constant of the model and is answered as a Python value, so library code that
  branches on it (``nn.TransformerEncoder``'s fast-path checks, ``MultiheadAttention``'s ``query.dim() == 3``)
  traces; one that differs (``x.size(0)``, the batch) stays a graph node, so the graph runs at any batch size.
  Values read from tensor data (``.item()``, ``bool(t)``) are never made constants.
* **Kept whole**: where tracing inside a module fails, the nodes it emitted are removed and the module is called
  as one op instead; :attr:`StepTracer.kept_whole` says which module and why (one line each).
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import operator
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from graphs.batch import input_batches, map_batched, split_inputs
from graphs.gradmode import detached_inputs
from graphs.inplace import state_writes_recorded, thread_inplace_updates, with_in_place_operators

__all__ = ["COMPOSITE_MODULES", "LEAF_CLASS_NAMES", "is_primitive", "StepTracer", "trace_step"]

COMPOSITE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Sequential, nn.ModuleList, nn.ModuleDict,
    nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
    nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.MultiheadAttention,
)
"""torch.nn modules traced into (their parts are the ops); every other torch.nn module is one op."""

LEAF_CLASS_NAMES: frozenset[str] = frozenset({
    "transformers.pytorch_utils.Conv1D",  # GPT-2's Linear layer (weight stored transposed)
})
"""``module.QualName`` of primitive layers outside torch.nn, kept as one op like torch.nn's own."""

_MISSING = object()  # a value the second batch could not compute (the model failed on it)
_DATA_METHODS = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"})
_DATA_FUNCS = frozenset({torch.equal, torch.allclose, torch.is_nonzero})
_SIMPLE = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _unpatched() -> Any:
    """fx patches ``nn.Module.__call__`` while tracing; evaluating a node must call the real thing."""
    from torch.fx import _symbolic_trace

    revert = getattr(_symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


# Calls whose size arguments the C++ argument parser reads as plain ints: with the batch size (a Proxy) among
# them and a real tensor (a buffer) or no tensor at all, no __torch_function__ runs and the call fails. They are
# recorded as nodes instead (Hugging Face's ``buffer.expand(batch_size, -1)``, ``torch.zeros(batch, n)``).
_SIZE_METHODS = ("expand", "view", "reshape", "repeat", "tile", "new_zeros", "new_ones", "new_empty", "new_full")
_SIZE_FUNCS = ("zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "eye")


def _has_proxy(tree: Any) -> bool:
    found = False

    def look(a: Any) -> Any:
        nonlocal found
        found = found or isinstance(a, fx.Proxy)
        return a

    fx.node.map_aggregate(tree, look)
    return found


@contextlib.contextmanager
def _size_calls_recorded(tracer: "StepTracer") -> Any:
    """Patch the calls of ``_SIZE_METHODS`` / ``_SIZE_FUNCS`` to record a node when a Proxy is among their
    arguments (restored afterwards; the tracer's own evaluation of nodes calls the originals)."""
    saved: list[tuple[Any, str, Any]] = []

    def method(name: str, orig: Callable) -> Callable:
        def call(self_: Any, *args: Any, **kwargs: Any) -> Any:
            if tracer.recording and _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_method", name, (self_, *args), kwargs)
            return orig(self_, *args, **kwargs)
        return call

    def function(orig: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if tracer.recording and _has_proxy((args, kwargs)):
                return tracer.create_proxy("call_function", orig, args, kwargs)
            return orig(*args, **kwargs)
        return call

    for owner, names, wrap in ((torch.Tensor, _SIZE_METHODS, True), (torch, _SIZE_FUNCS, False)):
        for name in names:
            orig = getattr(owner, name)
            saved.append((owner, name, orig))
            setattr(owner, name, method(name, orig) if wrap else function(orig))
    try:
        yield
    finally:
        for owner, name, orig in saved:
            setattr(owner, name, orig)


def is_primitive(m: nn.Module) -> bool:
    """Whether ``m`` is one op of the graph (a leaf): a torch.nn layer that is not a composite, or a class
    named in :data:`LEAF_CLASS_NAMES`."""
    cls = type(m)
    if f"{cls.__module__}.{cls.__qualname__}" in LEAF_CLASS_NAMES:
        return True
    in_torch = cls.__module__.startswith(("torch.nn", "torch.ao.nn"))
    return in_torch and not isinstance(m, COMPOSITE_MODULES)


def _is_simple(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return all(_is_simple(x) for x in v)
    return isinstance(v, _SIMPLE)


def _same(a: Any, b: Any) -> bool:
    if b is _MISSING or type(a) is not type(b) or not _is_simple(a):
        return False
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - exotic __eq__
        return False


def _one_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    text = text if len(text) <= 140 else text[:137] + "..."
    return f"{type(e).__name__}: {text}".replace(";", ",")


@with_in_place_operators  # ``self.steps += 1``
class _Proxy(fx.Proxy):
    """An fx Proxy that knows its values (``_vals``: one per batch) and answers constant attributes with them."""

    def __getattr__(self, k: str) -> Any:
        vals = self.__dict__.get("_vals")
        if vals is None or k.startswith("__"):
            return super().__getattr__(k)
        attr = getattr(vals[0], k)  # AttributeError as the value would raise it (hasattr works)
        if isinstance(vals[0], Mapping) and k in ("values", "items"):  # for k, v in batch.items()
            return lambda: [self[key] if k == "values" else (key, self[key]) for key in vals[0]]
        if callable(attr) and not isinstance(attr, torch.Tensor):
            return _Method(self, k)
        return self.tracer.create_proxy("call_function", builtins.getattr, (self, k), {})

    def __iter__(self) -> Any:
        """A tuple's items; a dict's keys (an input dict's keys are the example's, as its tree structure is)."""
        vals = self.__dict__.get("_vals")
        if vals is not None and isinstance(vals[0], (tuple, list)):
            return (self[i] for i in range(len(vals[0])))
        if vals is not None and isinstance(vals[0], Mapping):
            return iter(list(vals[0]))
        return super().__iter__()

    def keys(self) -> Any:
        """``model(**batch)`` on an input dict: its keys, the example's (fx's own ``keys`` records a node that
        cannot be iterated)."""
        vals = self.__dict__.get("_vals")
        return list(vals[0]) if vals is not None and isinstance(vals[0], Mapping) else super().keys()

    def __contains__(self, key: Any) -> bool:
        """``"labels" in batch`` on an input dict: its keys are the example's."""
        vals = self.__dict__.get("_vals")
        if vals is not None and isinstance(vals[0], Mapping):
            return key in vals[0]
        return any(x is key or x == key for x in self)  # what Python does without __contains__

    def _known(self, to: type) -> Any:
        """``int(p)``, ``float(p)``, ``range(p)`` of a value read from buffers only: its value now (as before
        buffers were graph nodes); of one that depends on the inputs, the TypeError it always was."""
        vals = self.__dict__.get("_vals")
        if self.node in self.tracer._from_inputs or vals is None or vals[0] is _MISSING:
            raise TypeError(f"{to.__name__}() of a traced value that depends on the step's inputs")
        return to(vals[0])

    def __int__(self) -> int:
        return self._known(int)

    def __index__(self) -> int:
        return self._known(int)

    def __float__(self) -> float:
        return self._known(float)

    def __len__(self) -> int:
        vals = self.__dict__.get("_vals")
        if vals is not None and not isinstance(vals[0], torch.Tensor):
            n = len(vals[0])
            if all(v is not _MISSING and len(v) == n for v in vals[1:]):
                return n
        raise RuntimeError("'len' of a value that depends on the batch size cannot be traced")



class _Method:
    """``proxy.method`` before it is called: the call becomes one ``call_method`` node."""

    def __init__(self, root: _Proxy, name: str) -> None:
        self.root, self.name = root, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.root.tracer.create_proxy("call_method", self.name, (self.root,) + args, kwargs)


class StepTracer(fx.Tracer):
    """fx tracer over primitive leaves, evaluating every node on each of ``runs`` (tuples of model inputs; the
    first is the example batch, the others batches of other sizes). A module outside the traced root (a loss
    module) is inlined."""

    proxy_buffer_attributes = True
    """Buffers read in ``forward`` are graph nodes (fx's default answers the tensor itself, so an in-place update
    of a buffer, ``self.mean.mul_(0.5)``, ran once while tracing and never made it into the step)."""

    def __init__(self, runs: Sequence[tuple[Any, ...]]) -> None:
        super().__init__()
        self.runs = [tuple(r) for r in runs]
        self.kept_whole: dict[str, str] = {}
        """Module path → why tracing inside it failed (one line); the module is one op."""
        self._input_index = 0
        self._shape_nodes: list[fx.Node] = []
        self.node_vals: dict[fx.Node, list[Any]] = {}
        self._from_data: set[fx.Node] = set()
        """Nodes whose value was read from tensor data (``.item()``) or computed from such a value."""
        self._from_inputs: set[fx.Node] = set()
        """Nodes whose value depends on the step's inputs; the others (read from buffers and parameters only,
        ``if not self.initialized``) are known while tracing, as the model has them when traced."""
        self.recording = True
        """False while the tracer evaluates a node: patched calls then run as they are."""

    # ------------------------------------------------------------------ leaves and fallback
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.kept_whole or is_primitive(m)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            return forward(*args, **kwargs)
        if path == "" or self.is_leaf_module(m, path):
            return super().call_module(m, forward, args, kwargs)
        mark = next(iter(reversed(self.graph.nodes)), None)
        stack, calls = self.module_stack.copy(), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:  # tracing library or user code: anything can fail; the module stays whole
            for node in list(reversed(self.graph.nodes)):
                if node is mark:
                    break
                self.graph.erase_node(node)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls = calls
            self.kept_whole[path] = _one_line(e)
            return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        for key, p in list(parameter_proxy_cache.items()):  # proxies of nodes a fallback removed
            if getattr(p.node, "_erased", False):
                del parameter_proxy_cache[key]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # ------------------------------------------------------------------ inputs
    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        """One placeholder per example input; forward's other parameters keep their defaults. An input that is a
        plain Python value (``None`` for an optional mask, a flag, a count) reaches ``forward`` as that value, so
        ``if mask is not None`` and ``range(n)`` trace as the example has them (its placeholder stays, unread)."""
        n = len(self.runs[0])
        names: list[str] = []
        for p in list(inspect.signature(root_fn).parameters.values())[1 if is_module else 0:]:
            if len(names) == n:
                break
            if p.kind == p.VAR_POSITIONAL:
                names += [f"{p.name}_{i}" for i in range(n - len(names))]
            elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.append(p.name)
            else:
                break
        if len(names) != n:
            raise TypeError(f"forward takes {len(names)} positional inputs, the example has {n}")
        proxies = []
        for i, name in enumerate(names):
            self._input_index = i
            proxy = self.create_proxy("placeholder", name, (), {})
            value = self.runs[0][i]
            proxies.append(value if _is_simple(value) else proxy)
        return root_fn, ([self.root] if is_module else []) + proxies

    def to_bool(self, obj: fx.Proxy) -> bool:
        """``if flag:`` on a value that does not depend on the inputs (a buffer): its value now; else fx's error."""
        vals = obj.__dict__.get("_vals")
        if obj.node in self._from_inputs or vals is None or vals[0] is _MISSING:
            return super().to_bool(obj)
        return bool(vals[0])

    # ------------------------------------------------------------------ values
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: str | None = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> Any:
        args, kwargs = detached_inputs(self, kind, target, args, kwargs) if self.recording else (args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr)  # our Proxy, not ParameterProxy
        if kind == "placeholder" or any(a in self._from_inputs for a in proxy.node.all_input_nodes):
            self._from_inputs.add(proxy.node)
        vals = [self._value(kind, target, args, kwargs, k) for k in range(len(self.runs))]
        proxy.__dict__["_vals"] = vals
        self.node_vals[proxy.node] = vals
        return self._settle(proxy, kind, target, vals)

    def _value(self, kind: str, target: Any, args: tuple, kwargs: dict, k: int) -> Any:
        missing = False

        def val(a: Any) -> Any:
            nonlocal missing
            if isinstance(a, fx.Proxy):
                v = a.__dict__.get("_vals", [_MISSING] * len(self.runs))[k]
                missing = missing or v is _MISSING
                return v
            return a

        a, kw = fx.node.map_aggregate((args, kwargs), val)
        if missing:
            if k == 0:
                raise RuntimeError(f"no traced value for an argument of {target}")
            return _MISSING
        recording, self.recording = self.recording, False
        try:
            with _unpatched():  # run the real modules and functions, not fx's tracing patches
                return self._evaluate(kind, target, a, kw, k)
        except Exception:
            if k == 0:
                raise
            return _MISSING  # the model fails on the other batch: nothing is made constant from it
        finally:
            self.recording = recording

    def _evaluate(self, kind: str, target: Any, a: Any, kw: dict, k: int) -> Any:
        if kind == "placeholder":
            return self.runs[k][self._input_index]
        if kind == "get_attr":
            obj: Any = self.root
            for part in str(target).split("."):
                obj = builtins.getattr(obj, part)
            return obj
        if kind == "call_function":
            return target(*a, **kw)
        if kind == "call_method":
            return builtins.getattr(a[0], target)(*a[1:], **kw)
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **kw)
        raise RuntimeError(f"cannot evaluate fx node kind {kind!r}")

    def _settle(self, proxy: _Proxy, kind: str, target: Any, vals: list[Any]) -> Any:
        """The proxy, or a constant in its place when its value is the same Python value for every batch."""
        full = vals[0]
        if proxy.node in self._from_inputs and (target in _DATA_METHODS or (callable(target) and target in _DATA_FUNCS)
                                                 or any(a in self._from_data for a in proxy.node.all_input_nodes)):
            self._from_data.add(proxy.node)  # h.mean().item() > 0 is data too: never a constant
            return proxy
        if kind not in ("call_function", "call_method") or not _is_simple(full):
            return proxy
        if all(_same(full, v) for v in vals[1:]):
            self.graph.erase_node(proxy.node)
            return full
        if isinstance(full, (tuple, list)) and all(v is not _MISSING and isinstance(v, (tuple, list))
                                                    and len(v) == len(full) for v in vals[1:]):
            # a shape with the batch in it: constants where the batches agree, a getitem node where they don't
            self._shape_nodes.append(proxy.node)
            items = [full[i] if all(_same(full[i], v[i]) for v in vals[1:])
                     else self.create_proxy("call_function", operator.getitem, (proxy, i), {})
                     for i in range(len(full))]
            return tuple(items)
        return proxy

    def drop_unused_shapes(self) -> None:
        """Shape nodes (and their getitems) nothing ended up reading."""
        for node in reversed(list(self.graph.nodes)):
            if not node.users and node.op == "call_function" and node.target is operator.getitem \
                    and node.args and node.args[0] in self._shape_nodes:
                self.graph.erase_node(node)
        for node in self._shape_nodes:
            if not getattr(node, "_erased", False) and not node.users:
                self.graph.erase_node(node)
        for node in reversed(list(self.graph.nodes)):  # attributes read for checks only (fast-path tests)
            if not node.users and (node.op == "get_attr" or (node.op == "call_function"
                                                              and node.target is builtins.getattr)):
                self.graph.erase_node(node)


def _example_runs(inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """The example inputs and one other batch: the smallest micro-batch they split into, else twice the batch."""
    batches = [b for _, b in input_batches(inputs)]
    if not batches:
        return [inputs]
    b = batches[0]
    div = next((d for d in range(2, b + 1) if all(n % d == 0 for n in batches)), 0)
    other = split_inputs(inputs, div, 0) if div else map_batched(lambda x: torch.cat([x, x]), inputs)
    return [inputs, other]


def trace_step(model: nn.Module, inputs: tuple[Any, ...], loss_fn: Callable[[Any], Any]
               ) -> tuple[fx.GraphModule, dict[str, str]]:
    """``loss_fn(model(*inputs))`` as a GraphModule (targets relative to ``model``) and the modules kept whole."""
    tracer = StepTracer(_example_runs(inputs))
    with _size_calls_recorded(tracer), state_writes_recorded(tracer):
        graph = tracer.trace(model)
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    graph.erase_node(out)

    def as_proxy(n: fx.Node) -> fx.Proxy:
        p = _Proxy(n, tracer)
        p.__dict__["_vals"] = tracer.node_vals.get(n, [_MISSING] * len(tracer.runs))
        return p

    loss = loss_fn(fx.node.map_arg(result, as_proxy))
    graph.output(tracer.create_arg(loss))
    thread_inplace_updates(graph, tracer.node_vals)
    tracer.drop_unused_shapes()
    tracer.node_vals.clear()
    graph.lint()
    if tracer.kept_whole:  # a module kept whole inside another kept whole is moot
        kept = tracer.kept_whole
        tracer.kept_whole = {p: why for p, why in kept.items()
                             if not any(p.startswith(q + ".") for q in kept if q != p)}
    return fx.GraphModule(model, graph, class_name=f"{type(model).__name__}Step"), dict(tracer.kept_whole)
