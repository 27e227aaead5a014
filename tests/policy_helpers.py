"""Shared pieces of the policy tests: a two-CPU cluster and a one-thread fixture (small nets run fastest so)."""

import pytest
import torch

from placer.cluster import Cluster, Device


def pair(bandwidth_Bps: float = 1e9, memory: tuple[int, int] = (1 << 34, 1 << 34)) -> Cluster:
    return Cluster.uniform("pair", [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=m) for i, m in enumerate(memory)],
                           bandwidth_Bps=bandwidth_Bps, latency_s=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
