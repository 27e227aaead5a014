"""Seq2seq policy and REINFORCE: interface, memory masks, determinism, learning on an obvious problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.placement_env import make_env
from envs.problem import build_problem
from envs.synthetic import layered_dag, two_chains
from policies import MemoryMask, PolicyInput, imitate, make_algo, make_policy
from policies.reinforce import ReinforceConfig
from tests.policy_helpers import one_thread, pair  # noqa: F401 - one_thread is an autouse fixture


def test_sample_and_log_prob_agree_and_greedy_is_deterministic():
    env = make_env(layered_dag(3, 3, seed=0), "cpu+4gpu", num_groups=8)
    torch.manual_seed(0)
    policy = make_policy("seq2seq", env.problem, hidden=16, embed=8).eval()
    inp = PolicyInput.from_problem(env.problem)
    s = policy.sample(inp, 6, generator=torch.Generator().manual_seed(0))
    assert s.actions.shape == (6, env.num_groups) and s.log_prob.shape == (6,) and s.entropy.shape == (6,)
    assert int(s.actions.min()) >= 0 and int(s.actions.max()) < 5
    again = policy.log_prob(inp, s.actions)
    assert torch.allclose(again.log_prob, s.log_prob, atol=1e-5)
    assert torch.allclose(again.entropy, s.entropy, atol=1e-5)
    # entropy per decision is at most log(5); an untrained policy is close to uniform
    assert float(s.entropy.detach().max()) <= env.num_groups * np.log(5) + 1e-4
    g1 = policy.sample(inp, 1, greedy=True).actions
    g2 = policy.sample(inp, 3, greedy=True).actions
    assert torch.equal(g1.expand(3, -1), g2)
    with pytest.raises(ValueError, match="actions must be"):
        policy.log_prob(inp, s.actions[:, :2])


def test_policy_memory_mask_matches_the_env_and_prevents_oom():
    g = layered_dag(3, 4, seed=6)
    probe = build_problem(g, pair(), 64)
    c = pair(memory=(int(probe.mem_bytes.max() * 1.5), 1 << 40))
    env = make_env(g, c, num_groups=64)
    torch.manual_seed(1)
    policy = make_policy("seq2seq", env.problem, hidden=16)
    inp = PolicyInput.from_problem(env.problem)
    s = policy.sample(inp, 32, generator=torch.Generator().manual_seed(1))
    for placement in s.actions.numpy():
        assert env.evaluate(placement)[1].ok
    # step by step, the policy's mask is the env's
    placement = s.actions[0].numpy()
    mask = MemoryMask(inp, 1)
    env.reset(seed=0)
    for t, a in enumerate(placement):
        assert mask.mask(t)[0].numpy().tolist() == env.action_masks().tolist()
        mask.place(t, torch.tensor([int(a)]))
        env.step(int(a))


def test_registries_name_what_exists():
    p = build_problem(layered_dag(2, 2), pair(), 4)
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose one of .*seq2seq"):
        make_policy("nope", p)
    env = make_env(layered_dag(2, 2), pair(), num_groups=4)
    policy = make_policy("seq2seq", p)
    with pytest.raises(ValueError, match="unknown algorithm 'nope'; choose one of .*reinforce"):
        make_algo("nope", policy, env)
    with pytest.raises(ValueError, match="baseline must be"):
        ReinforceConfig(baseline="median")


def test_make_algo_refuses_hyperparameters_its_algorithm_does_not_have():
    from policies.ppo import PPOConfig

    env = make_env(layered_dag(2, 2), pair(), num_groups=4)
    policy = make_policy("seq2seq", env.problem, hidden=8)
    with pytest.raises(ValueError, match="'reinforce' has no hyper-parameter clip_range"):
        make_algo("reinforce", policy, env, clip_range=0.1)  # a PPO-only field
    with pytest.raises(ValueError, match="takes a ReinforceConfig, not a PPOConfig"):
        make_algo("reinforce", policy, env, PPOConfig())
    algo = make_algo("reinforce", policy, env, ReinforceConfig(lr=0.5, top_fraction=0.5), top_fraction=0.75)
    assert (algo.config.lr, algo.config.top_fraction) == (0.5, 0.75)  # the config, with the keywords replacing


def _reinforce_rewards(seed: int, updates: int) -> list[np.ndarray]:
    env = make_env(layered_dag(3, 3, seed=1), "cpu+4gpu", num_groups=8)
    torch.manual_seed(seed)
    policy = make_policy("seq2seq", env.problem, hidden=16)
    algo = make_algo("reinforce", policy, env, samples_per_update=8, seed=seed)
    return [algo.update().rewards for _ in range(updates)]


def test_reinforce_is_deterministic_under_a_seed():
    a, b, c = _reinforce_rewards(3, 3), _reinforce_rewards(3, 3), _reinforce_rewards(4, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("options", [{"baseline": "ema"}, {"baseline": "batch"},
                                     {"baseline": "quantile", "top_fraction": 0.25, "self_imitation_coef": 0.5}],
                         ids=["ema", "batch", "quantile+sil"])
def test_reinforce_learns_one_chain_per_device(options):
    # two chains of 4 ops (3 ms each), interleaved, on two devices whose link makes a chain split cost 6 ms:
    # the best placement alternates devices (14.8 ms with the updates), all on one device takes 29.6 ms
    env = make_env(two_chains(4), pair(), num_groups=64)
    assert env.num_groups == 8
    best = env.evaluate([0, 1] * 4)[0]
    assert env.evaluate([0] * 8)[1].step_time_s == pytest.approx(2 * env.evaluate([0, 1] * 4)[1].step_time_s,
                                                                   rel=0.1)
    rng = np.random.default_rng(0)
    random_mean = np.mean([env.evaluate(rng.integers(0, 2, 8))[0] for _ in range(400)])
    assert random_mean < best - 0.25  # the problem is not trivial for a random placer
    torch.manual_seed(0)
    policy = make_policy("seq2seq", env.problem, hidden=32)
    algo = make_algo("reinforce", policy, env, samples_per_update=16, lr=1e-3, entropy_coef=0.05, seed=0,
                     **options)
    stats = [algo.update() for _ in range(60)]
    late = np.mean([s.rewards.mean() for s in stats[-5:]])
    assert late > random_mean + 0.2, (late, random_mean)
    assert max(s.rewards.max() for s in stats) == pytest.approx(best)  # it found the optimum
    assert stats[-1].entropy < stats[0].entropy
    if options.get("self_imitation_coef"):
        assert algo.elite[0][0] == pytest.approx(best) and len(algo.elite) == algo.config.self_imitation_size


def test_imitation_warm_start_reproduces_a_placement():
    env = make_env(layered_dag(3, 3, seed=2), "cpu+4gpu", num_groups=8)
    torch.manual_seed(0)
    policy = make_policy("seq2seq", env.problem, hidden=16)
    inp = PolicyInput.from_problem(env.problem)
    target = torch.tensor([[(3 * g) % 5 for g in range(env.num_groups)]])
    assert not torch.equal(policy.sample(inp, 1, greedy=True).actions, target)
    steps, nll = imitate(policy, inp, target, max_steps=300)
    assert 0 < steps < 300 and nll < 0.1
    assert torch.equal(policy.sample(inp, 1, greedy=True).actions, target)
    # stopped at ~0.9 per decision: sampling still explores
    samples = policy.sample(inp, 64, generator=torch.Generator().manual_seed(0)).actions
    assert 0 < (samples != target).any(dim=1).float().mean() < 1
