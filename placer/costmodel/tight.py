"""Memory-tight clusters: device memory just large enough that the schedule decides whether a pipeline fits.

:func:`memory_tight` gives a cluster's devices the memory that 1F1B needs for a *balanced* contiguous split of
the graph (:func:`balanced_split`: op-index order cut so that the largest 1F1B peak is smallest) with the
largest allowed micro-batch count, plus a small margin. On such a cluster:

* no single device holds the whole step (parameters, gradients and optimizer state alone usually exceed it);
* GPipe, which stashes all ``M`` micro-batches on every stage, does not fit where 1F1B (at most
  ``stages - stage`` in flight) does -- whenever some stage's GPipe stash is larger than every stage's 1F1B
  peak (:func:`tight_report` says whether it is for a given graph).

The search then has to find plans that respect memory: the right schedule, enough micro-batches, a split that
does not overload one stage. Memory is the simulator's model (:class:`placer.costmodel.sim.Simulator`), so the
numbers are exactly what a plan is judged by.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graphs.grouping import colocation_first
from placer.costmodel.plans import allowed_microbatches
from placer.costmodel.sim import Simulator

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster

TIGHT_MARGIN = 0.05
"""Memory above the balanced split's 1F1B peak (5%): enough for small deviations from that split."""


def balanced_split(graph: "OpGraph", cluster: "Cluster", microbatches: int) -> np.ndarray:
    """Device per op: op-index order cut into at most ``D`` contiguous runs so that the largest 1F1B memory peak
    is smallest (a binary search on the peak, filling stages greedily), colocation groups moved to their first
    op's device.

    A stage's peak is *estimated* here as its parameters x (2 + Adam's 2 states) + ``min(D - s, M)`` micro-batches
    of its stash + its largest temporary (1F1B's in-flight count); the simulator measures the real peak after."""
    sim = Simulator(graph, cluster)
    d, m = cluster.num_devices, int(microbatches)
    static = sim.param_bytes * 4.0
    stash = sim.stash_bytes / m
    temp = sim.temp_bytes / m

    def fill(cap: float) -> np.ndarray | None:
        dev = np.empty(graph.n, dtype=np.int64)
        s, load_static, load_stash, load_temp = 0, 0.0, 0.0, 0.0
        for i in range(graph.n):
            while True:
                fly = min(d - s, m)
                need = (load_static + static[i]) + fly * (load_stash + stash[i]) + max(load_temp, temp[i])
                if need <= cap or (load_static == load_stash == load_temp == 0.0):
                    break
                s, load_static, load_stash, load_temp = s + 1, 0.0, 0.0, 0.0
                if s >= d:
                    return None
            dev[i] = s
            load_static += static[i]
            load_stash += stash[i]
            load_temp = max(load_temp, temp[i])
        return dev

    lo, hi = 0.0, float(static.sum() + m * stash.sum() + temp.max(initial=0.0)) * 1.01
    best = fill(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        got = fill(mid)
        if got is None:
            lo = mid
        else:
            hi, best = mid, got
    assert best is not None
    return best[colocation_first(graph)]


@dataclass(frozen=True)
class TightReport:
    """The peaks behind a memory-tight capacity (bytes, per device of the balanced split)."""

    microbatches: int
    one_f1b_peak_bytes: np.ndarray
    gpipe_peak_bytes: np.ndarray
    single_device_bytes: float
    """Peak of the whole step on one device (``none x1``)."""
    capacity_bytes: int

    @property
    def gpipe_fits(self) -> bool:
        return bool((self.gpipe_peak_bytes <= self.capacity_bytes).all())

    @property
    def one_f1b_fits(self) -> bool:
        return bool((self.one_f1b_peak_bytes <= self.capacity_bytes).all())

    @property
    def single_fits(self) -> bool:
        return self.single_device_bytes <= self.capacity_bytes


def tight_report(cluster: "Cluster", graph: "OpGraph", *, margin: float = TIGHT_MARGIN) -> TightReport:
    """The balanced split's peaks under 1F1B and GPipe (largest allowed ``M``) on ``cluster`` with unlimited
    memory, and the capacity :func:`memory_tight` would give."""
    roomy = _with_memory(cluster, 1 << 50)
    sim = Simulator(graph, roomy)
    m = max(allowed_microbatches(graph))
    dev = balanced_split(graph, roomy, m)
    fb = sim.run(dev, schedule="1f1b", microbatches=m).peak_memory_bytes
    gp = sim.run(dev, schedule="gpipe", microbatches=m).peak_memory_bytes
    single = float(sim.run(np.zeros(graph.n, dtype=np.int64)).peak_memory_bytes.max())
    cap = int(np.ceil(float(fb.max()) * (1.0 + margin)))
    return TightReport(microbatches=m, one_f1b_peak_bytes=fb, gpipe_peak_bytes=gp, single_device_bytes=single,
                       capacity_bytes=cap)


def memory_tight(cluster: "Cluster", graph: "OpGraph", *, margin: float = TIGHT_MARGIN) -> "Cluster":
    """``cluster`` with every device's memory set to the balanced split's 1F1B peak plus ``margin`` (see the
    module docstring), named ``<cluster>-tight[<graph>]``."""
    cap = tight_report(cluster, graph, margin=margin).capacity_bytes
    out = _with_memory(cluster, cap)
    return dataclasses.replace(out, name=f"{cluster.name}-tight[{graph.name}]",
                               meta={**cluster.meta, "note": f"memory-tight for {graph.name}: "
                                                            f"{cap / (1 << 30):.2f} GiB per device"})


def _with_memory(cluster: "Cluster", memory_bytes: int) -> "Cluster":
    devs = tuple(dataclasses.replace(d, memory_bytes=int(memory_bytes)) for d in cluster.devices)
    return dataclasses.replace(cluster, devices=devs)
