"""The shared fixtures of conftest.py and the builders of policy_helpers.py do what their docstrings say."""

import numpy as np
import pytest
import torch

from placer.costmodel.sim import simulate
from tests.policy_helpers import torch_threads


def test_one_thread_fixture(one_thread):
    assert torch.get_num_threads() == 1


def test_torch_threads_restores_the_count_even_on_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_cpu_pair_and_cpu_cluster(cpu_pair, cpu_cluster):
    assert cpu_pair.name == "pair" and cpu_pair.device_names == ("cpu:0", "cpu:1")
    assert [d.memory_bytes for d in cpu_pair.devices] == [1 << 34] * 2
    assert cpu_pair.transfer_s(0, 1, 1e9) == pytest.approx(1.0 + 1e-4)
    three = cpu_cluster(3, memory_bytes=[1, 2, 3], speeds=[1.0, 2.0, 4.0])
    assert [(d.memory_bytes, d.speed) for d in three.devices] == [(1, 1.0), (2, 2.0), (3, 4.0)]
    with pytest.raises(ValueError, match="need 3 memories and speeds"):
        cpu_cluster(3, speeds=[1.0])


def test_tiny_graphs_step_times_worked_by_hand(chain_graph, diamond_graph, cpu_cluster):
    free = cpu_cluster(2, bandwidth_Bps=1e30, latency_s=0.0)
    # one device runs every forward then every backward: (1 + 2 + 3) + 2 * (1 + 2 + 3)
    g = chain_graph(3, fwd_s=[1.0, 2.0, 3.0])
    assert g.op_names == ("op0", "op1", "op2")
    assert simulate(g, free, np.zeros(3, dtype=np.int64), dispatch_overhead_s=0.0).step_time_s == 18.0
    # s(1) | l(2) on 0, r(3) on 1 | t(1): forwards end at 1 + 3 + 1 = 5; backwards t(2), r(6) beside l(4), s(2)
    d = diamond_graph()
    assert simulate(d, free, np.array([0, 0, 1, 0]), dispatch_overhead_s=0.0).step_time_s == 15.0
    # backwards as long as forwards: s 1 | l 4 beside r 2 | t 1, then t 1 | l 4 beside r 2 | s 1
    even = diamond_graph(fwd_s=(1.0, 4.0, 2.0, 1.0), bwd_s=(1.0, 4.0, 2.0, 1.0))
    assert simulate(even, free, np.array([0, 0, 1, 0]), dispatch_overhead_s=0.0).step_time_s == 12.0


def test_chain_passes_op_fields_to_every_op(chain_graph):
    g = chain_graph(4, bwd_s=0.5, out_bytes=8, stash_bytes=100)
    assert g.cost().bwd_s.tolist() == [0.5] * 4
    assert g.out_bytes.tolist() == [8] * 4 and g.stash_bytes.tolist() == [100] * 4
    assert g.edge_index.tolist() == [[0, 1, 2], [1, 2, 3]]
