"""From a model source to a profiled :class:`~graphs.ir.OpGraph`, reproducibly.

A source is either a benchmark name (``rnnlm``, ``nmt``, ``inception_v3``: :func:`graphs.models.build_model`)
or a user factory ``"package.module:function"``. A factory takes no arguments and returns ``(model,
example_inputs)`` or ``(model, example_inputs, loss_fn)``; ``model(*example_inputs)`` gives the output and the
step's loss is ``loss_fn(output)`` (default: the output itself when it is a scalar, else the mean of its squares,
:func:`graphs.loss.default_loss`; ``meta["loss"]`` says which).

``graph.meta["source"]`` records everything needed to rebuild the identical model in another process (the
execution engine does so with :func:`rebuild_traced`): ``{"benchmark": name, "config": ..., "overrides": ...,
"seed": ...}`` or ``{"factory": "pkg.mod:fn", "seed": ...}``. Factories are called after seeding torch, numpy
and ``random`` with ``seed``, so their default initialisation is reproducible too.
"""

from __future__ import annotations

import importlib
from functools import partial
import logging
import os
import random
import re
import sys
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import nn

from graphs.ir import OpGraph
from graphs.microbatch import MICROBATCH_KEYS
from graphs.trace import TracedModel, trace_model

log = logging.getLogger(__name__)

__all__ = ["load_factory", "build_graph", "rebuild_traced", "parse_profile_spec"]

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def load_factory(path: str) -> Callable[[], Any]:
    """The callable named by ``"pkg.module:factory"`` (one-line ``ValueError`` on any problem)."""
    if not isinstance(path, str) or not _FACTORY_RE.match(path):
        raise ValueError(f"model factory must look like 'package.module:function', got {path!r}")
    module_name, attr = path.split(":")
    # Like `python -m`, resolve user modules from the working directory too (the `placer` script lacks it).
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as e:  # importing user code: any error, sys.exit() included
        raise ValueError(f"cannot import module {module_name!r} for factory {path!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not hasattr(module, attr):
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (factory {path!r})")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ValueError(f"factory {path!r} is not callable (it is a {type(factory).__name__})")
    return factory


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _call_factory(path: str, seed: int) -> tuple[nn.Module, tuple, Callable | None]:
    factory = load_factory(path)
    _seed_everything(seed)
    try:
        result = factory()
    except (Exception, SystemExit) as e:  # user code, sys.exit() included
        raise ValueError(f"factory {path!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                         ) from None
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise ValueError(f"factory {path!r} must return (model, example_inputs) or (model, example_inputs, loss_fn), "
                         f"got {type(result).__name__}")
    model, inputs, *rest = result
    loss_fn = rest[0] if rest else None
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {path!r}: first returned value must be an nn.Module, got {type(model).__name__}")
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not isinstance(inputs, (tuple, list)):
        raise ValueError(f"factory {path!r}: example_inputs must be a tuple of tensors, got {type(inputs).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise ValueError(f"factory {path!r}: loss_fn must be callable or None, got {type(loss_fn).__name__}")
    return model, tuple(inputs), loss_fn


def _source_of(source: str, config: str, overrides: Mapping[str, Any] | None, seed: int) -> dict[str, Any]:
    if ":" in source:
        return {"factory": source, "seed": int(seed)}
    return {"benchmark": source, "config": config, "overrides": dict(overrides or {}), "seed": int(seed)}


def _build(src: Mapping[str, Any]) -> tuple[nn.Module, tuple, Callable | None, str]:
    """Model, inputs, loss and graph name from a ``meta["source"]`` record."""
    if "factory" in src:
        model, inputs, loss_fn = _call_factory(src["factory"], int(src.get("seed", 0)))
        return model, inputs, loss_fn, src["factory"].split(":")[1]
    if "benchmark" in src:
        from graphs.models import build_model  # lazy: the models are only needed for benchmark sources

        name, config = src["benchmark"], src.get("config", "small")
        overrides = dict(src.get("overrides") or {})
        model, inputs, loss_fn = build_model(name, config, seed=int(src.get("seed", 0)), **overrides)
        return model, tuple(inputs), loss_fn, f"{name}-{config}"
    raise ValueError(f"graph meta source must name a 'benchmark' or a 'factory', got {dict(src)!r}")


def parse_profile_spec(spec: str) -> tuple[str, int]:
    """``"cpu"`` → ``("cpu", 1)``, ``"cpu:4"`` → ``("cpu", 4)``, ``"cuda"`` → ``("cuda", 1)``."""
    m = re.fullmatch(r"(cpu)(?::(\d+))?|(cuda(?::\d+)?)", str(spec))
    if not m:
        raise ValueError(f"profile must be 'cpu', 'cpu:N' (N threads) or 'cuda', got {spec!r}")
    if m.group(3):
        return m.group(3), 1
    threads = int(m.group(2) or 1)
    if threads < 1:
        raise ValueError(f"profile threads must be >= 1, got {spec!r}")
    return "cpu", threads


def _trace_from(src: Mapping[str, Any], method: Literal["auto", "fx", "export"] = "auto", *,
                legacy: bool = False, check_grads: bool = True,
                microbatch_record: Mapping[str, Any] | None = None) -> TracedModel:
    model, inputs, loss_fn, name = _build(src)
    return trace_model(model, inputs, loss_fn, name=name, meta={"source": dict(src)}, method=method, legacy=legacy,
                       check_grads=check_grads, microbatch_record=microbatch_record)


def build_graph(source: str, *, config: str = "small", overrides: Mapping[str, Any] | None = None,
                profile: str | None = "cpu", seed: int = 0, progress: bool = False) -> OpGraph:
    """Build, trace and (unless ``profile`` is None) profile a model; see the module docstring for ``source``.

    ``profile``: ``"cpu"``, ``"cpu:N"`` (N intra-op threads) or ``"cuda"``. The graph is named
    ``"{model}-{config}"`` for benchmarks and after the factory function otherwise.
    """
    if not isinstance(source, str) or not source:
        raise ValueError(f"model source must be a benchmark name or 'package.module:function', got {source!r}")
    if ":" not in source and not re.fullmatch(r"[A-Za-z_]\w*", source):
        raise ValueError(f"model source must be a benchmark name or 'package.module:function', got {source!r}")
    device, threads = parse_profile_spec(profile) if profile is not None else ("", 0)
    traced = _trace_from(_source_of(source, config, overrides, seed))
    if profile is None:
        return traced.graph
    from graphs.profile import profile as run_profile

    return run_profile(traced, device=device, threads=threads, progress=progress)


def rebuild_traced(meta: Mapping[str, Any]) -> TracedModel:
    """Rebuild the model of a graph from its ``meta`` and trace it the same way (same op names, same order)."""
    if not isinstance(meta, Mapping) or not isinstance(meta.get("source"), Mapping):
        raise ValueError("graph meta has no 'source' record; it was not built by graphs.build.build_graph")
    method = meta.get("trace")
    # A graph built before the tracer went inside composite modules has no "kept_whole": trace it as then.
    # no gradient check and the recorded micro-batch finding: the graph passed the one and found the other when
    # it was built, and every engine worker rebuilds (gpt-medium: the gradient check alone took 11 s)
    record = {k: meta[k] for k in MICROBATCH_KEYS if k in meta} if "microbatchable" in meta else None
    return _trace_from(meta["source"], method if method in ("fx", "export") else "auto",
                       legacy="kept_whole" not in meta, check_grads=False, microbatch_record=record)


def model_factory(graph: OpGraph) -> Callable[[], Any]:
    """A picklable zero-argument callable rebuilding the graph's traced model (:func:`rebuild_traced` of its
    ``meta['source']``)."""
    meta = dict(graph.meta)
    if not isinstance(meta.get("source"), dict):
        raise ValueError(f"graph {graph.name!r} has no meta['source']; build it with graphs.build.build_graph")
    return partial(rebuild_traced, meta)
