"""Whether a traced step can be split into micro-batches, found by running it (not by guessing), and the one
refusal every consumer calls.

:func:`find_batch_mixing` runs the traced step twice: on one micro-batch ``h`` (the example's first ``1/p`` along
dim 0, ``p`` the smallest factor of the batch) and on the batch made of ``p`` copies of ``h``. Per sample, a
micro-batchable step computes the same thing in both, so each op's result on ``h`` must be the first part of its
result on the copies, along the dimension that carries the batch (dim 0, or another after a transpose). Copies
make batch statistics (BatchNorm, a mean loss) equal too, and dropout is run as the identity, so any difference
is the op mixing samples: a reshape with a hard-coded batch (it fails, or slices samples apart), a constant of the
example's batch size. The first op whose inputs agree but whose result does not is named.

Copies hide one kind of mixing: an op invariant to duplicated samples (attention across dim 0, which is what a
sequence-first ``nn.MultiheadAttention`` does to a batch split along time; a max over the batch). A third run on
the example's own samples catches it: there an op whose inputs agree must give the first part of its batch
result too. Other samples' values are expected in that run wherever batch statistics enter (BatchNorm, a
reduction), so such an op and everything after it is left unjudged, as are shapes that depend on the data.

Two kinds of result are never taken for mixing: integers (ids and positions, such as the tokens of a batch sorted
by expert id in an MoE layer: the copies' order and indices differ, while the rows dispatched by them come back to
their samples, where they are judged again), and uninitialised memory, which both runs fill with zeros (export's
``new_empty`` before slices are written into it).

:func:`check_microbatchable` is the refusal: the schedules (so the simulator and the engine) and the loaders
call it before splitting a batch, so a graph recorded as not micro-batchable is never scored nor run with M > 1.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from graphs.batch import cloned_inputs, input_batches, map_batched, split_inputs

__all__ = ["find_batch_mixing", "check_microbatchable", "microbatch_meta", "MICROBATCH_KEYS"]


_DROPOUT_FUNCS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                  torch.dropout, torch.nn.functional.dropout}
_DROPOUT_ATEN = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"}
_SAME, _UNKNOWN = "same", "unknown"
_CHANGED = "changed"  # a result of the batch-independent shape that the copies change: mixing for a layer only
_SHAPE = "shape:"  # prefix of a finding that holds whatever the op's inputs were
_DUPLICATES = ("; on copies of one micro-batch it agrees, so it mixes samples in a way duplicates hide (attention, "
               "a softmax or a mean across the batch: nn.MultiheadAttention and nn.TransformerEncoderLayer without "
               "batch_first=True take the batch on dim 1)")


def _smallest_factor(n: int) -> int:
    return next((d for d in range(2, int(math.isqrt(n)) + 1) if n % d == 0), n)


def _is_dropout(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.dropout._DropoutNd)
    if node.op == "call_function":
        if node.target in _DROPOUT_FUNCS:
            return True
        packet = getattr(node.target, "overloadpacket", None)
        return packet is not None and str(getattr(packet, "__name__", "")).split(".")[-1] in _DROPOUT_ATEN
    return False


def _identity_dropout(node: fx.Node, env: Mapping[fx.Node, Any]) -> Any:
    x = env[node.args[0]]
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None and str(getattr(packet, "__name__", "")).endswith("native_dropout"):
        return x, torch.ones_like(x, dtype=torch.bool)  # (output, mask)
    return x


class _Found(Exception):
    """Raised by a run's ``see`` to stop it: the check has its answer."""


_UNINITIALISED = {torch.empty, torch.empty_like, torch.empty_strided, "new_empty", "new_empty_strided",
                  torch.ops.aten.empty.memory_format, torch.ops.aten.new_empty.default,
                  torch.ops.aten.empty_like.default, torch.ops.aten.empty_strided.default}
"""Allocations the check fills with zeros, so both runs hold the same where the step writes nothing (export's
``new_empty`` before slices are written in it: DeepSeek-V3's attention)."""


class _Runner(fx.Interpreter):
    """Runs the step, dropout as the identity, stopping at the first failure (``failed``: the op and why); each
    op's value, detached, goes to ``see(node, value)`` as it is computed."""

    def __init__(self, gm: fx.GraphModule, see: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(gm)
        self.see = see
        self.failed: tuple[str, str] | None = None

    def run_node(self, n: fx.Node) -> Any:
        if n.op == "output":
            return super().run_node(n)
        try:
            out = _identity_dropout(n, self.env) if _is_dropout(n, self.module) else super().run_node(n)
            if n.op in ("call_function", "call_method") and n.target in _UNINITIALISED:
                out = out.zero_()
        except Exception as e:  # the model on another batch: any error is the finding
            self.failed = (n.name, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise
        # detached: the runner later copies the saved parameters back in place, and a view of a parameter
        # made under no_grad (self.pos[:T], a CLS token expanded) may not be used after that
        self.see(n, tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out))
        return out


def _run(gm: fx.GraphModule, inputs: Sequence[Any], see: Callable[[fx.Node, Any], None]) -> tuple[str, str] | None:
    """Run the step on ``inputs`` (the model's state put back afterwards), each value to ``see``; the op that
    failed and why, or None."""
    runner = _Runner(gm, see)
    state = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}
    try:
        with torch.no_grad():
            runner.run(*inputs)
    except _Found:  # the check has its answer
        pass
    except Exception:  # noqa: BLE001 - the model's failure is in runner.failed; anything else is not the model's
        if runner.failed is None:
            raise
    finally:
        with torch.no_grad():
            for k, v in gm.state_dict(keep_vars=True).items():
                v.copy_(state[k])
    return runner.failed


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype:
        return False
    if not a.is_floating_point() and not a.is_complex():
        return bool(torch.equal(a, b))
    if not a.numel():
        return True
    # Root-mean-square difference within 5% of the values' RMS: float rounding differs between batch sizes
    # (oneDNN picks other kernels) and grows through deep nets and small-batch BatchNorm, while an op that mixes
    # samples moves whole values (other samples' data), far beyond it.
    a, b = a.float(), b.float()
    finite = a.isfinite() & b.isfinite()
    if not bool(finite.all()):  # -inf in a mask, inf or nan: equal where not finite, then the rest
        if not bool(((a == b) | (a.isnan() & b.isnan()))[~finite].all()):
            return False
        a, b = a[finite], b[finite]
        if not a.numel():
            return True
    return bool((a - b).pow(2).mean().sqrt() <= 0.05 * b.pow(2).mean().sqrt() + 1e-6)


def _compare(full: Any, part: Any, p: int) -> str | None:
    """``same``, ``unknown`` (a batch reduction: not comparable), or why the op mixes samples."""
    if isinstance(full, (tuple, list)) and isinstance(part, (tuple, list)):
        if len(full) != len(part):
            return f"{_SHAPE}returns {len(part)} values for a micro-batch and {len(full)} for the batch"
        results = [_compare(f, h, p) for f, h in zip(full, part)]
        bad = next((r for r in results if r not in (_SAME, _UNKNOWN)), None)
        return bad or (_SAME if all(r == _SAME for r in results) else _UNKNOWN)
    if not isinstance(full, torch.Tensor) or not isinstance(part, torch.Tensor):
        return _SAME
    if full.shape == part.shape:  # no batch dimension: a reduction over the batch, or batch-independent
        if _close(part, full):
            return _SAME  # batch-independent, or a mean / max over the batch (the copies leave it as it is)
        return _UNKNOWN if _close(part * p, full) else _CHANGED  # a sum over the batch; or a var, a norm... or not
    scaled = [d for d in range(full.dim()) if full.dim() == part.dim() and full.shape[d] == p * part.shape[d]
              and all(full.shape[e] == part.shape[e] for e in range(full.dim()) if e != d)]
    if not scaled:
        return (f"{_SHAPE}gives shape {tuple(part.shape)} for a micro-batch of 1/{p} of the batch, "
                f"{tuple(full.shape)} for the batch")
    d = scaled[0]
    if _close(part, full.narrow(d, 0, part.shape[d])):
        return _SAME
    return f"splits samples apart along dim {d} (its result on a micro-batch is not part of the batch's)"


def _integers(value: Any) -> bool:
    """Whether every tensor of ``value`` holds integers: ids or positions, which may be grouped across the batch
    (a sort of the tokens by expert id: its order and indices differ on the copies, but the rows it dispatches come
    back to their samples)."""
    return all(not (t.is_floating_point() or t.is_complex()) for t in tree_leaves(value) if isinstance(t, torch.Tensor))


def _is_random(gm: fx.GraphModule, node: fx.Node, values: Mapping[str, Any]) -> bool:
    """Whether ``node`` gives other values on the same inputs (dropout inside a function, noise): its
    difference between the runs is then randomness, not mixing."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: values[a.name])
    if node.op == "call_module":
        fn: Any = gm.get_submodule(str(node.target))
    elif node.op == "call_method":
        fn = getattr(args[0], str(node.target))
        args = args[1:]
    elif node.op == "call_function":
        fn = node.target
    else:
        return False
    outs = []
    try:
        with torch.no_grad():
            for seed in (1, 2):
                torch.manual_seed(seed)
                outs.append(fn(*args, **kwargs))
    except Exception:  # noqa: BLE001 - in-place ops on recorded values and the like: not random then
        return False
    return _compare(outs[0], outs[1], 1) != _SAME


def find_batch_mixing(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[str, str] | None:
    """``(op name, why)`` of the first op of ``gm`` that mixes the samples of a batch, ``("", why)`` when the
    example cannot be split at all, or None when the step micro-batches (see the module docstring)."""
    found = input_batches(inputs)
    batches = [b for _, b in found]
    if not batches:
        return "", "the example inputs have no tensor with a batch dimension"
    g = math.gcd(*batches)
    if g < 2 and len(set(batches)) > 1:
        (big, b), (small, s) = max(found, key=lambda x: x[1]), min(found, key=lambda x: x[1])
        return "", (f"{small} has {s} rows on dim 0 beside {b} of {big}: every tensor input carries the batch on "
                    f"dim 0 (one shared by all samples, such as position ids of shape (1, T), can be expanded to "
                    f"the batch or left to the model)")
    if g < 2:
        return "", f"the example batch ({batches[0]}) has no micro-batch to split into"
    p = _smallest_factor(g)
    guarded = int(getattr(gm, "meta", {}).get("batch_min", 0))
    if guarded > 2 and batches[0] // p < guarded:
        return "", (f"torch.export guarded the batch size >= {guarded} (control flow on the batch size), "
                    f"a micro-batch of {batches[0] // p} would take another branch")
    # every run on its own copy: a step that writes its batch in place (x.mul_(2)) changes only that copy, and the
    # values a run keeps that are its inputs stay as that run computed them
    part_in = cloned_inputs(split_inputs(inputs, p, 0))
    full_in = map_batched(lambda x: torch.cat([x] * p), part_in)
    gen = torch.random.get_rng_state()
    try:
        part: dict[str, Any] = {}  # copies: the values as computed (a later in-place op, ReLU(inplace=True), may
        # change the tensor itself), compared with the batch's as each is computed
        part_failed = _run(gm, part_in, lambda n, v: part.__setitem__(n.name, cloned_inputs((v,))[0]))
        return (_first_mixing(gm, full_in, part, part_failed, p)
                or _first_mixing(gm, cloned_inputs(inputs), part, part_failed, p, distinct=True))
    finally:
        torch.random.set_rng_state(gen)  # the check leaves no trace, randomness included


def _is_batch_norm(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Batch statistics by design (BatchNorm in training): each micro-batch normalises by its own, as GPipe."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and "batch_norm" in str(getattr(node.target, "__name__", node.target))


def _first_mixing(gm: fx.GraphModule, inputs: Sequence[Any], part: Mapping[str, Any],
                  part_failed: tuple[str, str] | None, p: int, distinct: bool = False) -> tuple[str, str] | None:
    """The first op whose inputs agree between the run on ``inputs`` and the micro-batch's (``part``: its values
    by op) but whose result does not (module docstring). Each value of the batch's run is judged as it is
    computed and then dropped, so the check holds one run's values, a micro-batch's, rather than both. With
    ``distinct``, ``inputs`` are the example's own samples instead of copies: only a result that splits samples
    apart is a finding then (other samples' values are expected in batch statistics, reductions and shapes that
    depend on the data), and BatchNorm's statistics are accepted."""
    state: dict[str, str] = {}
    found: list[tuple[str, str] | None] = []

    def see(node: fx.Node, value: Any) -> None:
        if part_failed is not None and part_failed[0] == node.name:
            found.append((node.name, f"fails on a micro-batch of 1/{p} of the batch: {part_failed[1]}"))
        elif node.name not in part:
            found.append(None)  # pragma: no cover - the micro-batch's run stopped without a recorded failure
        else:
            why = _judge(gm, node, _compare(value, part[node.name], p), state, part, p, distinct)
            if why is None:
                return
            found.append((node.name, why))
        raise _Found

    failed = _run(gm, inputs, see)
    if found:
        return found[0]
    return None if failed is None else (failed[0], f"fails on the example batch: {failed[1]}")


def _judge(gm: fx.GraphModule, node: fx.Node, why: str, state: dict[str, str], part: Mapping[str, Any], p: int,
           distinct: bool) -> str | None:
    """Why ``node`` mixes samples (``why``: :func:`_compare` of its values), or None after recording in ``state``
    that it is the same as the micro-batch's or cannot be judged."""
    inputs_same = all(state.get(a.name) == _SAME for a in node.all_input_nodes)
    if why not in (_SAME, _UNKNOWN) and not why.startswith(_SHAPE) and _integers(part.get(node.name)):
        why = _UNKNOWN  # ids or positions grouped across the batch
    if distinct and (not inputs_same or why.startswith(_SHAPE) or why == _CHANGED or _is_batch_norm(node, gm)):
        why = _UNKNOWN  # even when close: other samples' statistics, amplified further on, taint what follows
    elif distinct and why not in (_SAME, _UNKNOWN):
        why += _DUPLICATES
    if why == _CHANGED:  # a reduction (var, norm, a token count...) may do that; a layer works per sample
        why = _UNKNOWN if node.op != "call_module" else (
            "gives a result of the same shape for a micro-batch and the batch, neither the same nor "
            f"{p} times it: the batch is not on dim 0 of its input (nn.RNN/GRU/LSTM without batch_first=True "
            "take it on dim 1), or the layer mixes samples")
    if why in (_SAME, _UNKNOWN):
        state[node.name] = why
    elif why.startswith(_SHAPE) or (inputs_same and not _is_random(gm, node, part)):
        return why.removeprefix(_SHAPE)
    else:
        state[node.name] = _UNKNOWN  # downstream of a random or reducing op: cannot be judged
    return None


MICROBATCH_KEYS = ("microbatchable", "microbatch_op", "microbatch_why")
"""The graph ``meta`` entries :func:`microbatch_meta` writes."""


def microbatch_meta(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """The graph ``meta`` entries: ``microbatchable`` and, when false, ``microbatch_op`` and ``microbatch_why``."""
    found = find_batch_mixing(gm, inputs)
    if found is None:
        return {"microbatchable": True}
    return {"microbatchable": False, "microbatch_op": found[0], "microbatch_why": found[1]}


MAX_MICROBATCHES = 65_536
"""More micro-batches than this in one step is refused (a schedule holds tasks per op and micro-batch)."""


_BATCH: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()
""":func:`batch_size` per graph (immutable): every schedule built asks, on the plan search's hot path."""


def batch_size(graph: Any) -> int | None:
    """The batch of one step of an OpGraph: the first dimension of its input ops' outputs (their gcd: the engine
    splits every batched input along it), None when unknown."""
    if graph not in _BATCH:
        dims = [int(s[0]) for s, k in zip(graph.out_shapes, graph.op_kinds) if k == "input" and len(s) and s[0] > 0]
        _BATCH[graph] = int(math.gcd(*dims)) if dims else None
    return _BATCH[graph]


def check_microbatchable(graph: Any, microbatches: int) -> None:
    """One-line ``ValueError`` when ``microbatches`` > 1 and ``graph`` (an OpGraph, or its ``meta``) was recorded
    as not micro-batchable at build time, or its batch (:func:`batch_size`, where known) does not split into that
    many equal parts, or there are more than :data:`MAX_MICROBATCHES`; graphs without the record (built before
    it, synthetic) pass the first check."""
    if int(microbatches) <= 1:
        return
    name = getattr(graph, "name", "") or "the graph"
    if int(microbatches) > MAX_MICROBATCHES:
        raise ValueError(f"{int(microbatches)} micro-batches: at most {MAX_MICROBATCHES} per step")
    batch = batch_size(graph) if hasattr(graph, "out_shapes") else None
    if batch is not None and batch % int(microbatches):
        raise ValueError(f"{name} has a batch of {batch}, which does not split into {int(microbatches)} equal "
                         f"micro-batches; use a divisor of {batch}")
    meta: Mapping[str, Any] = graph if isinstance(graph, Mapping) else (getattr(graph, "meta", None) or {})
    if meta.get("microbatchable", True) is not False:
        return
    op = meta.get("microbatch_op") or ""
    where = f"op {op!r} " if op else ""
    raise ValueError(f"{name} cannot be split into {int(microbatches)} micro-batches: {where}"
                     f"{meta.get('microbatch_why', 'mixes the samples of a batch')}; use --microbatches 1")
