"""``even-layers`` and ``even-layers-weighted``: torchtitan's pipeline split by layer count (Liang et al.,
"TorchTitan: One-stop PyTorch native solution for production ready LLM pre-training", ICLR 2025;
``torchtitan/distributed/pipeline_parallel.py``, ``generate_llm_fqn_per_model_part``).

The model's repeated blocks (:func:`placer.baselines._layers.find_layers`: ``blocks.N``, ``layers.N``, or the
top-level children in order) are cut over the accelerators in cluster order, one stage each:

- ``even-layers``: stage ``k`` of ``S = min(#accelerators, L)`` gets blocks ``[k·L/S, (k+1)·L/S)`` (floors); the
  ops before the first block (embeddings) go on the first stage and those after the last block (norm, head, loss)
  on the last.
- ``even-layers-weighted``: torchtitan's ``input_weight`` / ``output_weight``: the embedding counts as ``w_in``
  layers and the head + loss as ``w_out``; the ``L + w_in + w_out`` effective layers are dealt out evenly (the
  remainder to the first stages, as torchtitan does) and the first and last stages take ``w_in`` / ``w_out``
  fewer blocks. torchtitan leaves the weights to the user (default 1 each); we set each to what a user reading
  a profile would: the pre (post) units' compute over the mean block's, rounded, at least 1, and lowered until
  every stage's share covers it (torchtitan refuses a weight above the per-stage layer count).

Costs, memory and links are not looked at beyond the weights: this is the split users write by hand; an
over-full device shows up as OOM in the simulator. Deterministic (``seed`` unused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import accelerators, finish, groups_of
from placer.baselines._layers import Layers, find_layers, stages_to_placement
from placer.baselines.registry import register

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def even_blocks(num_blocks: int, num_stages: int) -> list[int]:
    """Blocks per stage of the even split: stage ``k`` gets ``[k·L/S, (k+1)·L/S)``."""
    cuts = [k * num_blocks // num_stages for k in range(num_stages + 1)]
    return [cuts[k + 1] - cuts[k] for k in range(num_stages)]


def weighted_blocks(num_blocks: int, num_stages: int, input_weight: int, output_weight: int) -> list[int]:
    """Blocks per stage of torchtitan's weighted split (module docstring); weights must not exceed the per-stage
    layer count ``(L + w_in + w_out) // S`` (a one-line ``ValueError`` otherwise, as torchtitan)."""
    if num_stages == 1:
        return [num_blocks]
    effective = num_blocks + input_weight + output_weight
    per, extra = divmod(effective, num_stages)
    if max(input_weight, output_weight) > per:
        raise ValueError(f"layer weights {input_weight}/{output_weight} exceed {per} layers per stage")
    sizes = [per + (k < extra) for k in range(num_stages)]
    sizes[0] -= input_weight
    sizes[-1] -= output_weight
    out, left = [], num_blocks
    for size in sizes:  # torchtitan stops handing out blocks when they run out
        take = min(size, left)
        out.append(take)
        left -= take
    out[-1] += left
    return out


def layer_weights(layers: Layers, unit_time_s: np.ndarray, num_stages: int) -> tuple[int, int]:
    """``(w_in, w_out)``: the pre and post units' compute in mean blocks (module docstring)."""
    blocks = unit_time_s[layers.first_block:layers.first_block + layers.num_blocks]
    mean = float(blocks.mean()) if blocks.size and blocks.mean() > 0 else 1.0

    def weight(units: range) -> int:
        return max(1, int(round(float(unit_time_s[list(units)].sum()) / mean))) if len(units) else 0

    w_in, w_out = weight(layers.pre), weight(layers.post)
    while max(w_in, w_out) > (layers.num_blocks + w_in + w_out) // num_stages and max(w_in, w_out) > 0:
        if w_in >= w_out:
            w_in -= 1
        else:
            w_out -= 1
    return w_in, w_out


def _place(graph: "OpGraph", cluster: "Cluster", *, weighted: bool) -> "Placement":
    groups = groups_of(graph, cluster)
    devices = accelerators(cluster)
    if groups.num == 0:
        return finish(graph, cluster, groups, np.zeros(0, dtype=np.int64))
    layers = find_layers(graph, groups)
    # no more stages than blocks (torchtitan refuses more): the spare accelerators stay idle
    s = min(len(devices), max(1, layers.num_blocks))
    devices = devices[:s]
    if weighted:
        w_in, w_out = layer_weights(layers, layers.unit_sums(groups.time_s[:, devices[0]]), s)
        counts = weighted_blocks(layers.num_blocks, s, w_in, w_out)
    else:
        counts = even_blocks(layers.num_blocks, s)
    bounds = [0] + [layers.first_block + int(c) for c in np.cumsum(counts)]
    bounds[-1] = layers.num  # the post units go with the last stage
    return stages_to_placement(graph, cluster, groups, layers, bounds, devices)


@register("even-layers")
def place_even_layers(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """torchtitan's even split of the repeated blocks over the accelerators."""
    return _place(graph, cluster, weighted=False)


@register("even-layers-weighted")
def place_even_layers_weighted(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """torchtitan's split with the embedding and the head + loss counted as layers."""
    return _place(graph, cluster, weighted=True)
