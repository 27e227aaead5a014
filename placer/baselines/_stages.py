"""Contiguous pipeline stages with the memory a schedule needs: the search ``pipedream-dp`` and ``hetero-dp`` share.

Colocation groups in their order (:class:`placer.baselines._common.Groups`) are cut into contiguous stages, stage
``k`` on device ``order[k]`` (a stage may be empty: its device is skipped). A stage costs

- **time** ``T_k(i..j)``: forward+backward time of its groups on its own device (its kind's costs / speed), and
  ``C_k(i)``: the bytes crossing cut ``i`` sent forward and their gradients back (``2 × bytes``) over the mean
  link into the device plus latency (PipeDream's cost model); the objective is the slowest stage, ``max_k
  max(T_k, C_k)`` (PipeDream, SOSP 2019, §3.1);
- **memory**: ``4 × params`` (:data:`placer.costmodel.costs.PARAM_COPIES`) plus the activation stash the schedule
  keeps resident, the simulator's rule: GPipe (and ``none``) hold all ``M`` micro-batches, i.e. the whole stash;
  1F1B's stage ``k`` of ``S`` holds at most ``min(S − k, M)`` micro-batches of ``stash / M`` each.

The min-max split for a fixed device order (to 1e-9 relative): binary search on the bottleneck ``B`` with a greedy
probe that fills the stages from the last one back, each starting as early as ``B``, its memory and its input
transfer allow (feasibility is monotone in where a stage ends, so the earliest start is never worse). Filling
from the back leaves the early stages, which 1F1B makes hold the most micro-batches, the least work and stash
(PipeDream's DP breaks its ties similarly). Each probe costs ``O(S log G)`` plus one vector pass, so searching
every candidate is milliseconds on a 1000-op graph; the chosen candidate is then re-split by PipeDream's own
recurrence (:func:`dp_in_order`, one ``(G+1)²`` matrix per stage, ~0.1 s at 1000 groups) so that ties break as
PipeDream's did.

Fewer stages can be faster: with ``M`` micro-batches a pipeline takes about ``(Σ_k t_k + (M − 1) × B) / M`` (one
micro-batch through every stage to fill and drain, then ``M − 1`` more at the bottleneck's pace; ``t_k`` is stage
``k``'s ``max(T_k, C_k)``), which for balanced stages is the textbook ``B × (M + S − 1) / M``; :func:`best_split`
tries every candidate device list (each ``S``) and keeps the smallest estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines._common import Groups
from placer.baselines.baechi import transfer_matrix_s
from placer.costmodel.costs import PARAM_COPIES

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster

MEMORY_SCHEDULES = ("none", "gpipe", "1f1b")
"""Schedules whose stage memory :func:`stash_fraction` models."""


def stash_fraction(schedule: str, num_stages: int, microbatches: int) -> np.ndarray:
    """``(S,)`` share of each stage's activation stash resident at its peak under ``schedule`` (module docstring)."""
    if schedule not in MEMORY_SCHEDULES:
        raise ValueError(f"stage memory is modelled for schedules {', '.join(MEMORY_SCHEDULES)}, not {schedule!r}")
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if schedule != "1f1b":
        return np.ones(num_stages)
    in_flight = np.minimum(num_stages - np.arange(num_stages), microbatches)
    return in_flight / microbatches


def cut_bytes(groups: Groups) -> np.ndarray:
    """``cut[i]``: bytes over edges between groups ``< i`` and ``≥ i`` (``i`` in ``0..G``)."""
    diff = np.zeros(groups.num + 2, dtype=np.int64)
    np.add.at(diff, groups.src + 1, groups.edge_bytes)
    np.add.at(diff, groups.dst + 1, -groups.edge_bytes)
    return np.cumsum(diff)[: groups.num + 1]


@dataclass(frozen=True, eq=False)
class StageProblem:
    """Prefix sums of one graph on one cluster, shared by every device order tried."""

    groups: Groups
    cluster: "Cluster"
    time_pre: np.ndarray
    """``(D, G+1)`` prefix sums of group time on each device."""
    param_pre: np.ndarray
    """``(G+1,)`` prefix sums of resident parameter bytes (``PARAM_COPIES × params``)."""
    stash_pre: np.ndarray
    """``(G+1,)`` prefix sums of activation stash bytes (all micro-batches)."""
    cut: np.ndarray
    """``(G+1,)`` bytes crossing each cut."""

    @classmethod
    def build(cls, graph: "OpGraph", cluster: "Cluster", groups: Groups) -> "StageProblem":
        def per_group(values: np.ndarray) -> np.ndarray:
            return np.bincount(groups.group_of_op, weights=values.astype(np.float64), minlength=groups.num)

        zero = np.zeros((cluster.num_devices, 1))
        return cls(groups=groups, cluster=cluster,
                   time_pre=np.concatenate([zero, np.cumsum(groups.time_s.T, axis=1)], axis=1),
                   param_pre=np.concatenate([[0.0], np.cumsum(per_group(graph.param_bytes) * PARAM_COPIES)]),
                   stash_pre=np.concatenate([[0.0], np.cumsum(per_group(graph.stash_bytes))]),
                   cut=cut_bytes(groups).astype(np.float64))

    def comm_s(self, order: list[int]) -> np.ndarray:
        """``(S, G+1)`` input transfer time of a stage starting at each cut, per device of ``order``."""
        lat, inv_bw = transfer_matrix_s(self.cluster)
        rows = []
        for dev in order:
            others = [o for o in order if o != dev]
            in_lat = float(lat[others, dev].mean()) if others else 0.0
            in_inv_bw = float(inv_bw[others, dev].mean()) if others else 0.0
            rows.append(np.where(self.cut > 0, in_lat + 2.0 * self.cut * in_inv_bw, 0.0))
        return np.array(rows).reshape(len(order), self.cut.size)


@dataclass(frozen=True)
class Split:
    """One contiguous split: its slowest stage, the stages it uses and the device of every group."""

    bottleneck_s: float
    """The slowest stage, ``max_k t_k`` (whole batch)."""
    stage_sum_s: float
    """``Σ_k t_k`` over the used stages (whole batch)."""
    stages: int
    """Non-empty stages."""
    dev_of_group: np.ndarray
    """``(G,)`` device of each colocation group."""

    def estimate_s(self, microbatches: int) -> float:
        """Pipelined step estimate ``(Σ t_k + (M − 1) × B) / M`` (module docstring)."""
        return (self.stage_sum_s + (microbatches - 1) * self.bottleneck_s) / microbatches


def _probe(prob: StageProblem, order: list[int], comm: np.ndarray, mem_pre: list[np.ndarray], cap: np.ndarray,
           limit_s: float) -> list[int] | None:
    """Stage bounds (one more than stages) of the greedy split under bottleneck ``limit_s``, or None. From the
    last stage back, each takes the earliest start whose time, memory and input transfer fit (a stage that cannot
    start anywhere in reach stays empty); a later end never hurts the stages before it."""
    g_num = prob.cut.size - 1
    j, starts = g_num, []  # starts of stages S-1, S-2, ...
    for k in range(len(order) - 1, -1, -1):
        pre = prob.time_pre[order[k]]
        i = max(int(np.searchsorted(pre, pre[j] - limit_s, side="left")),
                int(np.searchsorted(mem_pre[k], mem_pre[k][j] - cap[k], side="left")))
        if i == 0:
            return [0] * (k + 1) + starts[::-1] + [g_num]
        if k == 0:
            return None
        ok = np.flatnonzero(comm[k, i:j] <= limit_s)
        if ok.size:
            j = i + int(ok[0])
        starts.append(j)
    return None


def _stage_times(prob: StageProblem, order: list[int], comm: np.ndarray, bounds: list[int]) -> list[float]:
    """``t_k = max(T_k, C_k)`` of every non-empty stage."""
    return [max(float(prob.time_pre[dev][bounds[k + 1]] - prob.time_pre[dev][bounds[k]]), float(comm[k, bounds[k]]))
            for k, dev in enumerate(order) if bounds[k + 1] > bounds[k]]


def _limits(prob: StageProblem, order: list[int], schedule: str, microbatches: int,
            use_memory: bool) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """``(comm, memory prefix sums per stage, capacity per stage)`` of a device order."""
    frac = stash_fraction(schedule, len(order), microbatches)
    cap = np.array([prob.cluster.devices[d].memory_bytes if use_memory else np.inf for d in order], dtype=float)
    return prob.comm_s(order), [prob.param_pre + f * prob.stash_pre for f in frac], cap


def _split(prob: StageProblem, order: list[int], comm: np.ndarray, bounds: list[int]) -> Split:
    dev = np.zeros(prob.cut.size - 1, dtype=np.int64)
    for k, d in enumerate(order):
        dev[bounds[k]:bounds[k + 1]] = d
    times = _stage_times(prob, order, comm, bounds)
    return Split(bottleneck_s=max(times), stage_sum_s=sum(times), stages=len(times), dev_of_group=dev)


def split_in_order(prob: StageProblem, order: list[int], *, schedule: str, microbatches: int,
                   use_memory: bool = True) -> Split | None:
    """The min-bottleneck contiguous split on the devices of ``order`` in that order (None: nothing fits)."""
    comm, mem_pre, cap = _limits(prob, order, schedule, microbatches, use_memory)
    bounds = _probe(prob, order, comm, mem_pre, cap, np.inf)
    if bounds is None:
        return None
    lo, hi = 0.0, max(_stage_times(prob, order, comm, bounds))
    for _ in range(64):
        if hi - lo <= 1e-9 * hi:
            break
        trial = _probe(prob, order, comm, mem_pre, cap, 0.5 * (lo + hi))
        if trial is None:
            lo = 0.5 * (lo + hi)
        else:
            bounds, hi = trial, max(_stage_times(prob, order, comm, trial))
    return _split(prob, order, comm, bounds)


def dp_in_order(prob: StageProblem, order: list[int], *, schedule: str, microbatches: int,
                use_memory: bool = True) -> Split | None:
    """PipeDream's recurrence (``pipedream.py``'s docstring) on ``order``, one ``(G+1)²`` matrix per stage:
    the same bottleneck as :func:`split_in_order`, with PipeDream's tie-breaking (the earliest start of each
    stage, counted from the last, and a device left empty only when that is strictly better)."""
    comm, mem_pre, cap = _limits(prob, order, schedule, microbatches, use_memory)
    g_num = prob.cut.size - 1
    later = np.triu(np.ones((g_num + 1, g_num + 1), dtype=bool), 1)  # [i, j]: i < j
    best = np.full(g_num + 1, np.inf)
    best[0] = 0.0
    choices = []
    for k, dev in enumerate(order):
        pre = prob.time_pre[dev]
        cost = np.maximum(np.maximum(best[:, None], pre[None, :] - pre[:, None]), comm[k][:, None])
        cost[~later | (mem_pre[k][None, :] - mem_pre[k][:, None] > cap[k])] = np.inf
        start = np.argmin(cost, axis=0)
        value = cost[start, np.arange(g_num + 1)]
        take = value < best
        choices.append(np.where(take, start, -1))
        best = np.where(take, value, best)
    if not np.isfinite(best[g_num]):
        return None
    bounds, j = [g_num], g_num
    for k in range(len(order) - 1, -1, -1):
        if choices[k][j] >= 0:
            j = int(choices[k][j])
        bounds.append(j)
    bounds[-1] = 0
    return _split(prob, order, comm, bounds[::-1])


DP_MAX_GROUPS = 2000
"""Largest graph (colocation groups) the final split is recomputed for by :func:`dp_in_order` (its matrices grow
as ``G²``); larger ones keep the greedy split."""


def best_split(prob: StageProblem, candidates: list[list[int]], *, schedule: str, microbatches: int,
               use_memory: bool = True) -> Split | None:
    """The candidate order (a device list; fewer devices = fewer stages) whose split has the smallest pipelined
    estimate (ties: the earlier candidate), recomputed with PipeDream's tie-breaking when the graph is small
    enough (:data:`DP_MAX_GROUPS`)."""
    best: tuple[Split, list[int]] | None = None
    for order in candidates:
        split = split_in_order(prob, order, schedule=schedule, microbatches=microbatches, use_memory=use_memory)
        if split is not None and (best is None or split.estimate_s(microbatches) < best[0].estimate_s(microbatches)):
            best = split, order
    if best is None or prob.cut.size - 1 > DP_MAX_GROUPS:
        return None if best is None else best[0]
    exact = dp_in_order(prob, best[1], schedule=schedule, microbatches=microbatches, use_memory=use_memory)
    return exact if exact is not None else best[0]
