"""Plain helpers shared by the tests (importable, unlike ``conftest.py``, whose fixtures wrap them): clusters of
CPUs, tiny hand-made graphs, a thread-count guard and a stand-in for the engine's Measurer.

New tests take the fixtures of ``tests/conftest.py`` (``one_thread``, ``cpu_pair``, ``cpu_cluster``,
``chain_graph``, ``diamond_graph``); helpers called at import time or inside hypothesis strategies import these.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import pytest
import torch

from graphs.ir import OpGraph
from placer.core.cluster import Cluster, Device

GiB = 1 << 30


def cpus(num_devices: int = 2, *, memory_bytes: int | Sequence[int] = 16 * GiB, bandwidth_Bps: float = 1e9,
         latency_s: float = 1e-4, speeds: Sequence[float] | None = None, kind: str = "cpu",
         name: str | None = None) -> Cluster:
    """``num_devices`` devices ``cpu:0``.. of one ``kind`` on uniform links (memory per device or one for all)."""
    mem = [memory_bytes] * num_devices if isinstance(memory_bytes, int) else list(memory_bytes)
    speeds = list(speeds) if speeds is not None else [1.0] * num_devices
    if len(mem) != num_devices or len(speeds) != num_devices:
        raise ValueError(f"need {num_devices} memories and speeds, got {len(mem)} and {len(speeds)}")
    devs = [Device(name=f"cpu:{i}", kind=kind, memory_bytes=m, speed=s) for i, (m, s) in enumerate(zip(mem, speeds))]
    return Cluster.uniform(name or f"cpu{num_devices}", devs, bandwidth_Bps=bandwidth_Bps, latency_s=latency_s)


def pair(bandwidth_Bps: float = 1e9, memory: tuple[int, int] = (1 << 34, 1 << 34)) -> Cluster:
    """Two 16 GiB CPUs, 1 GB/s and 100 µs apart (the policy and env tests' cluster)."""
    return cpus(2, memory_bytes=memory, bandwidth_Bps=bandwidth_Bps, latency_s=1e-4, name="pair")


def _per_op(value: float | Sequence[float], n: int) -> list[float]:
    return list(value) if isinstance(value, Sequence) else [value] * n


def chain(n: int, *, fwd_s: float | Sequence[float] = 1.0, bwd_s: float | Sequence[float] | None = None,
          name: str | None = None, **op_fields: int | str) -> OpGraph:
    """Ops ``op0 -> op1 -> ... -> op{n-1}``; ``bwd_s`` defaults to twice the forward (a typical backward);
    ``op_fields`` (``out_bytes=8``, ``stash_bytes=...``, ``param_bytes=...``) are given to every op."""
    fwd = _per_op(fwd_s, n)
    bwd = [2 * f for f in fwd] if bwd_s is None else _per_op(bwd_s, n)
    ops = [dict(name=f"op{i}", fwd_s=fwd[i], bwd_s=bwd[i], **op_fields) for i in range(n)]
    return OpGraph.build(name=name or f"chain{n}", ops=ops, edges=[(f"op{i}", f"op{i + 1}") for i in range(n - 1)])


def diamond(*, fwd_s: Sequence[float] = (1.0, 2.0, 3.0, 1.0), bwd_s: Sequence[float] | None = None,
            edge_bytes: int = 0) -> OpGraph:
    """``s -> (l, r) -> t`` with forward times ``fwd_s`` for s, l, r, t (backwards: ``bwd_s``, else twice those)."""
    bwd = [2 * f for f in fwd_s] if bwd_s is None else list(bwd_s)
    ops = [dict(name=n, fwd_s=f, bwd_s=b) for n, f, b in zip("slrt", fwd_s, bwd)]
    return OpGraph.build(name="diamond", ops=ops, edges=[(a, b, edge_bytes) for a, b in
                                                         (("s", "l"), ("s", "r"), ("l", "t"), ("r", "t"))])


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave it) and restore the previous count afterwards."""
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    """Autouse in the modules that import it (``from tests.policy_helpers import one_thread``); it requests the
    ``one_thread`` fixture of conftest.py. New modules write ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    yield


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
        r = self.sim.run(placement, schedule=schedule, microbatches=microbatches)
        return dataclasses.replace(r, step_time_s=r.step_time_s * self.scale + self.offset_s, source="engine")


def chain_per_device_task(chain_len: int = 4) -> tuple[object, float, float]:
    """(env, best reward, mean reward of 400 uniform random placements) for two independent chains on two
    devices, whose best placement is one chain per device; then seeds torch for the policy that learns it."""
    import numpy as np

    from envs.placement_env import make_env
    from envs.synthetic import two_chains

    env = make_env(two_chains(chain_len), pair(), num_groups=64)
    best = env.evaluate([0, 1] * chain_len)[0]
    rng = np.random.default_rng(0)
    random_mean = float(np.mean([env.evaluate(rng.integers(0, 2, 2 * chain_len))[0] for _ in range(400)]))
    torch.manual_seed(0)
    return env, best, random_mean
