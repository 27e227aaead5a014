"""``expert``: ColocRL's hand-made placements (Mirhoseini et al., ICML 2017, §4 "Baselines").

- **RNNLM / NMT** (any graph whose module paths contain ``layers.<k>``, ``encoder.<k>`` or ``decoder.<k>``):
  LSTM layer ``k`` on accelerator ``k`` (modulo the number of accelerators, so fewer devices wrap around; NMT's
  encoder and decoder layer ``k`` share it). Embeddings (``embed*``) go with layer 0; attention, the output
  projection and the softmax/loss (``attention*``, ``proj*``, ``softmax*``, ``loss*``) with the top layer. These
  rules mirror ``expert_layer_of_module`` in ``graphs/models/rnnlm.py`` and ``nmt.py`` (a test checks they agree;
  they are restated here so that placing does not import torch). Glue ops of no such module (e.g. reshapes,
  the loss average) follow the neighbour they exchange the most bytes with, predecessors first.
- **Inception-V3**: the whole graph on the fastest accelerator (ColocRL: "a single GPU").
- **Any other graph**: a balanced layer-wise split — colocation groups in topological order cut into contiguous
  runs over the accelerators, each taking a share of the compute proportional to its throughput.

"Accelerators" are the non-CPU devices; a CPU-only cluster uses all its devices. Memory is not considered
(experts assumed it fits); an over-full device shows up as OOM in the simulator. Deterministic (``seed`` unused).
A colocation group whose ops the rules split goes where most of its compute was assigned.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import Groups, accelerators, finish, groups_of

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement

_LAYER_RE = re.compile(r"^(?:layers|encoder|decoder)\.(\d+)(?:\.|$)")
_FIRST = ("embed", "embed_src", "embed_tgt")
_TOP = ("attention", "proj", "loss", "softmax")


def layer_of_path(path: str) -> int | None:
    """LSTM layer index of ``layers.<k>`` / ``encoder.<k>`` / ``decoder.<k>`` (or below); else ``None``."""
    m = _LAYER_RE.match(path)
    return int(m.group(1)) if m else None


def expert_layer(path: str, num_layers: int) -> int | None:
    """ColocRL's rule: the LSTM layer a module goes with (``None``: follow a neighbour)."""
    layer = layer_of_path(path)
    if layer is not None:
        return layer
    head = path.split(".", 1)[0]
    if head in _FIRST:
        return 0
    if head in _TOP:
        return num_layers - 1
    return None


def benchmark_of(graph: "OpGraph") -> str | None:
    """``rnnlm``, ``nmt``, ``inception_v3`` or ``None``, from ``meta`` (``source.benchmark``, ``benchmark``,
    ``model``), then the graph name's prefix, then the module paths."""
    meta = graph.meta
    src = meta.get("source")
    cands = [src.get("benchmark") if isinstance(src, dict) else None, meta.get("benchmark"), meta.get("model"),
             graph.name]
    for c in cands:
        if isinstance(c, str):
            low = c.lower().replace("-", "_")
            for known in ("inception_v3", "rnnlm", "nmt"):
                if low.startswith(known):
                    return known
    heads = {p.split(".", 1)[0] for p in graph.module_paths}
    if {"encoder", "decoder"} & heads:
        return "nmt"
    if "layers" in heads:
        return "rnnlm"
    return None


def _recurrent(graph: "OpGraph", groups: Groups, accel: list[int]) -> np.ndarray:
    layers = [layer_of_path(p) for p in graph.module_paths]
    num_layers = max((x for x in layers if x is not None), default=0) + 1
    dev_of_op = np.full(graph.n, -1, dtype=np.int64)
    for i, path in enumerate(graph.module_paths):
        k = expert_layer(path, num_layers)
        if k is not None:
            dev_of_op[i] = accel[k % len(accel)]
    # glue ops follow their heaviest already-placed neighbour: predecessors in topological order, then a
    # backward pass over successors for ops that had none (e.g. inputs feeding the embedding)
    src, dst, nbytes = graph.edge_index[0], graph.edge_index[1], graph.edge_bytes
    by_dst = np.argsort(dst, kind="stable")
    by_src = np.argsort(src, kind="stable")
    ids = np.arange(graph.n)
    in_lo, in_hi = np.searchsorted(dst[by_dst], ids), np.searchsorted(dst[by_dst], ids, "right")
    out_lo, out_hi = np.searchsorted(src[by_src], ids), np.searchsorted(src[by_src], ids, "right")

    def follow(i: int, edges: np.ndarray, ends: np.ndarray) -> None:
        best, best_b = -1, -1
        for e in edges:
            j = int(ends[e])
            if dev_of_op[j] >= 0 and nbytes[e] > best_b:
                best, best_b = int(dev_of_op[j]), int(nbytes[e])
        if best >= 0:
            dev_of_op[i] = best

    for i in range(graph.n):
        if dev_of_op[i] < 0:
            follow(i, by_dst[in_lo[i]:in_hi[i]], src)
    for i in range(graph.n - 1, -1, -1):
        if dev_of_op[i] < 0:
            follow(i, by_src[out_lo[i]:out_hi[i]], dst)
    dev_of_op[dev_of_op < 0] = accel[0]  # isolated ops
    return _group_vote(graph, groups, dev_of_op)


def _group_vote(graph: "OpGraph", groups: Groups, dev_of_op: np.ndarray) -> np.ndarray:
    """One device per colocation group: where most of its compute (its op count when costless) was put."""
    w = np.ones(graph.n)
    if graph.costs:
        c = graph.cost().step_s
        w = c + (1e-12 if c.sum() > 0 else 1.0)
    out = np.zeros(groups.num, dtype=np.int64)
    for g, ops in enumerate(groups.ops):
        devs = dev_of_op[ops]
        votes = np.bincount(devs, weights=w[ops])
        out[g] = int(np.argmax(votes))
    return out


def balanced_split(groups: Groups, devices: list[int]) -> np.ndarray:
    """Contiguous runs of groups (topological order) over ``devices``, compute shares ∝ their throughput."""
    if len(devices) == 1 or groups.num == 0:
        return np.full(groups.num, devices[0], dtype=np.int64)
    share = np.cumsum(groups.throughput(devices))
    # progress through the graph measured on each group's own candidate device would make runs overlap;
    # one common yardstick (the fastest device's times) keeps the cut points monotone
    ref = devices[int(np.argmax(groups.throughput(devices)))]
    t_ref = groups.time_s[:, ref]
    if not t_ref.sum() > 0:
        t_ref = np.ones(groups.num)
    mid = (np.cumsum(t_ref) - t_ref / 2) / t_ref.sum()  # midpoint of each group on the 0..1 progress axis
    idx = np.minimum(np.searchsorted(share, mid, side="right"), len(devices) - 1)
    return np.asarray(devices, dtype=np.int64)[idx]


@register("expert")
def place_expert(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """ColocRL's expert placement (rules in the module docstring)."""
    groups = groups_of(graph, cluster, need_costs=False)
    accel = accelerators(cluster)
    bench = benchmark_of(graph)
    if bench == "inception_v3":
        tot = groups.time_s[:, accel].sum(axis=0)
        best = accel[int(np.argmin(tot))] if tot.size else accel[0]
        return finish(graph, cluster, groups, np.full(groups.num, best, dtype=np.int64))
    if bench in ("rnnlm", "nmt") and any(layer_of_path(p) is not None for p in graph.module_paths):
        return finish(graph, cluster, groups, _recurrent(graph, groups, accel))
    return finish(graph, cluster, groups, balanced_split(groups, accel))
