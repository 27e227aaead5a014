"""``expert-parallel``: expert parallelism over the pipeline's devices, the split MoE users run (DeepSpeed-MoE,
Rajbhandari et al., ICML 2022; Megatron-LM's expert parallel; torchtitan's EP beside PP).

The dense part (embeddings, attention, routers, shared experts, norm, head, loss) is split as
``even-layers-weighted`` splits it (torchtitan's layer split, :mod:`placer.baselines.even_layers`); then the routed
experts of every MoE block, the modules ``<...>.experts.<k>`` (DeepSeekMoE, Mixtral, Qwen-MoE naming), are dealt
round-robin over the accelerators (those the split left idle first), expert ``k`` on the ``k mod E``-th, except the
one that holds the head and loss: the last stage carries the vocabulary projection, the step's largest op, and
adding experts there would lengthen the pipeline's slowest stage (with one accelerator they stay with it).

Every device then holds a slice of every MoE block, so each block's tokens fan out to all devices and back: the
in-order pipeline schedules serialise that badly, and ``dataflow`` (:mod:`placer.costmodel.schedules`) is the order
that runs it, as the expert-parallel runtimes overlap their all-to-alls with other micro-batches' work.
A graph without routed experts is refused (one-line ``ValueError``), as ``single-gpu`` is on a cluster without GPU.
Deterministic (``seed`` unused); memory is not looked at (an over-full device is the simulator's OOM).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import accelerators
from placer.baselines.even_layers import place_even_layers_weighted
from placer.baselines.registry import register
from placer.core.placement import Placement

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster

EXPERT = re.compile(r"(?:^|\.)experts\.(\d+)(?:\.|$)")
"""A routed expert's module path: ``blocks.3.moe.experts.5.fc`` is expert 5."""


def expert_index(module_paths: "tuple[str, ...] | list[str]") -> np.ndarray:
    """Per op, the index of the routed expert it belongs to (-1: not in an expert)."""
    return np.array([int(m.group(1)) if (m := EXPERT.search(p or "")) else -1 for p in module_paths],
                    dtype=np.int64)


@register("expert-parallel")
def place_expert_parallel(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """Routed experts round-robin over the accelerators but the head's, the rest as torchtitan's weighted split."""
    expert = expert_index(graph.module_paths)
    if not (expert >= 0).any():
        raise ValueError(f"graph {graph.name!r} has no routed experts (modules '<...>.experts.<k>')")
    dev = np.array(place_even_layers_weighted(graph, cluster).device_of_op, dtype=np.int64)
    devices = accelerators(cluster)
    head = int(dev[-1])
    split = set(dev.tolist())
    idle = [d for d in devices if d not in split]  # a short model leaves accelerators idle: they come first
    spread = idle + [d for d in devices if d != head and d not in idle] or devices
    moved = expert >= 0
    dev[moved] = np.asarray(spread, dtype=np.int64)[expert[moved] % len(spread)]
    return Placement(dev).colocated(graph)  # a group follows its first op (an expert shared across blocks)
