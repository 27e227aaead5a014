"""``PlacementEnv``: device placement as a Gymnasium environment (registered as ``placer/Placement-v0``)."""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.problem import (DEVICE_STATIC_FEATURES, EDGE_FEATURES, NODE_STATIC_FEATURES, FinishEstimate,
                          PlacementProblem, build_problem, device_load_features)
from envs.rewards import BACKENDS, Reference, RewardBackend, make_backend, pick_reference
from graphs.ir import OpGraph
from placer.core.cluster import Cluster, get_cluster
from placer.core.result import StepResult

log = logging.getLogger(__name__)

DEFAULT_GRAPH = "rnnlm-small"
"""Graph used when none is given (from ``graphs/data``; a synthetic layered DAG until that file exists)."""
DEFAULT_CLUSTER = "cpu-2"
DEFAULT_FAILURE_FACTOR = 100.0
"""Default penalty: a failed or OOM placement counts as ``100 x`` the reference step time, i.e. a reward of
``-sqrt(100) = -10`` (the hierarchical planner's TF code charged 100 s per failure, with step times around 1 s)."""
DEVICE_DYNAMIC_FEATURES = ("compute_load", "memory_used", "finish_estimate")
"""Dynamic per-device columns appended to :data:`envs.problem.DEVICE_STATIC_FEATURES` in the observation."""
FEATURE_MAX = 1e3
"""Upper bound of the feature boxes (features are ``log1p`` of ratios or fractions; values are clipped to it)."""


def unflatten(obs: Mapping[str, Any], layout: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Observation arrays reshaped to their logical shapes (``env.layout``), keeping any leading batch dimensions.

    Works on numpy arrays and torch tensors alike (SB3 hands a batch of flattened float32 arrays to a features
    extractor; ``edge_index`` then needs ``.long()``).
    """
    out = dict(obs)
    for key, shape in layout.items():
        if key in obs and len(shape) > 1:
            x = obs[key]
            out[key] = x.reshape(*x.shape[:-1], *shape)
    return out


def resolve_graph(graph: OpGraph | str | Path | None, *, config: str = "small") -> OpGraph:
    """:func:`graphs.data.resolve_graph` (an ``OpGraph``, a graph JSON path or a shipped graph's name; a bare name
    means ``config``), or ``None`` for :data:`DEFAULT_GRAPH` (a synthetic layered DAG when that is not shipped)."""
    from graphs.data import resolve_graph as resolve

    if graph is None:
        try:
            return resolve(DEFAULT_GRAPH)
        except ValueError:
            from envs.synthetic import layered_dag

            log.info("%s is not in graphs/data yet; using a synthetic layered DAG", DEFAULT_GRAPH)
            return layered_dag(6, 4, seed=0)
    return resolve(graph, config=config)


def resolve_cluster(cluster: Cluster | str | Path | None) -> Cluster:
    """A ``Cluster``; a preset name or cluster JSON (:func:`placer.core.cluster.get_cluster`); ``None`` for
    :data:`DEFAULT_CLUSTER`."""
    if isinstance(cluster, Cluster):
        return cluster
    return get_cluster(DEFAULT_CLUSTER if cluster is None else cluster)


class PlacementEnv(gym.Env):
    """Place a grouped op graph on a cluster, one group per step (ColocRL, Mirhoseini et al., ICML 2017).

    The graph's ops are grouped by ColocRL's co-location heuristics into at most ``num_groups`` groups
    (:mod:`envs.problem`); step ``t`` puts group ``t`` on a device (groups in HEFT's upward-rank order,
    :func:`envs.problem.placement_order`). After the last group the placement is evaluated by the reward backend
    (:mod:`envs.rewards`: ``sim``, ``real`` or ``sim+real``; ``sim_graph`` picks the op graph (default) or the
    coarse graph for the simulator).

    The env is given its problem, a built reward backend and the :class:`~envs.rewards.Reference` that normalises
    the reward; :func:`make_env` (the ``gymnasium.make`` entry point) builds all three from names.

    ## Observation Space
    A ``Dict`` of fixed-size arrays, padded to ``max_groups`` (``Gm``), ``max_edges`` (``Em``) and
    ``max_devices`` (``Dm``), so that graphs of different sizes share one space (SB3 rejects ``spaces.Graph``).
    Two-dimensional arrays are flattened row-major (SB3 expects 1-D vectors in a ``Dict``); their logical shapes
    are in ``env.layout`` and :func:`unflatten` restores them. Feature values are clipped to ``[0, 1000]``.

    - ``node_features`` ``Box(Gm, 11 + 2 Dm + 2)`` float32, per group: the 11 static columns of
      :data:`envs.problem.NODE_STATIC_FEATURES` (forward and backward time, bytes in and out, parameter bytes, memory
      vs the largest device, topological depth, position, number of ops, source and sink flags; times and bytes as
      ``log1p(x / mean)``), then ``Dm`` columns of its time on each device, ``Dm`` columns of the current partial
      placement (one-hot of its device, zeros while unplaced), then ``placed`` and ``is_current`` flags.
    - ``node_mask`` ``Box(Gm,)`` float32: 1 for real groups, 0 for padding.
    - ``edge_index`` ``Box(2, Em)`` int64: group edges (producer, consumer); padding entries are ``0 -> 0``.
    - ``edge_features`` ``Box(Em, 2)`` float32: ``log1p`` bytes over the mean, transfer time over the mean group time.
    - ``edge_mask`` ``Box(Em,)`` float32: 1 for real edges.
    - ``device_features`` ``Box(Dm, 7)`` float32: present, relative throughput on this graph, memory over the
      graph's total need, is-CPU, then the current per-device load (compute placed so far over the device's
      time for the whole graph; memory used over capacity) and when the current group would finish there
      (:class:`envs.problem.FinishEstimate`: ``log1p`` of the delay over the best device, in mean group times).
    - ``current_group`` ``Discrete(Gm)``: the group this step places (the last group once the episode is over).
    - ``action_mask`` ``Box(Dm,)`` int8: same as :meth:`action_masks`.

    ## Action Space
    ``Discrete(Dm)``: the device of the current group. :meth:`action_masks` (sb3-contrib's convention) is 0 for
    padding devices and for devices whose memory would overflow with this group added; when every device would
    overflow, all real devices are allowed and the reward penalises the OOM. A masked or padding device is still
    accepted (the placement then fails and gets the penalty).

    ## Reward
    ColocRL's ``-sqrt(step time)``, normalised by the reference placement's step time ``t_ref``
    (:func:`envs.rewards.pick_reference`: by default the ``expert`` baseline, simulated on the full op graph; with
    the ``real`` backend, measured): ``-sqrt(t / t_ref)``, so matching the reference scores -1. Given once, at the
    last step. A failed or OOM placement gets ``failure_penalty`` (default ``-sqrt(100)``:
    :data:`DEFAULT_FAILURE_FACTOR`); nothing raises.

    With ``incremental=True`` (Placeto, Addanki et al., NeurIPS 2019): after step ``t`` the partial placement is
    completed with the reference placement's devices for the remaining groups and evaluated, giving the potential
    ``phi_t = -sqrt(t_t / t_ref)`` (or the penalty); step ``t`` earns ``phi_t - phi_{t-1}`` with ``phi_{-1} = 0``,
    so an episode's rewards sum to exactly the terminal reward above. Needs a simulated backend.

    Rewards are cached by placement (``cache_size`` entries, LRU). ``info`` at the last step has ``step_time_s``,
    ``ok``, ``oom``, ``failure``, ``reward_source``, ``placement`` (device per group) and ``result`` (the
    :class:`~placer.core.result.StepResult`).
    """

    metadata = {"render_modes": []}

    def __init__(self, problem: PlacementProblem, backend: RewardBackend, reference: Reference, *,
                 incremental: bool = False, failure_penalty: float | None = None, max_groups: int | None = None,
                 max_devices: int | None = None, max_edges: int | None = None, cache_size: int = 200_000,
                 seed: int | None = None) -> None:
        super().__init__()
        self.problem, self.backend, self.reference = problem, backend, reference
        self.graph, self.cluster = problem.graph, problem.cluster
        p = self.problem
        self.num_groups, self.num_devices = p.num_groups, p.num_devices
        self.max_groups = self._bound("max_groups", max_groups, p.num_groups)
        self.max_devices = self._bound("max_devices", max_devices, p.num_devices)
        self.max_edges = self._bound("max_edges", max_edges, max(1, p.num_edges))
        if incremental and backend.source == "engine":
            raise ValueError("incremental rewards evaluate every step; use a simulated reward backend "
                             "('sim' or 'sim+real')")
        self.incremental = incremental
        self._cache: OrderedDict[bytes, StepResult] = OrderedDict()
        self.cache_size = cache_size
        self.evaluations = 0
        self.cache_hits = 0
        self.failure_penalty = (-math.sqrt(DEFAULT_FAILURE_FACTOR) if failure_penalty is None
                                else float(failure_penalty))

        gm, dm, em = self.max_groups, self.max_devices, self.max_edges
        self.node_dim = len(NODE_STATIC_FEATURES) + 2 * dm + 2
        self.layout: dict[str, tuple[int, ...]] = {
            "node_features": (gm, self.node_dim), "node_mask": (gm,), "edge_index": (2, em),
            "edge_features": (em, len(EDGE_FEATURES)), "edge_mask": (em,),
            "device_features": (dm, len(DEVICE_STATIC_FEATURES) + len(DEVICE_DYNAMIC_FEATURES)),
            "action_mask": (dm,),
        }
        """Logical (unflattened) shape of each array observation; see :func:`unflatten`."""
        flat = {k: int(np.prod(v)) for k, v in self.layout.items()}
        self.observation_space = spaces.Dict({
            "node_features": spaces.Box(0.0, FEATURE_MAX, (flat["node_features"],), np.float32),
            "node_mask": spaces.Box(0.0, 1.0, (gm,), np.float32),
            "edge_index": spaces.Box(0, max(0, gm - 1), (flat["edge_index"],), np.int64),
            "edge_features": spaces.Box(0.0, FEATURE_MAX, (flat["edge_features"],), np.float32),
            "edge_mask": spaces.Box(0.0, 1.0, (em,), np.float32),
            "device_features": spaces.Box(0.0, FEATURE_MAX, (flat["device_features"],), np.float32),
            "current_group": spaces.Discrete(gm),
            "action_mask": spaces.Box(0, 1, (dm,), np.int8),
        })
        self.action_space = spaces.Discrete(dm)
        self._static_obs()
        self._t = 0
        self._placement = np.zeros(p.num_groups, dtype=np.int64)
        self._invalid: str | None = None
        self._phi = 0.0
        self._mem_used = np.zeros(p.num_devices)
        self._time_used = np.zeros(p.num_devices)
        self._finish = FinishEstimate(p)
        self._estimates: tuple[int, np.ndarray] = (-1, np.zeros((1, p.num_devices)))
        if seed is not None:
            self.reset(seed=seed)

    @staticmethod
    def _bound(name: str, value: int | None, need: int) -> int:
        if value is None:
            return need
        if value < need:
            raise ValueError(f"{name}={value} is smaller than this problem needs ({need})")
        return int(value)

    # ------------------------------------------------------------------ reference and rewards
    @property
    def reference_time_s(self) -> float:
        """``t_ref``: the reference placement's step time under this env's backend."""
        return self.reference.step_time_s

    @property
    def reference_method(self) -> str:
        """The baseline (or ``given`` / ``fastest-device-compute``) behind ``t_ref``."""
        return self.reference.method

    def reward_of(self, result: StepResult) -> float:
        """``-sqrt(t / t_ref)``, or the failure penalty."""
        if not result.ok:
            return self.failure_penalty
        return -math.sqrt(result.step_time_s / self.reference_time_s)

    def result_of(self, device_of_group: Sequence[int] | np.ndarray) -> StepResult:
        """The backend's result for a per-group placement (cached by placement)."""
        arr = np.asarray(device_of_group, dtype=np.int64)
        if arr.shape != (self.num_groups,):
            raise ValueError(f"expected {self.num_groups} group devices, got shape {arr.shape}")
        key = arr.astype(np.int16).tobytes()
        hit = self._cache.get(key)
        if hit is not None:
            self.cache_hits += 1
            self._cache.move_to_end(key)
            return hit
        if arr.min() < 0 or arr.max() >= self.num_devices:
            res = StepResult.failed(f"invalid placement: device outside 0..{self.num_devices - 1}",
                                    source="sim", devices=self.cluster.device_names)
        else:
            res = self.backend.evaluate(arr)
        self.evaluations += 1
        self._cache[key] = res
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return res

    def evaluate(self, device_of_group: Sequence[int] | np.ndarray) -> tuple[float, StepResult]:
        """Reward and result of a complete per-group placement: what an episode placing it would earn in total."""
        res = self.result_of(device_of_group)
        return self.reward_of(res), res

    # ------------------------------------------------------------------ observations
    def _static_obs(self) -> None:
        p, gm, dm, em = self.problem, self.max_groups, self.max_devices, self.max_edges
        g, d, e = p.num_groups, p.num_devices, p.num_edges
        ns = len(NODE_STATIC_FEATURES)
        nf = np.zeros((gm, self.node_dim), dtype=np.float32)
        nf[:g, :ns] = p.node_features
        nf[:g, ns:ns + d] = p.node_device_time
        self._node_static = nf
        self._col_place = ns + dm          # first placement one-hot column
        self._col_placed = ns + 2 * dm     # placed flag; +1: is_current
        self._node_mask = np.zeros(gm, dtype=np.float32)
        self._node_mask[:g] = 1
        self._edge_index = np.zeros((2, em), dtype=np.int64)
        self._edge_index[:, :e] = p.edge_index
        self._edge_features = np.zeros((em, len(EDGE_FEATURES)), dtype=np.float32)
        self._edge_features[:e] = p.edge_features
        self._edge_mask = np.zeros(em, dtype=np.float32)
        self._edge_mask[:e] = 1
        self._device_static = np.zeros((dm, len(DEVICE_STATIC_FEATURES) + len(DEVICE_DYNAMIC_FEATURES)),
                                       dtype=np.float32)
        self._device_static[:d, :len(DEVICE_STATIC_FEATURES)] = p.device_features
        self._device_total_s = np.maximum(p.time_s.sum(axis=0), 1e-30)

    def _obs(self) -> dict[str, Any]:
        nf = self._node_features.copy()
        cur = min(self._t, self.num_groups - 1)
        nf[cur, self._col_placed + 1] = 1.0
        dev = self._device_static.copy()
        d = self.num_devices
        ns = len(DEVICE_STATIC_FEATURES)
        dev[:d, ns], dev[:d, ns + 1] = device_load_features(self._time_used, self._mem_used, self._device_total_s,
                                                            self.problem.capacity_bytes)
        if self._t < self.num_groups:
            dev[:d, ns + 2] = self._finish.feature(self._current_estimates())[0]
        return {
            "node_features": np.minimum(nf, FEATURE_MAX).reshape(-1),
            "node_mask": self._node_mask.copy(),
            "edge_index": self._edge_index.reshape(-1).copy(),
            "edge_features": np.minimum(self._edge_features, FEATURE_MAX).reshape(-1),
            "edge_mask": self._edge_mask.copy(),
            "device_features": np.minimum(dev, FEATURE_MAX).reshape(-1),
            "current_group": cur,
            "action_mask": self.action_masks().astype(np.int8),
        }

    def _current_estimates(self) -> np.ndarray:
        """``(1, D)`` finish estimates of the current group (computed once per step)."""
        if self._estimates[0] != self._t:
            self._estimates = (self._t, self._finish.estimates(self._t, self._placement[None]))
        return self._estimates[1]

    def action_masks(self) -> np.ndarray:
        """Boolean ``(max_devices,)``: devices that can take the current group without overflowing memory
        (all real devices when none can; padding devices never)."""
        mask = np.zeros(self.max_devices, dtype=bool)
        if self._t >= self.num_groups:
            mask[:self.num_devices] = True
            return mask
        fits = self._mem_used + self.problem.mem_bytes[self._t] <= self.problem.capacity_bytes
        mask[:self.num_devices] = fits if fits.any() else True
        return mask

    # ------------------------------------------------------------------ gym API
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        self._placement = np.zeros(self.num_groups, dtype=np.int64)
        self._invalid = None
        self._phi = 0.0
        self._mem_used = np.zeros(self.num_devices)
        self._time_used = np.zeros(self.num_devices)
        self._finish = FinishEstimate(self.problem)
        self._estimates = (-1, np.zeros((1, self.num_devices)))
        self._node_features = self._node_static.copy()
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self._t >= self.num_groups:
            raise RuntimeError("step() called after the episode ended; call reset()")
        a = int(action)
        g = self._t
        if not 0 <= a < self.num_devices:
            self._invalid = self._invalid or f"action {a} for group {g} is not a device of {self.cluster.name!r}"
            a = 0  # keep the episode going; the placement is penalised at the end
        self._placement[g] = a
        self._mem_used[a] += self.problem.mem_bytes[g]
        self._time_used[a] += self.problem.time_s[g, a]
        self._current_estimates()  # place() records the per-node finishes of the estimate for this group
        self._finish.place(g, np.array([a]))
        self._node_features[g, self._col_place + a] = 1.0
        self._node_features[g, self._col_placed] = 1.0
        self._t += 1
        terminated = self._t == self.num_groups
        reward = 0.0
        info: dict[str, Any] = {}
        if self.incremental and not terminated:
            completed = np.concatenate([self._placement[:self._t], self.reference.device_of_group[self._t:]])
            phi = self.failure_penalty if self._invalid else self.evaluate(completed)[0]
            reward, self._phi = phi - self._phi, phi
        if terminated:
            if self._invalid:
                res = StepResult.failed(self._invalid, source="sim", devices=self.cluster.device_names)
                final = self.failure_penalty
            else:
                final, res = self.evaluate(self._placement)
            reward = final - self._phi if self.incremental else final
            info = {"step_time_s": float(res.step_time_s), "ok": res.ok, "oom": res.oom,
                    "failure": res.failure or "", "reward_source": res.source,
                    "placement": self._placement.copy(), "result": res,
                    "reference_step_time_s": self.reference_time_s}
        return self._obs(), float(reward), terminated, False, info

    def replica(self) -> "PlacementEnv":
        """Another environment for the same problem, for a vectorised rollout (SB3 ``DummyVecEnv``): it shares
        everything static (problem, observation arrays, reward reference, simulator and result cache) and has
        its own episode state, made fresh by its ``reset``. Simulated rewards only: an engine-backed
        environment owns worker processes and cannot be shared (:attr:`envs.rewards.RewardBackend.replicable`)."""
        if not self.backend.replicable:
            raise ValueError(f"replica() needs a backend that can be shared, such as the sim reward, not "
                             f"{self.backend.name!r}")
        twin = copy.copy(self)
        twin.reset()
        return twin

    def close(self) -> None:
        backend = getattr(self, "backend", None)
        if backend is not None:
            backend.close()
        super().close()


def make_env(graph: OpGraph | str | Path | None = None, cluster: Cluster | str | Path | None = None, *,
             num_groups: int = 128, reward_backend: str = "sim", reference: str | float = "expert",
             schedule: str = "none", microbatches: int = 1, sim_graph: str = "full", graph_config: str = "small",
             engine_timeout_s: float = 120.0, **env_options: Any) -> PlacementEnv:
    """A :class:`PlacementEnv` from names (the ``gymnasium.make("placer/Placement-v0", ...)`` entry point).

    Builds the problem (``graph`` grouped into at most ``num_groups`` groups for ``cluster``; ``None``:
    :data:`DEFAULT_GRAPH` / :data:`DEFAULT_CLUSTER`), the reward backend ``reward_backend`` of
    :data:`envs.rewards.BACKENDS` simulating or measuring ``schedule`` x ``microbatches`` (``"auto"``: each placement
    under its best schedule and micro-batch count, :func:`placer.costmodel.plans.best_plan`; ``sim_graph``: the op
    graph or the coarse graph; ``engine_timeout_s``: seconds an engine measurement may take) and the reference
    (:func:`envs.rewards.pick_reference`: a baseline's name or a number of seconds). ``env_options`` go to
    :class:`PlacementEnv` (``incremental``, ``failure_penalty``, ``max_groups`` ...).
    """
    if env_options.get("incremental") and getattr(BACKENDS.get(reward_backend), "source", "") == "engine":
        raise ValueError("incremental rewards evaluate every step; use a simulated reward backend "
                         "('sim' or 'sim+real')")  # before the engine measures the reference
    problem = build_problem(resolve_graph(graph, config=graph_config), resolve_cluster(cluster), num_groups)
    backend = make_backend(reward_backend, problem, schedule=schedule, microbatches=microbatches,
                           sim_graph=sim_graph, engine_timeout_s=engine_timeout_s)
    try:
        ref = pick_reference(problem, backend, reference, schedule=schedule, microbatches=microbatches)
        return PlacementEnv(problem, backend, ref, **env_options)
    except BaseException:
        backend.close()  # engine workers started for the reference must not outlive a failed construction
        raise
