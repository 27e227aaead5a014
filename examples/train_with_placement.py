"""Train a model with a placement JSON made by placer — the trainer side of ``placer.placement/v1``.

Two modes (see ``examples/README.md``):

* ``--mode apply``: one process; :func:`placer.io.loaders.apply` puts each module on its device and moves
  activations between them (single-process model parallelism, as ColocRL ran its placements).
* ``--mode pipeline``: one process per device of the pipeline stages, launched by ``torchrun``;
  :func:`placer.io.loaders.rank_pipeline_stages` builds this rank's ``torch.distributed.pipelining`` stage (several
  for an interleaved placement, whose stages go round the devices) from the
  placement's ``stages`` and the placement's schedule (GPipe, 1F1B or interleaved 1F1B) runs them. gloo on CPU, nccl
  on CUDA.

The model is rebuilt from the graph the placement was made for: the shipped graph of that name
(``graphs/data``) or ``--graph FILE.json``; its ``meta["source"]`` says how (benchmark name and config, or a
``package.module:factory``), with the same seed on every rank so all ranks start from identical weights.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from graphs.batch import batched_tensors, input_batches  # noqa: E402
from graphs.build import load_factory, rebuild_traced  # noqa: E402
from graphs.data import load_benchmark_graph  # noqa: E402
from graphs.ir import OpGraph  # noqa: E402
from graphs.loss import traced_default_loss  # noqa: E402
from placer.io.document import load_placement  # noqa: E402
from placer.io.loaders import (apply, module_fqns_per_model_part, pipeline_schedule, placed_devices,  # noqa: E402
                               rank_pipeline_stages)


def build_from_source(src: dict[str, Any]) -> tuple[nn.Module, tuple, Callable | None]:
    """``(model, example_inputs, loss_fn)`` from a graph's ``meta["source"]``, exactly as it was traced."""
    seed = int(src.get("seed", 0))
    if "benchmark" in src:
        from graphs.models import build_model

        model, inputs, loss_fn = build_model(src["benchmark"], src.get("config", "small"), seed=seed,
                                             **dict(src.get("overrides") or {}))
        return model, tuple(inputs), loss_fn
    torch.manual_seed(seed)  # factories use the default initialisation: seed it as graphs.build does
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model, inputs, *rest = load_factory(src["factory"])()
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return model, inputs, (rest[0] if rest else None)


def step_loss(model: nn.Module, inputs: tuple, loss_fn: Callable | None, meta: dict[str, Any]) -> torch.Tensor:
    """The loss the graph was traced with: the factory's, else the one placer chose (the mean of squares)."""
    return (loss_fn or traced_default_loss(meta))(model(*inputs))


def parse_device_map(text: str | None) -> dict[str, str]:
    """``"cpu:1=cpu,gpu:0=cuda:0"`` → ``{"cpu:1": "cpu", "gpu:0": "cuda:0"}``."""
    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise SystemExit(f"--device-map must look like 'cpu:1=cpu,gpu:0=cuda:0', got {text!r}")
    return {k.strip(): v.strip() for k, v in pairs}


def load(args: argparse.Namespace) -> tuple[dict[str, Any], OpGraph]:
    graph = OpGraph.load(args.graph) if args.graph else None
    doc = load_placement(args.placement).doc
    if graph is None:
        graph = load_benchmark_graph(doc["graph"]["name"])
    load_placement(args.placement, graph)  # the placement must be for this graph (hash, op names)
    return doc, graph


# ---------------------------------------------------------------------------------------------- apply


def train_apply(args: argparse.Namespace) -> None:
    doc, graph = load(args)
    model, inputs, loss_fn = build_from_source(graph.meta["source"])
    apply(model, doc, device_map=parse_device_map(args.device_map))
    where = placed_devices(model)
    print(f"placed {len(where)} modules of {graph.name}: "
          + ", ".join(f"{p or '<root>'}->{d}" for p, d in sorted(where.items())))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = step_loss(model, inputs, loss_fn, graph.meta)
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.6f} ({(time.perf_counter() - t0) * 1e3:.1f} ms)", flush=True)


# ---------------------------------------------------------------------------------------------- pipeline


def train_pipeline(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    doc, graph = load(args)
    if not doc.get("stages"):
        raise SystemExit(f"{args.placement}: this placement is not stage-contiguous (no 'stages'); "
                         f"use --mode apply, or make one with e.g. 'placer baseline --method pipedream-dp'")
    device_map = parse_device_map(args.device_map)
    rank = int(os.environ.get("RANK", "0"))
    stage_dev = doc["devices"][doc["stages"][rank]["device"]] if rank < len(doc["stages"]) else "cpu"
    device = torch.device(device_map.get(stage_dev, stage_dev))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # traced exactly as the graph was (same op names), from the same seed on every rank
        traced = rebuild_traced(graph.meta)
        inputs = traced.example_inputs
        stages = rank_pipeline_stages(traced, doc, rank, device_map=device_map, microbatches=args.microbatches)
        schedule = pipeline_schedule(stages, doc, microbatches=args.microbatches)
        m = schedule._n_microbatches
        batch = input_batches(inputs)[0][1]
        if batch % m:
            raise SystemExit(f"batch {batch} does not split into {m} equal micro-batches")
        first, last = any(s.is_first for s in stages), any(s.is_last for s in stages)  # interleaved: several
        dev = stages[0].device
        opt = torch.optim.SGD([p for s in stages for p in s.submod.parameters()], lr=args.lr)
        feed = tuple(x.to(dev) for x in batched_tensors(inputs)) if first else ()  # a dict batch: its tensors
        dummy_target = torch.zeros(batch, device=dev) if last else None  # the last stage returns the loss itself
        if rank == 0:
            print(f"{graph.name}: {len(doc['stages'])} stages, {doc['schedule']['name']} with {m} micro-batches, "
                  f"backend {dist.get_backend()}", flush=True)
            if doc.get("module_fqns_per_model_part"):  # the same split by module names (torchtitan's form)
                print("; ".join(f"stage {k} owns {', '.join(fqns)}" for k, fqns in
                                enumerate(module_fqns_per_model_part(doc, traced.gm))), flush=True)
        for step in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            losses: list[torch.Tensor] = []
            schedule.step(*feed, target=dummy_target, losses=losses if last else None, return_outputs=False)
            opt.step()
            # equal micro-batches of a mean loss: the step's loss is the mean of the micro-batch losses
            loss = torch.stack([x.detach() for x in losses]).mean().reshape(1) if last else torch.zeros(1, device=dev)
            dist.broadcast(loss, src=dist.get_world_size() - 1)
            if rank == 0:
                print(f"step {step} loss {loss.item():.6f} ({(time.perf_counter() - t0) * 1e3:.1f} ms)", flush=True)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--placement", required=True, help="placement JSON (placer baseline/train/place --out)")
    ap.add_argument("--mode", choices=("apply", "pipeline"), default="apply")
    ap.add_argument("--graph", help="graph JSON the placement was made for (default: the shipped graph of its name)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--microbatches", type=int, help="override the placement's micro-batch count (pipeline)")
    ap.add_argument("--device-map", help="rename placement devices, e.g. 'cpu:1=cpu,gpu:0=cuda:0'")
    args = ap.parse_args(argv)
    try:
        (train_apply if args.mode == "apply" else train_pipeline)(args)
    except ValueError as e:  # placer's one-line errors: no traceback for bad input
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
