"""Measure per-op forward and backward times of a traced step on the real device.

Method (one cost set per device kind, as ColocRL measured its ops on the target hardware): run the step once
recording every node's values, then replay **each op in isolation** — its own autograd graph, on fresh leaf
copies of its inputs — in passes over the whole step (see :func:`_timed_passes` for why passes):

* forward time: median over ``repeats`` passes after ``warmup``, with autograd recording as in the real step
  (inputs that required grad in the step are leaves requiring grad);
* backward time: ``torch.autograd.grad`` of the op's outputs (ones as grad_outputs) w.r.t. all its inputs that
  required grad in the step plus its own parameters, timed from the op's first backward node starting to its
  last input gradient (autograd hooks; the call's fixed setup cost is paid once by a real step's backward, but
  would be paid once per op here). For a multi-op leaf module such as ``LSTMCell`` this covers its whole
  backward, which per-node hooks would not. Where the step sums gradients (a parameter shared by every time
  step, an activation read by several ops) the op whose use comes after the first also pays one ``add_`` per
  summed gradient. Ops that do not lead to the loss, whose outputs need no gradient (integer getitem,
  ``size``), or that return an input unchanged (getitem on a tuple) get backward 0;
* ``stash_bytes``: tensors saved for backward during the op's forward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage, parameters excluded;
* ``flops``: ``torch.utils.flop_counter.FlopCounterMode`` over the op's forward;
* ``temp_bytes``: on CUDA the op's peak allocation beyond its inputs and outputs
  (``torch.cuda.max_memory_allocated``); on CPU it is not measured and left 0 (no cheap allocator statistics).

:func:`measure_step_s` times the whole step run normally, to check that the per-op sums cover it. Measured
here (2-core AMD EPYC, one thread, thread CPU time): 0.97-1.09 of the whole step's forward and backward for
RNNLM, NMT and Inception-V3 with ops of a millisecond or more; tiny ops (the ``small`` test configs, tens of
microseconds each) come out 15-40% too slow, because the Python work between replays cools the caches that
back-to-back ops in the compiled step keep warm.

In-place ops are replayed on clones of their inputs (made outside the timed region), and module buffers (e.g.
BatchNorm running statistics) are restored afterwards, so profiling leaves the model as it found it.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import operator
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from graphs.batch import inputs_to
from graphs.device_names import cpu_model_name, gpu_kind
from graphs.ir import OpCosts, OpGraph, Provenance
from graphs.trace import TracedModel, buffers_restored, record_values, value_bytes

log = logging.getLogger(__name__)

__all__ = ["profile", "measure_step_s", "cpu_model_name", "gpu_kind"]

_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                  operator.ipow, operator.imod, operator.iand, operator.ior, operator.ixor}


# ---------------------------------------------------------------------------------------------- timing


class _Clock:
    """Wall time on CPU (or the calling thread's CPU time); CUDA events, synchronised before reading, on GPU."""

    def __init__(self, device: torch.device, clock: str = "wall", threads: int = 1) -> None:
        if clock not in ("wall", "thread"):
            raise ValueError(f"clock must be 'wall' or 'thread', got {clock!r}")
        if clock == "thread" and (device.type != "cpu" or threads != 1):
            raise ValueError("clock='thread' measures one CPU thread: it needs device='cpu' and threads=1")
        self.cuda = device.type == "cuda"
        self._now = time.thread_time if clock == "thread" else time.perf_counter

    def mark(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self._now()

    def between(self, start: Any, end: Any) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return end - start

    def time(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        if self.cuda:
            torch.cuda.synchronize()
        start = self.mark()
        out = fn()
        return self.between(start, self.mark()), out


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------- replay


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCS:
            return True
        schema = getattr(node.target, "_schema", None)  # ATen OpOverload
        if schema is not None:
            return bool(schema.is_mutable)
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    return False


@dataclass
class _OpReplay:
    """Everything needed to run one node alone on recorded values."""

    node: fx.Node
    fn: Callable[..., Any]
    flat: list[Any]  # leaves of (args, kwargs), tensors detached
    spec: TreeSpec
    needs_grad: list[bool]  # per leaf: the step's value required grad
    params: list[nn.Parameter]
    inplace: bool
    backward: bool  # the op leads to the loss and its output needs a gradient
    accumulate: list[bool]  # per grad target (leaves, then params): an earlier op already produced its gradient

    def inputs_from(self, env: dict[str, Any]) -> list[Any]:
        """This op's flattened inputs taken from ``env`` (node name → value), same structure as ``flat``."""
        args_kwargs = fx.node.map_arg((self.node.args, self.node.kwargs), lambda a: env[a.name])
        return tree_flatten(args_kwargs)[0]

    def fresh(self, flat: list[Any] | None = None) -> tuple[tuple, dict, list[torch.Tensor]]:
        """New leaf inputs (grad as in the step) from ``flat`` (default: the recorded values), plus the list
        of those requiring grad."""
        leaves: list[torch.Tensor] = []

        def make(value: Any, grad: Any) -> Any:
            if not isinstance(value, torch.Tensor):
                return value
            if grad:
                leaf = value.detach().requires_grad_(True)
                leaves.append(leaf)
                return leaf.clone() if self.inplace else leaf
            return value.detach().clone() if self.inplace else value.detach()

        values = self.flat if flat is None else flat
        assert len(values) == len(self.needs_grad), "replay inputs do not match the recorded structure"
        args, kwargs = tree_unflatten([make(v, g) for v, g in zip(values, self.needs_grad)], self.spec)
        return tuple(args), dict(kwargs), leaves

    def grad_targets(self, out: Any) -> list[torch.Tensor]:
        return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]


def _callable(node: fx.Node, gm: fx.GraphModule) -> Callable[..., Any]:
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    method = node.target
    return lambda self_, *a, **k: getattr(self_, method)(*a, **k)


def _reaches_loss(gm: fx.GraphModule) -> set[str]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    seen: set[str] = set()
    stack = list(output.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name not in seen:
            seen.add(n.name)
            stack.extend(n.all_input_nodes)
    return seen


def _replays(traced: TracedModel, gm: fx.GraphModule, inputs: tuple
             ) -> tuple[list[_OpReplay | None], dict[str, Any]]:
    """One replay per computing op (None for inputs and attribute reads), and the values of those others."""
    _, values = record_values(gm, inputs)
    on_path = _reaches_loss(gm)

    def needs(v: Any) -> bool:
        return isinstance(v, torch.Tensor) and v.requires_grad

    replays: list[_OpReplay | None] = []
    sources: dict[str, Any] = {}
    grad_seen: set[int] = set()  # ids of tensors (activations, parameters) some earlier op takes a gradient of
    for i in range(traced.graph.n):
        node = traced.node_of_op(i)
        if node.op not in ("call_module", "call_function", "call_method"):
            replays.append(None)  # inputs and attribute reads cost nothing to compute
            value = values[node.name]
            sources[node.name] = value.detach() if isinstance(value, torch.Tensor) else value
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a.name])  # noqa: F821 - deleted after the loop
        params = [p for p in gm.get_submodule(node.target).parameters() if p.requires_grad] \
            if node.op == "call_module" else []
        out = values[node.name]
        flat, spec = tree_flatten((args, kwargs))
        # An output that *is* one of the inputs (getitem on a tuple) adds no autograd node: no backward work.
        # (An in-place op also returns its input, but records a backward node.)
        inplace = _is_inplace(node, gm)
        passthrough = not inplace and all(
            any(t is v for v in flat) for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        backward = node.name in on_path and not passthrough and any(needs(t) for t in tree_leaves(out))
        # A tensor used by several ops gets its gradients summed in the step's backward (the engine's input
        # buffers, or AccumulateGrad for a parameter shared by every time step): one add per use after the first.
        accumulate = []
        for t in [v for v in flat if needs(v)] + params:
            accumulate.append(backward and id(t) in grad_seen)
            if backward:
                grad_seen.add(id(t))
        replays.append(_OpReplay(
            node=node, fn=_callable(node, gm), spec=spec,
            flat=[v.detach() if isinstance(v, torch.Tensor) else v for v in flat],
            needs_grad=[needs(v) for v in flat],
            params=params, inplace=inplace, backward=backward, accumulate=accumulate,
        ))
    del values
    return replays, sources


def _instrument_op(r: _OpReplay, *, param_ptrs: set[int], cuda: bool) -> tuple[int, int, float]:
    """One untimed run of an op: (stash_bytes, temp_bytes, flops)."""
    stash: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            key = (ptr, t.storage_offset())
            stash[key] = max(t.numel() * t.element_size(), stash.get(key, 0))
        return t

    args, kwargs, _ = r.fresh()
    counter = FlopCounterMode(display=False)
    temp_bytes = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = r.fn(*args, **kwargs)
    if cuda:
        torch.cuda.synchronize()
        temp_bytes = max(0, torch.cuda.max_memory_allocated() - base - value_bytes(out))
    return sum(stash.values()), temp_bytes, float(counter.get_total_flops())


def _timed_passes(replays: list[_OpReplay | None], sources: dict[str, Any], clock: _Clock, *, warmup: int,
                  repeats: int, advance: Callable[[], None]) -> tuple[np.ndarray, np.ndarray]:
    """Median per-op forward and backward times over ``repeats`` passes after ``warmup`` passes.

    Each pass re-executes the step op by op: every op runs alone on fresh leaf copies of the outputs its
    producers gave earlier in the same pass (so inputs are as warm in cache as in the real step), then every
    op's backward runs alone in reverse order, with all of the pass's outputs kept alive as a real step keeps
    them. Timing ops in this order, rather than repeating one op many times, leaves the caches as the step
    leaves them: an op repeated alone finds its weights, inputs and (oneDNN) kernel code hot, and ran up to ~2x
    faster than inside the step on Inception-V3.
    """
    n = len(replays)
    fwd = np.zeros((repeats, n))
    bwd = np.zeros((repeats, n))
    for rep in range(warmup + repeats):
        row = rep - warmup
        env = dict(sources)
        pending: list[tuple[int, _OpReplay, Any, list[torch.Tensor]]] = []
        for i, r in enumerate(replays):
            if r is None:
                continue
            args, kwargs, leaves = r.fresh(r.inputs_from(env))
            t_fwd, out = clock.time(lambda: r.fn(*args, **kwargs))  # noqa: B023,F821 - called at once
            if row >= 0:
                fwd[row, i] = t_fwd
            env[r.node.name] = out
            pending.append((i, r, out, leaves))
            del args, kwargs
        del env
        while pending:
            i, r, out, leaves = pending.pop()
            if r.backward:
                t_bwd = _backward_s(r, clock, out, leaves)
                if row >= 0:
                    bwd[row, i] = t_bwd
            del out, leaves
        advance()
    return np.median(fwd, axis=0), np.median(bwd, axis=0)


def _backward_s(r: _OpReplay, clock: _Clock, out: Any, leaves: list[torch.Tensor]) -> float:
    """Backward time of one replayed op, from its first backward node starting to its last input gradient.

    Marks are taken in autograd hooks (a pre-hook on each output's ``grad_fn``, a hook on each gradient target)
    rather than around ``torch.autograd.grad``: the call's fixed setup cost (tens of microseconds on CPU, paid
    once by the whole step's backward but once per op here) would otherwise swamp small ops.
    """
    outs = r.grad_targets(out)
    wrt = leaves + r.params
    if not outs or not wrt:
        return 0.0
    grads = [torch.ones_like(o) for o in outs]
    starts: list[Any] = []
    ends: list[Any] = []
    handles = [t.register_hook(lambda g: ends.append(clock.mark())) for t in wrt]
    for fn in dict.fromkeys(o.grad_fn for o in outs if o.grad_fn is not None):
        handles.append(fn.register_prehook(lambda g: starts.append(clock.mark()) if not starts else None))
    try:
        got = torch.autograd.grad(outs, wrt, grads, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    t_bwd = clock.between(starts[0], ends[-1]) if starts and ends else 0.0
    # Gradients summed with an earlier op's (shared parameters, fan-out activations): the step pays one add each.
    summed = [(g, g.clone()) for g, acc in zip(got, r.accumulate) if acc and g is not None]
    if summed:
        t_bwd += clock.time(lambda: [a.add_(b) for a, b in summed])[0]
    return max(t_bwd, 0.0)


def _on_device(traced: TracedModel, device: torch.device) -> tuple[fx.GraphModule, tuple]:
    if device.type == "cpu":
        return traced.gm, traced.example_inputs
    import copy

    gm = copy.deepcopy(traced.gm).to(device)
    inputs = inputs_to(traced.example_inputs, device)
    return gm, inputs


def _check_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"profile device must be 'cpu' or 'cuda', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("profile device 'cuda' requested but torch.cuda.is_available() is False")
    return dev


# ---------------------------------------------------------------------------------------------- API


def profile(traced: TracedModel, *, device: str = "cpu", threads: int = 1, warmup: int = 3, repeats: int = 10,
            progress: bool = False, clock: str = "wall") -> OpGraph:
    """The traced graph with measured ``costs["cpu"]`` (on CUDA ``costs[gpu_kind(name)]``, e.g. ``costs["H200"]``),
    stash/temp bytes and FLOPs.

    ``threads`` sets ``torch.set_num_threads`` for the measurement (restored afterwards). ``clock="thread"``
    (CPU, one thread only) times with the calling thread's CPU time instead of wall time: immune to other
    processes competing for the cores, for checks on a shared machine; the default wall time is what a step
    really takes.
    """
    dev = _check_device(device)
    if threads < 1 or warmup < 0 or repeats < 1:
        raise ValueError(f"profile: need threads >= 1, warmup >= 0, repeats >= 1 (got {threads}, {warmup}, {repeats})")
    graph = traced.graph
    n = graph.n
    stash_bytes, temp_bytes, flops = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n)
    gm, inputs = _on_device(traced, dev)
    timer = _Clock(dev, clock, threads)
    param_ptrs = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    with _threads(threads), buffers_restored(gm, inputs), \
            _progress(progress, n + warmup + repeats, graph.name) as advance:
        replays, sources = _replays(traced, gm, inputs)
        for i, r in enumerate(replays):
            if r is not None:
                stash_bytes[i], temp_bytes[i], flops[i] = _instrument_op(
                    r, param_ptrs=param_ptrs, cuda=dev.type == "cuda")
                r.flat = []  # the timed passes compute their own inputs: free the recorded activations
            advance()
        fwd_s, bwd_s = _timed_passes(replays, sources, timer, warmup=warmup, repeats=repeats, advance=advance)
        del replays, sources
    if dev.type == "cuda":
        kind, name = gpu_kind(torch.cuda.get_device_name(dev)), f"cuda:{torch.cuda.get_device_name(dev)}"
        note = f"{name}; "
    else:
        kind, name = "cpu", "cpu"
        note = f"CPU {cpu_model_name() or 'unknown'}; temp_bytes not measured on CPU; "
    note += "thread CPU time; " if clock == "thread" else ""
    note += (f"median of {repeats} passes after {warmup} warm-up, each op replayed alone in step order; "
             "backward = autograd.grad w.r.t. inputs and parameters, timed between autograd hooks")
    prov = Provenance(device=name, threads=threads, torch_version=torch.__version__,
                      date=datetime.date.today().isoformat(), method="measured", note=note)
    return graph.replace(
        stash_bytes=stash_bytes, temp_bytes=temp_bytes, flops=flops,
        costs={**graph.costs, kind: OpCosts(fwd_s=fwd_s, bwd_s=bwd_s, provenance=prov)},
    )


def measure_step_s(traced: TracedModel, *, device: str = "cpu", threads: int = 1, warmup: int = 3,
                   repeats: int = 10, clock: str = "wall") -> tuple[float, float]:
    """Median wall time of the whole step's forward and of ``loss.backward()`` (gradients reset each time).

    Used to check coverage: the per-op sums of :func:`profile` should come within ~15% of these.
    """
    dev = _check_device(device)
    gm, inputs = _on_device(traced, dev)
    timer = _Clock(dev, clock, threads)
    params = list(gm.parameters())
    fwd, bwd = [], []
    with _threads(threads), buffers_restored(gm, inputs):
        for rep in range(warmup + repeats):
            for p in params:
                p.grad = None
            t_fwd, loss = timer.time(lambda: gm(*inputs))
            t_bwd, _ = timer.time(loss.backward)
            if rep >= warmup:
                fwd.append(t_fwd)
                bwd.append(t_bwd)
        for p in params:
            p.grad = None
    return statistics.median(fwd), statistics.median(bwd)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, name: str) -> Iterator[Callable[[], None]]:
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(f"profiling {name}", total=total)
        yield lambda: bar.advance(task)
