"""The real engine reproduces single-process training for any placement and schedule (CPU, 2 gloo workers).

Workers are expensive to start on 2 cores, so each graph gets one module-scoped :class:`Measurer` reused by
all its tests. Reference numbers come from running the same traced step in this process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphs.build import build_graph, rebuild_traced
from graphs.ir import OpCosts, Provenance
from placer.core.cluster import get_cluster
from placer.costmodel.sim import Simulator
from placer.engine import EngineConfig, Measurer, reference_step
from placer.engine.ordering import device_tasks
from placer.core.placement import Placement

pytestmark = pytest.mark.slow

CPU2 = get_cluster("cpu-2")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Reference steps in this process with one intra-op thread, like the workers: with two OpenMP threads
    and another job on one of the two cores, an Inception step here took 15 s instead of 0.1 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_placement(graph, seed: int, num_devices: int = 2) -> Placement:
    """Random device per colocation group (so shared modules stay together)."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, num_devices, size=int(graph.colocation.max()) + 1)
    pl = Placement(groups[graph.colocation])
    if len(pl.devices_used()) < num_devices:  # make sure both devices take part
        arr = pl.device_of_op.copy()
        arr[graph.colocation == graph.colocation[-1]] = 1 - arr[-1]
        pl = Placement(arr)
    return pl


def assert_matches(out, ref, *, rtol: float = 1e-4, atol: float = 1e-6, scaled: bool = False) -> None:
    """Loss and every gradient equal the reference to ``rtol``.

    ``scaled``: the absolute tolerance is ``rtol`` times the tensor's largest gradient. For BatchNorm networks
    single-process fp32 itself is only that good: a BN bias gradient is a sum with heavy cancellation, and any
    other summation order (the engine accumulates a fan-out's gradients op by op) moves its small elements.
    """
    ref_loss, ref_grads, _ = ref
    assert out.result.ok, out.result.failure
    assert out.loss == pytest.approx(ref_loss, rel=rtol)
    assert set(out.grads) == set(ref_grads)
    for name, g in ref_grads.items():
        tol = max(atol, rtol * float(g.abs().max())) if scaled else atol
        torch.testing.assert_close(out.grads[name], g, rtol=rtol, atol=tol, msg=lambda m: f"{name}: {m}")  # noqa: B023 - called at once


class Model:
    def __init__(self, source: str, **overrides):
        self.graph = build_graph(source, profile=None, overrides=overrides or None)
        self.traced = rebuild_traced(self.graph.meta)
        self._refs: dict[int, tuple] = {}

    def reference(self, microbatches: int = 1):
        if microbatches not in self._refs:
            init = {k: v.clone() for k, v in self.traced.gm.state_dict().items()}
            self._refs[microbatches] = reference_step(self.traced.gm, self.traced.example_inputs,
                                                      microbatches=microbatches)
            self.traced.gm.load_state_dict(init)
        return self._refs[microbatches]


_MODELS: dict[tuple, Model] = {}


def get_model(source: str, **overrides) -> Model:
    key = (source, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = Model(source, **overrides)
    return _MODELS[key]


@pytest.fixture(scope="module")
def pool():
    """One pair of warm workers for the whole module; tests switch it to their graph."""
    with Measurer(get_model("placer.engine.toy:branchy").graph, CPU2, config=EngineConfig(timeout_s=120)) as m:
        yield m


def on(pool: Measurer, model: Model) -> Measurer:
    if pool.graph is not model.graph:
        pool.switch_graph(model.graph)
    return pool


@pytest.fixture
def branchy(pool):
    model = get_model("placer.engine.toy:branchy")
    return model, on(pool, model)


# ---------------------------------------------------------------------------------------------- toy graph
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_placement_equals_single_process(branchy, seed):
    model, m = branchy
    pl = random_placement(model.graph, seed)
    out = m.run_step(pl, update=False)
    assert_matches(out, model.reference())
    # both devices worked and talked
    assert (out.result.busy_s > 0).all()
    assert out.result.bytes_moved.sum() > 0


def test_single_device_equals_single_process(branchy):
    model, m = branchy
    out = m.run_step(Placement.single(model.graph, 1), update=False)
    assert_matches(out, model.reference())
    assert out.result.bytes_moved.sum() == 0
    assert out.result.busy_s[0] == 0 and out.result.busy_s[1] > 0


@pytest.mark.parametrize("schedule", ["none", "gpipe", "1f1b"])
def test_schedules_agree_with_plain_training(branchy, schedule):
    model, m = branchy
    out = m.run_step(random_placement(model.graph, 3), schedule=schedule, microbatches=4, update=False)
    # no batch-dependent op: 4 micro-batches of 2 give the full-batch gradients
    assert_matches(out, model.reference(1))
    assert out.result.microbatches == 4 and out.result.schedule == schedule


def test_dataflow_runs_the_simulators_order_and_trains_like_one_process(branchy):
    """``dataflow`` lists come from list scheduling on the costs: the workers run exactly the simulator's lists
    (micro-batches interleaved where the costs say so) and the gradients are plain training's."""
    model, m = branchy
    g = model.graph
    rng = np.random.default_rng(0)
    prov = Provenance(device="cpu", threads=1, torch_version="", date="", method="estimated")
    costed = g.with_costs("cpu", OpCosts(fwd_s=rng.uniform(1e-4, 1e-3, g.n), bwd_s=rng.uniform(1e-4, 2e-3, g.n),
                                        provenance=prov))
    pl = random_placement(g, 3)
    with pytest.raises(ValueError, match="needs the cluster"):  # no costs to order by
        device_tasks(costed, pl, 2, schedule="dataflow", microbatches=4)
    m.switch_graph(costed)
    try:
        out = m.run_step(pl, schedule="dataflow", microbatches=4, update=False)
    finally:
        m.switch_graph(g)
    assert_matches(out, model.reference(1))
    sched = Simulator(costed, CPU2).schedule(pl, "dataflow", microbatches=4)  # same costs, same lists
    tasks, order, _ = device_tasks(costed, pl, 2, schedule="dataflow", microbatches=4, cluster=CPU2)
    assert order == out.result.schedule_ran == "dataflow"
    assert tasks == [sched.tasks(d) for d in range(2)]
    fwd_mbs = [[t.microbatch for t in seq if t.phase == "fwd"] for seq in tasks]
    assert any(mbs != sorted(mbs) for mbs in fwd_mbs)  # micro-batches interleaved: no in-order schedule does that
    start = {(e.track, e.op, e.microbatch, e.phase): e.start_s for e in out.result.timeline}
    for d, name in enumerate(CPU2.device_names):  # each worker ran its list in the list's order
        ran = [start[(name, g.op_names[t.op] if t.op >= 0 else "update", t.microbatch, t.phase)] for t in tasks[d]]
        assert ran == sorted(ran)


def test_alternating_placement_finishes(branchy):
    """dev0 -> dev1 -> dev0 -> ...: every op on the other device from its predecessor."""
    model, m = branchy
    g = model.graph
    dev = np.zeros(g.n, dtype=np.int64)
    first_of_group: dict[int, int] = {}
    k = 0
    for i, grp in enumerate(g.colocation.tolist()):
        if grp not in first_of_group:
            first_of_group[grp] = k % 2
            k += 1
        dev[i] = first_of_group[grp]
    pl = Placement(dev)
    for schedule in ("gpipe", "1f1b"):
        out = m.run_step(pl, schedule=schedule, microbatches=2, update=False)
        assert_matches(out, model.reference(1))
    assert out.result.bytes_moved[0, 1] > 0 and out.result.bytes_moved[1, 0] > 0


def test_sgd_update_equals_single_process(branchy):
    model, m = branchy
    out = m.run_step(random_placement(model.graph, 4), update=True)
    traced = rebuild_traced(model.graph.meta)  # a fresh copy: the update must start from the initial state
    _, _, ref_params = reference_step(traced.gm, traced.example_inputs, lr=m.config.lr)
    assert set(out.params) == set(ref_params)
    for name, p in ref_params.items():
        torch.testing.assert_close(out.params[name], p, rtol=1e-4, atol=1e-6)
    # and the update did something: parameters moved away from their initial values
    init = dict(traced.gm.named_parameters())
    assert any(not torch.equal(out.params[n], init[n]) for n in init)


def test_adam_update_equals_single_process(branchy):
    model, m = branchy
    m.config.optimizer = "adam"
    try:
        out = m.run_step(random_placement(model.graph, 6), schedule="gpipe", microbatches=2, steps=2)
    finally:
        m.config.optimizer = "sgd"
    traced = rebuild_traced(model.graph.meta)
    opt = torch.optim.Adam(traced.gm.parameters(), lr=m.config.lr)
    for _ in range(2):  # two steps: the second uses Adam's moment estimates from the first
        opt.zero_grad(set_to_none=True)
        traced.gm(*traced.example_inputs).backward()
        opt.step()
    for name, p in traced.gm.named_parameters():
        torch.testing.assert_close(out.params[name], p.detach(), rtol=1e-4, atol=1e-6)


def test_measure_reports_a_consistent_step(branchy):
    model, m = branchy
    res = m.measure(random_placement(model.graph, 5), schedule="gpipe", microbatches=2, steps=3, warmup=1)
    assert res.ok and res.source == "engine"
    assert len(res.extra["samples_s"]) == 3
    assert res.step_time_s == pytest.approx(float(np.median(res.extra["samples_s"])))
    assert (res.busy_s > 0).all() and (res.busy_s <= res.step_time_s * 1.05).all()
    assert (res.peak_memory_bytes > 0).all()
    ops = [e for e in res.timeline if e.phase in ("fwd", "bwd")]
    sends = [e for e in res.timeline if e.phase == "send"]
    assert len(ops) == 2 * 2 * model.graph.n  # fwd + bwd of every op, 2 micro-batches
    assert sends and all("->" in e.track for e in sends)
    assert all(-1e-3 <= e.start_s <= e.end_s <= res.step_time_s + 1e-3 for e in res.timeline)
    assert sum(e.phase == "update" for e in res.timeline) == 2


def test_bytes_moved_hand_worked(pool):
    """Chain of 4 Linear+tanh (batch 8, width 16, fp32): split after layer 2 (op ``tanh_1``).

    Forward dev0 -> dev1: the activation (8*16*4 = 512 bytes) and the target input (512 bytes, held on dev0);
    backward dev1 -> dev0: the activation's gradient (512 bytes), none for the target (it needs no grad).
    """
    model = get_model("placer.engine.toy:chain")
    g = model.graph
    cut = g.index("tanh_1")
    dev = np.array([0 if i <= cut or name == "target" else 1 for i, name in enumerate(g.op_names)])
    res = on(pool, model).measure(Placement(dev), steps=1, warmup=0)
    assert res.ok, res.failure
    np.testing.assert_array_equal(res.bytes_moved, [[0, 1024], [512, 0]])


def test_bad_inputs_are_one_line_errors(branchy):
    model, m = branchy
    with pytest.raises(ValueError, match="placement has"):
        m.measure(Placement(np.zeros(3, dtype=np.int64)))
    with pytest.raises(ValueError, match="schedule"):
        m.measure(Placement.single(model.graph), schedule="nope")
    # batch 8 does not split in 3: refused where the schedule is built, as the simulator refuses it
    with pytest.raises(ValueError, match="has a batch of 8, which does not split into 3 equal micro-batches"):
        m.measure(Placement.single(model.graph), microbatches=3)
    # the workers are still usable afterwards (a planning error does not restart them)
    restarts = m.restarts
    assert m.measure(Placement.single(model.graph), steps=1, warmup=0).ok
    assert m.restarts == restarts


# ---------------------------------------------------------------------------------------------- BatchNorm
def test_batchnorm_microbatched_matches_microbatched_reference(pool):
    model = get_model("placer.engine.toy:bn_net")
    pl = random_placement(model.graph, 0)
    m = on(pool, model)
    gp = m.run_step(pl, schedule="gpipe", microbatches=2, update=False)
    fb = m.run_step(pl, schedule="1f1b", microbatches=2, update=False)
    assert_matches(gp, model.reference(2))
    assert_matches(fb, model.reference(2))
    # and the check can fail: the full-batch statistics give different gradients
    full_grads = model.reference(1)[1]
    assert any(not torch.allclose(gp.grads[n], full_grads[n], rtol=1e-4) for n in full_grads)


# ---------------------------------------------------------------------------------------------- benchmark models
@pytest.mark.parametrize("name,overrides,mb,scaled", [
    ("rnnlm", {}, 2, False),
    ("nmt", {}, 2, False),
    ("inception_v3", {"batch": 4}, 2, True),  # micro-batches of 2: BatchNorm needs > 1 value per channel
])
def test_benchmark_models_match_single_process(pool, name, overrides, mb, scaled):
    model = get_model(name, **overrides)
    m = on(pool, model)
    out = m.run_step(random_placement(model.graph, 7), update=False)
    assert_matches(out, model.reference(1), atol=1e-6, scaled=scaled)
    for schedule in ("gpipe", "1f1b"):
        out = m.run_step(random_placement(model.graph, 8), schedule=schedule, microbatches=mb, update=False)
        assert_matches(out, model.reference(mb), atol=1e-6, scaled=scaled)
    # checkpointed segments on a scattered placement: values without a gradient (token ids, integer getitems)
    # that later segments read must leave the checkpoint too (found on a lent GPU: KeyError in the worker)
    out = m.run_step(random_placement(model.graph, 3), schedule="gpipe", microbatches=mb, update=False,
                     recompute=(0, 1))
    assert out.result.ok, out.result.failure
    assert_matches(out, model.reference(mb), atol=1e-6, scaled=scaled)


# ---------------------------------------------------------------------------------------------- pipelining backend
@pytest.mark.parametrize("schedule,devices", [
    # chain: x, target, layers_0, tanh, layers_1, tanh_1, layers_2, tanh_2, layers_3, tanh_3, sub, pow_1, mean
    ("gpipe", [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]),
    ("1f1b", [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]),
    ("interleaved-1f1b", [0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1]),  # stages on dev0, dev1, dev0, dev1
])
def test_pipelining_backend_agrees_with_ops(pool, schedule, devices):
    model = get_model("placer.engine.toy:chain")
    m = on(pool, model)
    pl = Placement(np.array(devices))
    piped = m.run_step(pl, schedule=schedule, microbatches=4, update=False, backend="pipelining")
    ops = m.run_step(pl, schedule=schedule, microbatches=4, update=False, backend="ops")
    assert piped.result.extra["backend"] == "pipelining" and ops.result.extra["backend"] == "ops"
    assert_matches(piped, model.reference(1))
    for name, g in ops.grads.items():
        torch.testing.assert_close(piped.grads[name], g, rtol=1e-5, atol=1e-7)
    assert piped.loss == pytest.approx(ops.loss, rel=1e-6)


def test_pipelining_carries_values_through_stages(pool):
    """branchy split after ``size``: an int (the batch size), a tuple's leaves, a fan-out and the integer target
    all cross the stage boundary."""
    model = get_model("placer.engine.toy:branchy")
    g = model.graph
    cut = g.index("size")
    pl = Placement(np.array([0 if i <= cut else 1 for i in range(g.n)]))
    m = on(pool, model)
    out = m.run_step(pl, schedule="1f1b", microbatches=2, update=False, backend="pipelining")
    assert_matches(out, model.reference(1))
    res = m.measure(pl, schedule="gpipe", microbatches=2, steps=2, warmup=0, backend="pipelining")
    assert res.ok and {e.op for e in res.timeline} == {"stage0", "stage1", "update"}
    assert res.bytes_moved[0, 1] > 0 and res.bytes_moved[1, 0] > 0


def test_pipelining_rejects_non_contiguous_placements(pool):
    model = get_model("placer.engine.toy:chain")
    m = on(pool, model)
    restarts = m.restarts
    res = m.measure(Placement(np.array([0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1])), schedule="gpipe",
                    microbatches=2, backend="pipelining")
    assert not res.ok and "stage" in res.failure
    assert m.restarts == restarts  # refused while planning, workers kept
