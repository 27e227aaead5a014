"""Regenerate the shipped, profiled benchmark graphs: ``python -m graphs.data [--configs small,paper]``.

On the CPU (the default) each model is traced, every op is profiled on one pinned CPU core (1 intra-op thread —
the same as a ``cpu-2`` worker), roofline estimates for K80/V100/A100/H100 are added and the shipped graph files
are rewritten. Prints, per graph, what the closing notes of the foundation issue ask for: ops, groups, total step
time, parameter MB and build time.

On a GPU (``--device cuda``), the same ops are profiled on the card and stored as one more *measured* cost set
named after it (``H200``, ``H100``...; see :func:`graphs.profile.gpu_kind`), next to the CPU costs. A lent GPU
machine cannot write here, so ``--costs-out FILE`` writes only the cost sets; ``--merge FILE`` adds them to the
shipped graphs on this machine, after checking that the GPU machine traced the same ops.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from graphs.build import rebuild_traced
from graphs.data import DATA_DIR
from graphs.grouping import group_ops
from graphs.ir import OpCosts, OpGraph
from graphs.profile import gpu_kind, measure_step_s, profile
from graphs.roofline import GPUS, estimate, with_estimates

MODELS = ("rnnlm", "nmt", "inception_v3")
REPEATS = {"small": (3, 10), "paper": (1, 3)}  # (warm-up, repeats): paper steps take ~20 s on one core
CUDA_REPEATS = (3, 10)  # a GPU step takes milliseconds: the paper graphs get as many repeats as the small ones


def _trace(model: str, config: str):
    return rebuild_traced({"source": {"benchmark": model, "config": config, "overrides": {}, "seed": 0}})


def profile_cpu(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    for config in args.configs.split(","):
        warmup, repeats = REPEATS[config]
        for model in args.models.split(","):
            t0 = time.perf_counter()
            traced = _trace(model, config)
            graph = profile(traced, device="cpu", threads=1, warmup=warmup, repeats=repeats, progress=True,
                            clock=args.clock)
            graph = with_estimates(graph)
            old = DATA_DIR / f"{model}-{config}.json"
            if old.exists():  # keep cost sets measured on GPUs earlier (they are not re-measured here)
                before = OpGraph.load(old)
                kept = {k: c for k, c in before.costs.items()
                        if c.provenance.method == "measured" and k != "cpu"}
                if before.op_names == graph.op_names:
                    graph = graph.replace(costs={**graph.costs, **kept})
            built_s = time.perf_counter() - t0
            fwd_s, bwd_s = measure_step_s(traced, threads=1, warmup=warmup, repeats=repeats, clock=args.clock)
            graph.save(old)
            c = graph.cost("cpu")
            groups = int(group_ops(graph, args.groups).max()) + 1
            print(f"{graph.name}: ops={graph.n} groups={groups} params_MB={graph.param_bytes.sum() / 1e6:.1f} "
                  f"per_op_fwd+bwd_s={c.fwd_s.sum():.3f}+{c.bwd_s.sum():.3f} "
                  f"measured_step_fwd+bwd_s={fwd_s:.3f}+{bwd_s:.3f} "
                  f"bwd_coverage={c.bwd_s.sum() / bwd_s:.3f} build+profile_s={built_s:.0f}", flush=True)


def profile_cuda(args: argparse.Namespace) -> None:
    """Measured GPU cost sets, printed with the whole-step coverage and the roofline's error for this card."""
    out: dict[str, dict] = {}
    warmup, repeats = CUDA_REPEATS
    for config in args.configs.split(","):
        for model in args.models.split(","):
            t0 = time.perf_counter()
            traced = _trace(model, config)
            graph = profile(traced, device="cuda", warmup=warmup, repeats=repeats, clock="wall")
            kind = gpu_kind(torch.cuda.get_device_name())
            c = graph.cost(kind)
            fwd_s, bwd_s = measure_step_s(traced, device="cuda", warmup=warmup, repeats=repeats)
            line = (f"{graph.name} [{kind}]: ops={graph.n} per_op_fwd+bwd_ms={c.fwd_s.sum() * 1e3:.3f}+"
                    f"{c.bwd_s.sum() * 1e3:.3f} measured_step_fwd+bwd_ms={fwd_s * 1e3:.3f}+{bwd_s * 1e3:.3f} "
                    f"step_coverage={c.step_s.sum() / (fwd_s + bwd_s):.3f}")
            if kind in GPUS:
                roof = estimate(graph, kind)
                line += f" roofline/measured={roof.step_s.sum() / c.step_s.sum():.3f}"
            print(line + f" s={time.perf_counter() - t0:.0f}", flush=True)
            out[graph.name] = {"op_names": list(graph.op_names), "kind": kind, "costs": c.to_json(),
                               "step_s": [fwd_s, bwd_s]}
    text = json.dumps(out)
    if args.costs_out:
        Path(args.costs_out).write_text(text)
    else:
        merge(out)


def merge(costs: dict[str, dict]) -> None:
    """Add measured GPU cost sets (``--costs-out`` output) to the shipped graphs whose ops they describe."""
    for name, entry in costs.items():
        path = DATA_DIR / f"{name}.json"
        graph = OpGraph.load(path)
        if list(graph.op_names) != entry["op_names"]:
            raise SystemExit(f"{name}: the GPU machine traced other ops ({len(entry['op_names'])} vs {graph.n}); "
                             "not merged")
        graph.with_costs(entry["kind"], OpCosts.from_json(entry["costs"])).save(path)
        print(f"{name}: merged measured {entry['kind']} costs "
              f"(step {sum(entry['step_s']) * 1e3:.3f} ms on the card)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--configs", default="small")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--groups", type=int, default=256)
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    ap.add_argument("--clock", default="thread", choices=("thread", "wall"),
                    help="CPU: thread CPU time (robust on a shared machine; the default) or wall time")
    ap.add_argument("--costs-out", help="cuda: write the measured cost sets to this JSON, not into graphs/data")
    ap.add_argument("--merge", help="add the cost sets of a --costs-out file to the shipped graphs")
    args = ap.parse_args()
    if args.merge:
        merge(json.loads(Path(args.merge).read_text()))
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        profile_cuda(args)
    else:
        profile_cpu(args)


if __name__ == "__main__":
    main()
