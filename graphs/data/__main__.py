"""Regenerate the shipped, profiled benchmark graphs: ``python -m graphs.data [--configs small,paper]``.

Each model is traced, every op is profiled on one pinned CPU core (1 intra-op thread — the same as a ``cpu-2``
worker), and roofline estimates for K80/V100/A100/H100 are added. Prints, per graph, what the closing notes
of the foundation issue ask for: ops, groups, total step time, parameter MB and build time.
"""

from __future__ import annotations

import argparse
import os
import time

from graphs.build import rebuild_traced
from graphs.data import DATA_DIR
from graphs.grouping import group_ops
from graphs.profile import measure_step_s, profile
from graphs.roofline import with_estimates

MODELS = ("rnnlm", "nmt", "inception_v3")
REPEATS = {"small": (3, 10), "paper": (1, 3)}  # (warm-up, repeats): paper steps take ~20 s on one core


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default="small")
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    ap.add_argument("--clock", default="thread", choices=("thread", "wall"),
                    help="thread CPU time (robust on a shared machine; the default) or wall time")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    for config in args.configs.split(","):
        warmup, repeats = REPEATS[config]
        for model in args.models.split(","):
            t0 = time.perf_counter()
            traced = rebuild_traced({"source": {"benchmark": model, "config": config, "overrides": {}, "seed": 0}})
            graph = profile(traced, device="cpu", threads=1, warmup=warmup, repeats=repeats, progress=True,
                            clock=args.clock)
            graph = with_estimates(graph, ("K80", "V100", "A100", "H100"))
            built_s = time.perf_counter() - t0
            fwd_s, bwd_s = measure_step_s(traced, threads=1, warmup=warmup, repeats=repeats, clock=args.clock)
            graph.save(DATA_DIR / f"{model}-{config}.json")
            c = graph.cost("cpu")
            groups = int(group_ops(graph, args.groups).max()) + 1
            print(f"{graph.name}: ops={graph.n} groups={groups} params_MB={graph.param_bytes.sum() / 1e6:.1f} "
                  f"per_op_fwd+bwd_s={c.fwd_s.sum():.3f}+{c.bwd_s.sum():.3f} "
                  f"measured_step_fwd+bwd_s={fwd_s:.3f}+{bwd_s:.3f} "
                  f"bwd_coverage={c.bwd_s.sum() / bwd_s:.3f} build+profile_s={built_s:.0f}", flush=True)


if __name__ == "__main__":
    main()
