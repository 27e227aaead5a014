"""The repeated-layer structure of a traced model, from ``graph.module_paths``: what the layer-count splitters
(``even-layers``, ``deepspeed-*``) cut into pipeline stages.

A model's *units*, in pipeline order, are found once for any traced model:

- **Repeated blocks.** Every module path whose outermost numeric component follows a prefix (``blocks.3.attn``
  → prefix ``blocks``, index 3) belongs to that prefix's run of siblings. The run with the most distinct
  indices (ties: more ops, then the earlier one) is the model's body when its blocks hold at least
  :data:`BODY_SHARE` of the compute; its blocks become units in index order, the top-level modules before its
  first op are the *pre* units (embeddings) and those after its last op the *post* units (norm, head, loss).
- **Otherwise** (Inception's ``Mixed_*``, an encoder-decoder whose two stacks are each too small to be the body)
  the top-level children in order of first appearance are the units, a ``ModuleList`` child expanded into its
  items (``encoder.0``, ``encoder.1``, ...); every unit counts as a block.
- A graph with no module paths at all has one unit per colocation group.

Ops without a module path (inputs, functional glue) join the unit of the op before them in topological order
(the first ones join the first unit). A colocation group takes the unit of its first op, and units are made
non-decreasing along the groups' order (a running maximum), so any cut between units is a contiguous stage
split of the groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphs.grouping import part_of_path
from placer.baselines._common import Groups, finish

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement

BODY_SHARE = 0.5
"""Least share of the step's compute the longest ``<prefix>.<int>`` run must hold to be the model's body."""


@dataclass(frozen=True, eq=False)
class Layers:
    """A model's units in pipeline order and the unit of every colocation group."""

    names: list[str]
    """Unit names (module paths such as ``tok_emb``, ``blocks.3``), in pipeline order."""
    unit_of_group: np.ndarray
    """``(G,)`` unit index of each colocation group, non-decreasing in group order."""
    first_block: int
    """Index of the first repeated block among the units (the number of pre units)."""
    num_blocks: int
    """Number of repeated blocks; units after them are the post units."""

    @property
    def num(self) -> int:
        return len(self.names)

    @property
    def pre(self) -> range:
        return range(0, self.first_block)

    @property
    def post(self) -> range:
        return range(self.first_block + self.num_blocks, self.num)

    def unit_sums(self, per_group: np.ndarray) -> np.ndarray:
        """``(U,)`` sum of a per-group quantity over each unit."""
        return np.bincount(self.unit_of_group, weights=np.asarray(per_group, dtype=np.float64),
                           minlength=self.num)


def _outer_index(path: str) -> tuple[str, int] | None:
    """``("blocks", 3)`` for ``blocks.3.attn.q``: the prefix before the outermost numeric component."""
    parts = path.split(".")
    for p in range(1, len(parts)):
        if parts[p].isdigit():
            return ".".join(parts[:p]), int(parts[p])
    return None


def _longest_run(paths: list[str], op_time_s: np.ndarray) -> tuple[str, list[int]] | None:
    """The ``<prefix>.<int>`` run with the most distinct indices (ties: more ops, then earlier), if it is the body."""
    runs: dict[str, dict[int, int]] = {}
    for path in paths:
        hit = _outer_index(path)
        if hit is not None:
            counts = runs.setdefault(hit[0], {})
            counts[hit[1]] = counts.get(hit[1], 0) + 1
    if not runs:
        return None
    order = list(runs)  # first appearance
    prefix = max(order, key=lambda p: (len(runs[p]), sum(runs[p].values()), -order.index(p)))
    if len(runs[prefix]) < 2:
        return None
    in_run = np.array([(_outer_index(p) or ("", 0))[0] == prefix for p in paths])
    total = float(op_time_s.sum())
    if total > 0 and float(op_time_s[in_run].sum()) < BODY_SHARE * total:
        return None
    return prefix, sorted(runs[prefix])


def _fill_gaps(unit_of_op: np.ndarray) -> np.ndarray:
    """Ops with unit -1 take the unit of the op before them (the leading ones, of the first op that has one)."""
    known = unit_of_op >= 0
    if not known.any():
        return np.zeros_like(unit_of_op)
    idx = np.where(known, np.arange(unit_of_op.size), -1)
    prev = np.maximum.accumulate(idx)
    prev = np.where(prev < 0, int(np.flatnonzero(known)[0]), prev)
    return unit_of_op[prev]


def _run_units(paths: list[str], prefix: str, indices: list[int]) -> tuple[list[str], np.ndarray, int]:
    """Units around a run of blocks: ``(names, unit of each op or -1, number of pre units)``. A top-level module
    before the first block op is a pre unit, one after the last block op (and not a pre unit: a tied embedding
    used again by the head stays with its group) a post unit; anything else between blocks joins its neighbour."""
    rank = {k: r for r, k in enumerate(indices)}
    block = np.array([rank[h[1]] if (h := _outer_index(p)) and h[0] == prefix else -1 for p in paths], dtype=np.int64)
    in_block = np.flatnonzero(block >= 0)
    first_op, last_op = int(in_block[0]), int(in_block[-1])
    tops = [p.split(".", 1)[0] for p in paths]
    pre = list(dict.fromkeys(t for i, t in enumerate(tops) if t and block[i] < 0 and i < first_op))
    post = list(dict.fromkeys(t for i, t in enumerate(tops) if t and block[i] < 0 and i > last_op and t not in pre))
    where = {t: u for u, t in enumerate(pre)} | {t: len(pre) + len(indices) + u for u, t in enumerate(post)}
    unit = np.where(block >= 0, len(pre) + block, -1)
    for i, t in enumerate(tops):
        if block[i] < 0 and (i < first_op and t in pre or i > last_op and t in post):
            unit[i] = where[t]
    return pre + [f"{prefix}.{k}" for k in indices] + post, unit, len(pre)


def _top_level_units(paths: list[str]) -> tuple[list[str], np.ndarray]:
    """The top-level children in order of first appearance, a ``ModuleList`` child split into its items."""
    index: dict[str, int] = {}
    unit = np.full(len(paths), -1, dtype=np.int64)
    for i, p in enumerate(paths):
        if p:
            unit[i] = index.setdefault(part_of_path(p), len(index))
    return list(index), unit


def find_layers(graph: "OpGraph", groups: Groups) -> Layers:
    """The units of ``graph`` (module docstring) with the unit of each of ``groups``."""
    paths = [str(p) for p in graph.module_paths]
    op_time = groups.time_s[groups.group_of_op, 0] if groups.time_s.size else np.zeros(graph.n)
    run = _longest_run(paths, op_time)
    if run is not None:
        names, unit_of_op, first_block = _run_units(paths, *run)
        num_blocks = len(run[1])
    else:
        names, unit_of_op = _top_level_units(paths)
        first_block, num_blocks = 0, len(names)
    if not names:  # no module paths: one unit per colocation group
        return Layers(names=[f"group{g}" for g in range(groups.num)], unit_of_group=np.arange(groups.num),
                      first_block=0, num_blocks=groups.num)
    unit_of_op = _fill_gaps(unit_of_op)
    first_ops = np.array([int(ops[0]) for ops in groups.ops], dtype=np.int64)
    unit_of_group = np.maximum.accumulate(unit_of_op[first_ops]) if first_ops.size else first_ops
    return Layers(names=names, unit_of_group=unit_of_group, first_block=first_block, num_blocks=num_blocks)


def stages_to_placement(graph: "OpGraph", cluster: "Cluster", groups: Groups, layers: Layers, bounds: list[int],
                        devices: list[int]) -> "Placement":
    """The placement putting units ``bounds[k]..bounds[k+1]-1`` on ``devices[k]`` (an empty stage leaves its
    device unused); ``bounds`` starts at 0 and ends at the number of units."""
    if len(bounds) != len(devices) + 1 or bounds[0] != 0 or bounds[-1] != layers.num:
        raise ValueError(f"stage bounds {bounds} do not cover {layers.num} units on {len(devices)} devices")
    stage_of_unit = np.searchsorted(np.asarray(bounds[1:]), np.arange(layers.num), side="right")
    dev = np.asarray(devices, dtype=np.int64)[stage_of_unit[layers.unit_of_group]]
    return finish(graph, cluster, groups, dev)
