"""Reward backends: what a per-group placement costs, by name.

Every backend turns a per-group placement into a :class:`~placer.core.result.StepResult`; the environment turns that
into a reward (and caches it by placement). Backends never raise for a bad placement: OOM, a crashed or hung
worker, or an engine error all come back as a failed ``StepResult`` with its reason.

- ``sim``: the discrete-event simulator (:class:`placer.costmodel.sim.Simulator`) — thousands of placements per second.
  ``schedule="auto"`` scores each placement under its best schedule and micro-batch count
  (:func:`placer.costmodel.plans.best_plan`, a few simulations per placement); the result says which it chose.
  ``sim_graph="full"`` (default) simulates the op graph; ``"coarse"`` the problem's coarse graph. The coarse graph
  was meant for speed, but on our benchmark graphs it is only 4-15% faster (2,300 vs 2,200 placements/s on
  NMT-paper, 876 ops vs 425 nodes) while its step times can differ from the op graph's by up to ~4% (a coarse
  node sends its outputs only when the whole run of ops is done), and the policy network, not the simulator,
  dominates an update's time. Rewards on the full graph are exactly the step times we report.
- ``real``: the execution engine (``placer.engine.Measurer``) on the full op graph, one worker process per
  device (``schedule="auto"``: it measures the plan the simulator chooses for the placement); created on first
  use, reused for every placement (workers stay warm) and closed with the env.
- ``sim+real``: the ``sim`` reward, plus a record of the best placements seen; :meth:`SimRealBackend.remeasure_top`
  measures the ``k`` best with the engine (the trainer calls it periodically and at the end), so training runs at
  simulator speed while the reported placement is a measured one.
"""

from __future__ import annotations

import heapq
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from envs.problem import PlacementProblem
from placer.core.placement import Placement
from placer.core.result import StepResult

log = logging.getLogger(__name__)


class RewardBackend:
    """Base class: ``evaluate(device_of_group) -> StepResult``; ``close()`` frees resources."""

    name = "base"
    source = "sim"
    replicable = False
    """Whether several environments may share this backend (a vectorised rollout); a backend owning engine
    workers may not."""
    remeasures = False
    """Whether the backend keeps its best placements for :meth:`SimRealBackend.remeasure_top` (the trainer then
    re-measures them with a callback)."""

    def __init__(self, problem: PlacementProblem, *, schedule: str = "none", microbatches: int = 1,
                 sim_graph: str = "full", engine_timeout_s: float = 120.0, engine_steps: int = 3,
                 engine_warmup: int = 1) -> None:
        if sim_graph not in ("full", "coarse"):
            raise ValueError(f"sim_graph must be 'full' or 'coarse', got {sim_graph!r}")
        self.problem = problem
        self.sim_graph = sim_graph
        self.schedule = schedule
        self.microbatches = int(microbatches)
        self.engine_timeout_s = engine_timeout_s
        self.engine_steps = engine_steps
        self.engine_warmup = engine_warmup

    def evaluate(self, device_of_group: np.ndarray) -> StepResult:
        raise NotImplementedError

    def close(self) -> None:
        """Release workers or other resources (idempotent)."""


BACKENDS: dict[str, type[RewardBackend]] = {}


def register_backend(name: str) -> Callable[[type[RewardBackend]], type[RewardBackend]]:
    def deco(cls: type[RewardBackend]) -> type[RewardBackend]:
        BACKENDS[name] = cls
        cls.name = name
        return cls

    return deco


def make_backend(name: str, problem: PlacementProblem, **options: Any) -> RewardBackend:
    """Backend ``name`` for ``problem`` (one-line ``ValueError`` for an unknown name)."""
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown reward backend {name!r}; choose one of {', '.join(sorted(BACKENDS))}") from None
    return cls(problem, **options)


# ---------------------------------------------------------------------------------------------- sim
def _run_plan() -> Callable[..., StepResult]:
    """:func:`placer.costmodel.plans.run_plan` (``Simulator.run`` that also takes ``schedule="auto"``), imported on
    first use like the simulator."""
    from placer.costmodel.plans import run_plan

    return run_plan


@register_backend("sim")
class SimBackend(RewardBackend):
    """The simulator on the full op graph or on the coarse graph (``sim_graph``)."""

    source = "sim"
    replicable = True

    def __init__(self, problem: PlacementProblem, **options: Any) -> None:
        super().__init__(problem, **options)
        from placer.costmodel.sim import Simulator

        self._run_plan = run_plan = _run_plan()
        graph = problem.graph if self.sim_graph == "full" else problem.coarse
        self.sim = Simulator(graph, problem.cluster)
        # fail now (one line) on a bad schedule name rather than inside every episode
        run_plan(self.sim, np.zeros(graph.n, dtype=np.int64), schedule=self.schedule, microbatches=self.microbatches)

    def evaluate(self, device_of_group: np.ndarray) -> StepResult:
        p = self.problem
        try:
            dev = (p.expand(device_of_group).device_of_op if self.sim_graph == "full"
                   else p.coarse_devices(device_of_group))
            return self._run_plan(self.sim, dev, schedule=self.schedule, microbatches=self.microbatches)
        except ValueError as e:  # an invalid placement: a failure, not an exception
            return StepResult.failed(f"invalid placement: {e}", source="sim",
                                     devices=self.problem.cluster.device_names)


# ---------------------------------------------------------------------------------------------- engine
def load_measurer_class() -> type:
    """``placer.engine.Measurer``, imported on first use (it brings the engine's schedules and kernels; tests
    patch this function with a stand-in)."""
    from placer.engine.measurer import Measurer

    return Measurer


def engine_available() -> bool:
    """Whether the execution engine can be imported (tests skip the ``real`` backend otherwise)."""
    try:
        load_measurer_class()
    except ImportError:
        return False
    return True


class EngineSession:
    """A lazily started, reused engine ``Measurer`` for one problem; failures become failed results."""

    def __init__(self, problem: PlacementProblem, *, timeout_s: float, steps: int, warmup: int,
                 schedule: str, microbatches: int) -> None:
        if "source" not in problem.graph.meta:
            raise ValueError(f"graph {problem.graph.name!r} has no meta['source']; the engine cannot rebuild its "
                             f"model (build it with 'placer graph build')")
        self.problem, self.timeout_s, self.steps, self.warmup = problem, timeout_s, steps, warmup
        self.schedule, self.microbatches = schedule, microbatches
        self._measurer: Any = None
        self.measurements = 0

    def measure(self, device_of_group: np.ndarray) -> StepResult:
        """Measure a per-group placement."""
        return self.measure_placement(self.problem.expand(device_of_group))

    def measure_placement(self, placement: Placement) -> StepResult:
        """Measure an op-level placement (e.g. a baseline's) with the same warm workers."""
        names = self.problem.cluster.device_names
        try:
            if self._measurer is None:
                cls = load_measurer_class()
                m = cls(self.problem.graph, self.problem.cluster, timeout_s=self.timeout_s)
                self._measurer = m.__enter__() or m
            self.measurements += 1
            schedule, micro = self.schedule, self.microbatches
            if schedule == "auto":  # measure the plan the simulator chooses for this placement
                from placer.costmodel.plans import best_plan
                from placer.costmodel.sim import get_simulator

                plan, _ = best_plan(get_simulator(self.problem.graph, self.problem.cluster), placement)
                schedule, micro = plan.schedule, plan.microbatches
            return self._measurer.measure(placement, schedule=schedule, microbatches=micro,
                                          steps=self.steps, warmup=self.warmup)
        except Exception as e:  # the engine's own errors must not stop training: a penalised failure
            log.warning("engine measurement failed: %s", str(e).splitlines()[0] if str(e) else type(e).__name__)
            return StepResult.failed(f"engine: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                     source="engine", devices=names)

    def close(self) -> None:
        if self._measurer is not None:
            m, self._measurer = self._measurer, None
            try:
                m.__exit__(None, None, None)
            except Exception as e:  # closing must not raise from env.close()
                log.warning("closing the engine failed: %s", e)


@register_backend("real")
class RealBackend(RewardBackend):
    """The engine, measuring every (uncached) placement."""

    source = "engine"

    def __init__(self, problem: PlacementProblem, **options: Any) -> None:
        super().__init__(problem, **options)
        self.session = EngineSession(problem, timeout_s=self.engine_timeout_s, steps=self.engine_steps,
                                     warmup=self.engine_warmup, schedule=self.schedule,
                                     microbatches=self.microbatches)

    def evaluate(self, device_of_group: np.ndarray) -> StepResult:
        return self.session.measure(device_of_group)

    def close(self) -> None:
        self.session.close()


@dataclass(frozen=True)
class Remeasured:
    """A placement with its simulated and measured step."""

    device_of_group: np.ndarray
    sim: StepResult
    real: StepResult


@register_backend("sim+real")
class SimRealBackend(SimBackend):
    """Simulated reward; the best placements are kept so that :meth:`remeasure_top` can measure them."""

    replicable = False  # it owns engine workers
    remeasures = True

    def __init__(self, problem: PlacementProblem, *, keep: int = 32, **options: Any) -> None:
        super().__init__(problem, **options)
        self.keep = keep
        self._top: list[tuple[float, bytes]] = []  # max-heap by time via negation: (-time, key)
        self._entries: dict[bytes, tuple[np.ndarray, StepResult]] = {}
        self._real: dict[bytes, StepResult] = {}
        self._samples: dict[bytes, list[StepResult]] = {}
        self.session = EngineSession(problem, timeout_s=self.engine_timeout_s, steps=self.engine_steps,
                                     warmup=self.engine_warmup, schedule=self.schedule,
                                     microbatches=self.microbatches)

    def evaluate(self, device_of_group: np.ndarray) -> StepResult:
        res = super().evaluate(device_of_group)
        if res.ok:
            arr = np.asarray(device_of_group, dtype=np.int64)
            key = arr.tobytes()
            if key not in self._entries:
                if len(self._top) < self.keep:
                    heapq.heappush(self._top, (-res.step_time_s, key))
                    self._entries[key] = (arr.copy(), res)
                elif res.step_time_s < -self._top[0][0]:
                    _, old = heapq.heapreplace(self._top, (-res.step_time_s, key))
                    self._entries.pop(old, None)
                    self._entries[key] = (arr.copy(), res)
        return res

    def top(self, k: int) -> list[tuple[np.ndarray, StepResult]]:
        """The ``k`` best placements by simulated time (best first)."""
        best = sorted(self._top, key=lambda e: (-e[0], e[1]))[:k]
        return [self._entries[key] for _, key in best]

    def remeasure_top(self, k: int, *, rounds: int = 0) -> list[Remeasured]:
        """The ``k`` best simulated placements with their engine measurement, best simulated first.

        ``rounds=0``: a placement measured before keeps that measurement (cheap, for periodic checks). ``rounds > 0``
        measures all ``k`` again in ``rounds`` interleaved rounds and reports, per placement, the measurement with
        the median step time of all it ever had: on a machine whose speed drifts, a placement measured once in a
        fast spell would otherwise beat better ones (the final choice of a ``sim+real`` run uses this)."""
        top = self.top(k)
        for _ in range(rounds):
            for arr, _ in top:
                self._record(arr.tobytes(), self.session.measure(arr))
        out = []
        for arr, sim_res in top:
            key = arr.tobytes()
            if key not in self._real:
                self._record(key, self.session.measure(arr))
            out.append(Remeasured(arr, sim_res, self._real[key]))
        return out

    def _record(self, key: bytes, res: StepResult) -> None:
        """Add a measurement of ``key``; its representative is the median-time one (failed ones count as slowest)."""
        got = self._samples.setdefault(key, [])
        got.append(res)
        ranked = sorted(got, key=lambda r: r.step_time_s if r.ok else float("inf"))
        self._real[key] = ranked[(len(ranked) - 1) // 2]

    def measure(self, device_of_group: np.ndarray) -> StepResult:
        """Measure any placement with the engine (cached)."""
        arr = np.asarray(device_of_group, dtype=np.int64)
        key = arr.tobytes()
        if key not in self._real:
            self._record(key, self.session.measure(arr))
        return self._real[key]

    def close(self) -> None:
        self.session.close()


# ---------------------------------------------------------------------------------------------- reference
@dataclass(frozen=True, kw_only=True)
class Reference:
    """The placement whose step time ``t_ref`` normalises the reward (``-sqrt(t / t_ref)``)."""

    step_time_s: float
    """``t_ref``, under the reward backend (measured with the engine for ``real``)."""
    method: str
    """The baseline that placed it, ``given`` (a number of seconds) or ``fastest-device-compute``."""
    device_of_group: np.ndarray
    """Its device per group: incremental rewards complete a partial placement with it."""
    result: StepResult | None = None
    """Its simulated step on the full op graph (``None`` for a given time)."""

    def __post_init__(self) -> None:
        if not (self.step_time_s > 0 and math.isfinite(self.step_time_s)):  # rewards divide by it
            raise ValueError(f"the reference step ({self.method}) takes {self.step_time_s} s: a graph whose ops "
                             "cost no time has nothing to place")


REFERENCE_FALLBACKS = ("expert", "single", "heft", "m-etf", "round-robin")
"""Tried in order when the requested reference placement fails (OOM) or does not apply to the cluster."""


def pick_reference(problem: PlacementProblem, backend: RewardBackend, reference: str | float = "expert", *,
                   schedule: str = "none", microbatches: int = 1) -> Reference:
    """The reference of ``problem``: ``reference`` seconds, or that baseline's placement simulated on the full op
    graph (measured by ``backend`` when its results come from the engine). A reference that does not fit falls
    back along :data:`REFERENCE_FALLBACKS` (logged); when nothing fits, ``t_ref`` is the whole graph's compute
    time on the fastest device."""
    if isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if not reference > 0:
            raise ValueError(f"reference step time must be positive, got {reference}")
        return Reference(step_time_s=float(reference), method="given",
                         device_of_group=problem.project(Placement.single(problem.graph, 0)))
    from placer import baselines
    from placer.costmodel.sim import Simulator

    graph, cluster = problem.graph, problem.cluster
    sim = Simulator(graph, cluster)
    tried = []
    for method in dict.fromkeys([str(reference), *REFERENCE_FALLBACKS]):
        try:
            placement = baselines.place(method, graph, cluster, seed=0)
        except ValueError as e:
            if method == reference and method not in baselines.BASELINES and not method.startswith("single"):
                raise
            tried.append(f"{method}: {e}")
            continue
        res = _run_plan()(sim, placement, schedule=schedule, microbatches=microbatches)
        if not res.ok:
            tried.append(f"{method}: {res.failure}")
            continue
        if method != reference:
            log.warning("reference %r unusable (%s); normalising by %r", reference, "; ".join(tried), method)
        groups = problem.project(placement)
        return Reference(step_time_s=_reference_time_s(backend, groups, res), method=method,
                         device_of_group=groups, result=res)
    # nothing fits (every placement will be penalised anyway): normalise by the compute on the fastest device
    compute_s = problem.time_s.sum(axis=0)
    t_ref = float(compute_s.min()) or 1.0
    log.warning("no reference placement fits %s on %s (%s); normalising by %.4g s of compute",
                graph.name, cluster.name, "; ".join(tried), t_ref)
    return Reference(step_time_s=t_ref, method="fastest-device-compute",
                     device_of_group=np.full(problem.num_groups, int(compute_s.argmin())))


def _reference_time_s(backend: RewardBackend, groups: np.ndarray, simulated: StepResult) -> float:
    """The reference's step time under ``backend``: measured when the backend's results come from the engine
    (its simulated time when the measurement fails), else the simulated time on the full op graph."""
    if backend.source != "engine":
        return float(simulated.step_time_s)
    res = backend.evaluate(groups)
    if res.ok:
        return float(res.step_time_s)
    log.warning("measuring the reference failed (%s); normalising by its simulated time", res.failure)
    return float(simulated.step_time_s)
