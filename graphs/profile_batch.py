"""Per-op costs at the micro-batch sizes a plan may use, measured rather than divided.

A pipelined step runs each op on ``batch / M`` samples. Small ops do not get ``M`` times faster (dispatch,
kernel set-up and cache effects stay), large ones nearly do; dividing the full-batch time misses both ways. Here
the traced step is profiled again (:func:`graphs.profile.profile`, same method, clock and threads) on the first
``batch / M`` samples of every batched input (dim 0, as :func:`graphs.batch.split_inputs` cuts micro-batches),
and the times land in ``OpCosts.microbatch_s[M]`` of the cost set, which the simulator uses for ``M``
micro-batches (and interpolates between, :func:`placer.costmodel.sim.microbatch_costs_s`).

Regenerate the shipped small graphs' CPU costs (full batch and every ``M``, one pinned core, one thread, thread
CPU time as ``python -m graphs.data``; other fields and cost sets are kept)::

    python -m graphs.profile_batch --graphs rnnlm-small nmt-small gpt-small --microbatches 2 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Sequence

import numpy as np

from graphs.batch import split_inputs
from graphs.ir import OpCosts, OpGraph
from graphs.profile import profile
from graphs.trace import TracedModel

__all__ = ["profile_microbatches", "with_microbatch_costs"]


def profile_microbatches(traced: TracedModel, microbatches: Sequence[int], *, warmup: int = 3, repeats: int = 10,
                         clock: str = "thread") -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{M: (fwd_s, bwd_s)}`` per op of one micro-batch of ``batch / M``, on this CPU with one thread."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for m in sorted(set(int(x) for x in microbatches)):
        if m < 2:
            raise ValueError(f"micro-batch counts must be >= 2, got {m}")
        part = dataclasses.replace(traced, example_inputs=split_inputs(traced.example_inputs, m, 0))
        c = profile(part, device="cpu", threads=1, warmup=warmup, repeats=repeats, clock=clock).costs["cpu"]
        out[m] = (c.fwd_s, c.bwd_s)
    return out


def with_microbatch_costs(graph: OpGraph, traced: TracedModel, microbatches: Sequence[int], *, warmup: int = 3,
                          repeats: int = 10, clock: str = "thread") -> OpGraph:
    """``graph`` with its ``cpu`` cost set profiled again at the full batch and at every ``M`` in ``microbatches``
    (in one sitting, so the sizes are comparable); everything else of ``graph`` is kept."""
    if traced.graph.op_names != graph.op_names:
        raise ValueError(f"graph {graph.name!r}: the traced model's ops differ from the graph's")
    full = profile(traced, device="cpu", threads=1, warmup=warmup, repeats=repeats, clock=clock).costs["cpu"]
    per_mb = profile_microbatches(traced, microbatches, warmup=warmup, repeats=repeats, clock=clock)
    prov = dataclasses.replace(full.provenance, note=full.provenance.note + (
        f"; microbatch_s: the same at batch/M for M in {sorted(per_mb)} (graphs.profile_batch)"))
    return graph.with_costs("cpu", OpCosts(fwd_s=full.fwd_s, bwd_s=full.bwd_s, provenance=prov, microbatch_s=per_mb))


def main(argv: Sequence[str] | None = None) -> None:
    from graphs.build import rebuild_traced
    from graphs.data import DATA_DIR

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--graphs", nargs="+", default=["rnnlm-small", "nmt-small", "gpt-small"])
    ap.add_argument("--microbatches", nargs="+", type=int, default=[2, 4, 8])
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    for name in args.graphs:
        t0 = time.perf_counter()
        path = DATA_DIR / f"{name}.json"
        graph = OpGraph.load(path)
        graph = with_microbatch_costs(graph, rebuild_traced(graph.meta), args.microbatches, warmup=args.warmup,
                                      repeats=args.repeats)
        graph.save(path)
        c = graph.costs["cpu"]
        sizes = ", ".join(f"M={m}: {(f.sum() + b.sum()) * 1e3:.3f} ms x {m}" for m, (f, b) in c.microbatch_s.items())
        print(f"{name}: full batch {c.step_s.sum() * 1e3:.3f} ms; one micro-batch {sizes} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
