"""``single``, ``single-cpu``, ``single-gpu``: the whole graph on one device (ColocRL's "Single-CPU" and
"Single-GPU" columns).

``single`` takes the fastest device (least total forward+backward time) whose memory holds the whole graph; when
none does it still takes the fastest device, and the simulator reports OOM — ColocRL's NMT on one GPU is that
case. ``single-cpu`` / ``single-gpu`` choose the same way among the CPU devices / the accelerators (a one-line
``ValueError`` when the cluster has no device of that class). :func:`place` also accepts ``single:<kind>`` and
``single:<device name>``; :func:`single_methods` lists one such entry per device kind of a cluster.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import groups_of
from placer.costmodel.costs import op_memory_bytes
from placer.core.placement import Placement

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster


def _pick(graph: "OpGraph", cluster: "Cluster", candidates: list[int]) -> int:
    """Fastest candidate whose memory holds the graph; the fastest one when none does."""
    groups = groups_of(graph, cluster, need_costs=False)
    total_s = groups.time_s.sum(axis=0)
    need = int(op_memory_bytes(graph).sum())
    fits = [d for d in candidates if cluster.devices[d].memory_bytes >= need]
    pool = fits or candidates
    # ties (e.g. no costs): most memory, then lowest index
    return min(pool, key=lambda d: (total_s[d], -cluster.devices[d].memory_bytes, d))


def place_single(graph: "OpGraph", cluster: "Cluster", device: int | str) -> Placement:
    """All ops on one device: an index, a device name, a device kind (``K80``), or ``cpu`` / ``gpu``."""
    if isinstance(device, (int, np.integer)):
        d = int(device)
        if not 0 <= d < cluster.num_devices:
            raise ValueError(f"device {d} is not in cluster {cluster.name!r} (devices 0..{cluster.num_devices - 1})")
        return Placement.single(graph, d).validate(graph, cluster)
    key = str(device)
    if key in cluster.device_names:
        return Placement.single(graph, cluster.index(key)).validate(graph, cluster)
    low = key.lower()
    if low == "cpu":
        cands = [i for i, dev in enumerate(cluster.devices) if dev.is_cpu]
    elif low in ("gpu", "accelerator"):
        cands = [i for i, dev in enumerate(cluster.devices) if not dev.is_cpu]
    else:
        cands = [i for i, dev in enumerate(cluster.devices) if dev.kind.lower() == low]
    if not cands:
        kinds = sorted({dev.kind for dev in cluster.devices})
        raise ValueError(f"cluster {cluster.name!r} has no {key!r} device (kinds: {', '.join(kinds)}; "
                         f"devices: {', '.join(cluster.device_names)})")
    return Placement.single(graph, _pick(graph, cluster, cands)).validate(graph, cluster)


def single_methods(cluster: "Cluster") -> list[str]:
    """One ``single:<kind>`` method name per device kind in the cluster, in device order."""
    seen: list[str] = []
    for dev in cluster.devices:
        if dev.kind not in seen:
            seen.append(dev.kind)
    return [f"single:{k}" for k in seen]


@register("single")
def place_single_fastest(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """The fastest device that holds the whole graph (the fastest device when none does)."""
    return Placement.single(graph, _pick(graph, cluster, list(range(cluster.num_devices)))).validate(graph, cluster)


@register("single-cpu")
def place_single_cpu(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """ColocRL's "Single-CPU": the fastest CPU device."""
    return place_single(graph, cluster, "cpu")


@register("single-gpu")
def place_single_gpu(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """ColocRL's "Single-GPU": the fastest accelerator that fits (the fastest one when none fits)."""
    return place_single(graph, cluster, "gpu")
