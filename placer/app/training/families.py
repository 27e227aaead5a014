"""Random training graphs for multi-graph runs: the four families of :mod:`envs.synthetic`, drawn from a seed, so
that one policy sees variety (Placeto, Addanki et al., NeurIPS 2019, trains on a family of graphs)."""

from __future__ import annotations

import numpy as np

from envs.synthetic import branch_blocks, layered_dag, recurrent_grid, seq2seq_grid
from graphs.ir import OpGraph


def random_graphs(count: int, seed: int) -> list[OpGraph]:
    """``count`` random graphs drawn from ``seed``, the four families of :mod:`envs.synthetic` in turn: layered
    DAGs of 3-8 layers x 2-6 ops, recurrent grids of 2-4 layers x 8-30 steps, 6-14 Inception-like blocks of 2-5
    branches of 1-5 convolutions, and attentional encoder-decoders of 1-3 layers x 8-30 source and target steps.

    The Inception-like graphs come near Inception-V3's size (median 118 ops over 60 draws, at most 184; it has 317
    ops in 180 groups): with 3-10 blocks of 2-4 branches of 1-3 convolutions (median 61 ops) Inception-V3's
    zero-shot ratio was 1.318, with these 1.138 (``benchmarks/bench_rl_part2.py``'s zero-shot step, 420 s, finish
    dropout 0.5, best of 16 samples per view, groups placed by first op). Their costs have Inception-V3's
    proportions (:func:`envs.synthetic.branch_blocks`); with 200-300x its parameter bytes per CPU-second, the
    zero-shot GNN learnt to spread parameters and placed Inception-V3 at 1.29 (1.15 with these costs, both with
    ``ema`` baselines, groups in HEFT's order).

    Tensor sizes and GPU speed-ups keep the generators' defaults. Tried: drawing them per graph (mean output
    0.5-16 MB, GPU speed-ups up to 5-40x): Inception-V3's zero-shot ratio went from 1.30 to 1.24 and RNNLM's from
    1.03 to 2.71 (``benchmarks/bench_rl_part2.py``'s zero-shot step, 180 s each), so it was left out.
    """
    rng = np.random.default_rng(seed)
    out: list[OpGraph] = []
    for i in range(count):
        sizes = rng.integers(3, 9), rng.integers(2, 7), rng.integers(2, 5), rng.integers(8, 31), rng.integers(6, 15)
        s = int(rng.integers(1 << 30))
        family = i % 4
        if family == 3:
            layers, src, tgt = int(rng.integers(1, 4)), int(rng.integers(8, 31)), int(rng.integers(8, 31))
            out.append(seq2seq_grid(layers, src, tgt, seed=s))
        else:
            out.append(layered_dag(int(sizes[0]), int(sizes[1]), seed=s) if family == 0 else
                       recurrent_grid(int(sizes[2]), int(sizes[3]), seed=s) if family == 1 else
                       branch_blocks(int(sizes[4]), seed=s, max_branches=5, max_chain=5))
    return out
