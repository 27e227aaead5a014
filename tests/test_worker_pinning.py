"""torchrun workers of several nodes on one host share its cores (one core each on 2 cores), instead of each
taking every core with as many threads: a woken receiver then waited for its core behind the other rank's threads
(issue #19 item 3: 0.18-0.60 s a step before, 0.06-0.09 s after, RNNLM-small round-robin 1f1b x4)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch.multiprocessing as mp


def _rank(rank: int, init: str, out: "mp.Queue") -> None:
    import torch
    import torch.distributed as dist

    from placer.engine.worker import _host_rank, _pin_among

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    local_rank, local_world = _host_rank(rank, 2)
    _pin_among(local_rank, local_world, 0)  # as two torchrun nodes on this host: LOCAL_RANK 0 of 1 each
    out.put((rank, local_rank, local_world, sorted(os.sched_getaffinity(0)), torch.get_num_threads()))
    dist.destroy_process_group()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores and Linux affinity")
def test_ranks_of_two_nodes_on_one_host_get_a_core_each():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_rank, args=(r, f"file://{tmp}/store", out)) for r in (0, 1)]
        for p in procs:
            p.start()
        got = sorted(out.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(30)
    cores = len(os.sched_getaffinity(0))
    assert [g[:3] for g in got] == [(0, 0, 2), (1, 1, 2)]
    assert not set(got[0][3]) & set(got[1][3])  # disjoint cores
    assert got[0][4] == got[1][4] == cores // 2
