"""Plans: an op placement together with its schedule, micro-batch count and virtual stages, and the search
that finds the best schedule and micro-batch count of a placement (``schedule="auto"``).

**Why a per-placement search and not extra decisions in the episode.** The schedule and ``M`` could be two
more actions of the environment's episode (the policy picks them after the groups). We choose them instead by
simulation, per placement: for a given placement the best (schedule, ``M``) is a small discrete argmin that the
simulator answers exactly in a few milliseconds, whereas a policy would have to *learn* it from a noisy reward
and every placement would be judged under a possibly bad schedule while it does (a placement that is good
under 1F1B x8 but scored under ``none`` gets no credit). The policy then searches the one thing simulation cannot
enumerate (the placement), and every reward is the placement's best achievable step. The price is evaluation
time: one ``auto`` evaluation simulates several plans; :func:`best_plan` keeps that small with the pruning below.
``benchmarks/bench_plan.py --compare-fixed`` measures one against the other (a fixed ``1f1b`` schedule env against
``auto``, same graph and search budget).

**The search** (:func:`best_plan`): candidates are ``none x1`` and, for every allowed ``M > 1``
(:func:`allowed_microbatches`: divisors of the graph's batch up to :data:`MAX_MICROBATCHES`, only 1 when the
graph was recorded as not micro-batchable), ``interleaved-1f1b`` (only where some device holds several
chunks: with one chunk per device it is exactly ``1f1b``), ``1f1b`` and ``gpipe``, and for every allowed ``M``
``dataflow`` (:mod:`placer.costmodel.schedules`), except on placements that are a chain of contiguous stages:
``torch.distributed.pipelining`` runs those with its own schedules, which a trainer can load (the price: the list
order can be faster there too, by 1% on gpt-medium's best two-stage split and 9% on the 8-op chain of
``tests/test_plans.py``). A candidate that is out of memory is simulated again with activation recomputation
(:mod:`placer.costmodel.recompute`) on the devices over memory, then on any still over: recomputation is paid only
where memory asks for it, never as a speed trade. A failed (OOM) plan is ``inf``. The fastest
wins; ties go to the simpler schedule (registry order: none, gpipe, 1f1b, interleaved-1f1b, dataflow), then to
fewer micro-batches. Settings skipped because they provably cannot win:

* ``gpipe`` / ``1f1b`` with ``M = 1`` run exactly ``none x1``'s order (``interleaved-1f1b x1`` does not where
  a device holds several chunks: it runs them chunk by chunk, and is tried);
* ``none x M`` (gradient accumulation) for ``M > 1`` is never faster than ``none x1`` (every micro-batch pays
  the per-op dispatch again, and runs the same chain), so it is only tried when ``none x1`` does not fit,
  smallest ``M`` first, as the memory saver;
* a placement on one device has no pipeline: only ``none`` (x ``M`` for memory) applies;
* a pipelined order that falls back to another order (a ``1f1b`` that would deadlock runs ``gpipe``'s) is the
  same task list as that order: simulated once;
* **work bound**: a device runs its tasks one after the other, so a plan's step is at least
  ``max_d (start_d + M x sum of its per-micro-batch op times + its update)``, which grows with ``M``
  (:meth:`placer.costmodel.sim.Simulator.microbatch_s`). A setting whose bound is not below the best step found so far
  cannot win and is not simulated. ``M`` is tried largest first (small bubbles first), so a good plan is
  found early and prunes the rest.

The schedules themselves come from :mod:`placer.costmodel.schedules` and the times from
:class:`placer.costmodel.sim.Simulator`, unchanged: :func:`run_plan` with a schedule name is ``Simulator.run``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from placer.core.result import StepResult, plan_label
from placer.costmodel.schedules import SCHEDULES, build_schedule, is_stage_contiguous, virtual_stages
from placer.costmodel.sim import OPTIMIZERS

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.placement import Placement
    from placer.costmodel.sim import Simulator

AUTO = "auto"
"""The schedule name that asks for the best schedule and micro-batch count of each placement."""
MAX_MICROBATCHES = 32
"""Largest micro-batch count the search tries."""
UNKNOWN_BATCH_MICROBATCHES = (1, 2, 4, 8)
"""Tried when a graph's batch size is unknown (hand-made and synthetic graphs carry no input shapes)."""
_REL_TIE = 1e-9
"""Two step times closer than this (relative) are a tie."""


def schedule_choices() -> list[str]:
    """Every name a ``--schedule`` option accepts: the registered schedules and :data:`AUTO`."""
    return [*SCHEDULES, AUTO]


def check_schedule(name: str) -> str:
    """``name`` if it is a registered schedule or ``auto``; a one-line ``ValueError`` otherwise."""
    if name not in SCHEDULES and name != AUTO:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(schedule_choices())}")
    return name


@dataclass(frozen=True, kw_only=True, eq=False)
class Plan:
    """What a trainer runs: an op placement, a schedule, its micro-batch count and the virtual stages."""

    device_of_op: np.ndarray
    """Device index per op (read-only)."""
    schedule: str
    """A key of :data:`placer.costmodel.schedules.SCHEDULES`."""
    microbatches: int
    """Micro-batches per step."""
    stage_of_device: tuple[int, ...] = field(default=())
    """Pipeline stage per device (-1 unused), from :func:`placer.costmodel.schedules.virtual_stages`."""
    virtual_stages: tuple[int, ...] = field(default=())
    """Chunks (virtual stages) per device (0 unused), from :func:`placer.costmodel.schedules.virtual_stages`."""
    recompute: tuple[int, ...] = field(default=())
    """Devices that recompute activations (checkpoint each segment or stage; keep only its inputs)."""

    @property
    def label(self) -> str:
        """``"1f1b x8"``, ``"1f1b x8 +recompute 0,1"``."""
        return plan_label(self.schedule, self.microbatches, self.recompute)

    def to_json(self) -> dict[str, Any]:
        """The schedule part of a placement document."""
        return {"name": self.schedule, "microbatches": int(self.microbatches),
                "stages": [int(s) for s in self.stage_of_device],
                "virtual_stages": [int(v) for v in self.virtual_stages],
                "recompute": [int(d) for d in self.recompute]}


def make_plan(graph: "OpGraph", placement: "Placement | np.ndarray", num_devices: int, schedule: str,
              microbatches: int, recompute: Sequence[int] = ()) -> Plan:
    """A :class:`Plan` with its stages computed from the placement."""
    dev = np.array(getattr(placement, "device_of_op", placement), dtype=np.int64)
    _, stage, chunks = virtual_stages(graph, dev, num_devices)
    dev.setflags(write=False)
    return Plan(device_of_op=dev, schedule=schedule, microbatches=int(microbatches),
                stage_of_device=tuple(int(s) for s in stage), virtual_stages=tuple(int(c) for c in chunks),
                recompute=tuple(sorted(int(d) for d in recompute)))


def allowed_microbatches(graph: "OpGraph", cap: int = MAX_MICROBATCHES) -> tuple[int, ...]:
    """Micro-batch counts a plan of ``graph`` may use, ascending: 1 only when the graph was recorded as not
    micro-batchable (:func:`graphs.microbatch.check_microbatchable`), else the divisors of its batch up to ``cap``
    (:data:`UNKNOWN_BATCH_MICROBATCHES` when the batch is unknown)."""
    from graphs.microbatch import batch_size  # noqa: PLC0415 - torch only where micro-batches are asked about

    if (getattr(graph, "meta", None) or {}).get("microbatchable", True) is False:
        return (1,)
    b = batch_size(graph)
    if b is None:
        return tuple(m for m in UNKNOWN_BATCH_MICROBATCHES if m <= cap)
    return tuple(m for m in range(1, min(b, cap) + 1) if b % m == 0)


def _work_bounds_s(sim: "Simulator", dev: np.ndarray, ms: Sequence[int], optimizer: str) -> dict[int, float]:
    """Per ``M``: ``max_d`` of the device's start + its tasks' total time + its update (see the module docstring)."""
    d = sim.cluster.num_devices
    ar = np.arange(dev.shape[0])
    params = np.bincount(dev, weights=sim.param_bytes, minlength=d)
    upd = np.where(params > 0, params * OPTIMIZERS[optimizer].touched / sim.mem_bw_Bps + sim.overhead_s, 0.0)
    used = np.bincount(dev, minlength=d) > 0
    start = sim.step_overhead_s if used.sum() > 1 else 0.0
    out = {}
    for m in ms:
        fwd_s, bwd_s = sim.microbatch_s(m)  # the simulator's own per-micro-batch times: measured or divided
        work = np.bincount(dev, weights=m * (fwd_s[dev, ar] + bwd_s[dev, ar]), minlength=d)
        out[m] = float(np.max(np.where(used, work + upd + start, 0.0)))
    return out


_RANK = {name: i for i, name in enumerate(SCHEDULES)}


def _better(res: StepResult, key: tuple[int, int], best: StepResult | None, best_key: tuple[int, int]) -> bool:
    if best is None:
        return True
    t, bt = res.step_time_s, best.step_time_s
    if not np.isfinite(bt):
        return np.isfinite(t) or _least_over(res) < _least_over(best)
    if abs(t - bt) <= _REL_TIE * bt:
        return key < best_key
    return t < bt


def _least_over(res: StepResult) -> float:
    """How far an OOM result's worst device is over its memory (for picking the least bad infeasible plan)."""
    return float(res.extra.get("_over", np.inf))


def best_plan(sim: "Simulator", placement: "Placement | np.ndarray", *, schedules: Sequence[str] | None = None,
              microbatches: Sequence[int] | None = None, optimizer: str = "adam",
              recompute: bool = True) -> tuple[Plan, StepResult]:
    """The fastest feasible ``(plan, its simulated step)`` of ``placement`` (see the module docstring).

    ``schedules`` / ``microbatches`` restrict the candidates (default: every registered schedule, every
    :func:`allowed_microbatches`). When no candidate fits, the result is the OOM whose worst device is least
    over its memory. ``result.extra["plans_simulated"]`` counts the simulations done. With ``recompute``, a
    candidate that is out of memory is simulated again with activation recomputation on the devices over
    memory (and then on any device still over), so recomputation is paid only where memory asks for it.
    """
    graph = sim.graph
    dev = sim.device_array(placement)
    names = [check_schedule(s) for s in (schedules if schedules is not None else SCHEDULES) if s != AUTO]
    allowed = allowed_microbatches(graph)
    ms = sorted({int(m) for m in (microbatches if microbatches is not None else allowed)} & set(allowed)) or [1]
    bounds = _work_bounds_s(sim, dev, ms, optimizer)
    single = np.unique(dev).size <= 1
    best: StepResult | None = None
    best_key = (len(_RANK), 0)
    seen: set[tuple[str, int]] = set()
    simulated = 0

    def consider(name: str, m: int) -> None:
        nonlocal best, best_key, simulated
        if best is not None and np.isfinite(best.step_time_s) and bounds[m] > best.step_time_s:
            return  # the work bound says it cannot win
        # no warnings while searching (M < stages, fallbacks): the chosen plan's run warns, if it deserves it
        sched = build_schedule(name, graph, dev, sim.cluster.num_devices, microbatches=m, warn=False, sim=sim)
        if (sched.order, m) in seen:
            return  # a fallback to an order already simulated: the same task list
        seen.add((sched.order, m))
        res = sim.run(dev, schedule=sched, optimizer=optimizer)
        simulated += 1
        redo: set[int] = set()
        while res.oom and recompute:  # recompute on the devices over memory, until it fits or nothing is left
            over = set(np.flatnonzero(res.peak_memory_bytes > sim.memory_bytes).tolist()) - redo
            if not over:
                break
            redo |= over
            res = sim.run(dev, schedule=sched, optimizer=optimizer, recompute=sorted(redo))
            simulated += 1
        if res.oom:
            res.extra["_over"] = float(np.max(res.peak_memory_bytes / np.maximum(sim.memory_bytes, 1.0)))
        key = (_RANK.get(name, len(_RANK)), m)
        if _better(res, key, best, best_key):
            best, best_key = res, key

    # simplest first within one M: an order that falls back to a simpler one is then already simulated
    pipelined = [s for s in ("gpipe", "1f1b", "interleaved-1f1b") if s in names]
    multi_chunk = not single and bool((virtual_stages(graph, dev, sim.cluster.num_devices)[2] > 1).any())
    if not multi_chunk and "interleaved-1f1b" in pipelined and "1f1b" in pipelined:
        pipelined.remove("interleaved-1f1b")  # one chunk per device: exactly 1f1b
    if 1 in ms:
        if "none" in names:
            consider("none", 1)
        if multi_chunk and "interleaved-1f1b" in pipelined:
            consider("interleaved-1f1b", 1)  # chunk by chunk: another order than none's, even for M = 1
    if not single:
        for m in sorted((m for m in ms if m > 1), reverse=True):
            for name in pipelined:
                consider(name, m)
        # after the pipeline orders (their best step prunes it by the work bound); not on a chain of contiguous
        # stages unless asked alone: torch.distributed.pipelining runs those with its own schedules, not this one
        if "dataflow" in names and (names == ["dataflow"] or not is_stage_contiguous(graph, dev)):
            for m in sorted(ms, reverse=True):
                consider("dataflow", m)
    if "none" in names and (best is None or not best.ok):  # gradient accumulation only saves memory
        for m in (m for m in ms if m > 1):
            consider("none", m)
            if best is not None and best.ok:
                break
    if best is None:  # nothing allowed was simulated (e.g. only none x M>1 asked): the first candidate
        name, m = (names or ["none"])[0], ms[0]
        best = sim.run(dev, schedule=name, microbatches=m, optimizer=optimizer)
        simulated += 1
    best.extra.pop("_over", None)
    best.extra["plans_simulated"] = simulated
    return make_plan(graph, dev, sim.cluster.num_devices, best.schedule, best.microbatches, best.recompute), best


def run_plan(sim: "Simulator", placement: "Placement | np.ndarray", *, schedule: str = "none",
             microbatches: int = 1, optimizer: str = "adam", timeline: bool = False) -> StepResult:
    """``Simulator.run`` for a schedule name; for :data:`AUTO`, the best plan's step (``microbatches`` is then
    ignored: the search chooses it; ``result.schedule`` / ``result.microbatches`` say what it chose)."""
    if check_schedule(schedule) != AUTO:
        return sim.run(placement, schedule=schedule, microbatches=microbatches, optimizer=optimizer,
                       timeline=timeline)
    plan, res = best_plan(sim, placement, optimizer=optimizer)
    if timeline and res.ok:
        res = sim.run(plan.device_of_op, schedule=plan.schedule, microbatches=plan.microbatches,
                      optimizer=optimizer, timeline=True)
    return res


def plan_bound(graph: "OpGraph", cluster: Any, microbatches: Sequence[int] | None = None, *,
               optimizer: str = "adam", recompute: bool = True) -> tuple[float, int | None, str]:
    """``(bound, its M, the term that sets it)``: for each allowed micro-batch count (``microbatches``: only these)
    that :func:`placer.costmodel.bounds.memory_fits`, the largest of
    :func:`placer.costmodel.bounds.bound_terms_s` (updates of ``optimizer`` included); the smallest over the
    counts. ``(inf, None, "")`` when no count can fit. ``recompute``: over plans that may recompute activations
    (what :func:`best_plan` searches by default), else over plans that do not."""
    from placer.costmodel.bounds import bound_terms_s, memory_fits

    best: tuple[float, int | None, str] = (float("inf"), None, "")
    for m in (microbatches if microbatches is not None else allowed_microbatches(graph)):
        if not memory_fits(graph, cluster, microbatches=int(m), optimizer=optimizer, recompute=recompute):
            continue
        terms = bound_terms_s(graph, cluster, microbatches=int(m), optimizer=optimizer, recompute=recompute)
        name = max(terms, key=lambda k: terms[k])
        if terms[name] < best[0]:
            best = (terms[name], int(m), name)
    return best


def plan_lower_bound_s(graph: "OpGraph", cluster: Any, microbatches: Sequence[int] | None = None, *,
                       optimizer: str = "adam", recompute: bool = True) -> float:
    """No plan of ``graph`` on ``cluster`` beats this (:func:`plan_bound`'s value); ``inf`` when no micro-batch
    count can fit."""
    return plan_bound(graph, cluster, microbatches, optimizer=optimizer, recompute=recompute)[0]


def simulate_plan(graph: "OpGraph", cluster: Any, placement: "Placement | np.ndarray", *, schedule: str = "none",
                  microbatches: int = 1, timeline: bool = False) -> StepResult:
    """:func:`placer.costmodel.sim.simulate` that also takes ``schedule="auto"`` (cached simulator)."""
    from placer.costmodel.sim import get_simulator

    return run_plan(get_simulator(graph, cluster), placement, schedule=schedule, microbatches=microbatches,
                    timeline=timeline)
