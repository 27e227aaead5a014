"""Plan refinement: local search over placements, each candidate scored by its best plan (:func:`best_plan`).

A policy (or a baseline) proposes placements; refinement polishes the best of them under the one measure that
counts, the simulated step of the placement's best schedule and micro-batch count. It works on the *runs* of a
placement (maximal ranges of consecutive op indices on one device; for a pipeline, its stages):

* **boundary moves**: shift the cut between two neighbouring runs by ``k`` ops either way (``k`` from half the
  longest run down to 1; a shift by a whole run removes it, which lets the search use fewer stages);
* **device swaps**: exchange the ops of two devices (on a mixed cluster, which stage gets the faster GPU);
* **starts** beside the given placements: contiguous splits balanced by compute over the ``S`` fastest
  devices for ``S`` in 1, 2, 4, ... ``D``, the interleaved splits over the same ``S`` fastest devices (``S >= 2``)
  with ``v = 2, 3, 4`` virtual stages per device (``vS`` balanced chunks, chunk ``j`` on device ``j mod S``), which
  ``interleaved-1f1b`` can run (on a mixed cluster the faster kind alone, interleaved, can beat every split that
  also feeds the slower one: gpt-1.3b on 4 A100 + 4 H100), the
  split balanced by 1F1B memory (:func:`placer.costmodel.tight.balanced_split`), and, where colocation groups of
  several ops carry the work (NMT's LSTM layers and output projection, each shared by all 30 time steps), the
  heaviest groups one per device (:func:`group_start`): a group that recurs through the whole op order follows
  its first op, so no contiguous split gives it a device of its own; and the heaviest group alone on the
  fastest device with the rest interleaved over the others (:func:`isolated_start`: a language model's
  vocabulary projection, one op with 0.9 of a device's share of the work in moe-paper on 8 GPUs).

An OOM placement scores above every feasible one, by how far its worst device is over memory
(:data:`INFEASIBLE_S`), so from a start that does not fit the search walks towards one that does.

Search: the :data:`CONTENDERS` best-scoring starts each climb (first-improvement hill climbing) for an equal
share of half the budget, then the best plan so far climbs on to a local optimum, then iterated local search
(random kicks of a few boundaries from the best plan, climb again) until the budget is spent. The start that
scores best is not always the one that climbs best (moe-paper on the mixed cluster: the climb from another of the
best starts ends 5% lower), and on a large graph one climb can take the whole budget, so several are given a
share. Colocation groups move with their first op. Deterministic for a seed and an evaluation budget; with a time
budget, how far it gets depends on the machine.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from graphs.grouping import colocation_first, colocation_index
from placer.costmodel.plans import Plan, allowed_microbatches, best_plan
from placer.costmodel.tight import balanced_split

if TYPE_CHECKING:
    from placer.core.result import StepResult
    from placer.costmodel.sim import Simulator


INFEASIBLE_S = 1e9
"""Score of an OOM placement per unit of its worst device's memory ratio (peak / capacity): above every
feasible step, so the search prefers any plan that fits, and among OOM ones descends towards fitting."""


INTERLEAVE_V = (2, 3, 4)
"""Virtual stages per device of the interleaved starts."""
ISOLATED_V = (4, 8)
"""Chunks per device of the other ops in the isolated-group starts (:func:`isolated_start`)."""
CONTENDERS = 3
"""Starts that climb before the search settles on one (module docstring)."""
_STALE_KICKS = 200
"""Kicks in a row that find nothing new before the search stops early (every neighbourhood seen)."""


@dataclass
class Refined:
    """The best plan found and how the search got there."""

    plan: Plan
    result: "StepResult"
    evaluations: int
    """Placements scored (each by :func:`best_plan`)."""
    start: str
    """Label of the start the best plan descends from."""
    start_step_s: float
    """That start's own best-plan step (before refinement)."""


class _Scorer:
    """Best-plan step of a placement, cached; colocation groups follow their first op."""

    def __init__(self, sim: "Simulator", deadline: float, max_evals: int | None) -> None:
        self.sim, self.deadline, self.max_evals = sim, deadline, max_evals
        self.coloc_first = colocation_first(sim.graph)
        self.cache: dict[bytes, float] = {}
        self.evals = 0

    def fix(self, dev: np.ndarray) -> np.ndarray:
        return dev[self.coloc_first]

    @property
    def done(self) -> bool:
        return time.perf_counter() >= self.deadline or (self.max_evals is not None and self.evals >= self.max_evals)

    @contextlib.contextmanager
    def capped(self, seconds: float, evals: int | None) -> Iterator[None]:
        """The budget cut to ``seconds`` more (and ``evals`` more scores, when bounded) for the block."""
        saved = self.deadline, self.max_evals
        self.deadline = min(self.deadline, time.perf_counter() + seconds)
        if self.max_evals is not None and evals is not None:
            self.max_evals = min(self.max_evals, self.evals + evals)
        try:
            yield
        finally:
            self.deadline, self.max_evals = saved

    def left(self) -> tuple[float, int | None]:
        """Seconds and (when bounded) scores left."""
        return (max(0.0, self.deadline - time.perf_counter()),
                None if self.max_evals is None else max(0, self.max_evals - self.evals))

    def __call__(self, dev: np.ndarray) -> float:
        key = dev.tobytes()
        t = self.cache.get(key)
        if t is None:
            self.evals += 1
            res = best_plan(self.sim, dev)[1]
            if res.ok:
                t = res.step_time_s
            elif res.oom:  # worse than any feasible plan, but less over memory is better: the search can descend
                t = INFEASIBLE_S * float(np.max(res.peak_memory_bytes / self.sim.memory_bytes))
            else:
                t = np.inf
            self.cache[key] = t
        return t


def device_speed_order(sim: "Simulator") -> list[int]:
    """Devices fastest first (by the whole graph's forward+backward time on each)."""
    total = (sim.fwd_s + sim.bwd_s).sum(axis=1)
    return [int(d) for d in np.argsort(total, kind="stable")]


def balanced_runs(sim: "Simulator", devices: Sequence[int], runs: int | None = None,
                  ops: np.ndarray | None = None) -> np.ndarray:
    """Op-index order cut into ``runs`` (default ``len(devices)``) contiguous runs, run ``j`` on
    ``devices[j mod len(devices)]`` (``runs = 2 x len(devices)``: the interleaved split, v = 2). Each run's share of
    the compute is its device's speed (1 / the graph's time on it) over the runs' total: equal runs on devices of
    one kind, bigger runs for the faster kind of a mixed cluster. ``ops``: cut only these ops (index order), and
    return their devices."""
    runs = runs or len(devices)
    devs = np.asarray(devices, dtype=np.int64)
    ops = np.arange(sim.graph.n) if ops is None else np.asarray(ops, dtype=np.int64)
    work = (sim.fwd_s[devs][:, ops] + sim.bwd_s[devs][:, ops]).mean(axis=0)
    cum = np.cumsum(work) - work / 2
    total = float(work.sum()) or 1.0
    speed = 1.0 / np.maximum((sim.fwd_s[devs] + sim.bwd_s[devs]).sum(axis=1), 1e-300)
    share = speed[np.arange(runs) % len(devs)]
    ends = np.cumsum(share) / share.sum()  # where each run's share of the compute ends, as a fraction
    j = np.minimum(np.searchsorted(ends, cum / total, side="right"), runs - 1)
    return devs[j % len(devs)]


def default_starts(sim: "Simulator") -> dict[str, np.ndarray]:
    """Balanced contiguous splits over the 1, 2, 4, ... fastest devices and all ``D``, the interleaved splits
    (:data:`INTERLEAVE_V` virtual stages per device) over the same device sets from 2 up, the memory-balanced split
    and, where it applies, the heavy colocation groups one per device (:func:`group_start`); from 3 devices, the
    heaviest group alone on one device and the rest interleaved over the others (:func:`isolated_start`)."""
    order = device_speed_order(sim)
    d = len(order)
    out: dict[str, np.ndarray] = {}
    sizes = [1 << k for k in range(d.bit_length()) if 1 << k < d] + [d]
    for s in sizes:
        out[f"balanced-{s}"] = balanced_runs(sim, order[:s])
    for s in sizes[1:]:  # interleaved over the s fastest: on a mixed cluster the slow kind may be better left out
        for v in INTERLEAVE_V:
            out[f"interleaved-{s}x{v}"] = balanced_runs(sim, order[:s], v * s)
    if d > 1:
        # balanced by 1F1B memory instead of compute: what fits when memory is tight
        out[f"memory-balanced-{d}"] = balanced_split(sim.graph, sim.cluster, max(allowed_microbatches(sim.graph)))
        groups = group_start(sim)
        if groups is not None:
            out[f"groups-{d}"] = groups
    if d > 2:
        for v in ISOLATED_V:
            out[f"isolated-{d - 1}x{v}"] = isolated_start(sim, v)
    return out


def isolated_start(sim: "Simulator", v: int) -> np.ndarray:
    """The heaviest colocation group alone on the fastest device, every other op interleaved over the others
    (``v`` balanced chunks per device, :func:`balanced_runs`). Where one op carries a device's share of the work
    (a language model's vocabulary projection: 0.9 of it in moe-paper on 8 GPUs), every contiguous or interleaved
    split gives its device other work too, which the whole pipeline then waits for; the rest, with few
    micro-batches (a batch of 4), needs many chunks to keep its devices busy."""
    group, _ = colocation_index(sim.graph)
    heavy = int(np.argmax(np.bincount(group, weights=(sim.fwd_s + sim.bwd_s).min(axis=0))))
    order = device_speed_order(sim)
    dev = np.full(sim.graph.n, order[0], dtype=np.int64)
    rest = np.flatnonzero(group != heavy)
    if rest.size:
        dev[rest] = balanced_runs(sim, order[1:], v * (len(order) - 1), ops=rest)
    return dev


def group_start(sim: "Simulator") -> np.ndarray | None:
    """The ``D`` heaviest colocation groups of several ops, heaviest first, each on the least loaded device (LPT);
    then, in op order, every other op on the least loaded of its producers' devices (the chains stay local) unless
    that device would pass its fair share of the work (the whole graph's time spread over the devices by speed,
    so that all would finish together) and another device would end less loaded with it, then on the device least
    loaded with it; the graph's sources on that one too. Memory: a device is only chosen while its parameter
    states (x 4, Adam) and the whole batch's stash stay within its capacity (GPipe's peak, so any schedule fits),
    as long as some device has that room. None when no group has several ops."""
    graph = sim.graph
    group, g_num = colocation_index(graph)
    multi = np.flatnonzero(np.bincount(group) > 1)
    if not multi.size:
        return None
    d = sim.cluster.num_devices
    work = sim.fwd_s + sim.bwd_s  # (D, n): full-batch time of every op on every device
    group_work = np.stack([np.bincount(group, weights=work[k], minlength=g_num) for k in range(d)])
    need = np.bincount(group, weights=sim.param_bytes * 4.0 + sim.stash_bytes)  # bytes per group
    share = 1.0 / (1.0 / np.maximum(work.sum(axis=1), 1e-300)).sum()  # each device's time when all end together
    dev = np.full(graph.n, -1, dtype=np.int64)
    load, mem = np.zeros(d), np.zeros(d)

    def put(g: int, k: int) -> None:
        dev[group == g] = k
        load[k] += group_work[k, g]
        mem[k] += need[g]

    def room(g: int) -> np.ndarray:
        fits = mem + need[g] <= sim.memory_bytes
        return fits if fits.any() else mem + need[g] <= (mem + need[g]).min()

    for g in multi[np.argsort(-group_work[:, multi].mean(axis=0), kind="stable")][:d]:
        put(int(g), int(np.argmin(np.where(room(g), load + group_work[:, g], np.inf))))
    producers = graph.predecessors()
    for i in range(graph.n):  # op-index order is topological: a producer is placed before its readers
        if dev[i] >= 0:
            continue
        g, ok = int(group[i]), room(group[i])
        w = group_work[:, g]
        near = [q for q in set(dev[producers[i]].tolist()) if ok[q]]
        k = min(near, key=lambda q: (load[q], q)) if near else -1
        alt = int(np.argmin(np.where(ok, load + w, np.inf)))
        if k < 0 or (load[k] + w[k] > share and load[alt] + w[alt] < load[k] + w[k]):
            k = alt
        put(g, k)
    return dev


def _cuts(dev: np.ndarray) -> np.ndarray:
    """Op indices where a new run starts (excluding 0)."""
    return np.flatnonzero(dev[1:] != dev[:-1]) + 1


def _shift(dev: np.ndarray, cut: int, k: int) -> np.ndarray | None:
    """The cut at op index ``cut`` moved by ``k`` ops (positive: the left run grows)."""
    n = dev.shape[0]
    out = dev.copy()
    if k > 0:
        end = min(cut + k, n)
        out[cut:end] = dev[cut - 1]
    else:
        start = max(cut + k, 0)
        out[start:cut] = dev[cut]
    return None if np.array_equal(out, dev) else out


def _neighbours(dev: np.ndarray, rng: np.random.Generator, num_devices: int, swaps: bool) -> list[np.ndarray]:
    """Boundary moves at every scale (largest first, cuts in random order), then device swaps (``swaps``)."""
    cuts = _cuts(dev)
    if cuts.size == 0:
        return []
    lengths = np.diff(np.concatenate([[0], cuts, [dev.shape[0]]]))
    ks = []
    k = 1
    while k <= int(lengths.max()):
        ks.append(k)
        k *= 2
    out = []
    for k in reversed(ks):
        for c in rng.permutation(cuts):
            for sign in (1, -1):
                cand = _shift(dev, int(c), sign * k)
                if cand is not None:
                    out.append(cand)
    used = np.unique(dev) if swaps else []
    for a in used:
        for b in range(num_devices):
            if b != a and (b not in used or b > a):
                cand = dev.copy()
                cand[dev == a], cand[dev == b] = b, a
                out.append(cand)
    return out


def _devices_differ(sim: "Simulator") -> bool:
    """Whether exchanging two devices can change a step (other op times, memory or links); else swaps are idle."""
    same_ops = bool(np.all(sim.fwd_s == sim.fwd_s[0]) and np.all(sim.bwd_s == sim.bwd_s[0]))
    same_mem = bool(np.all(sim.memory_bytes == sim.memory_bytes[0]))
    off = ~np.eye(sim.cluster.num_devices, dtype=bool)
    same_links = bool(np.ptp(sim.bandwidth_Bps[off]) == 0 and np.ptp(sim.latency_s[off]) == 0) if off.any() else True
    return not (same_ops and same_mem and same_links)


def _climb(score: _Scorer, dev: np.ndarray, t: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """First-improvement hill climbing until no neighbour is better or the budget is spent."""
    d = score.sim.cluster.num_devices
    swaps = _devices_differ(score.sim)
    improved = True
    while improved and not score.done:
        improved = False
        for cand in _neighbours(dev, rng, d, swaps):
            if score.done:
                break
            cand = score.fix(cand)
            tc = score(cand)
            if tc < t * (1 - 1e-9):
                dev, t, improved = cand, tc, True
                break
    return dev, t


def _kick(dev: np.ndarray, rng: np.random.Generator, score: _Scorer) -> np.ndarray:
    """A few random boundary shifts (iterated local search's perturbation)."""
    for _ in range(int(rng.integers(1, 4))):
        cuts = _cuts(dev)
        if cuts.size == 0:
            break
        lengths = np.diff(np.concatenate([[0], cuts, [dev.shape[0]]]))
        k = int(rng.integers(1, max(2, int(lengths.max()) // 2)))
        got = _shift(dev, int(rng.choice(cuts)), k * int(rng.choice([-1, 1])))
        if got is not None:
            dev = score.fix(got)
    return dev


def refine(sim: "Simulator", starts: dict[str, np.ndarray] | None = None, *, budget_s: float = 10.0,
           max_evals: int | None = None, seed: int = 0, default: bool = True,
           contenders: int = CONTENDERS) -> Refined:
    """The best plan found from ``starts`` (label -> device per op; with ``default``, plus
    :func:`default_starts`) within ``budget_s`` seconds (and ``max_evals`` placements, when given); the
    ``contenders`` best-scoring starts each climb first (module docstring)."""
    score = _Scorer(sim, time.perf_counter() + budget_s, max_evals)
    rng = np.random.default_rng(seed)
    cands = {**(default_starts(sim) if default else {}), **(starts or {})}
    if not cands:
        raise ValueError("refine needs at least one start placement")
    scored = []
    for label, dev in cands.items():
        # a start's colocation groups follow their first op (the balanced splits cut through groups)
        dev = sim.device_array(score.fix(np.asarray(getattr(dev, "device_of_op", dev), dtype=np.int64)))
        scored.append((score(dev), label, dev))
    scored.sort(key=lambda x: (x[0], x[1]))
    best_t, best_label, best_dev = scored[0]
    start_t = {label: t for t, label, _ in scored}
    top = scored[:contenders]
    seconds, evals = score.left()  # half the budget shared by the best starts, then the best of them climbs on
    for t0, label, dev in top:
        with score.capped(seconds / (2 * len(top)), None if evals is None else evals // (2 * len(top))):
            dev, t = _climb(score, dev, t0, rng)
        if t < best_t:
            best_t, best_label, best_dev = t, label, dev
    best_dev, best_t = _climb(score, best_dev, best_t, rng)
    stale = 0
    while not score.done and stale < _STALE_KICKS:  # iterated local search from the best plan
        before = score.evals
        kicked = _kick(best_dev, rng, score)
        dev, t = _climb(score, kicked, score(kicked), rng)
        if t < best_t * (1 - 1e-9):
            best_t, best_dev = t, dev
        stale = stale + 1 if score.evals == before else 0  # only placements scored before: a small space, done
    plan, res = best_plan(sim, best_dev)
    return Refined(plan=plan, result=res, evaluations=score.evals, start=best_label,
                   start_step_s=start_t[best_label])
