"""The one cost rule (placer.costmodel.costs) and the one "is this a CPU" predicate, shared by the simulator, the
baselines and the environment's problem."""

from __future__ import annotations

import numpy as np
import pytest

from envs.problem import build_problem
from graphs.ir import OpGraph
from placer.baselines import place
from placer.core.cluster import Cluster, Device, get_cluster, is_cuda_name
from placer.costmodel.costs import cost_kind_of, op_time_s, substitute_costs
from placer.costmodel.sim import Simulator, simulate

GiB = 1 << 30


def cpu_only_chain() -> OpGraph:
    ops = [dict(name=f"o{i}", fwd_s=float(i + 1), out_bytes=8) for i in range(3)]
    return OpGraph.build(name="cpu-only", ops=ops, edges=[("o0", "o1"), ("o1", "o2")])


@pytest.mark.parametrize("user", ["sim", "baseline", "problem", "op_time"])
def test_a_missing_device_kind_is_the_same_one_line_error_everywhere(user):
    g, cl = cpu_only_chain(), get_cluster("cpu+2gpu")
    run = {"sim": lambda: Simulator(g, cl), "baseline": lambda: place("m-etf", g, cl),
           "problem": lambda: build_problem(g, cl, 2), "op_time": lambda: op_time_s(g, cl)}[user]
    with pytest.raises(ValueError) as e:
        run()
    msg = str(e.value)
    assert "\n" not in msg
    assert "graph 'cpu-only' has no op costs for device kind 'K80' (device gpu:0); it has: cpu" in msg


def test_substitution_scales_by_speed_and_matches_the_simulator():
    g, cl = cpu_only_chain(), get_cluster("cpu+2gpu")  # cpu speed 6, K80 speed 1
    assert cost_kind_of(g, cl.devices[1], {"K80": "cpu"}) == "cpu"
    np.testing.assert_allclose(op_time_s(g, cl, cost_kind="cpu"), [[1 / 6, 1, 1], [2 / 6, 2, 2], [3 / 6, 3, 3]])
    sub = substitute_costs(g, cl, "cpu")
    assert substitute_costs(g, cl, None) is g and sorted(sub.costs) == ["K80", "cpu"]
    np.testing.assert_array_equal(op_time_s(sub, cl), op_time_s(g, cl, cost_kind="cpu"))
    for dev in ([0, 0, 0], [1, 2, 1], [0, 1, 2]):
        assert simulate(sub, cl, dev).step_time_s == simulate(g, cl, dev, cost_kind="cpu").step_time_s


def test_problem_op_times_are_the_cost_rule():
    g, cl = cpu_only_chain(), get_cluster("cpu-2")
    p = build_problem(g, cl, 3)
    np.testing.assert_allclose(p.time_s.sum(axis=0), op_time_s(g, cl).sum(axis=0))


def test_is_cpu_and_is_cuda_name():
    cpu = Device(name="cpu:0", kind="cpu", memory_bytes=GiB)
    host = Device(name="cpu:1", kind="K80", memory_bytes=GiB)  # named a CPU, borrowing another cost set
    gpu = Device(name="gpu:0", kind="K80", memory_bytes=GiB)
    cuda = Device(name="cuda:0", kind="cuda", memory_bytes=GiB)
    assert cpu.is_cpu and host.is_cpu and not gpu.is_cpu and not cuda.is_cpu
    assert Device(name="x", kind="CPU", memory_bytes=GiB).is_cpu
    assert is_cuda_name("cuda:0") and is_cuda_name("cuda") and not is_cuda_name("gpu:0")
    assert not is_cuda_name("cpu:0")
    cl = Cluster.uniform("mix", [cpu, gpu, cuda], bandwidth_Bps=1e9, latency_s=0.0)
    p = build_problem(cpu_only_chain().with_costs("K80", cpu_only_chain().cost("cpu"))
                      .with_costs("cuda", cpu_only_chain().cost("cpu")), cl, 2)
    assert p.device_features[:, 3].tolist() == [1.0, 0.0, 0.0]  # the is_cpu device feature


@pytest.mark.parametrize("edit, why", [
    (lambda d: d["latency_s"][0].__setitem__(1, float("inf")), "latency_s must be finite"),
    (lambda d: d["bandwidth_Bps"][1].__setitem__(0, float("nan")), "bandwidth_Bps must be finite"),
    (lambda d: d["devices"][0].__setitem__("memory_bytes", float("nan")), "memory_bytes must be a finite number"),
    (lambda d: d["devices"][0].__setitem__("memory_bytes", 0.5), "memory_bytes must be a finite number >= 1"),
    (lambda d: d["devices"][1].__setitem__("speed", float("inf")), "speed must be a finite positive number"),
    (lambda d: d["devices"][1].__setitem__("name", None), "a device name must be a non-empty string"),
    (lambda d: d["devices"][1].__setitem__("kind", 5), "kind must be a non-empty string"),
    (lambda d: d.__setitem__("meta", [1]), "meta must be an object, got list"),
    (lambda d: d["meta"].__setitem__("step_overhead_s", float("inf")), "step_overhead_s must be a finite number"),
    (lambda d: d["meta"].__setitem__("dispatch_overhead_s", {"cpu": [1]}), "dispatch_overhead_s must be a finite"),
    (lambda d: d["meta"].__setitem__("memory_bandwidth_Bps", {"cpu": 0}), "memory_bandwidth_Bps must be a finite "
                                                                         "number > 0"),
    (lambda d: d["meta"].__setitem__("send_overhead_s", True), "send_overhead_s must be a finite number"),
])
def test_a_cluster_with_a_non_finite_or_ill_typed_number_is_refused(edit, why):
    d = get_cluster("cpu-2").to_json()
    edit(d)
    with pytest.raises(ValueError, match=why):
        Cluster.from_json(d)


def test_link_costs_that_overflow_fail_the_step_instead_of_crashing_the_scheduler():
    # finite, but their sums are not: the dataflow list scheduler once indexed device -1 here (heap corruption)
    from graphs.data import load_benchmark_graph

    g = load_benchmark_graph("rnnlm")
    d = get_cluster("cpu-2").to_json()
    d["latency_s"] = [[0.0, 1e308], [1e308, 0.0]]
    cluster = Cluster.from_json(d)
    dev = place("even-layers", g, cluster).device_of_op
    assert len(set(dev.tolist())) == 2
    for schedule in ("dataflow", "1f1b"):
        res = simulate(g, cluster, dev, schedule=schedule, microbatches=2)
        assert not res.ok and "overflows" in res.failure
