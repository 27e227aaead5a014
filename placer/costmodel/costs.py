"""Op time on a device and op memory: the one cost rule every user shares (the simulator, the baselines, the
environment's features, the lower bounds and the comparison table).

- **Time.** Op ``i`` on device ``d`` takes ``costs[kind].fwd_s[i]`` forward and ``bwd_s[i]`` backward, divided by
  ``d.speed``, where ``kind`` is the device's cost set (``d.kind``, a key of ``OpGraph.costs``).
- **Missing costs.** A device kind the graph has no cost set for is a one-line ``ValueError`` naming the kind and
  the graph. A caller that wants to substitute one set for another says so with ``cost_kind=``: a name (every
  device uses that set, still scaled by its ``speed``) or a mapping ``{"K80": "cpu"}`` per device kind. We do not
  guess a CPU-to-GPU factor silently.
- **Weight traffic** (:func:`param_traffic_s`): what a micro-batch pass costs in streaming the op's weights and
  gradients through memory on top of its profiled time (CPU only).
- **Memory** of op ``i`` while training = ``PARAM_COPIES x param_bytes + stash_bytes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    from graphs.ir import OpCosts, OpGraph
    from placer.core.cluster import Cluster, Device

CostKind = str | Mapping[str, str] | None
"""A deliberate substitution of cost sets: ``None`` (each device uses its own kind), one set name for every
device, or a mapping from device kind to the set it uses."""

PARAM_COPIES = 4
"""Resident copies per parameter byte during training: weights + gradient + Adam's first and second moment."""


def cost_kind_of(graph: "OpGraph", device: "Device", cost_kind: CostKind = None) -> str:
    """The name of the cost set ``device`` runs with (module docstring); a one-line ``ValueError`` when ``graph``
    has none of that kind."""
    kind = cost_kind if isinstance(cost_kind, str) else (cost_kind or {}).get(device.kind, device.kind)
    if kind not in graph.costs:
        have = ", ".join(sorted(graph.costs)) or "none"
        raise ValueError(
            f"graph {graph.name!r} has no op costs for device kind {kind!r} (device {device.name}); it has: "
            f"{have}. Profile/estimate that kind, or pass cost_kind= to substitute one on purpose")
    return kind


def device_costs(graph: "OpGraph", cluster: "Cluster", cost_kind: CostKind = None) -> list["OpCosts"]:
    """The cost set of every device of ``cluster``, in device order (:func:`cost_kind_of`)."""
    return [graph.costs[cost_kind_of(graph, dev, cost_kind)] for dev in cluster.devices]


def op_time_s(graph: "OpGraph", cluster: "Cluster", *, cost_kind: CostKind = None) -> np.ndarray:
    """``(n, D)`` forward+backward seconds of every op on every device: ``step_s / speed``."""
    cols = [c.step_s / dev.speed for c, dev in zip(device_costs(graph, cluster, cost_kind), cluster.devices)]
    return np.stack(cols, axis=1) if cols else np.zeros((graph.n, 0))


def op_memory_bytes(graph: "OpGraph") -> np.ndarray:
    """Resident bytes per op during a training step: ``PARAM_COPIES x param_bytes + stash_bytes`` (int64)."""
    return graph.param_bytes.astype(np.int64) * PARAM_COPIES + graph.stash_bytes.astype(np.int64)


def substitute_costs(graph: "OpGraph", cluster: "Cluster", cost_kind: CostKind) -> "OpGraph":
    """``graph`` with every device kind of ``cluster`` given the cost set ``cost_kind`` picks for it (``graph``
    itself when ``cost_kind`` is ``None``). For callers that substitute on purpose and then run code that takes no
    ``cost_kind=`` of its own (the baselines): simulating the result equals simulating ``graph`` with
    ``cost_kind``."""
    if cost_kind is None:
        return graph
    costs = dict(graph.costs)
    for dev in cluster.devices:
        costs[dev.kind] = graph.costs[cost_kind_of(graph, dev, cost_kind)]
    return graph.replace(costs=costs)


PARAM_TRAFFIC_PER_MICROBATCH: dict[str, float] = {
    "cpu": 5.0,  # forward reads W (1); backward reads W, writes the new dW, reads it and .grad, writes .grad (4)
}
"""Bytes moved through memory per parameter byte of an op, per micro-batch pass, that its profiled time does not
include. CPU op costs are profiled op by op with the op's weights hot in cache; in a whole step a micro-batch pass
streams every weight and gradient from memory (gpt-medium on one core: +41 ms per extra micro-batch for 168 MB of
parameters at ~19.5 GB/s, i.e. ~4.75 bytes per parameter byte). GPU kernels are timed with their weights in HBM
already, so GPU kinds add nothing. Override per kind with ``cluster.meta["param_traffic_per_microbatch"]``."""


def meta_per_kind(cluster: "Cluster", key: str, kind: str, *, default: float = 0.0) -> float:
    """``cluster.meta[key]`` for device kind ``kind``: a number, ``{kind: number}``, or absent (``default``); the
    :class:`placer.core.cluster.Cluster` has checked that it is a finite number in range
    (:data:`placer.core.cluster.META_NUMBERS`)."""
    v = cluster.meta.get(key, default)
    if isinstance(v, Mapping):
        v = v.get(kind, default)
    return float(v)


CACHE_BYTES: dict[str, float] = {"cpu": 2 * 2**20}
"""Per-core cache that holds a model's weights and gradients between micro-batch passes (this machine's L2 per
core; its VM-reported L3 did not help: gpt-medium's 168 MB of weights cost +41 ms per extra micro-batch).
Override per kind with ``cluster.meta["cache_bytes"]``."""


def param_traffic_s(cluster: "Cluster", param_bytes: np.ndarray, memory_bandwidth_Bps: np.ndarray) -> np.ndarray:
    """``(D, n)`` seconds per micro-batch pass of each op's weight and gradient memory traffic on each device:
    ``k x param_bytes / bandwidth`` with ``k`` from ``cluster.meta["param_traffic_per_microbatch"]`` (a number or
    ``{kind: k}``), else :data:`PARAM_TRAFFIC_PER_MICROBATCH`; the simulator puts a fifth of it in the forward.
    Nothing when the whole model's weights and gradients fit in the kind's cache (:data:`CACHE_BYTES`): they stay
    there between passes (small models; a rule on the graph, not the placement, so that per-micro-batch times
    stay placement-independent and the plan search's work bounds stay bounds)."""
    out = np.zeros((cluster.num_devices, param_bytes.shape[0]))
    for i, dv in enumerate(cluster.devices):
        k = meta_per_kind(cluster, "param_traffic_per_microbatch", dv.kind,
                          default=PARAM_TRAFFIC_PER_MICROBATCH.get(dv.kind, 0.0))
        cache = meta_per_kind(cluster, "cache_bytes", dv.kind, default=CACHE_BYTES.get(dv.kind, 0.0))
        if 2 * float(param_bytes.sum()) <= cache:
            continue
        out[i] = float(k) * param_bytes / memory_bandwidth_Bps[i]
    return out
