"""Engine benchmarks: overhead over eager PyTorch, GPipe speed-up on 2 devices, warm measurements per second.

Prints, at the end (ratios measured within this one run)::

    figure: engine_overhead = R                      # single-device engine step / eager step, same core, 1 thread
    figure: engine_overhead[nmt] = R   (rounds A..B) # the same for the small configs of nmt, inception_v3, gpt
    figure: gpipe_speedup_2dev = R                   # 2-device GPipe M=8 throughput / 1-device throughput
    figure: measured_placements_per_s[rnnlm] = R     # warm Measurer, random placements of RNNLM small

* ``engine_overhead``: RNNLM in its paper widths (hidden = embedding 1500, vocabulary 10k, batch 64, 2 layers)
  unrolled over ``--rnnlm-steps`` time steps (default 10 instead of 35, to keep the run short; the per-op
  overhead share is the same). Eager = ``loss = model(*inputs); loss.backward(); sgd.step()`` on the original
  module in this process, pinned to core 0 with 1 thread; engine = one worker pinned to core 0 with 1 thread
  (cluster ``cpu-2`` restricted to ``cpu:0``), SGD, median of ``--steps`` steps after warm-up. Target <= 1.10.
* ``engine_overhead[M]`` for M in nmt, inception_v3, gpt (``small`` configs): the same comparison, one warm
  worker against the eager model kept in this process, in ``--overhead-rounds`` interleaved rounds of
  ``--overhead-steps`` steps each (median per side per round); the figure is the median per-round ratio, the
  range of the rounds follows it. Target <= 1.10 (issue #19). The engine runs fused segments by default (one
  forward and one backward call per device run of ops, :mod:`placer.engine.segments`); run with
  ``PLACER_ENGINE_PER_OP=1`` in the environment to measure the per-op executor instead.
* ``gpipe_speedup_2dev``: ``placer.engine.toy:chain_bench`` (8 Linear(512)+tanh layers, batch 4096, balanced), the
  first 4 layers on ``cpu:0`` and the rest on ``cpu:1``, GPipe with 8 micro-batches, against the whole model on
  one worker with 1 micro-batch (plain training). Target >= 1.6 (the bubble bounds it by D M / (M + D - 1) = 1.78).
* ``measured_placements_per_s[rnnlm]``: RNNLM ``small``; random placements measured back to back by one warm
  :class:`Measurer` with its defaults (``steps=5, warmup=2``), including planning and result assembly.
  Target >= 2.

Run: ``python3 benchmarks/bench_engine.py`` (about 3-4 minutes; ``--only models`` for the per-model overheads).
Other jobs on the 2 cores distort everything, the GPipe figure most (a worker sharing its core with another busy
process runs ~3x slower); the load average at the start is printed for that reason.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from graphs.build import build_graph  # noqa: E402
from graphs.models import build_model  # noqa: E402
from placer.core.cluster import Cluster, Device, GiB, get_cluster  # noqa: E402
from placer.engine import EngineConfig, Measurer  # noqa: E402
from placer.core.placement import Placement  # noqa: E402


OVERHEAD_MODELS = ("nmt", "inception_v3", "gpt")


def eager_step_s(name: str, config: str, overrides: dict, *, steps: int, warmup: int, device: str = "cpu") -> float:
    """Median eager training step of a benchmark model in this process (CPU: core 0, one thread)."""
    return _EagerStep(name, config, overrides, device=device).median_s(steps, warmup)


def engine_overhead(args: argparse.Namespace, device: str = "cpu") -> float:
    """Engine step / eager step of the paper-width RNNLM: on ``cpu`` one worker pinned to core 0 with 1 thread;
    on ``cuda`` (a lent GPU) one NCCL worker on ``cuda:0`` against eager PyTorch on the same GPU."""
    overrides = {"seq_len": args.rnnlm_steps}
    graph = build_graph("rnnlm", config="paper", overrides=overrides, profile=None)
    if device == "cuda":
        one = Cluster.uniform("cuda-1", [Device(name="cuda:0", kind="cuda", memory_bytes=64 * GiB)],
                              bandwidth_Bps=1e12, latency_s=1e-6)
        config, steps, warmup, where = EngineConfig(timeout_s=900), max(args.steps, 10), 3, "cuda:0"
    else:
        one = get_cluster("cpu-2").subset([0], name="cpu-1")
        config, steps, warmup, where = EngineConfig(threads_per_device=1, timeout_s=900), args.steps, 1, "cpu"
    with Measurer(graph, one, config=config) as m:
        res = m.measure(Placement.single(graph), steps=steps, warmup=warmup)
    if not res.ok:
        raise SystemExit(f"engine run on {where} failed: {res.failure}")
    eager = eager_step_s("rnnlm", "paper", overrides, steps=steps, warmup=warmup, device=where)
    print(f"rnnlm paper on {where} (seq_len={args.rnnlm_steps}, {graph.n} ops): engine {res.step_time_s * 1e3:.2f} "
          f"ms, eager {eager * 1e3:.2f} ms per step (engine samples "
          f"{[round(x * 1e3, 2) for x in res.extra.get('samples_s', [])]} ms)")
    return res.step_time_s / eager


class _EagerStep:
    """An eager training step of a benchmark model in this process; on the CPU pinned to core 0 with one thread
    while it runs (the engine's worker in :func:`model_overhead` is pinned to the same core with one thread)."""

    def __init__(self, name: str, config: str, overrides: dict, *, device: str = "cpu") -> None:
        torch.manual_seed(0)
        model, inputs, _ = build_model(name, config, seed=0, **overrides)
        self.cuda = device.startswith("cuda")
        self.model = model.to(device)
        self.inputs = [x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs]
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01)

    def median_s(self, steps: int, warmup: int) -> float:
        old_aff, old_threads = os.sched_getaffinity(0), torch.get_num_threads()
        if not self.cuda:
            os.sched_setaffinity(0, {sorted(old_aff)[0]})
            torch.set_num_threads(1)
        try:
            samples = []
            for s in range(warmup + steps):
                if self.cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                self.opt.zero_grad(set_to_none=True)
                self.model(*self.inputs).backward()
                self.opt.step()
                if self.cuda:
                    torch.cuda.synchronize()
                if s >= warmup:
                    samples.append(time.perf_counter() - t)
            return float(statistics.median(samples))
        finally:
            torch.set_num_threads(old_threads)
            os.sched_setaffinity(0, old_aff)


def model_overhead(name: str, args: argparse.Namespace, config: str = "small") -> list[float]:
    """Per-round ratios engine step / eager step of a benchmark model's ``config`` on one device (core 0, one
    thread each side), rounds interleaved so that both sides of a ratio see the same load."""
    graph = build_graph(name, config=config, profile=None)
    one = get_cluster("cpu-2").subset([0], name="cpu-1")
    eager = _EagerStep(name, config, {})
    ratios, eng_s, eag_s = [], [], []
    with Measurer(graph, one, config=EngineConfig(threads_per_device=1, timeout_s=900)) as m:
        for _ in range(args.overhead_rounds):
            res = m.measure(Placement.single(graph), steps=args.overhead_steps, warmup=2)
            if not res.ok:
                raise SystemExit(f"engine run of {name} failed: {res.failure}")
            e = eager.median_s(args.overhead_steps, 2)
            ratios.append(res.step_time_s / e)
            eng_s.append(res.step_time_s)
            eag_s.append(e)
    print(f"{name} {config} ({graph.n} ops, {args.overhead_rounds} rounds x {args.overhead_steps} steps): engine "
          f"{statistics.median(eng_s) * 1e3:.2f} ms, eager {statistics.median(eag_s) * 1e3:.2f} ms (medians); "
          f"per-round ratios {[round(x, 3) for x in ratios]}")
    return ratios


def gpipe_speedup(args: argparse.Namespace) -> float:
    graph = build_graph("placer.engine.toy:chain_bench", profile=None)
    layers = [i for i, k in enumerate(graph.op_kinds) if k == "Linear"]
    cut = layers[len(layers) // 2]  # first op of layer 5
    two = Placement(np.array([0 if i < cut or name == "target" else 1 for i, name in enumerate(graph.op_names)]))
    ratios: list[float] = []
    one_s: list[float] = []
    piped_s: list[float] = []
    busy = []
    with Measurer(graph, get_cluster("cpu-2"), config=EngineConfig(threads_per_device=1, timeout_s=900)) as m:
        # Alternate the two configurations and take the median of the per-round ratios, so that a slow spell of
        # the (virtual) machine hits both sides of a ratio alike: one 3-step median swung it from 1.33 to 1.72.
        for _ in range(args.rounds):
            single = m.measure(Placement.single(graph, 0), steps=args.steps, warmup=1)
            piped = m.measure(two, schedule="gpipe", microbatches=8, steps=args.steps, warmup=1)
            for r in (single, piped):
                if not r.ok:
                    raise SystemExit(f"engine run failed: {r.failure}")
            ratios.append(single.step_time_s / piped.step_time_s)
            one_s.append(single.step_time_s)
            piped_s.append(piped.step_time_s)
            busy.append(piped.busy_s)
    one, two_dev = statistics.median(one_s), statistics.median(piped_s)
    stage_s = np.median(busy, axis=0)
    # GPipe's bound for these stages: the slower stage's work plus its share of the bubble, (M + D - 1) / M
    bound = one / (float(stage_s.max()) * (8 + 2 - 1) / 8)
    print(f"chain_bench ({args.rounds} rounds x {args.steps} steps): 1 device {one:.3f} s, 2-device GPipe M=8 "
          f"{two_dev:.3f} s (medians); per-round speed-ups {[round(x, 3) for x in ratios]}; median busy per "
          f"device {np.round(stage_s, 3).tolist()} s, so GPipe's bound for these stages is {bound:.3f} "
          f"(1.78 for equal stages with no micro-batching cost)")
    return float(statistics.median(ratios))


def placements_per_s(args: argparse.Namespace) -> float:
    graph = build_graph("rnnlm", config="small", profile=None)
    rng = np.random.default_rng(0)
    groups = int(graph.colocation.max()) + 1
    with Measurer(graph, get_cluster("cpu-2")) as m:
        assert m.measure(Placement.single(graph)).ok  # start the workers outside the timed loop
        t = time.perf_counter()
        done = 0
        while time.perf_counter() - t < args.seconds:
            pl = Placement(rng.integers(0, 2, groups)[graph.colocation])
            res = m.measure(pl)
            if not res.ok:
                raise SystemExit(f"engine run failed: {res.failure}")
            done += 1
        return done / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="measured steps per configuration")
    ap.add_argument("--rounds", type=int, default=7, help="alternating single/GPipe rounds (GPipe figure)")
    ap.add_argument("--rnnlm-steps", type=int, default=10, help="unrolled time steps of the paper-width RNNLM")
    ap.add_argument("--seconds", type=float, default=10.0, help="duration of the placements-per-second loop")
    ap.add_argument("--overhead-rounds", type=int, default=7, help="interleaved engine/eager rounds per model")
    ap.add_argument("--overhead-steps", type=int, default=20, help="steps per side per round (small models)")
    ap.add_argument("--only", default="", help="comma-separated subset of: rnnlm, models, gpipe, rate")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="cuda: only the engine overhead, on cuda:0 (figure engine_overhead[cuda])")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cuda":
        print(f"figure: engine_overhead[cuda] = {engine_overhead(args, device='cuda'):.3f}")
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f} (anything near or above 1 means other jobs compete)")
    only = set(filter(None, args.only.split(","))) or {"rnnlm", "models", "gpipe", "rate"}
    figures = []
    if "rnnlm" in only:
        figures.append(f"figure: engine_overhead = {engine_overhead(args):.3f}")
    if "models" in only:
        for name in OVERHEAD_MODELS:
            r = model_overhead(name, args)
            figures.append(f"figure: engine_overhead[{name}] = {statistics.median(r):.3f}   "
                           f"(rounds {min(r):.3f}..{max(r):.3f})")
    if "gpipe" in only:
        figures.append(f"figure: gpipe_speedup_2dev = {gpipe_speedup(args):.3f}")
    if "rate" in only:
        figures.append(f"figure: measured_placements_per_s[rnnlm] = {placements_per_s(args):.2f}")
    print("\n".join(figures))


if __name__ == "__main__":
    main()
