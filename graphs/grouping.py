"""Grouping ops before placement, as ColocRL did, and coarsening the graph for fast simulation.

ColocRL (Mirhoseini et al., ICML 2017, section 3.2) could not place tens of thousands of TensorFlow ops one by
one, so it first applied co-location heuristics: an op joins the group of its parameters (and their gradients
and optimizer updates), and small ops join a neighbour. The RL then places groups. We do the same:

1. **Colocation classes** come from the graph (``OpGraph.colocation``): every call of a parameterised module
   (an ``LSTMCell`` at each time step) shares its parameters, so all calls must share a device.
2. **Light ops** (views, ``getitem``, inputs, parameter reads, anything far cheaper than a typical op and owning no
   parameters) join the class of the neighbour they exchange the most bytes with, so placing them apart never
   costs a transfer for nothing.
3. **Merging to at most k groups** in rounds: first links of a chain (``a``'s only consumer is ``b``, ``b``'s
   only producer is ``a``, through a single op edge: they can never run side by side, so merging them loses no
   parallelism), then
   neighbouring classes whose owning modules share the longest module-path prefix (module boundaries are kept
   as long as possible), cheaper pairs first, so groups stay balanced. On Inception-V3-paper at 180 groups the
   chain rule keeps m-ETF's placement expressible (0.469 s, as at op level; 0.479 s without it); at 128 groups
   branches must merge either way.

:func:`coarsen` then builds a smaller :class:`~graphs.ir.OpGraph` for the simulator: consecutive ops (in the
graph's topological order) of the same group become one node. Runs of a topological order always give an acyclic
quotient, and all ops of a node share a device under any group placement, so the coarse graph is a faithful,
much smaller stand-in. Its ``colocation`` is the group id, so a group placement maps straight onto it.
"""

from __future__ import annotations

import numpy as np

from graphs.ir import OpCosts, OpGraph

LIGHT_KINDS = frozenset({
    "input", "get_attr", "getitem", "getattr", "size", "view", "reshape", "flatten", "unsqueeze", "squeeze",
    "transpose", "permute", "contiguous", "expand", "t", "dim", "detach", "to", "type_as",
})
"""Op kinds that move no data of their own: always merged with a neighbour."""

LIGHT_COST_FRACTION = 0.02
"""An op without parameters costing less than this fraction of the mean op cost is light."""


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        return min(ra, rb)

    def labels(self) -> np.ndarray:
        roots = np.array([self.find(i) for i in range(len(self.parent))])
        _, dense = np.unique(roots, return_inverse=True)
        return dense.astype(np.int64)


def op_weights(graph: OpGraph) -> np.ndarray:
    """A per-op size used for balancing: forward+backward seconds of the first cost set, else FLOPs, else 1."""
    if graph.costs:
        w = graph.cost().step_s.astype(np.float64)
        if w.sum() > 0:
            return w
    if graph.flops.sum() > 0:
        return graph.flops.astype(np.float64)
    return np.ones(graph.n)


def light_ops(graph: OpGraph) -> np.ndarray:
    """Boolean mask of ops that should never stand alone (see module docstring)."""
    w = op_weights(graph)
    mean = w[w > 0].mean() if (w > 0).any() else 0.0
    kinds = np.array([k in LIGHT_KINDS for k in graph.op_kinds], dtype=bool)
    return (graph.param_bytes == 0) & (kinds | (w < LIGHT_COST_FRACTION * mean))


def colocation_groups(graph: OpGraph) -> np.ndarray:
    """ColocRL-style colocation: the graph's colocation classes with every light op merged into a neighbour.

    Returns a dense group id per op. Placing groups (instead of ops) never separates an op from its parameters
    and never pays a transfer for a view or a ``getitem``.
    """
    uf = _UnionFind(graph.n)
    _, first = np.unique(graph.colocation, return_index=True)
    root_of_class = dict(zip(graph.colocation[first].tolist(), first.tolist()))
    for i, c in enumerate(graph.colocation.tolist()):
        uf.union(i, root_of_class[c])
    light = light_ops(graph)
    src, dst, nbytes = graph.edge_index[0], graph.edge_index[1], graph.edge_bytes
    # best neighbour per op: the one it exchanges the most bytes with (predecessors preferred on ties,
    # because an op usually lives with what it reads)
    best_nb = np.full(graph.n, -1)
    best_bytes = np.full(graph.n, -1)
    for e in range(graph.num_edges):
        a, b, by = int(src[e]), int(dst[e]), int(nbytes[e])
        if by > best_bytes[b]:  # b reads from a
            best_nb[b], best_bytes[b] = a, by
    for e in range(graph.num_edges):
        a, b, by = int(src[e]), int(dst[e]), int(nbytes[e])
        if best_nb[a] < 0 or (light[a] and by > best_bytes[a] and not light[b]):
            best_nb[a], best_bytes[a] = b, by
    for i in np.flatnonzero(light):
        if best_nb[i] >= 0:
            uf.union(int(i), int(best_nb[i]))
    return uf.labels()


def colocation_index(graph: OpGraph) -> tuple[np.ndarray, int]:
    """Each op's colocation group numbered ``0..G-1`` (in the order of the graph's colocation ids), and ``G``."""
    _, group = np.unique(graph.colocation, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)
    return group, int(group.max()) + 1 if group.size else 0


def colocation_first(graph: OpGraph) -> np.ndarray:
    """Per op, the index of the first op of its colocation group: the op whose device the group follows."""
    _, first, inverse = np.unique(graph.colocation, return_index=True, return_inverse=True)
    return first[inverse.reshape(-1)].astype(np.int64)


def part_of_path(path: str) -> str:
    """The model part of a module path: its first component, with the layer index when the first component is
    a layer list (``blocks.3.attn.qkv`` -> ``blocks.3``, ``ln_f`` -> ``ln_f``, ``""`` -> ``""``): the unit that
    trainers split a model by (torchtitan's ``module_fqns_per_model_part``) and the layer-split baselines count."""
    head, _, rest = path.partition(".")
    index = rest.partition(".")[0]
    return f"{head}.{index}" if index.isdigit() else head


def _module_key(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split(".") if p)


def _common_depth(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    d = 0
    for x, y in zip(a, b):
        if x != y:
            break
        d += 1
    return d


def group_ops(graph: OpGraph, k: int) -> np.ndarray:
    """Dense group id per op, at most ``k`` groups, respecting colocation (see module docstring)."""
    if k < 1:
        raise ValueError(f"number of groups must be >= 1, got {k}")
    labels = colocation_groups(graph)
    w = op_weights(graph)
    while True:
        num = int(labels.max()) + 1 if graph.n else 0
        if num <= k:
            return labels
        cost = np.bincount(labels, weights=w, minlength=num)
        # a class's module is the module of its heaviest op
        heaviest = np.full(num, -1)
        for i in range(graph.n):
            g = labels[i]
            if heaviest[g] < 0 or w[i] > w[heaviest[g]]:
                heaviest[g] = i
        keys = [_module_key(graph.module_paths[h]) for h in heaviest]
        ga, gb = labels[graph.edge_index[0]], labels[graph.edge_index[1]]
        cross = ga != gb
        pairs = {(int(min(a, b)), int(max(a, b))) for a, b in zip(ga[cross], gb[cross])}
        edges, op_edges = np.unique(np.stack([ga[cross], gb[cross]]), axis=1, return_counts=True)
        out_deg = np.bincount(edges[0], minlength=num)
        in_deg = np.bincount(edges[1], minlength=num)
        # a -> b is a chain link when it is a's only out-edge and b's only in-edge and one op edge carries it
        # (two LSTM layers unrolled over time also form a class chain, but their calls overlap in a wavefront)
        chain = {(int(min(a, b)), int(max(a, b))) for (a, b), k in zip(edges.T, op_edges)
                 if out_deg[a] == 1 and in_deg[b] == 1 and k == 1}
        if not pairs:  # disconnected leftovers: pair the cheapest classes
            order = np.argsort(cost, kind="stable")
            pairs = {(int(min(order[i], order[i + 1])), int(max(order[i], order[i + 1])))
                     for i in range(0, len(order) - 1, 2)}
        ranked = sorted(pairs, key=lambda p: (p not in chain, -_common_depth(keys[p[0]], keys[p[1]]),
                                              cost[p[0]] + cost[p[1]], p))
        uf = _UnionFind(num)
        used = np.zeros(num, dtype=bool)
        merges_needed = num - k
        for a, b in ranked:
            if merges_needed == 0:
                break
            if used[a] or used[b]:
                continue
            used[a] = used[b] = True
            uf.union(a, b)
            merges_needed -= 1
        labels = uf.labels()[labels]


def runs_of_groups(group_of_op: np.ndarray) -> np.ndarray:
    """Node id per op: consecutive ops (in topological index order) of the same group share a node."""
    g = np.asarray(group_of_op)
    if g.size == 0:
        return g.astype(np.int64)
    starts = np.concatenate([[True], g[1:] != g[:-1]])
    return (np.cumsum(starts) - 1).astype(np.int64)


def coarsen(graph: OpGraph, k: int) -> tuple[np.ndarray, OpGraph]:
    """Group ``graph`` into at most ``k`` groups and build the coarse graph the simulator runs on.

    Returns ``(group_of_op, coarse)``. ``coarse`` has one node per run of consecutive same-group ops (see the
    module docstring); ``coarse.colocation[node]`` is the node's group, so a per-group device assignment
    ``device_of_group`` places the coarse graph as ``device_of_group[coarse.colocation]`` and the full graph as
    ``device_of_group[group_of_op]``. ``coarse.meta["node_of_op"]`` maps ops to coarse nodes.
    """
    group_of_op = group_ops(graph, k)
    return group_of_op, contract(graph, group_of_op)


def contract(graph: OpGraph, group_of_op: np.ndarray) -> OpGraph:
    """The coarse graph for a given grouping (see :func:`coarsen`)."""
    group_of_op = np.asarray(group_of_op, dtype=np.int64)
    node = runs_of_groups(group_of_op)
    m = int(node.max()) + 1 if graph.n else 0
    first_op = np.searchsorted(node, np.arange(m))

    def summed(arr: np.ndarray) -> np.ndarray:
        return np.bincount(node, weights=arr, minlength=m)

    temp = np.zeros(m, dtype=np.int64)
    np.maximum.at(temp, node, graph.temp_bytes)
    # edges between nodes: a producer's tensor reaches each consumer node once (the engine sends it once)
    src, dst = graph.edge_index
    ns, nd = node[src], node[dst]
    cross = ns != nd
    per_producer: dict[tuple[int, int], int] = {}
    for s_op, d_node, by in zip(src[cross].tolist(), nd[cross].tolist(), graph.edge_bytes[cross].tolist()):
        key = (s_op, d_node)
        per_producer[key] = max(per_producer.get(key, 0), by)
    node_edges: dict[tuple[int, int], int] = {}
    for (s_op, d_node), by in per_producer.items():
        key = (int(node[s_op]), d_node)
        node_edges[key] = node_edges.get(key, 0) + by
    edge_keys = sorted(node_edges)
    out_bytes = np.zeros(m, dtype=np.int64)
    for (a, _), by in node_edges.items():
        out_bytes[a] = max(out_bytes[a], by)
    kinds = []
    for j in range(m):
        ops = np.flatnonzero(node == j)
        heaviest = ops[np.argmax(op_weights(graph)[ops])] if ops.size else first_op[j]
        kinds.append(graph.op_kinds[heaviest])
    costs = {
        kind: OpCosts(fwd_s=summed(c.fwd_s), bwd_s=summed(c.bwd_s), provenance=c.provenance)
        for kind, c in graph.costs.items()
    }
    return OpGraph(
        name=f"{graph.name}/coarse{int(group_of_op.max()) + 1 if graph.n else 0}",
        op_names=[f"n{j}:{graph.op_names[first_op[j]]}" for j in range(m)],
        op_kinds=kinds,
        module_paths=[graph.module_paths[first_op[j]] for j in range(m)],
        out_shapes=[() for _ in range(m)],
        out_bytes=out_bytes,
        param_bytes=summed(graph.param_bytes).astype(np.int64),
        stash_bytes=summed(graph.stash_bytes).astype(np.int64),
        temp_bytes=temp,
        flops=summed(graph.flops),
        colocation=group_of_op[first_op],
        edge_index=[[a for a, _ in edge_keys], [b for _, b in edge_keys]],
        edge_bytes=[node_edges[key] for key in edge_keys],
        costs=costs,
        meta={"coarsened_from": graph.content_hash, "source_graph": graph.name,
              "num_groups": int(group_of_op.max()) + 1 if graph.n else 0,
              "node_of_op": node.tolist(),
              **{k: v for k, v in graph.meta.items() if k.startswith("microbatch")}},  # refused on both graphs
    )
