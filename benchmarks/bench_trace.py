"""Tracing today's models: op counts, trace + profile time on one core, and whether the graph micro-batches.

For ``gpt`` and ``moe`` (``small``, ``medium``, ``paper``) and any extra model source that exists (``EXTRA``:
user factories such as Hugging Face models built from a config; a missing one is skipped with a comment), prints::

    figure: ops[gpt-paper] = 383              # ops of the traced training step
    figure: build_s[gpt-paper] = 138          # trace + profile, pinned to one core, one thread (wall seconds)
    figure: microbatchable[gpt-paper] = 1     # every op of the traced step splits into micro-batches
    # one-core step[gpt-paper]: fwd+bwd 16.779 s wall, 16.766 s CPU (eager model, one thread)

``build_s`` uses the warm-up/repeat counts that ``python -m graphs.data`` uses for the config. Graphs that
``graphs.data`` estimates from a profiled slice (``moe-paper``) are built that way here too, and their
one-core step line is left out (it takes minutes). ``microbatchable`` is 1 when every op of the traced step
(whatever tracer ran) gives on a micro-batch its share of its result on the batch
(:func:`graphs.microbatch.find_batch_mixing`, the check ``graph build`` records and the engine relies on); 0, with
the op named, when one mixes samples (e.g. a shape baked into a ``view``) or fails on a micro-batch.
Run: ``python3 benchmarks/bench_trace.py [--configs small,medium,paper] [--models gpt,moe] [--core 0]``.
Slow: the paper configs take several minutes each on one core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from graphs.build import build_graph, load_factory, rebuild_traced  # noqa: E402
from graphs.data.__main__ import ESTIMATED, REPEATS, _slice_layers, estimate_from_slice  # noqa: E402
from graphs.microbatch import find_batch_mixing  # noqa: E402
from graphs.models import CONFIGS, build_model, resolve_config  # noqa: E402
from graphs.profile import profile  # noqa: E402
from graphs.trace import TracedModel  # noqa: E402

EXTRA = tuple(f"tests.fixtures_models:{name}" for name in
              ("encoder_lm", "nn_transformer", "hf_gpt2", "hf_llama", "hf_bert", "hard_coded_batch"))
"""User model sources measured too when they exist (issue #18 part B's factories: an nn.TransformerEncoder LM,
nn.Transformer, Hugging Face models from configs, and a model with its batch size baked in, which should
report ``microbatchable`` 0)."""


def microbatchable(traced: TracedModel) -> int:
    """1 if the traced step splits into micro-batches: :func:`graphs.microbatch.find_batch_mixing`, the check the
    build records and the engine's refusal relies on (every op's result on a micro-batch must be its share of the
    op's result on the batch; comparing only the mean loss would pass a reshape that mixes samples, since a mean
    does not care which sample a row came from)."""
    found = find_batch_mixing(traced.gm, traced.example_inputs)
    if found is not None:
        print(f"# not micro-batchable at op {found[0]!r}: {found[1]}")
    return int(found is None)


def eager_step_s(name: str, config: str, repeats: int) -> tuple[float, float]:
    """Median wall and thread-CPU time of forward + backward of the eager benchmark model (one thread). On a
    shared machine the CPU time is the robust one: wall time grows with whatever else runs on the core."""
    model, inputs, _ = build_model(name, config)
    times = []
    for _ in range(repeats + 1):  # the first step warms up the allocator and oneDNN
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.thread_time()
        model(*inputs).backward()
        times.append((time.perf_counter() - t0, time.thread_time() - c0))
    walls, cpus = sorted(t[0] for t in times[1:]), sorted(t[1] for t in times[1:])
    return walls[len(walls) // 2], cpus[len(cpus) // 2]


def bench_benchmark(name: str, config: str, *, step_repeats: int) -> None:
    label = f"{name}-{config}"
    warmup, repeats = REPEATS[config]
    t0 = time.perf_counter()
    if (name, config) in ESTIMATED:
        graph = estimate_from_slice(name, config)
        print(f"# {label}: costs estimated from a profiled slice (graphs/data/__main__.py ESTIMATED)")
        traced = None
    else:
        traced = rebuild_traced({"source": {"benchmark": name, "config": config, "overrides": {}, "seed": 0}})
        graph = profile(traced, device="cpu", threads=1, warmup=warmup, repeats=repeats)
    build_s = time.perf_counter() - t0
    print(f"figure: ops[{label}] = {graph.n}")
    print(f"figure: build_s[{label}] = {build_s:.1f}")
    if traced is None:
        # The whole model's activations do not fit this machine (moe-paper: 24 GB, killed): check the same code
        # on the slice's blocks with 128-token sequences; micro-batching depends on neither.
        overrides = {"layers": _slice_layers(name, resolve_config(name, config)), "seq_len": 128}
        print(f"# {label}: microbatchable checked with overrides {overrides}")
        traced = rebuild_traced({"source": {"benchmark": name, "config": config, "overrides": overrides, "seed": 0}})
    print(f"figure: microbatchable[{label}] = {microbatchable(traced)}")
    del traced
    if (name, config) not in ESTIMATED:
        wall_s, cpu_s = eager_step_s(name, config, step_repeats)
        print(f"# one-core step[{label}]: fwd+bwd {wall_s:.3f} s wall, {cpu_s:.3f} s CPU (eager model, one thread)",
              flush=True)


def bench_extra(source: str) -> None:
    try:
        load_factory(source)
    except ValueError as e:
        print(f"# {source}: skipped ({e})")
        return
    label = source.split(":")[1]
    t0 = time.perf_counter()
    graph = build_graph(source, profile="cpu")
    print(f"figure: ops[{label}] = {graph.n}")
    print(f"figure: build_s[{label}] = {time.perf_counter() - t0:.1f}")
    print(f"# {label}: traced with {graph.meta.get('trace')}")
    print(f"figure: microbatchable[{label}] = {microbatchable(rebuild_traced(graph.meta))}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt,moe")
    ap.add_argument("--configs", default="small,medium,paper")
    ap.add_argument("--extra", default=",".join(EXTRA), help="user model sources; '' for none")
    ap.add_argument("--core", type=int, default=0, help="CPU core to pin to")
    args = ap.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.core})
    torch.set_num_threads(1)
    for config in args.configs.split(","):
        for name in args.models.split(","):
            if config in CONFIGS[name]:
                bench_benchmark(name, config, step_repeats=1 if config in ("paper", "1.3b") else 3)
    for source in filter(None, args.extra.split(",")):
        bench_extra(source)


if __name__ == "__main__":
    main()
