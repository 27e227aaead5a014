"""Regenerate the shipped, profiled benchmark graphs: ``python -m graphs.data [--configs small,paper]``.

On the CPU (the default) each model is traced, every op is profiled on one pinned CPU core (1 intra-op thread —
the same as a ``cpu-2`` worker), roofline estimates for K80/V100/A100/H100 are added and the shipped graph files
are rewritten. Prints, per graph, what the closing notes of the foundation issue ask for: ops, groups, total step
time, parameter MB and build time.

Two graphs are too big to profile whole here (``ESTIMATED``): ``gpt-1.3b`` (its parameters and gradients alone
are ~10 GB) and ``moe-paper`` (minutes per step). They are traced on the meta device (no memory, exact shapes and
bytes), and their CPU costs come from a profiled *slice*: the same model with its dense blocks and one more
block, at batch 1; every block beyond the slice takes the last slice block's op costs, and each op's time,
FLOPs and stash are scaled by the ratio of the bytes it touches (inputs + output) in the full graph to the
slice's. The cost set says so (provenance ``estimated``). Checked against graphs profiled whole (2026-12-03):
FLOPs and stash bytes come out exact; the step time 4% high for ``gpt-paper`` (1,024-token sequences, the
estimated graphs' length), 13-48% high for ``moe-medium`` and ``gpt-medium``, whose batch-1 slices of
128-token sequences run small, less efficient ops.

On a GPU (``--device cuda``), the same ops are profiled on the card and stored as one more *measured* cost set
named after it (``H200``, ``H100``...; see :func:`graphs.profile.gpu_kind`), next to the CPU costs. A lent GPU
machine cannot write here, so ``--costs-out FILE`` writes only the cost sets; ``--merge FILE`` adds them to the
shipped graphs on this machine, after checking that the GPU machine traced the same ops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphs.build import rebuild_traced
from graphs.data import DATA_DIR
from graphs.grouping import group_ops
from graphs.ir import OpCosts, OpGraph, Provenance
from graphs.models import CONFIGS, gpt, moe, resolve_config
from graphs.profile import gpu_kind, measure_step_s, profile
from graphs.roofline import GPUS, estimate, with_estimates
from graphs.trace import trace_model

MODELS = ("rnnlm", "nmt", "inception_v3", "gpt", "moe")
REPEATS = {"small": (3, 10), "medium": (1, 3), "paper": (1, 3), "1.3b": (1, 3)}
"""(warm-up, repeats) per config: paper steps take ~20 s (ColocRL models) to a minute (gpt) on one core."""
CUDA_REPEATS = (3, 10)  # a GPU step takes milliseconds: the paper graphs get as many repeats as the small ones
ESTIMATED = {("gpt", "1.3b"), ("moe", "paper")}
"""Graphs whose CPU costs are estimated from a profiled slice (see the module docstring), not profiled whole."""


def _source(model: str, config: str, overrides: dict | None = None) -> dict:
    return {"benchmark": model, "config": config, "overrides": dict(overrides or {}), "seed": 0}


def _trace(model: str, config: str, overrides: dict | None = None):
    return rebuild_traced({"source": _source(model, config, overrides)})


def profile_cpu(args: argparse.Namespace) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    for config in args.configs.split(","):
        warmup, repeats = REPEATS[config]
        for model in [m for m in args.models.split(",") if config in CONFIGS[m]]:
            t0 = time.perf_counter()
            if (model, config) in ESTIMATED:
                graph = with_estimates(estimate_from_slice(model, config, clock=args.clock))
                graph.save(DATA_DIR / f"{model}-{config}.json")
                c = graph.cost("cpu")
                print(f"{graph.name}: ops={graph.n} params_MB={graph.param_bytes.sum() / 1e6:.1f} "
                      f"estimated_fwd+bwd_s={c.fwd_s.sum():.3f}+{c.bwd_s.sum():.3f} "
                      f"build+profile_s={time.perf_counter() - t0:.0f}", flush=True)
                continue
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


def _slice_layers(model: str, config: Any) -> int:
    """Blocks of the profiled slice: every dense block of an MoE decoder plus one MoE block; one GPT block."""
    return config.dense_layers + 1 if model == "moe" else 1


def _role_keys(graph: OpGraph, last_block: int | None = None) -> list[tuple[str, int]]:
    """Per op: (module path, with a block index above ``last_block`` replaced by it; the op's rank among the
    ops of its own path). Blocks of one kind trace to the same ops in the same order, so equal keys mean the
    same op of equal blocks."""
    seen: dict[str, int] = {}
    keys = []
    for path in graph.module_paths:
        rank = seen[path] = seen.get(path, -1) + 1
        if last_block is not None:
            path = re.sub(r"^blocks\.(\d+)", lambda m: f"blocks.{min(int(m.group(1)), last_block)}", path)
        keys.append((path, rank))
    return keys


def _touched_bytes(graph: OpGraph) -> np.ndarray:
    touched = graph.out_bytes.astype(np.float64)
    np.add.at(touched, graph.edge_index[1], graph.edge_bytes.astype(np.float64))
    return touched


def estimate_from_slice(model: str, config: str, *, clock: str = "thread") -> OpGraph:
    """The full graph traced on the meta device, with CPU costs scaled from a profiled slice (module docstring)."""
    cfg = resolve_config(model, config)
    layers = _slice_layers(model, cfg)
    cls = {"gpt": gpt.GPT, "moe": moe.MoEDecoder}[model]
    with torch.device("meta"):  # exact shapes and bytes, no memory, no compute
        net = cls(cfg)
        inputs = tuple(torch.zeros(cfg.batch, cfg.seq_len, dtype=torch.long) for _ in range(2))
    full = trace_model(net, inputs, name=f"{model}-{config}", meta={"source": _source(model, config)},
                       method="fx").graph
    overrides = {"layers": layers, "batch": 1}
    part = profile(_trace(model, config, overrides), device="cpu", threads=1, warmup=1, repeats=3, clock=clock)
    index = {key: i for i, key in enumerate(_role_keys(part))}
    ref = np.array([index[key] for key in _role_keys(full, last_block=layers - 1)])
    if [part.op_kinds[i] for i in ref] != list(full.op_kinds):
        raise SystemExit(f"{full.name}: the slice's ops do not match the full graph's; cannot estimate")
    part_bytes = _touched_bytes(part)[ref]
    scale = np.where(part_bytes > 0, _touched_bytes(full) / np.maximum(part_bytes, 1.0), 1.0)
    measured = part.cost("cpu")
    prov = Provenance(
        device="cpu", threads=1, torch_version=torch.__version__, date=datetime.date.today().isoformat(),
        method="estimated",
        note=(f"too big to profile whole on this machine: op costs of a profiled {layers}-block, batch-1 slice "
              f"(overrides {overrides}), the last slice block's for every later block, each scaled by the ratio "
              f"of bytes the op touches (inputs + output) here to the slice's; slice: {measured.provenance.note}"))
    costs = OpCosts(fwd_s=measured.fwd_s[ref] * scale, bwd_s=measured.bwd_s[ref] * scale, provenance=prov)
    stash = np.rint(part.stash_bytes[ref] * scale).astype(np.int64)
    return full.replace(flops=part.flops[ref] * scale, stash_bytes=stash, temp_bytes=np.zeros(full.n, np.int64),
                        costs={"cpu": costs})


def profile_cuda(args: argparse.Namespace) -> None:
    """Measured GPU cost sets, printed with the whole-step coverage and the roofline's error for this card. Every
    graph is profiled whole (a lent card holds even the ``ESTIMATED`` ones); with ``--costs-out`` the file is
    rewritten after each graph, so a run stopped at its time limit keeps the graphs it finished."""
    out: dict[str, dict] = {}
    warmup, repeats = CUDA_REPEATS
    for config in args.configs.split(","):
        for model in [m for m in args.models.split(",") if config in CONFIGS[m]]:
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
            del traced, graph
            torch.cuda.empty_cache()
            if args.costs_out:
                Path(args.costs_out).write_text(json.dumps(out))
    if not args.costs_out:
        merge(out)


def merge(costs: dict[str, dict]) -> None:
    """Add measured GPU cost sets (``--costs-out`` output) to the shipped graphs whose ops they describe."""
    for name, entry in costs.items():
        path = DATA_DIR / f"{name}.json"
        graph = OpGraph.load(path)
        if list(graph.op_names) != entry["op_names"]:
            raise SystemExit(f"{name}: the GPU machine traced other ops ({len(entry['op_names'])} vs {graph.n}); "
                             "not merged")
        reestimate(graph.with_costs(entry["kind"], OpCosts.from_json(entry["costs"]))).save(path)
        print(f"{name}: merged measured {entry['kind']} costs "
              f"(step {sum(entry['step_s']) * 1e3:.3f} ms on the card)")


def reestimate(graph: OpGraph) -> OpGraph:
    """``graph`` with its estimated cost sets of GPUs that a measured GPU set anchors (``A100``... next to a
    measured ``H100``; see :mod:`graphs.roofline`) estimated anew; other sets as they are."""
    kinds = {k: c.provenance.method for k, c in graph.costs.items() if k in GPUS and GPUS[k].anchorable}
    if "measured" not in kinds.values():
        return graph
    return with_estimates(graph, [k for k, method in kinds.items() if method == "estimated"])


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
    ap.add_argument("--reestimate", action="store_true",
                    help="estimate the shipped graphs' anchored GPU cost sets anew (after a roofline change)")
    args = ap.parse_args()
    if args.merge:
        merge(json.loads(Path(args.merge).read_text()))
    elif args.reestimate:
        for path in sorted(DATA_DIR.glob("*.json")):
            reestimate(OpGraph.load(path)).save(path)
    elif args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
        profile_cuda(args)
    else:
        profile_cpu(args)


if __name__ == "__main__":
    main()
