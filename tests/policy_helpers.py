"""Shared pieces of the policy and training tests: a two-CPU cluster, a one-thread fixture (small nets run fastest
so) and a stand-in for the engine's Measurer."""

import pytest
import torch

from placer.core.cluster import Cluster, Device


def pair(bandwidth_Bps: float = 1e9, memory: tuple[int, int] = (1 << 34, 1 << 34)) -> Cluster:
    return Cluster.uniform("pair", [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=m) for i, m in enumerate(memory)],
                           bandwidth_Bps=bandwidth_Bps, latency_s=1e-4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SimMeasurer:
    """Stands in for :class:`placer.engine.Measurer` (patch ``envs.rewards.load_measurer_class``): 'measures' the
    simulated step times ``scale`` plus ``offset_s``, and counts its calls per class."""

    scale = 1.0
    offset_s = 0.0
    calls = 0

    def __init__(self, graph, cluster, *, timeout_s):
        from placer.costmodel.sim import Simulator

        self.sim = Simulator(graph, cluster)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def measure(self, placement, *, schedule, microbatches, steps, warmup):
        import dataclasses

        type(self).calls += 1
        r = self.sim.run(placement)
        return dataclasses.replace(r, step_time_s=r.step_time_s * self.scale + self.offset_s, source="engine")
