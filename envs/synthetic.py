"""Random op graphs with ``cpu`` and ``K80`` costs: training graphs for the RL placer when no profiled graph is
at hand, and (Placeto, Addanki et al., NeurIPS 2019, section 5) a source of graph variety for policies meant to
place unseen graphs. Three families, each shaped like a kind of network a placer meets:

* :func:`layered_dag` — ``n_layers`` layers of ``width`` ops, then one ``loss`` op. Every op of layer ``l + 1``
  reads one to three ops of layer ``l`` and every op of layer ``l`` is read at least once, so each layer is a
  wavefront that several devices can run in parallel.
* :func:`recurrent_grid` — a stacked recurrent network unrolled over time (RNNLM/NMT-like): cell ``(l, t)`` reads
  cell ``(l, t - 1)`` and cell ``(l - 1, t)``; the calls of one layer's cell share its weights, so they form one
  colocation group, as do the per-step embedding and output projection.
* :func:`branch_blocks` — blocks of parallel branches joined by a concatenation (Inception-like).

Costs, sizes and the GPU speed-up of each op are drawn from ``numpy.random.default_rng(seed)``; the same arguments
always give the same graph (and the same content hash).
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

    return OpGraph.build(name=f"layered-{n_layers}x{width}-s{seed}", ops=ops, edges=edges,
                         costs=_costs(np.append(fwd, 1e-5), np.append(bwd, 1e-5), np.append(speedup, 1.0),
                                      f"layered_dag seed={seed}"),
                         meta={"synthetic": {"generator": "layered_dag", "n_layers": n_layers, "width": width,
                                             "seed": seed}})


def _costs(fwd_s: np.ndarray, bwd_s: np.ndarray, gpu_speedup: np.ndarray, note: str) -> dict[str, OpCosts]:
    """``cpu`` costs as drawn and ``K80`` costs ``gpu_speedup`` times faster."""
    prov = dict(threads=0, torch_version="", date="", method="estimated", note=f"synthetic {note}")
    return {
        "cpu": OpCosts(fwd_s=fwd_s, bwd_s=bwd_s, provenance=Provenance(device="cpu", **prov)),
        "K80": OpCosts(fwd_s=fwd_s / gpu_speedup, bwd_s=bwd_s / gpu_speedup,
                       provenance=Provenance(device="K80", **prov)),
    }


def recurrent_grid(n_layers: int, steps: int, seed: int = 0, *, mean_fwd_s: float = 1e-3,
                   mean_out_bytes: float = 4e6, gpu_speedup: tuple[float, float] = (8.0, 15.0)) -> OpGraph:
    """A stacked recurrent network unrolled over ``steps`` time steps (see the module docstring).

    Per step: an embedding lookup, ``n_layers`` cells and an output projection; then one ``loss`` reads every
    projection. Each of those modules has one forward time for all steps (drawn per graph, +-10% per call), its
    parameters are counted at its first call, and its calls share a colocation group. Cells and projections get
    GPU speed-ups drawn from ``gpu_speedup``, the embedding lookup 1.5-3x.
    """
    if n_layers < 1 or steps < 1:
        raise ValueError(f"recurrent_grid needs n_layers >= 1 and steps >= 1, got {n_layers} x {steps}")
    rng = np.random.default_rng(seed)
    cell_s = rng.lognormal(np.log(mean_fwd_s) - 0.5, 0.5, n_layers)
    mods = {"emb": (float(cell_s.mean() * rng.uniform(0.02, 0.1)), rng.uniform(1.5, 3.0), "Embedding",
                    int(rng.uniform(10, 80) * 1e6))}
    for layer in range(n_layers):
        mods[f"cell{layer}"] = (float(cell_s[layer]), rng.uniform(*gpu_speedup), "LSTMCell",
                                int(rng.uniform(4, 40) * 1e6))
    mods["proj"] = (float(cell_s.mean() * rng.uniform(0.5, 3.0)), rng.uniform(*gpu_speedup), "Linear",
                    int(rng.uniform(10, 80) * 1e6))
    hidden_bytes = int(max(1024, rng.lognormal(np.log(mean_out_bytes) - 0.5, 0.5)))
    logits_bytes = int(hidden_bytes * rng.uniform(2.0, 10.0))
    ops: list[dict] = []
    edges: list[tuple[str, str]] = []
    first: dict[str, int] = {}
    fwd, speedup = [], []
    for t in range(steps):
        names = {"emb": f"emb_{t}", "proj": f"proj_{t}", **{f"cell{l}": f"cell{l}_{t}" for l in range(n_layers)}}
        for mod in ("emb", *[f"cell{l}" for l in range(n_layers)], "proj"):
            base_s, gpu_x, kind, params = mods[mod]
            out = logits_bytes if mod == "proj" else hidden_bytes
            new = mod not in first
            first.setdefault(mod, len(ops))
            ops.append({"name": names[mod], "kind": kind, "module": mod, "out_bytes": out,
                        "param_bytes": params if new else 0, "stash_bytes": out, "colocation": first[mod],
                        "flops": base_s * 1e10})
            fwd.append(base_s * rng.uniform(0.9, 1.1))
            speedup.append(gpu_x)
        edges.append((f"emb_{t}", f"cell0_{t}"))
        for layer in range(n_layers):
            if t:
                edges.append((f"cell{layer}_{t - 1}", f"cell{layer}_{t}"))
            if layer:
                edges.append((f"cell{layer - 1}_{t}", f"cell{layer}_{t}"))
        edges.append((f"cell{n_layers - 1}_{t}", f"proj_{t}"))
        edges.append((f"proj_{t}", "loss"))
    ops.append({"name": "loss", "kind": "loss", "module": "loss", "out_bytes": 4, "stash_bytes": 0, "flops": 0.0})
    fwd_s = np.append(fwd, 1e-5)
    return OpGraph.build(name=f"recurrent-{n_layers}x{steps}-s{seed}", ops=ops, edges=edges,
                         costs=_costs(fwd_s, fwd_s * 2.0, np.append(speedup, 1.0), f"recurrent_grid seed={seed}"),
                         meta={"synthetic": {"generator": "recurrent_grid", "n_layers": n_layers, "steps": steps,
                                             "seed": seed}})


def branch_blocks(n_blocks: int, seed: int = 0, *, mean_fwd_s: float = 1e-3, mean_out_bytes: float = 4e6,
                  gpu_speedup: tuple[float, float] = (6.0, 15.0)) -> OpGraph:
    """A stem, ``n_blocks`` blocks of 2-4 parallel branches (chains of 1-3 convolutions) each joined by a
    concatenation, then a classifier and the ``loss`` (see the module docstring). Convolutions get GPU speed-ups
    drawn from ``gpu_speedup``, concatenations 2-4x."""
    if n_blocks < 1:
        raise ValueError(f"branch_blocks needs n_blocks >= 1, got {n_blocks}")
    rng = np.random.default_rng(seed)
    ops: list[dict] = []
    edges: list[tuple[str, str]] = []
    fwd, speedup = [], []

    def add(name: str, kind: str, inputs: list[str], weight: float, out_bytes: float) -> str:
        conv = kind in ("Conv2d", "Linear")
        fwd.append(weight * mean_fwd_s * rng.lognormal(-0.5, 1.0) if conv else 0.05 * mean_fwd_s)
        speedup.append(rng.uniform(*gpu_speedup) if conv else rng.uniform(2.0, 4.0))
        ops.append({"name": name, "kind": kind, "module": name, "out_bytes": int(max(1024, out_bytes)),
                    "param_bytes": int(rng.uniform(0.2, 8.0) * 1e6) if conv else 0,
                    "stash_bytes": int(max(1024, out_bytes)), "flops": fwd[-1] * 1e10})
        edges.extend((src, name) for src in inputs)
        return name

    size = mean_out_bytes * rng.lognormal(0.0, 0.5)
    x = add("stem", "Conv2d", [], 2.0, size)
    for b in range(n_blocks):
        ends = []
        for br in range(int(rng.integers(2, 5))):
            y = x
            for k in range(int(rng.integers(1, 4))):
                y = add(f"b{b}_{br}_{k}", "Conv2d", [y], 1.0, size * rng.uniform(0.2, 0.6))
            ends.append(y)
        x = add(f"b{b}_cat", "cat", ends, 0.0, size)
    x = add("fc", "Linear", [x], 0.5, 4096)
    ops.append({"name": "loss", "kind": "loss", "module": "loss", "out_bytes": 4, "stash_bytes": 0, "flops": 0.0})
    edges.append((x, "loss"))
    fwd_s = np.append(fwd, 1e-5)
    bwd_s = fwd_s * np.append(rng.uniform(1.5, 2.5, len(fwd)), 1.0)
    return OpGraph.build(name=f"branchy-{n_blocks}-s{seed}", ops=ops, edges=edges,
                         costs=_costs(fwd_s, bwd_s, np.append(speedup, 1.0), f"branch_blocks seed={seed}"),
                         meta={"synthetic": {"generator": "branch_blocks", "n_blocks": n_blocks, "seed": seed}})


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
