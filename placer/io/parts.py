"""Model parts: a graph's top-level modules in execution order, the form trainers split pipelines by.

torchtitan (``torchtitan/distributed/pipeline_parallel.py``) describes a pipeline split as
``module_fqns_per_model_part``: one list per stage of the module FQNs that stage owns, a *part* being a top-level
module or one layer of a layer list (``[["tok_embeddings", "layers.0", "layers.1"], ["layers.2", "norm",
"output"]]``); it builds each stage by deleting every other part from a copy of the model. :func:`model_parts`
finds those parts in a traced graph (``blocks.3.attn.qkv`` belongs to part ``blocks.3``, ``ln_f`` to ``ln_f``),
:func:`model_part_fqns` says which stage of a stage-contiguous placement owns each, and
:func:`split_after` makes the contiguous placement that cuts between parts (the even layer split, the splits a
benchmark searches). Pure numpy: the placement JSON writer imports it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from graphs.grouping import colocation_first, part_of_path
from graphs.ir import OpGraph
from placer.core.placement import Placement

__all__ = ["part_of_path", "model_parts", "part_of_ops", "model_part_fqns", "split_after"]


def part_of_ops(graph: OpGraph) -> list[str]:
    """Each op's model part; ``""`` for ops outside every module (inputs, functional adds between parts)."""
    return [part_of_path(p) for p in graph.module_paths]


def model_parts(graph: OpGraph) -> list[str]:
    """The graph's model parts in order of their first op."""
    return list(dict.fromkeys(p for p in part_of_ops(graph) if p))


def model_part_fqns(graph: OpGraph, stages: Sequence[dict[str, Any]] | None) -> list[list[str]] | None:
    """torchtitan's ``module_fqns_per_model_part`` of a stage-contiguous placement: per stage (in ``stages``
    order, as :func:`placer.io.document.contiguous_stages` gives them: stage ``k`` runs from its ``first_op`` to
    the next stage's) the parts whose ops it runs; an input or parameter read counts with its first reader. None
    when there are no stages, or when a part's ops run on two stages (a cut inside a block: no list of whole
    modules describes that split)."""
    if not stages:
        return None
    starts = np.array([graph.index(s["first_op"]) for s in stages])
    stage_of = np.searchsorted(starts, np.arange(graph.n), side="right") - 1
    src, dst = graph.edge_index
    first_reader = np.full(graph.n, graph.n)
    np.minimum.at(first_reader, src, dst)
    moved = np.array([k in ("input", "get_attr") for k in graph.op_kinds], dtype=bool) & (first_reader < graph.n)
    stage_of[moved] = stage_of[first_reader[moved]]
    out: list[list[str]] = [[] for _ in stages]
    owner: dict[str, int] = {}
    for part, k in zip(part_of_ops(graph), stage_of.tolist()):
        if not part:
            continue
        if owner.setdefault(part, k) != k:
            return None
        if part not in out[k]:
            out[k].append(part)
    return out


def split_after(graph: OpGraph, *last_parts: str) -> Placement:
    """The contiguous placement whose stage ``k`` (on device ``k``) ends with model part ``last_parts[k]``; the
    last stage runs to the end. Ops outside every module go with the next part's stage (model inputs: with the
    first stage, which a pipeline feeds), unless colocated with an op of another stage. One-line ``ValueError``
    for an unknown part or parts out of order."""
    parts = model_parts(graph)
    rank = {p: i for i, p in enumerate(parts)}
    for p in last_parts:
        if p not in rank:
            raise ValueError(f"{graph.name} has no model part {p!r} (parts: {', '.join(parts)})")
    ends = [rank[p] for p in last_parts]
    if ends != sorted(set(ends)) or (ends and ends[-1] >= len(parts) - 1):
        raise ValueError(f"split points {list(last_parts)} must be distinct parts in order, before the last part "
                         f"{parts[-1]!r}")
    stage_of_part = {p: int(np.searchsorted(ends, i)) for i, p in enumerate(parts)}
    dev = np.zeros(graph.n, dtype=np.int64)
    nxt = len(last_parts)
    for i, part in reversed(list(enumerate(part_of_ops(graph)))):  # a module-less op joins the next part's stage
        nxt = stage_of_part[part] if part else nxt
        dev[i] = nxt
    # colocated ops (a module-less op sharing a group with a part's op) follow the group's first op
    return Placement(dev[colocation_first(graph)])
