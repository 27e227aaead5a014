"""Pipeline stages of a placement as plain modules: the step's ``torch.fx`` graph cut at the placement's ``stages``
(:func:`stage_modules`, over :func:`placer.engine.stages.split_stages`, the stage type the engine's pipelining
backend runs too), what :func:`placer.io.loaders.pipeline_stages` hands to ``torch.distributed.pipelining``.

A pipeline stage can only receive the previous stage's outputs, so every value a later stage needs (the integer
targets, activations skipping a stage, each tensor of a tuple such as ``LSTMCell``'s ``(h, c)``) is handed on
through the stages in between; Python values that are not tensors (e.g. ``x.size(0)``) are fixed at their value
for one micro-batch of the example inputs.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

from torch import nn

from graphs.batch import split_inputs
from graphs.microbatch import check_microbatchable
from graphs.trace import TracedModel, trace_model
from placer.engine.stages import StageModule, split_stages
from placer.io.document import PlacementLike, document_of

log = logging.getLogger(__name__)

__all__ = ["StageModule", "stage_modules"]


def _traced(model_or_traced: nn.Module | TracedModel, example_inputs: Sequence[Any] | None) -> TracedModel:
    if isinstance(model_or_traced, TracedModel):
        return model_or_traced
    if not isinstance(model_or_traced, nn.Module):
        raise ValueError(f"expected an nn.Module or a TracedModel, got {type(model_or_traced).__name__}")
    if example_inputs is None:
        raise ValueError("pipeline stages of an nn.Module need example_inputs to trace it with")
    return trace_model(model_or_traced, example_inputs, name=type(model_or_traced).__name__)


def _stage_of_op(traced: TracedModel, doc: Mapping[str, Any]) -> list[int]:
    """Stage index of every op, checking that ``stages`` tiles the traced ops in order."""
    stages = doc.get("stages")
    name = doc["graph"]["name"]
    if not stages:
        raise ValueError(f"placement of {name!r} has no 'stages' (it is not stage-contiguous): "
                         f"use apply() for single-process model parallelism, or a contiguous placement")
    ops = traced.graph.op_names
    if set(doc["ops"]) != set(ops):
        extra = sorted(set(doc["ops"]) ^ set(ops))
        raise ValueError(f"placement of graph {name!r} does not match the traced model "
                         f"({len(extra)} op names differ, e.g. {extra[0]!r})")
    out: list[int] = []
    for s, st in enumerate(stages):
        first, last = traced.graph.index(st["first_op"]), traced.graph.index(st["last_op"])
        if first != len(out) or last < first:
            raise ValueError(f"placement stage {s} ({st['first_op']}..{st['last_op']}) does not continue "
                             f"stage {s - 1}; stages must cover the ops in order")
        out.extend([s] * (last - first + 1))
    if len(out) != len(ops):
        raise ValueError(f"placement stages end at op {len(out) - 1} of {len(ops)}; they must cover every op")
    return out


def stage_modules(model_or_traced: nn.Module | TracedModel, placement: PlacementLike, *,
                  example_inputs: Sequence[Any] | None = None, microbatches: int | None = None) -> list[StageModule]:
    """All pipeline stages of ``placement`` as plain modules (no process group), in stage order.

    ``stages[0](*inputs)`` returns a tuple of tensors, each later stage takes the previous stage's tuple, and
    the last returns the loss: composing them in one process computes the model's step (useful for tests and to
    check a split). The modules share parameters with ``model_or_traced``. ``example_inputs`` (a whole batch)
    is required for an ``nn.Module`` and defaults to the TracedModel's; one micro-batch of it (the
    placement's ``schedule.microbatches`` unless ``microbatches`` is given) is run once to learn the structure
    of the values crossing each cut. A stage on a device of the plan's ``schedule.recompute`` runs under
    activation checkpointing (:attr:`placer.engine.stages.StageModule.recompute`).
    """
    doc = document_of(placement)
    traced = _traced(model_or_traced, example_inputs)
    stage_of = _stage_of_op(traced, doc)
    num_stages = len(doc["stages"])
    stage_by_name = dict(zip(traced.graph.op_names, stage_of))

    inputs = tuple(traced.example_inputs if example_inputs is None else example_inputs)
    m = int(microbatches or doc["schedule"]["microbatches"])
    check_microbatchable(traced.graph, m)
    if m > 1 and traced.graph.meta.get("trace") == "export" and "microbatchable" not in traced.graph.meta:
        log.warning("%s was traced with torch.export before graphs recorded a dynamic batch; micro-batches of "
                    "another size may fail or compute wrong values", traced.graph.name)
    mb = split_inputs(inputs, m, 0)  # equal parts only: torch's tensor_split would cut unequal ones otherwise
    stages = split_stages(traced.gm, stage_by_name, num_stages, mb)
    recompute = set(doc["schedule"].get("recompute", ()))
    for stage, entry in zip(stages, doc["stages"]):  # activation checkpointing where the plan recomputes
        stage.recompute = entry["device"] in recompute
    return stages
