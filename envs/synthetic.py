"""Random op graphs with ``cpu`` and ``K80`` costs: training graphs for the RL placer when no profiled graph is
at hand, and (Placeto, Addanki et al., NeurIPS 2019, section 5) a source of graph variety for policies meant to
place unseen graphs. Four families, each shaped like a kind of network a placer meets:

* :func:`layered_dag` — ``n_layers`` layers of ``width`` ops, then one ``loss`` op. Every op of layer ``l + 1``
  reads one to three ops of layer ``l`` and every op of layer ``l`` is read at least once, so each layer is a
  wavefront that several devices can run in parallel.
* :func:`recurrent_grid` — a stacked recurrent network unrolled over time (RNNLM-like): cell ``(l, t)`` reads
  cell ``(l, t - 1)`` and cell ``(l - 1, t)``; the calls of one layer's cell share its weights, so they form one
  colocation group, as do the per-step embedding and output projection.
* :func:`branch_blocks` — blocks of parallel branches joined by a concatenation (Inception-like).
* :func:`seq2seq_grid` — an attentional encoder-decoder (NMT-like): an encoder grid, a decoder grid that starts
  from the encoder's last states, and per target step an attention over the encoder outputs, a heavy shared
  output projection and a loss term.

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


class _ModuleCalls:
    """Builds a graph of calls of named modules: a module's calls share one colocation group (unless it is
    ``shared=False``) and one forward time (drawn once, +-10% per call), its parameters count at its first call."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.modules: dict[str, tuple[float, float, str, int, int, bool]] = {}
        self.ops: list[dict] = []
        self.edges: list[tuple[str, str]] = []
        self.fwd: list[float] = []
        self.speedup: list[float] = []
        self.first: dict[str, int] = {}

    def module(self, name: str, fwd_s: float, gpu_x: float, kind: str, param_bytes: int, out_bytes: int,
               shared: bool = True) -> None:
        self.modules[name] = (float(fwd_s), float(gpu_x), kind, int(param_bytes), int(out_bytes), shared)

    def call(self, module: str, name: str, inputs: tuple[str, ...] | list[str] = ()) -> str:
        base_s, gpu_x, kind, params, out, shared = self.modules[module]
        new = module not in self.first
        self.first.setdefault(module, len(self.ops))
        op = {"name": name, "kind": kind, "module": module, "out_bytes": out,
              "param_bytes": params if new else 0, "stash_bytes": out, "flops": base_s * 1e10}
        if shared:
            op["colocation"] = self.first[module]
        self.ops.append(op)
        self.fwd.append(base_s * self.rng.uniform(0.9, 1.1))
        self.speedup.append(gpu_x)
        self.edges.extend((src, name) for src in inputs)
        return name

    def to_loss(self, op: str) -> None:
        """``op`` feeds the final ``loss`` op (which :meth:`build` adds)."""
        self.edges.append((op, "loss"))

    def build(self, name: str, meta: dict) -> OpGraph:
        """The graph, with the ``loss`` op last; backward is twice the forward."""
        self.ops.append({"name": "loss", "kind": "loss", "module": "loss", "out_bytes": 4, "stash_bytes": 0,
                         "flops": 0.0})
        fwd_s = np.append(self.fwd, 1e-5)
        return OpGraph.build(name=name, ops=self.ops, edges=self.edges,
                             costs=_costs(fwd_s, fwd_s * 2.0, np.append(self.speedup, 1.0),
                                          f"{meta['generator']} seed={meta['seed']}"),
                             meta={"synthetic": meta})


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
    g = _ModuleCalls(rng)
    cell_s = rng.lognormal(np.log(mean_fwd_s) - 0.5, 0.5, n_layers)
    emb = (float(cell_s.mean() * rng.uniform(0.02, 0.1)), rng.uniform(1.5, 3.0), "Embedding",
           int(rng.uniform(10, 80) * 1e6))
    cells = [(float(cell_s[layer]), rng.uniform(*gpu_speedup), "LSTMCell", int(rng.uniform(4, 40) * 1e6))
             for layer in range(n_layers)]
    proj = (float(cell_s.mean() * rng.uniform(0.5, 3.0)), rng.uniform(*gpu_speedup), "Linear",
            int(rng.uniform(10, 80) * 1e6))
    hidden_bytes = int(max(1024, rng.lognormal(np.log(mean_out_bytes) - 0.5, 0.5)))
    logits_bytes = int(hidden_bytes * rng.uniform(2.0, 10.0))
    g.module("emb", *emb, hidden_bytes)
    for layer in range(n_layers):
        g.module(f"cell{layer}", *cells[layer], hidden_bytes)
    g.module("proj", *proj, logits_bytes)
    for t in range(steps):
        x = g.call("emb", f"emb_{t}")
        for layer in range(n_layers):
            prev = [f"cell{layer}_{t - 1}"] if t else []
            x = g.call(f"cell{layer}", f"cell{layer}_{t}", [x] + prev if layer == 0 else prev + [x])
        g.to_loss(g.call("proj", f"proj_{t}", [x]))
    return g.build(f"recurrent-{n_layers}x{steps}-s{seed}",
                   {"generator": "recurrent_grid", "n_layers": n_layers, "steps": steps, "seed": seed})


def seq2seq_grid(n_layers: int, src_steps: int, tgt_steps: int, seed: int = 0, *, mean_fwd_s: float = 1e-3,
                 mean_out_bytes: float = 4e6, gpu_speedup: tuple[float, float] = (8.0, 15.0)) -> OpGraph:
    """An attentional encoder-decoder unrolled over ``src_steps`` and ``tgt_steps`` (NMT-like; see the module
    docstring): two embeddings, an encoder grid and a decoder grid of ``n_layers`` recurrent cells (decoder layer
    ``l`` starts from encoder layer ``l``'s last step), the encoder's top outputs stacked into a memory, then per
    target step an attention (score, softmax and context as separate unshared ops, then a shared combine), an
    output projection and a loss term. Shared modules' calls form one colocation group each. The projection
    costs 1-6 cells per call (a large vocabulary), the attention's ops a few percent of a cell.
    """
    if n_layers < 1 or src_steps < 1 or tgt_steps < 1:
        raise ValueError(f"seq2seq_grid needs n_layers, src_steps, tgt_steps >= 1, got {n_layers}, {src_steps}, "
                         f"{tgt_steps}")
    rng = np.random.default_rng(seed)
    g = _ModuleCalls(rng)
    cell_s = rng.lognormal(np.log(mean_fwd_s) - 0.5, 0.5, 2 * n_layers)
    mean_cell = float(cell_s.mean())
    hidden_bytes = int(max(1024, rng.lognormal(np.log(mean_out_bytes) - 0.5, 0.5)))
    for side in ("src", "tgt"):
        g.module(f"emb_{side}", mean_cell * rng.uniform(0.2, 1.0), rng.uniform(1.5, 3.0), "Embedding",
                 int(rng.uniform(10, 80) * 1e6), hidden_bytes * max(src_steps, tgt_steps))
    for k, side in enumerate(("enc", "dec")):
        for layer in range(n_layers):
            g.module(f"{side}{layer}", cell_s[k * n_layers + layer], rng.uniform(*gpu_speedup), "LSTMCell",
                     int(rng.uniform(4, 40) * 1e6), hidden_bytes)
    g.module("memory", mean_cell * 0.02, 2.0, "stack", 0, hidden_bytes * src_steps)
    for op, kind in (("score", "Linear"), ("combine", "Linear")):
        g.module(op, mean_cell * rng.uniform(0.05, 0.3), rng.uniform(*gpu_speedup), kind,
                 int(rng.uniform(1, 8) * 1e6), hidden_bytes)
    for op, kind in (("weights", "softmax"), ("context", "matmul")):
        g.module(op, mean_cell * rng.uniform(0.01, 0.05), rng.uniform(2.0, 4.0), kind, 0, hidden_bytes,
                 shared=False)
    g.module("proj", mean_cell * rng.uniform(1.0, 6.0), rng.uniform(*gpu_speedup), "Linear",
             int(rng.uniform(20, 160) * 1e6), int(hidden_bytes * rng.uniform(2.0, 10.0)))
    g.module("xent", mean_cell * 0.05, 3.0, "loss", 0, 4096)
    src, tgt = g.call("emb_src", "emb_src"), g.call("emb_tgt", "emb_tgt")
    top = []
    for t in range(src_steps):
        x = src
        for layer in range(n_layers):
            x = g.call(f"enc{layer}", f"enc{layer}_{t}", [x] + ([f"enc{layer}_{t - 1}"] if t else []))
        top.append(x)
    memory = g.call("memory", "memory", top)
    for t in range(tgt_steps):
        x = tgt
        for layer in range(n_layers):
            x = g.call(f"dec{layer}", f"dec{layer}_{t}",
                       [x, f"dec{layer}_{t - 1}" if t else f"enc{layer}_{src_steps - 1}"])
        score = g.call("score", f"score_{t}", [x])
        weights = g.call("weights", f"weights_{t}", [score, memory])
        context = g.call("context", f"context_{t}", [weights, memory])
        h = g.call("combine", f"combine_{t}", [context, x])
        g.to_loss(g.call("xent", f"xent_{t}", [g.call("proj", f"proj_{t}", [h])]))
    return g.build(f"seq2seq-{n_layers}x{src_steps}+{tgt_steps}-s{seed}",
                   {"generator": "seq2seq_grid", "n_layers": n_layers, "src_steps": src_steps,
                    "tgt_steps": tgt_steps, "seed": seed})


def branch_blocks(n_blocks: int, seed: int = 0, *, max_branches: int = 4, max_chain: int = 3,
                  mean_fwd_s: float = 40e-3, mean_out_bytes: float = 2e7, param_bytes_per_s: float = 20e6,
                  gpu_speedup: tuple[float, float] = (15.0, 30.0)) -> OpGraph:
    """A stem, ``n_blocks`` blocks of 2 to ``max_branches`` parallel branches (chains of 1 to ``max_chain``
    convolutions) each joined by a concatenation, then a classifier and the ``loss`` (see the module docstring).
    Convolutions get GPU speed-ups drawn from ``gpu_speedup``, concatenations 2-4x.

    The defaults give a convolution the proportions of Inception-V3's (``graphs/data/inception_v3-paper.json``,
    median over its convolutions): ~40 ms forward on one CPU core and ~2 ms on a K80 (a 24x speed-up), an output
    of ~5 MB per K80 millisecond, and ``param_bytes_per_s`` parameter bytes per CPU second of forward time
    (Inception-V3: 19 MB/s), so the optimizer update is a small part of a step, as there (1-2% of a one-GPU step
    of the benchmark's two training graphs of this family). With 0.2-8 MB of parameters per 1 ms convolution (0.1
    ms on a K80) it was 41-46%, and spreading the parameters over devices was what paid, a lesson that placed
    Inception-V3 badly."""
    if n_blocks < 1 or max_branches < 2 or max_chain < 1:
        raise ValueError(f"branch_blocks needs n_blocks >= 1, max_branches >= 2 and max_chain >= 1, got "
                         f"{n_blocks}, {max_branches}, {max_chain}")
    rng = np.random.default_rng(seed)
    ops: list[dict] = []
    edges: list[tuple[str, str]] = []
    fwd, speedup = [], []

    def add(name: str, kind: str, inputs: list[str], weight: float, out_bytes: float) -> str:
        conv = kind in ("Conv2d", "Linear")
        fwd.append(weight * mean_fwd_s * rng.lognormal(-0.5, 1.0) if conv else 0.05 * mean_fwd_s)
        speedup.append(rng.uniform(*gpu_speedup) if conv else rng.uniform(2.0, 4.0))
        ops.append({"name": name, "kind": kind, "module": name, "out_bytes": int(max(1024, out_bytes)),
                    "param_bytes": int(fwd[-1] * param_bytes_per_s * rng.lognormal(0.0, 1.0)) if conv else 0,
                    "stash_bytes": int(max(1024, out_bytes)), "flops": fwd[-1] * 1e10})
        edges.extend((src, name) for src in inputs)
        return name

    size = mean_out_bytes * rng.lognormal(0.0, 0.5)
    x = add("stem", "Conv2d", [], 2.0, size)
    for b in range(n_blocks):
        ends = []
        for br in range(int(rng.integers(2, max_branches + 1))):
            y = x
            for k in range(int(rng.integers(1, max_chain + 1))):
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
