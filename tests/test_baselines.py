"""Placement baselines: hand-worked answers on tiny graphs, validity on every preset, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphs.ir import OpCosts, OpGraph, Provenance
from placer.baselines.expert_parallel import expert_index
from placer.baselines import BASELINES, names, place, place_single, single_methods
from placer.baselines._common import groups_of, memory_report
from placer.costmodel.costs import op_memory_bytes, op_time_s
from placer.baselines.expert import benchmark_of, expert_layer
from placer.baselines.scotch import _check, load_scotch, scotch_version
from placer.core.cluster import PRESETS, Cluster, Device, get_cluster

DATA = Path(__file__).resolve().parents[1] / "graphs" / "data"
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------- fixtures
def _equal(d: int = 2, *, memory_bytes: int = GiB, bw: float = 1e9, lat: float = 0.0, speeds=None) -> Cluster:
    speeds = speeds or [1.0] * d
    devs = [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=memory_bytes, speed=s) for i, s in enumerate(speeds)]
    return Cluster.uniform(f"eq{d}", devs, bandwidth_Bps=bw, latency_s=lat)


def two_chains(length: int = 6) -> OpGraph:
    """Chains a0..a5 and b0..b5 (1 s per op, 100 MB edges), joined by one 10-byte edge a2 -> b3."""
    ops = [dict(name=f"{c}{i}", fwd_s=0.5, bwd_s=0.5, out_bytes=10**8) for i in range(length) for c in "ab"]
    edges = [(f"{c}{i}", f"{c}{i + 1}") for c in "ab" for i in range(length - 1)] + [("a2", "b3", 10)]
    return OpGraph.build(name="two-chains", ops=ops, edges=edges)


def chain(n: int, *, fwd_s=1.0, param_bytes: int = 0, out_bytes: int = 1000, name: str = "chain") -> OpGraph:
    f = fwd_s if isinstance(fwd_s, list) else [fwd_s] * n
    ops = [dict(name=f"o{i}", fwd_s=f[i], param_bytes=param_bytes, out_bytes=out_bytes) for i in range(n)]
    return OpGraph.build(name=name, ops=ops, edges=[(f"o{i}", f"o{i + 1}") for i in range(n - 1)])


def with_k80(g: OpGraph, factor: float = 8.0) -> OpGraph:
    c = g.cost("cpu")
    prov = Provenance(device="K80", threads=0, torch_version="", date="", method="estimated")
    return g.with_costs("K80", OpCosts(fwd_s=c.fwd_s / factor, bwd_s=c.bwd_s / factor, provenance=prov))


def with_cpu_costs_for(g: OpGraph, cluster) -> OpGraph:
    """``g`` with its ``cpu`` cost set copied to every device kind of ``cluster`` it lacks (a hand-made graph on a
    GPU preset; the cost model refuses missing kinds)."""
    for kind in sorted({dev.kind for dev in cluster.devices} - set(g.costs)):
        g = g.with_costs(kind, g.cost("cpu"))
    return g


def fake_rnnlm(steps: int = 4, layers: int = 2) -> OpGraph:
    """embed -> layers.k per step (one colocation group per layer) -> proj -> loss per step -> mean."""
    ops: list[dict] = [dict(name="tokens", kind="input", fwd_s=0.0, out_bytes=100),
                       dict(name="embed", module="embed", fwd_s=0.01, param_bytes=1000, out_bytes=4000)]
    edges = [("tokens", "embed")]
    for t in range(steps):
        for k in range(layers):
            ops.append(dict(name=f"cell{k}_{t}", module=f"layers.{k}", kind="LSTMCell", fwd_s=0.1,
                            param_bytes=4000, out_bytes=2000, colocation=1000 + k))
            edges.append(("embed" if k == 0 else f"cell{k - 1}_{t}", f"cell{k}_{t}"))
            if t:
                edges.append((f"cell{k}_{t - 1}", f"cell{k}_{t}"))
        ops.append(dict(name=f"getitem{t}", kind="getitem", fwd_s=0.0, out_bytes=1000))
        edges.append((f"cell{layers - 1}_{t}", f"getitem{t}"))
        ops.append(dict(name=f"proj{t}", module="proj", fwd_s=0.05, param_bytes=8000, out_bytes=8000, colocation=2000))
        ops.append(dict(name=f"loss{t}", module="loss", fwd_s=0.01, out_bytes=4))
        edges += [(f"getitem{t}", f"proj{t}"), (f"proj{t}", f"loss{t}")]
    ops.append(dict(name="mean", kind="mean", fwd_s=0.0, out_bytes=4))
    edges += [(f"loss{t}", "mean") for t in range(steps)]
    return with_k80(OpGraph.build(name="rnnlm-fake", ops=ops, edges=edges))


def fake_nmt() -> OpGraph:
    ops = [dict(name="src", kind="input", fwd_s=0.0, out_bytes=10),
           dict(name="tgt", kind="input", fwd_s=0.0, out_bytes=10),
           dict(name="es", module="embed_src", fwd_s=0.01), dict(name="et", module="embed_tgt", fwd_s=0.01),
           dict(name="e0", module="encoder.0", fwd_s=0.1), dict(name="e1", module="encoder.1", fwd_s=0.1),
           dict(name="d0", module="decoder.0", fwd_s=0.1), dict(name="d1", module="decoder.1", fwd_s=0.1),
           dict(name="att", module="attention.score", fwd_s=0.05), dict(name="proj", module="proj", fwd_s=0.05),
           dict(name="loss", module="loss", fwd_s=0.01)]
    edges = [("src", "es"), ("tgt", "et"), ("es", "e0"), ("e0", "e1"), ("et", "d0"), ("e1", "d0"), ("d0", "d1"),
             ("d1", "att"), ("e1", "att"), ("att", "proj"), ("proj", "loss")]
    return with_k80(OpGraph.build(name="nmt-fake", ops=ops, edges=edges))


def layered(n_layers: int = 12, width: int = 5, seed: int = 0) -> OpGraph:
    """A random layered DAG with some multi-op colocation groups (shared modules at several depths)."""
    rng = np.random.default_rng(seed)
    ops, edges = [], []
    for layer in range(n_layers):
        for w in range(width):
            name = f"l{layer}w{w}"
            ops.append(dict(name=name, fwd_s=float(rng.uniform(1e-3, 1e-2)), bwd_s=float(rng.uniform(1e-3, 2e-2)),
                            out_bytes=int(rng.integers(10**3, 10**7)), param_bytes=int(rng.integers(0, 10**6)),
                            stash_bytes=int(rng.integers(0, 10**6)),
                            colocation=w if layer % 3 == 0 else 100 + len(ops)))
            if layer:
                for p in sorted(set(rng.integers(0, width, size=2).tolist())):
                    edges.append((f"l{layer - 1}w{p}", name))
    return with_k80(OpGraph.build(name="layered", ops=ops, edges=edges))


HAND_MADE = {"two-chains": two_chains, "chain": lambda: chain(7), "rnnlm-fake": fake_rnnlm, "nmt-fake": fake_nmt,
             "layered": layered}
CLASS_METHODS = {"single-cpu", "single-gpu", "expert-parallel"}  # ValueError: no such device / no routed experts


def _devices(p, g: OpGraph) -> dict[str, int]:
    return dict(zip(g.op_names, p.device_of_op.tolist()))


# ---------------------------------------------------------------------------------------------- registry
def test_registry_names_and_unknown_method():
    assert {"single", "scotch", "mincut", "metis", "expert", "m-topo", "m-etf", "m-sct", "heft", "pipedream-dp",
            "random", "round-robin"} <= set(BASELINES)
    with pytest.raises(ValueError, match="unknown placement method 'nope'.*m-etf"):
        place("nope", chain(3), _equal())


def test_common_cost_and_memory_model():
    g = chain(3, fwd_s=[1.0, 2.0, 3.0], param_bytes=10)
    g = g.replace(stash_bytes=[5, 0, 0])
    np.testing.assert_array_equal(op_memory_bytes(g), [45, 40, 40])  # 4 x params + stash
    cl = get_cluster("cpu+2gpu")
    # K80 costs absent: the simulator's rule, a one-line error naming the kind and the graph ...
    with pytest.raises(ValueError, match="graph 'chain' has no op costs for device kind 'K80'"):
        op_time_s(g, cl)
    with pytest.raises(ValueError, match="graph 'chain' has no op costs for device kind 'K80'"):
        place("heft", g, cl)
    # ... unless substituted on purpose: cpu costs / speed (cpu speed 6, K80 speed 1)
    np.testing.assert_allclose(op_time_s(g, cl, cost_kind={"K80": "cpu"}),
                               [[1 / 6, 1, 1], [2 / 6, 2, 2], [3 / 6, 3, 3]])
    with pytest.raises(ValueError, match="no op costs"):
        op_time_s(OpGraph.build(name="bare", ops=[dict(name="a")], edges=[]), cl)


# ---------------------------------------------------------------------------------------------- partitioners
@pytest.mark.parametrize("method", ["scotch", "metis", "mincut"])
def test_partitioners_cut_the_light_edge(method):
    g = two_chains()
    p = place(method, g, _equal(2), seed=0)
    dev = _devices(p, g)
    a = {dev[f"a{i}"] for i in range(6)}
    b = {dev[f"b{i}"] for i in range(6)}
    assert len(a) == 1 and len(b) == 1 and a != b, dev


def test_scotch_uses_the_real_library_and_device_speeds():
    assert scotch_version().startswith("7.")
    g = chain(40)
    # speeds 1 and 3: the 40 equal ops split 10 / 30 (weighted complete architecture)
    counts = np.bincount(place("scotch", g, _equal(2, speeds=[1.0, 3.0]), seed=0).device_of_op, minlength=2)
    assert abs(counts[0] - 10) <= 1 and counts.sum() == 40
    # non-uniform links take the SCOTCH_archBuild2 path; the same proportions hold
    devs = [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=GiB, speed=s) for i, s in enumerate([1.0, 3.0, 2.0])]
    bw = np.array([[1, 1e9, 1e8], [1e9, 1, 1e10], [1e8, 1e10, 1]])
    cl3 = Cluster(name="nu3", devices=devs, bandwidth_Bps=bw, latency_s=np.full((3, 3), 1e-5))
    c3 = np.bincount(place("scotch", chain(60), cl3, seed=0).device_of_op, minlength=3)
    assert np.all(np.abs(c3 - np.array([10, 30, 20])) <= 2), c3


def test_scotch_failure_is_one_line_value_error():
    with pytest.raises(ValueError, match=r"^scotch: SCOTCH_x failed \(code 1\)") as e:
        _check(load_scotch(), 1, "SCOTCH_x")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["mincut", "expert", "m-topo", "m-etf", "m-sct", "pipedream-dp"])
def test_gpu_only_methods_leave_the_host_cpu_out(method):
    g = layered()
    for name in ("cpu+2gpu", "cpu+4gpu"):
        cl = get_cluster(name)
        assert 0 not in place(method, g, cl).device_of_op  # device 0 is the host CPU


def test_mincut_on_cpu_only_cluster():
    # a CPU-only cluster keeps all its devices
    assert set(place("mincut", two_chains(), get_cluster("cpu-2")).device_of_op.tolist()) == {0, 1}


# ---------------------------------------------------------------------------------------------- memory-aware
def test_m_etf_respects_a_memory_cap_with_the_hand_worked_split():
    g = chain(10, param_bytes=25)  # 100 bytes resident per op, 1000 in all
    cl = _equal(2, memory_bytes=600)
    p = place("m-etf", g, cl)
    # ETF keeps the chain where its input is (no transfer) until device 0 is full: six ops, then four
    assert p.device_of_op.tolist() == [0] * 6 + [1] * 4
    for method in ("m-etf", "m-sct", "m-topo", "heft", "pipedream-dp", "random"):
        groups = groups_of(g, cl)
        dev = np.array([p2 for p2 in place(method, g, cl, seed=0).device_of_op])
        assert memory_report(groups, cl, dev[[o[0] for o in groups.ops]]) == [], method


def test_memory_infeasible_still_returns_a_placement():
    g = chain(10, param_bytes=100)  # 4000 bytes, cluster holds 2 x 1000
    cl = _equal(2, memory_bytes=1000)
    for method in sorted(set(names()) - {"single-gpu", "expert-parallel"}):  # no GPU, no experts
        p = place(method, g, cl, seed=0)
        groups = groups_of(g, cl)
        assert memory_report(groups, cl, p.device_of_op[[o[0] for o in groups.ops]]), method


def test_m_topo_fills_devices_in_order():
    assert place("m-topo", chain(4), _equal(2)).device_of_op.tolist() == [0, 0, 1, 1]
    # a faster second device takes the larger share: speeds 1 and 3 -> 1 of 4 ops, then 3
    assert place("m-topo", chain(4), _equal(2, speeds=[1.0, 3.0])).device_of_op.tolist() == [0, 1, 1, 1]


def test_m_sct_keeps_the_favourite_child_with_its_parent():
    # p -> c2 (1 MB) and p -> c1 (500 MB = 0.5 s at 1 GB/s); c2 comes first in op order
    ops = [dict(name="p", fwd_s=1.0), dict(name="c2", fwd_s=1.0), dict(name="c1", fwd_s=1.0)]
    g = OpGraph.build(name="fork", ops=ops, edges=[("p", "c2", 10**6), ("p", "c1", 5 * 10**8)])
    cl = _equal(2, bw=1e9)
    # ETF: c1 and c2 can both start at 1 s on p's device; the tie goes to c2, so c1 moves (starts at 1.5 s)
    assert _devices(place("m-etf", g, cl), g) == {"p": 0, "c2": 0, "c1": 1}
    # SCT: c1 is p's favourite child (the heavier edge) and stays with p; c2 moves for 1 ms
    assert _devices(place("m-sct", g, cl), g) == {"p": 0, "c1": 0, "c2": 1}


def test_heft_spreads_independent_work_and_keeps_costly_edges():
    ops = [dict(name=f"x{i}", fwd_s=1.0) for i in range(2)]
    g = OpGraph.build(name="pair", ops=ops, edges=[])
    assert sorted(place("heft", g, _equal(2)).device_of_op.tolist()) == [0, 1]
    # a chain whose edges take 10 s each stays on one device
    assert len(set(place("heft", chain(5, out_bytes=10**10), _equal(2)).device_of_op.tolist())) == 1


def test_pipedream_balances_the_slowest_stage():
    cl = _equal(2, bw=1e12)
    assert place("pipedream-dp", chain(4), cl).device_of_op.tolist() == [0, 0, 1, 1]
    # times 3,1,1,1: the best bottleneck is 3 with the first op alone
    assert place("pipedream-dp", chain(4, fwd_s=[3.0, 1.0, 1.0, 1.0]), cl).device_of_op.tolist() == [0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- single, expert
def test_single_picks_the_fastest_device_that_fits():
    g = with_k80(chain(4, param_bytes=GiB // 2))  # 8 GiB resident
    cl = get_cluster("cpu+2gpu")  # K80s (12 GiB) are 8x faster than 1 cpu core; the host has speed 6
    assert set(place("single", g, cl).device_of_op.tolist()) == {1}
    big = with_k80(chain(4, param_bytes=GiB))  # 16 GiB: only the 64 GiB host fits
    assert set(place("single", big, cl).device_of_op.tolist()) == {0}
    # single-gpu still puts it on a GPU (the simulator reports the OOM, as ColocRL's NMT on one GPU)
    assert set(place("single-gpu", big, cl).device_of_op.tolist()) == {1}
    assert set(place("single-cpu", big, cl).device_of_op.tolist()) == {0}
    assert set(place("single:K80", g, cl).device_of_op.tolist()) == {1}
    assert set(place_single(g, cl, "gpu:1").device_of_op.tolist()) == {2}
    assert single_methods(cl) == ["single:cpu", "single:K80"]
    with pytest.raises(ValueError, match="no 'gpu' device"):
        place("single-gpu", g, get_cluster("cpu-2"))


def test_expert_puts_lstm_layer_k_on_gpu_k():
    g = fake_rnnlm()
    assert benchmark_of(g) == "rnnlm"
    dev = _devices(place("expert", g, get_cluster("cpu+2gpu")), g)
    assert {dev[f"cell0_{t}"] for t in range(4)} == {1} and {dev[f"cell1_{t}"] for t in range(4)} == {2}
    assert dev["embed"] == dev["tokens"] == 1  # embedding (and its input) with the first layer
    assert dev["proj0"] == dev["loss3"] == dev["getitem2"] == dev["mean"] == 2  # softmax side with the top layer
    # CPU-only cluster: layer k on device k; one GPU + CPU: both layers wrap onto the GPU
    assert _devices(place("expert", g, get_cluster("cpu-2")), g)["cell1_0"] == 1
    one = get_cluster("cpu+2gpu").subset([0, 1])
    assert set(place("expert", g, one).device_of_op.tolist()) == {1}


def test_expert_nmt_rules():
    g = fake_nmt()
    dev = _devices(place("expert", g, get_cluster("cpu+4gpu")), g)
    assert dev["e0"] == dev["d0"] == dev["es"] == dev["et"] == 1
    assert dev["e1"] == dev["d1"] == dev["att"] == dev["proj"] == dev["loss"] == 2


def test_expert_other_graphs_split_contiguously_and_inception_on_one_gpu():
    p = place("expert", with_k80(chain(8)), get_cluster("cpu+4gpu"))
    assert p.device_of_op.tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    inc = with_k80(chain(5, name="inception_v3-small"))
    assert set(place("expert", inc, get_cluster("cpu+4gpu")).device_of_op.tolist()) == {1}


def test_expert_rules_agree_with_the_model_modules():
    pytest.importorskip("torch")
    from graphs.models import nmt, rnnlm

    for path in ["embed", "layers.0", "layers.1.cell", "proj", "loss", ""]:
        assert expert_layer(path, 2) == rnnlm.expert_layer_of_module(path, 2), path
    for path in ["embed_src", "embed_tgt", "encoder.0", "decoder.1", "attention", "attention.w", "proj", "loss", ""]:
        assert expert_layer(path, 2) == nmt.expert_layer_of_module(path, 2), path


# ---------------------------------------------------------------------------------------------- every method
def _benchmark_graphs() -> list[Path]:
    return sorted(DATA.glob("*.json")) if DATA.exists() else []


@pytest.mark.parametrize("graph_name", sorted(HAND_MADE))
@pytest.mark.parametrize("cluster_name", sorted(PRESETS))
def test_every_method_gives_a_valid_deterministic_placement(graph_name, cluster_name):
    cl = get_cluster(cluster_name)
    g = with_cpu_costs_for(HAND_MADE[graph_name](), cl)
    for method in names():
        try:
            p1 = place(method, g, cl, seed=3)
        except ValueError as e:
            assert method in CLASS_METHODS and "has no" in str(e), (method, e)
            continue
        p1.validate(g, cl)
        assert place(method, g, cl, seed=3) == p1, method


def test_expert_parallel_deals_each_blocks_experts_over_the_devices_but_the_heads():
    # two MoE blocks of 4 routed experts between a stem and a head, 4 devices: torchtitan's split makes two stages
    # (one per block), the head on the second; expert k goes round-robin over the idle devices 2, 3, then device 0
    ops, edges, prev = [dict(name="stem", module="emb", fwd_s=1.0)], [], "stem"
    for b in range(2):
        ops.append(dict(name=f"router{b}", module=f"blocks.{b}.moe.router", fwd_s=1.0))
        edges.append((prev, f"router{b}"))
        for k in range(4):
            ops.append(dict(name=f"e{b}.{k}", module=f"blocks.{b}.moe.experts.{k}.fc", fwd_s=1.0))
            edges.append((f"router{b}", f"e{b}.{k}"))
        ops.append(dict(name=f"combine{b}", module=f"blocks.{b}.moe", fwd_s=1.0))
        edges += [(f"e{b}.{k}", f"combine{b}") for k in range(4)]
        prev = f"combine{b}"
    ops.append(dict(name="head", module="head", fwd_s=8.0))
    edges.append((prev, "head"))
    g = with_k80(OpGraph.build(name="moe-toy", ops=ops, edges=edges))
    cl = _equal(4)
    dev = _devices(place("expert-parallel", g, cl), g)
    split = _devices(place("even-layers-weighted", g, cl), g)
    assert {k: v for k, v in dev.items() if not k.startswith("e")} == {k: v for k, v in split.items()
                                                                        if not k.startswith("e")}
    assert sorted(set(split.values())) == [0, 1] and dev["head"] == 1
    spread = [2, 3, 0]
    assert [dev[f"e{b}.{k}"] for b in range(2) for k in range(4)] == [spread[k % 3] for b in range(2) for k in range(4)]
    with pytest.raises(ValueError, match="no routed experts"):
        place("expert-parallel", chain(4), cl)


def test_random_depends_on_the_seed():
    g, cl = layered(), get_cluster("cpu+4gpu")
    assert place("random", g, cl, seed=1) != place("random", g, cl, seed=2)


@pytest.mark.parametrize("path", _benchmark_graphs(), ids=lambda p: p.stem)
def test_every_method_on_benchmark_graphs(path):
    g = OpGraph.load(path)
    for cluster_name in ("cpu+2gpu", "cpu+4gpu", "cpu-2"):
        cl = get_cluster(cluster_name)
        for method in names():
            if method in CLASS_METHODS and cluster_name == "cpu-2":
                continue
            if method == "expert-parallel" and not (expert_index(g.module_paths) >= 0).any():
                with pytest.raises(ValueError, match="has no routed experts"):
                    place(method, g, cl, seed=0)
                continue
            place(method, g, cl, seed=0).validate(g, cl)
    # the expert rule on the traced model: LSTM layer k (and its time steps) on GPU k, i.e. device k + 1
    dev = place("expert", g, get_cluster("cpu+4gpu")).device_of_op
    layer_ops = [(i, expert_layer(p, 2)) for i, p in enumerate(g.module_paths) if p.split(".")[0] in
                 ("layers", "encoder", "decoder")]
    assert all(dev[i] == k + 1 for i, k in layer_ops)
    if benchmark_of(g) == "inception_v3":
        assert set(dev.tolist()) == {1}
