"""The engine on a real GPU: a ``cuda:0`` worker alone (NCCL) and beside a ``cpu:0`` worker (gloo, staged through
host memory) reproduces single-process CPU training. Skipped without CUDA; run on a lent GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from placer.core.cluster import Cluster, Device, GiB
from placer.engine import EngineConfig, Measurer
from placer.core.placement import Placement
from tests.test_engine import assert_matches, get_model, on, random_placement

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cpu_and_gpu():
    devs = [Device(name="cpu:0", kind="cpu", memory_bytes=8 * GiB),
            Device(name="cuda:0", kind="cuda", memory_bytes=8 * GiB)]
    cluster = Cluster.uniform("cpu+cuda", devs, bandwidth_Bps=10e9, latency_s=20e-6)
    model = get_model("rnnlm")
    with Measurer(model.graph, cluster, config=EngineConfig(timeout_s=300)) as m:
        yield m


@pytest.mark.parametrize("name", ["rnnlm", "nmt"])
def test_gpu_and_mixed_placements_match_single_process(cpu_and_gpu, name):
    model = get_model(name)
    m = on(cpu_and_gpu, model)
    on_gpu = m.run_step(Placement(np.ones(model.graph.n, dtype=np.int64)), update=False)
    assert_matches(on_gpu, model.reference(1), rtol=1e-4, atol=1e-5)
    mixed = m.run_step(random_placement(model.graph, 3), schedule="1f1b", microbatches=2, update=False)
    assert_matches(mixed, model.reference(2), rtol=1e-4, atol=1e-5)


def test_gpu_measurement_reports_memory_and_transfers(cpu_and_gpu):
    model = get_model("rnnlm")
    m = on(cpu_and_gpu, model)
    res = m.measure(random_placement(model.graph, 5), steps=3, warmup=1)
    assert res.ok, res.failure
    assert res.step_time_s > 0 and res.peak_memory_bytes[1] > 0
    assert res.bytes_moved[0, 1] > 0 and res.bytes_moved[1, 0] > 0


def test_recomputing_on_the_gpu_keeps_the_step_and_frees_stash(cpu_and_gpu):
    """Checkpointed segments (``recompute``) on ``cuda:0`` and ``cpu:0`` give single-process gradients, and the GPU
    worker's measured peak (torch.cuda's allocator) drops where activations outweigh the ~70 MB of workspaces the
    allocator also counts (a gpt of 2048 x 16 tokens: ~200 MB of stash)."""
    model = get_model("rnnlm")
    m = on(cpu_and_gpu, model)
    redo = m.run_step(random_placement(model.graph, 3), schedule="1f1b", microbatches=2, update=False,
                      recompute=(0, 1))
    assert redo.result.ok and redo.result.recompute == (0, 1)
    assert_matches(redo, model.reference(2), rtol=1e-4, atol=1e-5)
    wide = get_model("gpt", batch=2048)
    m = on(cpu_and_gpu, wide)
    gpu_only = Placement(np.ones(wide.graph.n, dtype=np.int64))
    plain = m.measure(gpu_only, schedule="gpipe", microbatches=2, steps=2, warmup=1)
    held = m.measure(gpu_only, schedule="gpipe", microbatches=2, steps=2, warmup=1, recompute=(1,))
    assert plain.ok and held.ok, (plain.failure, held.failure)
    print(f"cuda:0 peak plain {plain.peak_memory_bytes[1] / 1e6:.1f} MB, recomputing "
          f"{held.peak_memory_bytes[1] / 1e6:.1f} MB; step "
          f"{plain.step_time_s * 1e3:.2f} -> {held.step_time_s * 1e3:.2f} ms")
    assert held.peak_memory_bytes[1] < 0.8 * plain.peak_memory_bytes[1]
