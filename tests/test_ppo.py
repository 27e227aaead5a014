"""MaskablePPO (sb3-contrib) over the GNN: learning, masks, determinism, the trainer's run folder and resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.placement_env import make_env
from envs.problem import build_problem
from envs.synthetic import layered_dag
from placer.core.cluster import get_cluster
from placer.io.document import load_placement
from placer.app.train import TrainConfig, train
from policies import make_algo, make_policy
from policies.ppo import MaskablePPOAlgo, PPOConfig
from tests.policy_helpers import chain_per_device_task, one_thread, pair  # noqa: F401 - one_thread is an autouse fixture


def test_ppo_learns_one_chain_per_device():
    env, best, random_mean = chain_per_device_task()
    policy = make_policy("gnn", env.problem, hidden=16, layers=2)
    algo = make_algo("ppo", policy, env, samples_per_update=8, lr=1e-2, entropy_coef=0.01, seed=0)
    stats = [algo.update() for _ in range(16)]
    assert all(len(s.rewards) == 8 and s.placements.shape == (8, 8) for s in stats)  # whole episodes per rollout
    late = np.mean([s.rewards.mean() for s in stats[-4:]])
    assert late > random_mean + 0.12, (late, random_mean)
    assert max(s.rewards.max() for s in stats) == pytest.approx(best)
    assert np.isfinite(stats[-1].loss) and 0 < stats[-1].entropy < np.log(2)


def test_maskable_ppo_never_picks_a_masked_device():
    g = layered_dag(3, 4, seed=6)
    probe = build_problem(g, pair(), 64)
    env = make_env(g, pair(memory=(int(probe.mem_bytes.max() * 1.5), 1 << 40)), num_groups=64)
    torch.manual_seed(0)
    algo = MaskablePPOAlgo(make_policy("gnn", env.problem, hidden=8, layers=1), env,
                           PPOConfig(samples_per_update=4, n_epochs=1, seed=0), check_masks=True)
    stats = [algo.update() for _ in range(3)]
    c = algo.collector
    assert algo.venv.num_envs == 4  # the 4 episodes of a rollout run side by side, in replicas of env
    assert len({id(e) for e in algo.venv.envs}) == 4 and all(e.problem is env.problem for e in algo.venv.envs)
    assert c.decisions == 3 * 4 * env.num_groups and c.constrained > 0  # the mask did rule devices out
    assert c.masked_picks == 0
    assert all(r.ok for s in stats for r in s.results)  # so no placement ran out of memory


def test_replicas_keep_their_own_episodes():
    env = make_env(layered_dag(2, 3, seed=1), "cpu+4gpu", num_groups=6)
    env.reset(seed=0)
    twin = env.replica()
    env.step(1)
    assert twin._t == 0 and twin._placement.sum() == 0 and env._t == 1
    obs_env, obs_twin = env._obs(), twin._obs()
    assert not np.array_equal(obs_env["node_features"], obs_twin["node_features"])
    env.backend.replicable = False  # as an engine-backed reward, which owns worker processes
    with pytest.raises(ValueError, match="sim reward"):
        env.replica()
    # PPO asks the backend, not its name: one environment for a backend that cannot be shared
    algo = make_algo("ppo", make_policy("gnn", env.problem, hidden=8, layers=1), env, samples_per_update=4, n_envs=4)
    assert algo.venv.num_envs == 1


def _rewards(seed: int) -> list[np.ndarray]:
    env = make_env(layered_dag(2, 3, seed=1), "cpu+4gpu", num_groups=6)
    torch.manual_seed(seed)
    algo = make_algo("ppo", make_policy("gnn", env.problem, hidden=8, layers=1), env, samples_per_update=4,
                     seed=seed)
    return [algo.update().rewards for _ in range(2)]


def test_ppo_is_deterministic_under_a_seed():
    a, b, c = _rewards(3), _rewards(3), _rewards(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_ppo_needs_the_gnn_policy():
    env = make_env(layered_dag(2, 2), pair(), num_groups=4)
    with pytest.raises(ValueError, match="ppo trains the gnn policy"):
        make_algo("ppo", make_policy("seq2seq", env.problem, hidden=8), env)


def test_train_with_ppo_writes_the_run_and_resumes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    graph = layered_dag(3, 3, seed=11)
    cfg = TrainConfig(graph=graph, cluster="cpu+4gpu", policy="gnn", algo="ppo", budget_s=120.0, max_updates=2,
                      algo_config={"samples_per_update": 4}, hidden=8, num_groups=8, runs_dir=str(tmp_path),
                      progress=False, checkpoint_every_s=0.0, baselines=("expert", "heft"))
    res = train(cfg)
    assert res.run_dir.name.startswith("layered-3x3-s11__gnn__ppo__0__") and res.updates == 2 and res.samples == 8
    doc = load_placement(res.run_dir / "placement.json", graph, get_cluster("cpu+4gpu"))
    assert doc.placement == res.placement and doc.doc["provenance"]["method"] == "rl:gnn+ppo"
    acc = EventAccumulator(str(res.run_dir))
    acc.Reload()
    assert {"charts/best_step_time_s", "charts/reward", "losses/policy", "baseline/expert_step_time_s"} <= set(
        acc.Tags()["scalars"])
    more = train(TrainConfig(resume=str(res.run_dir), budget_s=120.0, max_updates=3, progress=False,
                             runs_dir=str(tmp_path)))
    assert more.run_dir == res.run_dir and more.updates == 3 and more.samples == 12
    assert more.best_step_time_s <= res.best_step_time_s
