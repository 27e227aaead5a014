"""Simulator throughput: ``simulate`` evaluations per second on the benchmark graphs, one thread.

For each graph in ``graphs/data/`` (rnnlm, nmt, inception_v3; the ``paper`` config when present, else ``small``),
coarsened to the RL group count with ``graphs.grouping.coarsen(graph, k)`` (k = 256 by default), random
placements on ``cpu+4gpu`` are simulated for a few seconds. Prints one line per graph::

    figure: sim_evals_per_s[nmt] = 2345

With no graph files yet it measures a synthetic layered DAG (~300 ops, ~600 edges) and prints
``figure: sim_evals_per_s[synthetic] = N``. Run: ``python3 benchmarks/bench_sim.py [--seconds 3] [--k 256]``.
Numbers are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from graphs.ir import OpCosts, OpGraph, Provenance  # noqa: E402
from placer.core.cluster import get_cluster  # noqa: E402
from placer.core.placement import Placement  # noqa: E402
from placer.costmodel.sim import Simulator  # noqa: E402

MODELS = ("rnnlm", "nmt", "inception_v3")


def synthetic_graph(num_ops: int = 300, num_edges: int = 600, *, seed: int = 0,
                    kinds: tuple[str, ...] = ("cpu", "K80")) -> OpGraph:
    """A random layered DAG shaped like a coarsened model graph (costs 0.1-10 ms, activations 10 kB-10 MB)."""
    rng = np.random.default_rng(seed)
    width = max(1, int(np.sqrt(num_ops)))
    layer = np.sort(rng.integers(0, max(1, num_ops // width), num_ops))
    edges: set[tuple[int, int]] = set()
    for j in range(1, num_ops):  # every op but the first reads one earlier op (keeps it connected)
        prev = np.flatnonzero(layer < layer[j])
        edges.add((int(rng.choice(prev)) if prev.size else j - 1, j))
    while len(edges) < num_edges:
        a, b = sorted(rng.integers(0, num_ops, 2).tolist())
        if a != b and layer[b] - layer[a] <= 3:
            edges.add((a, b))
    src, dst = np.array(sorted(edges)).T
    fwd = rng.lognormal(np.log(1e-3), 1.0, num_ops)
    prov = lambda k: Provenance(device=k, threads=1, torch_version="", date="", method="estimated",  # noqa: E731
                                note="synthetic")
    costs = {"cpu": OpCosts(fwd_s=fwd, bwd_s=2 * fwd, provenance=prov("cpu"))}
    if "K80" in kinds:
        costs["K80"] = OpCosts(fwd_s=fwd / 8, bwd_s=fwd / 4, provenance=prov("K80"))
    out = rng.lognormal(np.log(1e5), 1.5, num_ops).astype(np.int64)
    return OpGraph(name="synthetic", op_names=[f"op{i}" for i in range(num_ops)], op_kinds=["op"] * num_ops,
                   module_paths=[""] * num_ops, out_shapes=[()] * num_ops, out_bytes=out,
                   param_bytes=rng.integers(0, 4 << 20, num_ops), stash_bytes=out, temp_bytes=out // 2,
                   flops=np.zeros(num_ops), colocation=np.arange(num_ops), edge_index=np.stack([src, dst]),
                   edge_bytes=out[src], costs=costs)


def find_graphs(data_dir: Path) -> list[tuple[str, Path, str]]:
    """``(model, path, config)`` per benchmark model with a ``{model}-{config}.json`` file, paper preferred."""
    found = []
    for model in MODELS:
        for config in ("paper", "small"):
            path = data_dir / f"{model}-{config}.json"
            if path.exists():
                found.append((model, path, config))
                break
    return found


def coarsened(graph: OpGraph, k: int) -> tuple[OpGraph, str]:
    try:
        from graphs.grouping import coarsen
    except ImportError:
        return graph, "uncoarsened (graphs.grouping.coarsen missing)"
    _, coarse = coarsen(graph, k)
    return coarse, f"coarsened to {coarse.n} nodes (k={k})"


def evals_per_s(sim: Simulator, seconds: float, *, seed: int = 0, **run_kw) -> float:
    rng = np.random.default_rng(seed)
    g, d = sim.graph, sim.cluster.num_devices
    # random group placements, repaired so colocated ops share a device (as the RL env does)
    pool = [Placement(rng.integers(0, d, g.n)).colocated(g).device_of_op for _ in range(64)]
    sim.run(pool[0], **run_kw)  # compile / warm caches
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for p in pool[:16]:
            sim.run(p, **run_kw)
        count += 16
        pool.append(pool.pop(0))
    return count / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="timing budget per graph")
    ap.add_argument("--k", type=int, default=256, help="RL group count to coarsen to")
    ap.add_argument("--cluster", default="cpu+4gpu")
    ap.add_argument("--schedule", default="none")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--data-dir", type=Path, default=ROOT / "graphs" / "data", help="where the graph JSON files are")
    args = ap.parse_args(argv)
    cluster = get_cluster(args.cluster)
    run_kw = dict(schedule=args.schedule, microbatches=args.microbatches)
    cases = []
    for model, path, config in find_graphs(args.data_dir):
        graph, how = coarsened(OpGraph.load(path), args.k)
        cases.append((model, graph, f"{path.name} ({config}), {how}"))
    if not cases:
        cases.append(("synthetic", synthetic_graph(), "synthetic layered DAG (no graphs in graphs/data/)"))
    for label, graph, how in cases:
        missing = {dev.kind for dev in cluster.devices} - set(graph.costs)
        cost_kind = {k: "cpu" for k in missing} if missing else None
        note = f"; no costs for {sorted(missing)}: using cpu costs for them" if missing else ""
        sim = Simulator(graph, cluster, cost_kind=cost_kind)
        rate = evals_per_s(sim, args.seconds, **run_kw)
        print(f"# {label}: {how}, {graph.n} nodes, {graph.num_edges} edges, {args.cluster}, "
              f"schedule={args.schedule} M={args.microbatches}{note}")
        print(f"figure: sim_evals_per_s[{label}] = {rate:.0f}")


if __name__ == "__main__":
    main()
