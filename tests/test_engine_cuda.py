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
