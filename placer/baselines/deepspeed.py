"""``deepspeed-parameters`` and ``deepspeed-uniform``: DeepSpeed's ``PipelineModule(partition_method=...)`` (Rasley
et al., "DeepSpeed: System Optimizations Enable Training Deep Learning Models with Over 100 Billion Parameters",
KDD 2020; ``deepspeed/runtime/pipe/module.py``, ``PipelineModule._partition_layers``).

A ``PipelineModule`` is a flat list of layers cut into ``num_stages`` contiguous parts. Our layer list is the
model's units (:func:`placer.baselines._layers.find_layers`: embeddings, each repeated block, norm, head, loss),
one part per accelerator in cluster order. What we reproduce (written here, not copied; no deepspeed import):

- ``uniform`` → ``ds_utils.partition_uniform(num_items=len(layers), num_parts)``: every part gets
  ``len // parts`` layers and the first ``len % parts`` parts one more; with fewer layers than parts, one layer
  per part and the last parts empty.
- ``parameters`` → ``partition_balanced(weights=param counts, num_parts)``: each layer weighs its trainable
  parameter count (``_count_layer_params``; layers without parameters weigh 0) and the parts are cut to make the
  heaviest part as light as possible. DeepSpeed's older releases binary-search that bottleneck with a greedy
  probe (``_rb_partition_balanced`` / ``_lprobe``), newer ones solve the linear-partition problem by dynamic
  programming; we solve it exactly by DP over prefix sums with non-empty parts (ties: the earliest cut). A graph
  without parameters falls back to ``uniform``.

Parameter bytes stand in for counts (same dtype throughout, so the split is the same). Neither method looks at
time, memory or links; an over-full device shows up as OOM in the simulator. Deterministic (``seed`` unused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import accelerators, finish, groups_of
from placer.baselines._layers import find_layers, stages_to_placement
from placer.baselines.registry import register

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """Part boundaries ``[0, ..., num_items]`` (``num_parts + 1`` of them) with balanced item counts."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    chunk, residual = divmod(num_items, num_parts)
    return [p * chunk + min(p, residual) for p in range(num_parts + 1)]


def partition_balanced(weights: np.ndarray, num_parts: int) -> list[int]:
    """Part boundaries of ``weights`` into ``num_parts`` non-empty contiguous parts minimising the heaviest part
    (uniform when there are no more items than parts)."""
    w = np.asarray(weights, dtype=np.float64)
    n = w.size
    if n <= num_parts:
        return partition_uniform(n, num_parts)
    pre = np.concatenate([[0.0], np.cumsum(w)])
    best = np.full((num_parts + 1, n + 1), np.inf)
    best[0, 0] = 0.0
    cut = np.zeros((num_parts + 1, n + 1), dtype=np.int64)
    for p in range(1, num_parts + 1):
        for i in range(p, n - (num_parts - p) + 1):  # leave one item for every later part
            k = np.arange(p - 1, i)
            cost = np.maximum(best[p - 1, k], pre[i] - pre[k])
            m = int(np.argmin(cost))
            best[p, i], cut[p, i] = cost[m], k[m]
    bounds = [n]
    for p in range(num_parts, 0, -1):
        bounds.append(int(cut[p, bounds[-1]]))
    return bounds[::-1]


def _place(graph: "OpGraph", cluster: "Cluster", method: str) -> "Placement":
    groups = groups_of(graph, cluster)
    devices = accelerators(cluster)
    if groups.num == 0:
        return finish(graph, cluster, groups, np.zeros(0, dtype=np.int64))
    layers = find_layers(graph, groups)
    params = layers.unit_sums(np.bincount(groups.group_of_op, weights=graph.param_bytes.astype(np.float64),
                                          minlength=groups.num))
    if method == "parameters" and params.sum() > 0:
        bounds = partition_balanced(params, len(devices))
    else:
        bounds = partition_uniform(layers.num, len(devices))
    return stages_to_placement(graph, cluster, groups, layers, bounds, devices)


@register("deepspeed-parameters")
def place_deepspeed_parameters(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """DeepSpeed's ``partition_method="parameters"``: layers balanced by parameter count."""
    return _place(graph, cluster, "parameters")


@register("deepspeed-uniform")
def place_deepspeed_uniform(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """DeepSpeed's ``partition_method="uniform"``: balanced layer counts."""
    return _place(graph, cluster, "uniform")
