"""``hetero-dp``: contiguous pipeline stages for a cluster of mixed device kinds (e.g. 4 A100 + 4 H100), in the
spirit of heterogeneity-aware pipeline planners (Park et al., "HetPipe", USENIX ATC 2020; Um et al., "Metis: Fast
Automatic Distributed Training on Heterogeneous GPUs", USENIX ATC 2024): PipeDream's contiguous min-max split
(:mod:`placer.baselines._stages`) where

- a stage's time is its groups' time on **its own device kind** (``graph.costs[kind]`` / speed), so the split
  gives a faster device a heavier stage;
- the **order of device kinds** along the pipeline is searched: every permutation of the kinds (up to
  :data:`MAX_KIND_PERMUTATIONS`; beyond, fastest-first and slowest-first), devices of one kind kept together in
  cluster order — the first and last stages hold the embedding and the head, so which kind sits at each end
  matters;
- the **number of stages** ``S`` is searched too, using the ``S`` fastest devices (ties: cluster order), with the
  pipelined estimate of :mod:`placer.baselines._stages`;
- memory per device is its own capacity, against what 1F1B with ``M`` micro-batches keeps resident.

The candidates include ``pipedream-dp``'s (first, so ties go to its split): on a cluster of one kind the two
agree, and on a mixed one hetero-dp's estimate is never worse. When no split fits
memory the best split without the limit is returned (the simulator reports the OOM). Deterministic (``seed``
unused).
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import Groups, accelerators
from placer.baselines.pipedream import MICROBATCHES, SCHEDULE, pipedream_candidates, place_stages
from placer.baselines.registry import register

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement

MAX_KIND_PERMUTATIONS = 24
"""Most device-kind orders tried (4 kinds); more kinds try only fastest-first and slowest-first."""


def kind_orders(cluster: "Cluster", devices: list[int], throughput: np.ndarray) -> list[list[str]]:
    """Orders of the device kinds among ``devices`` to try along the pipeline (fastest kind first leads)."""
    speed: dict[str, float] = {}
    for d, t in zip(devices, throughput):
        speed[cluster.devices[d].kind] = max(speed.get(cluster.devices[d].kind, 0.0), float(t))
    fastest = sorted(speed, key=lambda k: -speed[k])
    perms = itertools.permutations(fastest)
    if len(fastest) > 4:
        return [fastest, fastest[::-1]]
    return [list(p) for p in itertools.islice(perms, MAX_KIND_PERMUTATIONS)]


def hetero_candidates(cluster: "Cluster", groups: Groups) -> list[list[int]]:
    """Device orders to split over: ``pipedream-dp``'s candidates (all of them on one kind), then for each stage
    count ``S`` the ``S`` fastest accelerators in each kind order."""
    devs = accelerators(cluster)
    thr = groups.throughput(devs)
    by_speed = [devs[int(x)] for x in np.argsort(-thr, kind="stable")]
    out = pipedream_candidates(cluster, groups)  # first, so hetero-dp's estimate is never worse than pipedream-dp's
    kinds = kind_orders(cluster, devs, thr)
    if len(kinds) == 1:
        return out
    for s in range(1, len(devs) + 1):
        chosen = set(by_speed[:s])
        for kind_order in kinds:
            order = [d for k in kind_order for d in devs if d in chosen and cluster.devices[d].kind == k]
            if order not in out:
                out.append(order)
    return out


@register("hetero-dp")
def place_hetero_dp(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """Contiguous min-max stages over mixed device kinds, the kind order and the stage count searched."""
    return place_stages(graph, cluster, lambda groups: hetero_candidates(cluster, groups), schedule=SCHEDULE,
                        microbatches=MICROBATCHES)
