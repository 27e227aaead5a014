"""Activation recomputation in the simulator: what a plan's ``recompute`` devices hold and pay.

A device that recomputes runs each of its fused segments (the engine's units, :mod:`placer.engine.segments`; the
simulator finds the same ones with :meth:`placer.costmodel.sim.Simulator.segment_starts`) under activation
checkpointing, as the engine does with ``torch.utils.checkpoint`` (and the pipelining backend and the trainers'
loaders per stage, :attr:`placer.engine.stages.StageModule.recompute`):

* its forward keeps only the segment's inputs (the values its ops read from outside it; an input op keeps its
  batch) until the segment's backward, instead of every op's stash;
* its backward first runs the segment's forward again (the backward segment's first task takes that much longer),
  which brings the whole segment's stash back for one micro-batch; the backward frees it op by op, and the inputs
  at the segment's end.

So recomputation trades a forward per micro-batch for the stash of the micro-batches in flight: it pays off where
memory, not time, limits the plan (a 1F1B stage holding many micro-batches, a device too small for its share of a
pipeline). :func:`placer.costmodel.plans.best_plan` turns it on only for the devices a plan overflows;
:mod:`placer.costmodel.bounds` keeps the lower bound valid for such plans.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from placer.costmodel._segment_kernel import recompute_walk as _walk

if TYPE_CHECKING:
    from placer.costmodel.schedules import Schedule
    from placer.costmodel.sim import Simulator


def recompute_walk(sim: "Simulator", sched: "Schedule", dev: np.ndarray, recompute: Sequence[int],
                   dur_f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(recomputing device mask, their activation peaks in bytes, recomputation seconds per task)`` of ``sched``
    (``dur_f``: each op's per-micro-batch forward seconds on its device); None when no used device recomputes.
    A device index outside the cluster is a one-line ``ValueError``."""
    if not len(recompute):
        return None  # the common case, on the simulator's hot path
    num_dev = sim.cluster.num_devices
    mask = np.zeros(num_dev, dtype=bool)
    for d in recompute:
        if not 0 <= int(d) < num_dev:
            raise ValueError(f"recompute names device {d}; the cluster has {num_dev}")
        mask[int(d)] = True
    mask &= np.diff(sched.device_ptr) > 0
    if not mask.any():
        return None
    m = sched.microbatches
    ga = sim.arrays
    peak, extra = _walk(sched.device_ptr, sched.op, sched.microbatch, sched.phase, sim.segment_starts(sched, dev),
                        mask, sim.stash_bytes / m, sim.temp_bytes / m, sim.graph.out_bytes.astype(np.float64) / m,
                        dur_f, ga.pred_ptr, ga.pred_idx, m, sim.graph.n)
    return mask, peak, extra
