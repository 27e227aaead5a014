"""Grouping and coarsening: colocation respected, light ops merged, k respected, coarse graph acyclic."""

import numpy as np
import pytest

from graphs.grouping import coarsen, colocation_groups, group_ops, runs_of_groups
from graphs.ir import OpGraph


def unrolled_rnn(layers=2, steps=3):
    """A tiny unrolled 2-layer RNN: cell ops of one layer share a colocation class; getitems are light."""
    ops, edges = [dict(name="x", kind="input", out_bytes=64)], []
    coloc = {f"l{l}": 100 + l for l in range(layers)}
    prev_h = {}
    for t in range(steps):
        below = "x"
        for l in range(layers):
            cell = f"cell{l}_{t}"
            ops.append(dict(name=cell, kind="LSTMCell", module=f"layers.{l}", out_bytes=64,
                            param_bytes=1000 if t == 0 else 0, fwd_s=1.0, bwd_s=2.0, colocation=coloc[f"l{l}"]))
            edges.append((below, cell))
            if l in prev_h:
                edges.append((prev_h[l], cell))
            gi = f"h{l}_{t}"
            ops.append(dict(name=gi, kind="getitem", module=f"layers.{l}", out_bytes=32, fwd_s=0.0))
            edges.append((cell, gi))
            prev_h[l], below = gi, gi
    ops.append(dict(name="loss", kind="CrossEntropyLoss", module="loss", out_bytes=4, fwd_s=0.5, bwd_s=0.5))
    edges.append((below, "loss"))
    # give other ops unique colocation ids
    for i, o in enumerate(ops):
        o.setdefault("colocation", i)
    return OpGraph.build(name="rnn", ops=ops, edges=edges)


def test_colocation_groups_merge_light_ops_and_keep_classes():
    g = unrolled_rnn()
    labels = colocation_groups(g)
    # all cells of a layer together, each getitem with the cell it reads, the input with its consumer
    for l in range(2):
        members = {labels[g.index(f"cell{l}_{t}")] for t in range(3)} | {labels[g.index(f"h{l}_{t}")] for t in range(3)}
        assert len(members) == 1
    assert labels[g.index("x")] == labels[g.index("cell0_0")]
    assert labels[g.index("cell0_0")] != labels[g.index("cell1_0")]
    assert labels.max() + 1 == 3  # layer 0, layer 1, loss


@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_group_ops_respects_k_and_colocation(k):
    g = unrolled_rnn()
    labels = group_ops(g, k)
    assert labels.max() + 1 <= k
    for c in np.unique(g.colocation):
        assert len(set(labels[g.colocation == c])) == 1
    with pytest.raises(ValueError):
        group_ops(g, 0)


def test_merging_prefers_module_boundaries():
    # four ops in two modules, chained a1 -> a2 -> b1 -> b2, equal costs: with k=2 the groups are the modules
    ops = [dict(name=n, kind="Linear", module=m, param_bytes=4, fwd_s=1.0, out_bytes=4)
           for n, m in [("a1", "enc.0"), ("a2", "enc.1"), ("b1", "dec.0"), ("b2", "dec.1")]]
    g = OpGraph.build(name="g", ops=ops, edges=[("a1", "a2"), ("a2", "b1"), ("b1", "b2")])
    labels = group_ops(g, 2)
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[0] != labels[2]


def test_chain_links_merge_before_parallel_branches_do():
    # s -> (a1 -> a2), (b1 -> b2) -> j, all in one module; a2 + j is the cheapest neighbour pair, so merging by
    # module and cost alone would put branch a's end with the join, and the next round branch b's too
    cost = dict(s=4.0, a1=2.0, a2=0.5, b1=2.0, b2=1.0, j=0.2)
    ops = [dict(name=n, kind="Conv2d", module="blk", param_bytes=4, fwd_s=c, out_bytes=4) for n, c in cost.items()]
    edges = [("s", "a1"), ("a1", "a2"), ("a2", "j"), ("s", "b1"), ("b1", "b2"), ("b2", "j")]
    labels = dict(zip(cost, group_ops(OpGraph.build(name="fork", ops=ops, edges=edges), 4).tolist()))
    assert labels["a1"] == labels["a2"] and labels["b1"] == labels["b2"]
    assert len({labels["s"], labels["a1"], labels["b1"], labels["j"]}) == 4
    # two RNN layers unrolled over time form a chain of classes too, but through one op edge per step: no link
    # (merging them would serialise the layers' wavefront); the loss still joins the last layer
    g = unrolled_rnn()
    cell0, cell1, loss = group_ops(g, 2)[[g.index("cell0_0"), g.index("cell1_0"), g.index("loss")]].tolist()
    assert cell0 != cell1 and cell1 == loss


def test_runs_of_groups():
    assert runs_of_groups(np.array([0, 0, 1, 1, 0, 2, 2])).tolist() == [0, 0, 1, 1, 2, 3, 3]


def test_coarse_graph_sums_costs_and_maps_placements():
    g = unrolled_rnn()
    group_of_op, coarse = coarsen(g, 3)
    node_of_op = np.array(coarse.meta["node_of_op"])
    # every coarse node holds ops of exactly one group; its colocation is that group
    for j in range(coarse.n):
        assert set(group_of_op[node_of_op == j]) == {coarse.colocation[j]}
    assert coarse.cost().step_s.sum() == pytest.approx(g.cost().step_s.sum())
    assert coarse.param_bytes.sum() == g.param_bytes.sum()
    # interleaved layers: runs alternate layer 0 / layer 1, so nodes > groups, edges still forward only
    assert coarse.n > 3 and (coarse.edge_index[0] < coarse.edge_index[1]).all()
    # the layer-0 cell's output reaches the layer-1 run once per step (32 bytes of h), not per consumer
    assert coarse.edge_bytes.min() > 0
