"""PlacementEnv: Gymnasium/SB3 conformance, determinism, memory masks, rewards worked by hand, backends."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import gymnasium
import numpy as np
import pytest

import envs
from envs.placement_env import make_env, unflatten
from envs.problem import FinishEstimate, build_problem
from envs.rewards import SimRealBackend, engine_available, make_backend
from envs.synthetic import layered_dag, two_chains
from graphs.ir import OpGraph
from placer.core.cluster import get_cluster
from tests.policy_helpers import SimMeasurer, pair

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def rollout(env: gymnasium.Env, seed: int) -> list:
    """Episode with actions drawn from the masks by a seeded generator; returns everything observed."""
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    trace = [obs]
    done = False
    while not done:
        mask = env.unwrapped.action_masks()
        obs, reward, done, truncated, info = env.step(int(rng.choice(np.flatnonzero(mask))))
        trace += [obs, reward, truncated, {k: v for k, v in info.items() if k != "result"}]
    return trace


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(a, b))


# ---------------------------------------------------------------------------------------------- conformance
def _ours(w: warnings.WarningMessage) -> bool:
    """A warning we caused: any warning except third-party deprecations of their own APIs."""
    return not (issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
                and ROOT.as_posix() not in str(w.filename))


def test_make_with_defaults_and_checkers_pass_without_warnings():
    from gymnasium.utils.env_checker import check_env
    from stable_baselines3.common.env_checker import check_env as sb3_check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = gymnasium.make(envs.ENV_ID)
        check_env(env.unwrapped)
        sb3_check_env(env.unwrapped)
        rollout(env, 0)
        env.close()
    ours = [f"{w.category.__name__}: {w.message}" for w in caught if _ours(w)]
    assert not ours, "\n".join(ours)
    assert env.unwrapped.cluster.name == "cpu-2"


def test_make_with_graph_and_cluster_keywords_and_padding():
    g = layered_dag(3, 3, seed=1)
    env = gymnasium.make(envs.ENV_ID, graph=g, cluster="cpu+4gpu", num_groups=6, max_groups=10, max_devices=8,
                         max_edges=40)
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    assert u.num_groups <= 6 and u.num_devices == 5
    assert env.observation_space.contains(obs)
    full = unflatten(obs, u.layout)
    assert full["node_features"].shape == (10, u.node_dim)
    assert full["node_mask"].sum() == u.num_groups
    assert full["edge_mask"].sum() == u.problem.num_edges
    assert obs["action_mask"].tolist() == [1] * 5 + [0] * 3  # padding devices are never allowed
    with pytest.raises(ValueError, match="max_groups"):
        make_env(g, "cpu+4gpu", num_groups=6, max_groups=2)


def test_observation_tracks_the_partial_placement_and_load():
    env = make_env(two_chains(2), pair())
    env.reset(seed=0)
    obs, *_ = env.step(1)
    full = unflatten(obs, env.layout)
    nf, col = full["node_features"], env._col_place
    assert nf[0, col:col + 2].tolist() == [0.0, 1.0]       # group 0 placed on device 1
    assert nf[0, env._col_placed] == 1.0 and nf[1, env._col_placed] == 0.0
    assert nf[1, env._col_placed + 1] == 1.0                # group 1 is current
    assert obs["current_group"] == 1
    dev = full["device_features"]
    # device 1 holds group 0's compute: 3 ms of the 12 ms the whole graph takes on it
    assert dev[1, 4] == pytest.approx(0.25) and dev[0, 4] == 0.0
    # finish estimates, in mean group times (3 ms) over the best device: b0 ends at 3 ms on the idle device 0 and
    # at 6 ms on device 1, busy with a0 until 3 ms
    assert dev[:2, 6] == pytest.approx([0.0, math.log1p(1.0)])
    obs, *_ = env.step(0)
    dev = unflatten(obs, env.layout)["device_features"]
    # a1 reads a0 (device 1, done at 3 ms): 6 ms there; on device 0 (free at 3 ms) after a0's 3 MB output and its
    # gradient cross the 1 GB/s, 0.1 ms link: 3 + 2 x 3.1 + 3 = 12.2 ms
    assert dev[:2, 6] == pytest.approx([math.log1p(6.2 / 3.0), 0.0], rel=1e-5)


def test_finish_estimate_overlaps_an_unrolled_layer_with_the_one_below():
    # x -> layer A (3 calls) -> layer B (3 calls), each call reading A's call of its step and B's previous call;
    # every op 1 ms forward + 1 ms backward, edges carry no bytes (a transfer costs 2 x the 0.1 ms latency)
    ops = [dict(name="x", kind="Linear", param_bytes=4, fwd_s=1e-3, bwd_s=1e-3)]
    edges = []
    for t in range(3):
        for layer, below in (("a", "x" if t == 0 else f"a{t - 1}"), ("b", f"a{t}")):
            ops.append(dict(name=f"{layer}{t}", kind="LSTMCell", param_bytes=4 if t == 0 else 0, fwd_s=1e-3,
                            bwd_s=1e-3, colocation=100 if layer == "a" else 200))
            edges.append((below, f"{layer}{t}", 0))
            if layer == "b" and t:
                edges.append((f"b{t - 1}", f"b{t}", 0))
    problem = build_problem(OpGraph.build(name="rnn2", ops=ops, edges=edges), pair(), 8)
    assert problem.num_groups == 3  # x, layer A, layer B
    est = FinishEstimate(problem)
    dev = np.zeros((1, 3), dtype=np.int64)
    for group in (0, 1):  # x, then A, on device 0: A's calls end at 4, 6, 8 ms
        est.estimates(group, dev)
        est.place(group, dev[:, group])
    # B after A on device 0: 8 + 3 x 2 = 14 ms; on device 1 its calls follow A's step by step: b0 starts at
    # 4 + 0.2 ms, b2 ends at 10.2 ms (a group-level estimate would wait for all of A: 8.2 + 6 ms)
    assert est.estimates(2, dev)[0] * 1e3 == pytest.approx([14.0, 10.2])
    with pytest.raises(ValueError, match="needs estimates"):
        est.place(1, dev[:, 1])


def test_finish_estimate_fills_idle_gaps():
    # x (1 ms) -> s (4 ms) -> a1, x -> a0, x -> y; a0 and a1 are two calls of one module (1 ms each), y 1 ms
    # (forward = backward); edges carry no bytes, so a transfer costs 2 x the 0.1 ms latency
    def op(name, step_ms, **kw):
        return dict(name=name, kind="Linear", param_bytes=4, fwd_s=step_ms / 2e3, bwd_s=step_ms / 2e3, **kw)

    # (y is listed between a0 and a1, so the coarse graph keeps a0 and a1 apart)
    ops = [op("x", 1), op("s", 4), op("a0", 1, colocation=7), op("y", 1), op("a1", 1, colocation=7)]
    edges = [("x", "s", 0), ("x", "a0", 0), ("s", "a1", 0), ("x", "y", 0)]
    problem = build_problem(OpGraph.build(name="gap", ops=ops, edges=edges), pair(), 8)
    assert problem.num_groups == 4  # x, s, {a0, a1}, y
    est = FinishEstimate(problem)
    dev = np.array([[0, 1, 0, 0]])
    for group in (0, 1, 2):  # device 0 runs x [0, 1], a0 [1, 2], a1 [5.4, 6.4]; device 1 runs s [1.2, 5.2]
        est.estimates(group, dev)
        est.place(group, dev[:, group])
    # y fits device 0's gap [2, 5.4]: done at 3 ms (queued after a1 it would be 7.4 ms and device 1 would look
    # best); on device 1 it waits for s: 5.2 + 1 ms
    assert est.estimates(3, dev)[0] * 1e3 == pytest.approx([3.0, 6.2])


def test_groups_are_placed_longest_path_first():
    # x -> b (1 ms) and x -> c1 -> c2 -> c3 (1 ms each) -> cat: the long branch goes first, as in HEFT, though b
    # comes first in op order; b ties with c3 (both 2 ms from the end) and goes first as the earlier op
    def op(name):
        return dict(name=name, kind="Linear", param_bytes=4, fwd_s=5e-4, bwd_s=5e-4)

    names = ["x", "b", "c1", "c2", "c3", "cat"]
    edges = [("x", "b", 0), ("x", "c1", 0), ("c1", "c2", 0), ("c2", "c3", 0), ("b", "cat", 0), ("c3", "cat", 0)]
    problem = build_problem(OpGraph.build(name="block", ops=[op(n) for n in names], edges=edges), pair(), 8)
    assert problem.num_groups == 6
    placed = [names[i] for i in np.argsort(problem.group_of_op)]
    assert placed == ["x", "c1", "c2", "b", "c3", "cat"]


def test_same_seed_rollouts_are_equal_and_vector_env_runs():
    make = lambda: gymnasium.make(envs.ENV_ID, graph=layered_dag(4, 3, seed=2), cluster="cpu+4gpu")  # noqa: E731
    a, b = rollout(make(), 7), rollout(make(), 7)
    assert same(a, b)
    assert not same(a, rollout(make(), 8))
    venv = gymnasium.vector.SyncVectorEnv([make, make])
    venv.reset(seed=[0, 1])
    ends = 0
    for _ in range(30):
        _, reward, term, _, info = venv.step(venv.action_space.sample())
        ends += int(term.sum())
        assert np.all(reward[~term] == 0) and np.all(reward[term] < 0)
    assert ends >= 2 and "placement" in info or ends >= 2
    venv.close()


# ---------------------------------------------------------------------------------------------- rewards
def test_reward_is_minus_sqrt_of_normalised_step_time_worked_by_hand():
    # a -> b, 1 s forward and 2 s backward each, 1.5 GB between them on cpu-2 (1.5 GB/s, 160 us latency)
    g = OpGraph.build(name="ab", ops=[
        {"name": "a", "kind": "Linear", "out_bytes": 1_500_000_000, "fwd_s": 1.0, "bwd_s": 2.0},
        {"name": "b", "kind": "Linear", "out_bytes": 4, "fwd_s": 1.0, "bwd_s": 2.0}], edges=[("a", "b")])
    env = make_env(g, "cpu-2", num_groups=2, reference=6.0)
    reward, res = env.evaluate([0, 0])
    assert res.step_time_s == pytest.approx(6.0)
    assert reward == pytest.approx(-1.0)
    # split: a fwd 1, send 1 s + 160 us, b fwd 1, b bwd 2, gradient back 1 s + 160 us, a bwd 2
    reward, res = env.evaluate([0, 1])
    assert res.step_time_s == pytest.approx(8.00032)
    assert reward == pytest.approx(-math.sqrt(8.00032 / 6.0))


def test_env_takes_a_built_backend_and_reference_and_runs_no_baseline(monkeypatch):
    import placer.baselines as baselines
    from envs.placement_env import PlacementEnv
    from envs.rewards import Reference

    problem = build_problem(two_chains(2), pair(), 64)
    backend = make_backend("sim", problem)
    monkeypatch.setattr(baselines, "place", lambda *a, **k: pytest.fail("the env ran a baseline"))
    ref = Reference(step_time_s=0.5, method="given", device_of_group=np.zeros(problem.num_groups, dtype=np.int64))
    env = PlacementEnv(problem, backend, ref, incremental=True)
    assert env.backend is backend and env.reference_time_s == 0.5 and env.reference_method == "given"
    reward, res = env.evaluate([0, 1, 0, 1])
    assert reward == pytest.approx(-math.sqrt(res.step_time_s / 0.5))
    with pytest.raises(ValueError, match="incremental"):
        PlacementEnv(problem, type("Engine", (), {"source": "engine"})(), ref, incremental=True)


def test_episode_reward_equals_evaluate_and_incremental_rewards_sum_to_it():
    g, c = layered_dag(4, 3, seed=3), get_cluster("cpu+4gpu")
    plain = make_env(g, c, num_groups=8)
    inc = make_env(g, c, num_groups=8, incremental=True)
    placement = np.arange(plain.num_groups) % 5
    totals = []
    for env in (plain, inc):
        env.reset(seed=0)
        rewards = [env.step(int(a))[1] for a in placement]
        totals.append(sum(rewards))
        if env is inc:
            assert sum(r != 0 for r in rewards[:-1]) > 0  # something was earned before the end
    expected, _ = plain.evaluate(placement)
    assert totals[0] == pytest.approx(expected) and totals[1] == pytest.approx(expected)
    # the reference completion's first potential is the projected reference itself
    with pytest.raises(ValueError, match="incremental"):
        make_env(g, c, num_groups=8, incremental=True, reward_backend="real")


def test_failures_give_the_penalty_never_an_exception():
    g = layered_dag(3, 3, seed=4)
    tiny = pair(memory=(MiB, MiB))  # nothing fits anywhere
    env = make_env(g, tiny, num_groups=4, failure_penalty=-7.0)
    assert env.reference_method == "fastest-device-compute"  # every baseline OOMs too
    assert env.reference_time_s == pytest.approx(env.problem.time_s.sum(axis=0).min())
    env.reset(seed=0)
    assert env.action_masks().all()  # no device fits, so all are allowed and the reward penalises
    for _ in range(env.num_groups - 1):
        env.step(0)
    _, reward, done, _, info = env.step(0)
    assert done and reward == -7.0 and info["oom"] and not info["ok"]
    # an action outside the real devices (padding) is accepted and penalised at the end
    env2 = make_env(g, pair(), num_groups=4, max_devices=3)
    env2.reset(seed=0)
    for _ in range(env2.num_groups):
        _, reward, done, _, info = env2.step(2)
    assert done and reward == env2.failure_penalty == -10.0 and "not a device" in info["failure"]
    assert env2.evaluate([5] * env2.num_groups)[0] == -10.0  # invalid placement through evaluate()


def test_full_and_coarse_simulation_agree_on_a_chain():
    g = two_chains(3)
    full = make_env(g, pair(), num_groups=64)
    coarse = make_env(g, pair(), num_groups=64, sim_graph="coarse")
    for placement in ([0, 1] * 3, [0] * 6, [1, 0, 0, 1, 1, 0]):
        assert full.evaluate(placement)[1].step_time_s == pytest.approx(coarse.evaluate(placement)[1].step_time_s)
    with pytest.raises(ValueError, match="sim_graph"):
        make_env(g, pair(), sim_graph="nope")


def test_rewards_are_cached_by_placement():
    env = make_env(layered_dag(3, 3, seed=5), "cpu-2", num_groups=4)
    before = env.evaluations
    r1 = env.evaluate([0, 1, 0, 1])
    r2 = env.evaluate(np.array([0, 1, 0, 1]))
    assert r1 == r2 and env.evaluations == before + 1 and env.cache_hits >= 1


# ---------------------------------------------------------------------------------------------- masks
def test_masks_keep_groups_off_devices_that_would_overflow():
    g = layered_dag(3, 4, seed=6)
    problem = build_problem(g, pair(), 64)
    small = int(problem.mem_bytes.max() * 1.5)  # device 0 holds one or two groups at most
    c = pair(memory=(small, 1 << 40))
    env = make_env(g, c, num_groups=64)
    env.reset(seed=0)
    masked_once = False
    done = False
    while not done:
        mask = env.action_masks()
        masked_once |= not mask[0]
        _, _, done, _, info = env.step(int(np.flatnonzero(mask)[0]))  # always the first allowed device
    assert masked_once
    assert info["ok"], info["failure"]
    assert (info["placement"] == 0).sum() >= 1
    # ignoring the masks (everything on device 0) overflows it
    assert env.evaluate(np.zeros(env.num_groups, dtype=int))[1].oom


# ---------------------------------------------------------------------------------------------- backends
class _FakeMeasurer(SimMeasurer):
    """'Measures' 10% slower than simulated."""

    scale = 1.1
    calls = 0


def test_sim_real_keeps_the_top_k_and_remeasures_them(monkeypatch):
    import envs.rewards as rewards

    monkeypatch.setattr(rewards, "load_measurer_class", lambda: _FakeMeasurer)
    g = layered_dag(3, 3, seed=7)
    g = g.replace(meta={**g.meta, "source": {"factory": "fake:fake"}})
    env = make_env(g, "cpu+4gpu", num_groups=6, reward_backend="sim+real")
    assert isinstance(env.backend, SimRealBackend)
    rng = np.random.default_rng(0)
    times = {}  # distinct placements (two can tie on step time)
    for _ in range(60):
        placement = rng.integers(0, 5, env.num_groups)
        times[placement.tobytes()] = env.evaluate(placement)[1].step_time_s
    top = env.backend.remeasure_top(3)
    assert [r.sim.step_time_s for r in top] == sorted(times.values())[:3]
    assert all(r.real.step_time_s == pytest.approx(1.1 * r.sim.step_time_s) for r in top)
    calls = _FakeMeasurer.calls
    env.backend.remeasure_top(3)
    assert _FakeMeasurer.calls == calls  # measured once each
    env.close()


class _DriftingMeasurer(SimMeasurer):
    """The machine's speed drifts: the first measurement of the run is 2x fast, then 1.0x, 1.2x, 1.0x, 1.2x ..."""

    calls = 0

    def measure(self, placement, *, schedule, microbatches, steps, warmup):
        n = type(self).calls + 1
        self.scale = 0.5 if n == 1 else (1.0 if n % 2 == 0 else 1.2)
        return super().measure(placement, schedule=schedule, microbatches=microbatches, steps=steps, warmup=warmup)


def test_final_remeasure_reports_the_median_of_interleaved_rounds(monkeypatch):
    import envs.rewards as rewards

    _DriftingMeasurer.calls = 0
    monkeypatch.setattr(rewards, "load_measurer_class", lambda: _DriftingMeasurer)
    g = layered_dag(3, 3, seed=7)
    g = g.replace(meta={**g.meta, "source": {"factory": "fake:fake"}})
    env = make_env(g, "cpu+4gpu", num_groups=6, reward_backend="sim+real")
    rng = np.random.default_rng(0)
    for _ in range(60):
        env.evaluate(rng.integers(0, 5, env.num_groups))
    first = env.backend.remeasure_top(2)  # one measurement each; the first one caught the fast spell
    assert first[0].real.step_time_s == pytest.approx(0.5 * first[0].sim.step_time_s)
    final = env.backend.remeasure_top(2, rounds=2)  # 3 measurements each now: the median is not the lucky one
    assert _DriftingMeasurer.calls == 2 + 2 * 2
    for r in final:
        assert r.real.step_time_s >= 0.99 * r.sim.step_time_s, r.real.step_time_s / r.sim.step_time_s
    env.close()


def test_unknown_backend_and_missing_source_are_one_line_errors():
    p = build_problem(layered_dag(2, 2), get_cluster("cpu-2"), 4)
    with pytest.raises(ValueError, match="unknown reward backend"):
        make_backend("nope", p)
    with pytest.raises(ValueError, match="meta\\['source'\\]"):
        make_backend("real", p)


@pytest.mark.slow
@pytest.mark.skipif(not engine_available(), reason="placer.engine.Measurer is not importable")
def test_real_backend_runs_episodes_on_cpu2_with_the_small_rnnlm():
    from graphs.data import available

    if "rnnlm-small" not in available():
        pytest.skip("graphs/data/rnnlm-small.json is not shipped yet")
    env = make_env(reward_backend="real", engine_timeout_s=120)
    assert env.graph.name == "rnnlm-small" and env.cluster.name == "cpu-2"
    try:
        for seed in range(2):
            trace = rollout(env, seed)
            info = trace[-1]
            assert info["reward_source"] == "engine"
            assert info["ok"], info["failure"]
            assert trace[-3] == pytest.approx(-math.sqrt(info["step_time_s"] / env.reference_time_s))
    finally:
        env.close()
