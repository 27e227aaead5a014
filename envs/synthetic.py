"""Random layered DAGs with ``cpu`` and ``K80`` costs: training graphs for the RL placer when no profiled graph is
at hand, and (Placeto, Addanki et al., NeurIPS 2019, section 5) a source of graph variety for policies meant to
place unseen graphs.

A graph has ``n_layers`` layers of ``width`` ops, then one ``loss`` op. Every op of layer ``l + 1`` reads one to
three ops of layer ``l`` and every op of layer ``l`` is read at least once, so each layer is a wavefront that
several devices can run in parallel. Costs, sizes and the GPU speed-up of each op are drawn from
``numpy.random.default_rng(seed)``; the same arguments always give the same graph (and the same content hash).
"""

from __future__ import annotations

import numpy as np

from graphs.ir import OpCosts, OpGraph, Provenance

KINDS = ("Linear", "Conv2d", "LSTMCell", "matmul", "add", "relu")
"""Op kinds drawn for synthetic ops (the first three own parameters)."""
_PARAM_KINDS = frozenset(KINDS[:3])


def layered_dag(n_layers: int, width: int, seed: int = 0, *, mean_fwd_s: float = 1e-3,
                mean_out_bytes: float = 4e6, gpu_speedup: tuple[float, float] = (3.0, 15.0)) -> OpGraph:
    """A random layered DAG (see the module docstring).

    ``mean_fwd_s``: mean forward time of an op on one CPU core (log-normal spread; backward is 1.5-2.5x the
    forward). ``mean_out_bytes``: mean output size (log-normal). ``gpu_speedup``: range of the per-op ``K80``
    speed-up over the ``cpu`` cost (heavy ops get the larger speed-ups, as on real GPUs).
    """
    if n_layers < 1 or width < 1:
        raise ValueError(f"layered_dag needs n_layers >= 1 and width >= 1, got {n_layers} x {width}")
    if not mean_fwd_s > 0 or not mean_out_bytes > 0:
        raise ValueError("mean_fwd_s and mean_out_bytes must be positive")
    rng = np.random.default_rng(seed)
    n = n_layers * width
    kinds = [KINDS[int(k)] for k in rng.integers(0, len(KINDS), n)]
    # log-normal with the requested mean: exp(mu + s^2/2) = mean
    fwd = rng.lognormal(np.log(mean_fwd_s) - 0.5, 1.0, n)
    bwd = fwd * rng.uniform(1.5, 2.5, n)
    out = np.maximum(1024, rng.lognormal(np.log(mean_out_bytes) - 0.5, 1.0, n)).astype(np.int64)
    params = np.array([int(rng.uniform(0.5, 8.0) * 1e6) if k in _PARAM_KINDS else 0 for k in kinds], dtype=np.int64)
    # GPU speed-up grows with the op's weight (rank in [0, 1])
    rank = np.argsort(np.argsort(fwd)) / max(1, n - 1)
    lo, hi = gpu_speedup
    speedup = lo + (hi - lo) * rank * rng.uniform(0.7, 1.0, n)

    ops = [{"name": f"l{i // width}_{i % width}", "kind": kinds[i], "module": f"layer{i // width}.op{i % width}",
            "out_bytes": int(out[i]), "param_bytes": int(params[i]), "stash_bytes": int(out[i]),
            "flops": float(fwd[i] * 1e10)} for i in range(n)]
    ops.append({"name": "loss", "kind": "loss", "module": "loss", "out_bytes": 4, "stash_bytes": 0, "flops": 0.0})
    edges: list[tuple[str, str]] = []
    for layer in range(1, n_layers):
        prev = [f"l{layer - 1}_{w}" for w in range(width)]
        read = np.zeros(width, dtype=bool)
        for w in range(width):
            k = int(rng.integers(1, min(3, width) + 1))
            srcs = rng.choice(width, size=k, replace=False)
            read[srcs] = True
            edges += [(prev[int(s)], f"l{layer}_{w}") for s in sorted(srcs)]
        for s in np.flatnonzero(~read):  # nobody read it: give it a reader so no op dangles
            edges.append((prev[int(s)], f"l{layer}_{int(rng.integers(width))}"))
    edges += [(f"l{n_layers - 1}_{w}", "loss") for w in range(width)]
    edges = sorted(set(edges), key=lambda e: (_op_index(e[1], width), _op_index(e[0], width)))

    fwd_all = np.append(fwd, 1e-5)
    bwd_all = np.append(bwd, 1e-5)
    prov = dict(threads=0, torch_version="", date="", method="estimated", note=f"synthetic layered_dag seed={seed}")
    costs = {
        "cpu": OpCosts(fwd_s=fwd_all, bwd_s=bwd_all, provenance=Provenance(device="cpu", **prov)),
        "K80": OpCosts(fwd_s=fwd_all / np.append(speedup, 1.0), bwd_s=bwd_all / np.append(speedup, 1.0),
                       provenance=Provenance(device="K80", **prov)),
    }
    return OpGraph.build(name=f"layered-{n_layers}x{width}-s{seed}", ops=ops, edges=edges, costs=costs,
                         meta={"synthetic": {"generator": "layered_dag", "n_layers": n_layers, "width": width,
                                             "seed": seed}})


def _op_index(name: str, width: int) -> int:
    """Index of a synthetic op from its name (``l{layer}_{w}``, or ``loss`` last)."""
    if name == "loss":
        return 1 << 62
    layer, w = name[1:].split("_")
    return int(layer) * width + int(w)


def two_chains(length: int = 4, *, op_s: float = 1e-3, edge_bytes: int = 3_000_000) -> OpGraph:
    """Two independent chains of ``length`` equal ops (``op_s`` forward, twice that backward), listed interleaved
    (``a0, b0, a1, b1, ...``), each edge carrying ``edge_bytes``. On two equal devices joined by a 1 GB/s link
    the best placement is obviously one chain per device (devices alternate along the group order): each chain
    split costs two transfers of ~3 ms (forward and gradient), twice an op's whole time. A sanity problem for
    learners. (With much heavier edges, putting everything on one device becomes a deceptive local optimum
    that any policy-gradient learner with a mean baseline tends to settle in.)"""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    ops, edges = [], []
    for i in range(length):
        for chain in "ab":
            ops.append({"name": f"{chain}{i}", "kind": "Linear", "module": f"{chain}.{i}", "out_bytes": edge_bytes,
                        "param_bytes": 1_000_000, "stash_bytes": 1_000_000, "fwd_s": op_s, "bwd_s": 2 * op_s})
            if i:
                edges.append((f"{chain}{i - 1}", f"{chain}{i}"))
    return OpGraph.build(name=f"two-chains-{length}", ops=ops, edges=edges,
                         meta={"synthetic": {"generator": "two_chains", "length": length}})
