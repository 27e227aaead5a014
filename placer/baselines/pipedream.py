"""``pipedream-dp``: contiguous pipeline stages by PipeDream's partitioning (Narayanan et al., "PipeDream:
Generalized Pipeline Parallelism for DNN Training", SOSP 2019, §3.1), extended to the memory a schedule needs.

Colocation groups in topological order (of their first ops) are cut into contiguous stages, one per device,
each device used at most once in a fixed order. PipeDream's recurrence without data-parallel replication::

    A[k][j] = min( A[k-1][j],                                   # device k left empty
                   min_{i<j} max(A[k-1][i], T_k(i..j), C(i)) )   # groups i..j-1 on device k

``T_k(i..j)``: forward+backward time of those groups on device ``k`` (∞ when they do not fit its memory);
``C(i)``: time to send the bytes crossing cut ``i`` forward and their gradients back (``2 × bytes``) over the mean
link into device ``k``, plus latency. The objective is the slowest stage, i.e. pipelined throughput.
:mod:`placer.baselines._stages` finds that optimum quickly for every candidate device list (binary search on the
bottleneck with a greedy probe) and recomputes the chosen one with this recurrence, so ties break as PipeDream's.

Extensions (issue #20):

- **Schedule memory.** A stage holds what the schedule keeps resident
  (:func:`placer.baselines._stages.stash_fraction`); the registered method assumes **1F1B with**
  :data:`MICROBATCHES` micro-batches (stage ``k`` of ``S`` holds ``min(S − k, M)`` micro-batches of stash), so it
  neither rules out a split that only GPipe's memory forbids nor hands back one that OOMs under 1F1B when a
  fitting one exists. A split whose 1F1B order would deadlock (a device holding several chunks, e.g. an unrolled
  RNN's shared cells: the schedule builder then runs GPipe's order) is re-planned with GPipe's memory.
- **Fewer stages.** Every number of stages ``S`` is tried (the first ``S`` devices of each order) and the
  smallest pipelined estimate kept (:mod:`placer.baselines._stages`): fewer stages win when fill and drain or the
  transfers cost more than the finer split saves.

:func:`place_pipedream` with ``schedule="none", fewer_stages=False`` is the method before these extensions
(whole stash, every device).

Two device orders are tried (cluster order, and fastest device first) and the better kept. Stages go to the
accelerators only when the cluster also has a host CPU (PipeDream's workers are GPUs); a CPU-only cluster uses all
its devices. When no split fits memory the split is recomputed without the memory limit and returned (the
simulator reports the OOM). Deterministic (``seed`` unused).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import Groups, accelerators, finish, groups_of
from placer.baselines._stages import Split, StageProblem, best_split
from placer.baselines.registry import register
from placer.costmodel.schedules import SCHEDULES, is_stage_contiguous

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement

SCHEDULE = "1f1b"
"""The schedule whose stage memory the registered method respects."""
MICROBATCHES = 8
"""Micro-batches the registered method assumes for memory and for the fill-and-drain estimate."""


def plan_stages(graph: "OpGraph", cluster: "Cluster", candidates, *, schedule: str,
                microbatches: int) -> tuple[Groups, Split | None]:
    """The best split over ``candidates(groups) -> list of device orders``: memory respected when any split fits,
    else the best without the limit; ``None`` only for a graph without ops."""
    groups = groups_of(graph, cluster)
    if groups.num == 0:
        return groups, None
    prob = StageProblem.build(graph, cluster, groups)
    orders = candidates(groups)
    for use_memory in (True, False):
        split = best_split(prob, orders, schedule=schedule, microbatches=microbatches, use_memory=use_memory)
        if split is not None and use_memory and schedule == "1f1b" and not _runs_1f1b(graph, cluster, groups,
                                                                                        split, microbatches):
            # a device holding several chunks whose 1F1B order would deadlock runs GPipe's: its memory rules
            split = best_split(prob, orders, schedule="gpipe", microbatches=microbatches) or split
        if split is not None:
            return groups, split
    raise ValueError(f"no stage split for graph {graph.name!r}")  # unreachable: without memory every split fits


def _runs_1f1b(graph: "OpGraph", cluster: "Cluster", groups: Groups, split: Split, microbatches: int) -> bool:
    """Whether the schedule builder keeps 1F1B's order for this split (it falls back to GPipe's when a device
    holds several chunks and 1F1B's order would deadlock, as in an unrolled RNN's shared cells)."""
    dev_of_op = split.dev_of_group[groups.group_of_op]
    return SCHEDULES["1f1b"](graph, dev_of_op, cluster.num_devices, microbatches=microbatches).order == "1f1b"


def place_stages(graph: "OpGraph", cluster: "Cluster", candidates, *, schedule: str,
                 microbatches: int) -> "Placement":
    """:func:`plan_stages` as a placement; a split whose ops return to an earlier stage is kept only if the
    simulator finds it faster than the whole graph on the first stage's device (:func:`_unless_returning`)."""
    groups, split = plan_stages(graph, cluster, candidates, schedule=schedule, microbatches=microbatches)
    dev = np.zeros(0, dtype=np.int64) if split is None else split.dev_of_group
    placement = finish(graph, cluster, groups, dev)
    return placement if split is None or split.stages < 2 else _unless_returning(graph, cluster, placement)


def _unless_returning(graph: "OpGraph", cluster: "Cluster", placement: "Placement") -> "Placement":
    """The stage estimate assumes data flows from a stage to later ones. A colocation group whose ops lie far
    apart (a module called in a loop, a parameter read early and late) is cut in the order of its first op, so
    the step goes back and forth between devices and the estimate is far off (a looped shared block: 3.25 ms
    simulated against 0.72 ms on one device). Then both are simulated under their best plan, and the faster kept."""
    if is_stage_contiguous(graph, placement):
        return placement
    from placer.core.placement import Placement
    from placer.costmodel.plans import best_plan
    from placer.costmodel.sim import get_simulator

    sim = get_simulator(graph, cluster)
    one = Placement.single(graph, int(placement.device_of_op[0]))
    split_s, one_s = (best_plan(sim, p)[1].step_time_s for p in (placement, one))
    return one if one_s < split_s else placement


def pipedream_candidates(cluster: "Cluster", groups: Groups, *, fewer_stages: bool = True) -> list[list[int]]:
    """Device orders ``pipedream-dp`` splits over: the accelerators in cluster order and fastest first, and with
    ``fewer_stages`` every prefix of each (a prefix of ``S`` devices is an ``S``-stage pipeline)."""
    devs = accelerators(cluster)
    orders = [devs]
    fastest = [devs[int(x)] for x in np.argsort(-groups.throughput(devs), kind="stable")]
    if fastest != orders[0]:
        orders.append(fastest)
    if not fewer_stages:
        return orders
    return [o[:s] for s in range(1, len(devs) + 1) for o in orders]


def place_pipedream(graph: "OpGraph", cluster: "Cluster", *, schedule: str = SCHEDULE,
                    microbatches: int = MICROBATCHES, fewer_stages: bool = True) -> "Placement":
    """PipeDream's split with ``schedule``'s stage memory; ``fewer_stages`` also tries prefixes of each order."""
    return place_stages(graph, cluster, lambda groups: pipedream_candidates(cluster, groups, fewer_stages=fewer_stages),
                        schedule=schedule, microbatches=microbatches)


@register("pipedream-dp")
def place_pipedream_dp(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """PipeDream's stage-partitioning DP (no replication), 1F1B stage memory, fewer stages when faster."""
    return place_pipedream(graph, cluster)
