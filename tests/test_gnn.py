"""GNN policy: interface, agreement with its SB3 extractor, permutation equivariance, learning with REINFORCE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from envs.placement_env import make_env
from envs.synthetic import layered_dag
from policies import PolicyInput, make_algo, make_policy
from policies.gnn import NS, GNNExtractor, GNNPolicy, current_index
from tests.policy_helpers import chain_per_device_task, one_thread, pair  # noqa: F401 - one_thread is an autouse fixture


def batch(obs_list: list[dict]) -> dict[str, torch.Tensor]:
    """Observations as SB3 hands them to an extractor: float32 batches, Discrete one-hot."""
    out = {}
    for k in obs_list[0]:
        if k == "current_group":
            continue
        out[k] = torch.as_tensor(np.stack([o[k] for o in obs_list]), dtype=torch.float32)
    return out


def test_sample_log_prob_and_greedy():
    env = make_env(layered_dag(3, 3, seed=0), "cpu+4gpu", num_groups=8)
    torch.manual_seed(0)
    policy = make_policy("gnn", env.problem, hidden=16, layers=2).eval()
    inp = PolicyInput.from_problem(env.problem)
    s = policy.sample(inp, 6, generator=torch.Generator().manual_seed(0))
    assert s.actions.shape == (6, env.num_groups) and s.log_prob.shape == (6,)
    assert 0 <= int(s.actions.min()) and int(s.actions.max()) < 5
    again = policy.log_prob(inp, s.actions)
    assert torch.allclose(again.log_prob, s.log_prob, atol=1e-5)
    assert torch.allclose(again.entropy, s.entropy, atol=1e-5)
    assert float(s.entropy.detach().max()) <= env.num_groups * np.log(5) + 1e-4
    assert torch.equal(policy.sample(inp, 1, greedy=True).actions.expand(3, -1),
                       policy.sample(inp, 3, greedy=True).actions)
    with pytest.raises(ValueError, match="actions must be"):
        policy.log_prob(inp, s.actions[:, :2])


def test_finish_view_off_ignores_the_estimate_and_dropout_hides_it_from_some_training_samples(monkeypatch):
    from envs.problem import FinishEstimate

    env = make_env(layered_dag(3, 3, seed=0), "cpu+4gpu", num_groups=8)
    torch.manual_seed(0)
    policy = make_policy("gnn", env.problem, hidden=16, layers=2, finish_dropout=0.5).eval()
    inp = PolicyInput.from_problem(env.problem)
    actions = policy.sample(inp, 4, generator=torch.Generator().manual_seed(1)).actions

    def log_probs(shift):  # the finish column reads `shift` on device 0 and 0 elsewhere
        monkeypatch.setattr(FinishEstimate, "feature", lambda self, est: np.eye(est.shape[1])[[0] * len(est)] * shift)
        return policy.log_prob(inp, actions).log_prob

    assert not torch.allclose(log_probs(0.0), log_probs(3.0))
    policy.finish_feature = False
    assert torch.equal(log_probs(0.0), log_probs(3.0))
    assert policy.finish_keep(8, sampling=True).sum() == 0
    policy.finish_feature = True
    assert policy.finish_keep(8, sampling=True).sum() == 8  # eval mode: no dropout
    policy.train()
    keep = policy.finish_keep(400, sampling=True, generator=torch.Generator().manual_seed(0))
    assert 150 < keep.sum() < 250 and policy.finish_keep(8, sampling=False).sum() == 8
    policy.finish_feature = False
    assert list(policy.views()) == ["finish shown", "finish hidden"] and policy.finish_feature is False  # restored
    assert list(make_policy("gnn", env.problem).views()) == ["finish shown"]
    with pytest.raises(ValueError, match="finish_dropout"):
        make_policy("gnn", env.problem, finish_dropout=1.0)


def test_reinforce_trains_each_finish_view_on_its_own_samples_and_best_placements():
    env = make_env(layered_dag(3, 3, seed=0), "cpu+4gpu", num_groups=8)
    torch.manual_seed(0)
    policy = make_policy("gnn", env.problem, hidden=16, layers=2, finish_dropout=0.5)
    inp = PolicyInput.from_problem(env.problem)
    s = policy.train().sample(inp, 64, generator=torch.Generator().manual_seed(0))
    assert s.view is not None and 16 < int(s.view.sum()) < 48  # about half drawn with the estimate hidden
    # scoring in each sample's own view reproduces its sampling log-probability
    assert torch.allclose(policy.log_prob(inp, s.actions, view=s.view).log_prob, s.log_prob, atol=1e-5)
    hidden = torch.ones(64, dtype=torch.int64)
    policy.finish_feature = False
    assert torch.allclose(policy.log_prob(inp, s.actions, view=hidden).log_prob,
                          policy.log_prob(inp, s.actions).log_prob)
    policy.finish_feature = True
    assert make_policy("gnn", env.problem).sample(inp, 4).view is None  # one view: nothing to tell apart

    algo = make_algo("reinforce", policy, env, samples_per_update=16, seed=0, baseline="quantile",
                     top_fraction=0.25, self_imitation_coef=0.5, self_imitation_size=3)
    stats = [algo.update() for _ in range(4)]
    views = [v for _, _, v in algo.elite]
    assert views.count(0) == 3 and views.count(1) == 3  # each view keeps its own best placements
    for r, key, _ in algo.elite:
        assert env.evaluate(np.frombuffer(key, dtype=np.int16).astype(int))[0] == pytest.approx(r)
    assert max(r for r, _, _ in algo.elite) == pytest.approx(max(st.rewards.max() for st in stats))


@pytest.mark.parametrize("finish_shown", [True, False])
def test_extractor_logits_equal_the_policy_logits_along_an_episode(finish_shown):
    # the PPO view (observations) and the REINFORCE view (tracked state) must compute the same function, with the
    # finish estimate shown or hidden
    env = make_env(layered_dag(3, 4, seed=2), "cpu+4gpu", num_groups=10)
    torch.manual_seed(1)
    policy = GNNPolicy(hidden=16, layers=2).eval()
    policy.finish_feature = finish_shown
    ext = GNNExtractor(env.observation_space, network=policy).eval()
    inp = PolicyInput.from_problem(env.problem)
    placement = policy.sample(inp, 1, generator=torch.Generator().manual_seed(3)).actions[0]
    lp_policy = policy.log_prob(inp, placement[None]).log_prob
    obs, _ = env.reset(seed=0)
    total = torch.zeros(())
    dm = env.max_devices
    for a in placement.tolist():
        b = batch([obs])
        b["current_group"] = torch.nn.functional.one_hot(torch.tensor([obs["current_group"]]), env.max_groups).float()
        with torch.no_grad():
            logits = ext(b)[0, -dm:]
        mask = torch.as_tensor(env.action_masks())
        total = total + torch.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=0)[a]
        obs, *_ = env.step(a)
    assert float(total) == pytest.approx(float(lp_policy.detach()), abs=1e-4)


def test_current_group_in_every_sb3_shape():
    one_hot = torch.nn.functional.one_hot(torch.tensor([2, 0]), 5).float()
    for form in (one_hot, one_hot.unsqueeze(1), torch.tensor([2.0, 0.0]), torch.tensor([[2.0], [0.0]])):
        assert current_index(form, 5).tolist() == [2, 0]
    with pytest.raises(ValueError, match="fits neither"):
        current_index(torch.zeros(2, 3), 5)


def test_extractor_is_invariant_to_renumbering_the_nodes():
    env = make_env(layered_dag(3, 4, seed=5), "cpu+4gpu", num_groups=12, max_groups=14, max_edges=40)
    obs, _ = env.reset(seed=0)
    for a in (1, 2, 0, 3):  # a partial placement, so placement columns and loads are non-trivial
        obs, *_ = env.step(a)
    torch.manual_seed(2)
    ext = GNNExtractor(env.observation_space, hidden=16, layers=3).eval()
    gm, em = env.max_groups, env.max_edges
    rng = np.random.default_rng(0)
    perm = rng.permutation(gm)  # new index of old node i is perm[i]; padding nodes move too
    nf = obs["node_features"].reshape(gm, -1)
    nf2 = np.empty_like(nf)
    nf2[perm] = nf
    nm2 = np.empty_like(obs["node_mask"])
    nm2[perm] = obs["node_mask"]
    ei = obs["edge_index"].reshape(2, em)
    emask = obs["edge_mask"]
    eorder = rng.permutation(em)  # reorder the edge list as well
    ei2 = np.where(emask > 0, perm[ei], 0)[:, eorder]
    obs2 = dict(obs, node_features=nf2.reshape(-1), node_mask=nm2, edge_index=ei2.reshape(-1),
                edge_features=obs["edge_features"].reshape(em, -1)[eorder].reshape(-1), edge_mask=emask[eorder],
                current_group=int(perm[obs["current_group"]]))
    b = batch([obs, obs2])
    b["current_group"] = torch.tensor([[obs["current_group"]], [obs2["current_group"]]], dtype=torch.float32)
    with torch.no_grad():
        out = ext(b)
        # node embeddings are equivariant: embedding of old node i == embedding of new node perm[i]
        h1 = ext.net.encoder(torch.as_tensor(np.concatenate([nf[:, :NS], nf[:, NS:NS + 2]], 1)),
                             torch.as_tensor(ei[:, emask > 0]))
        h2 = ext.net.encoder(torch.as_tensor(np.concatenate([nf2[:, :NS], nf2[:, NS:NS + 2]], 1)),
                             torch.as_tensor(ei2[:, emask[eorder] > 0]))
    assert torch.allclose(h1, h2[torch.as_tensor(perm)], atol=1e-5)
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.allclose(out[0], ext(dict(b, current_group=torch.tensor([[0.0], [0.0]])))[0], atol=1e-3)


def test_one_set_of_weights_places_any_graph_and_cluster():
    torch.manual_seed(0)
    policy = GNNPolicy(hidden=8, layers=1)
    for graph, cluster in ((layered_dag(2, 2, seed=1), pair()), (layered_dag(4, 5, seed=2), "cpu+4gpu")):
        env = make_env(graph, cluster, num_groups=16)
        s = policy.sample(PolicyInput.from_problem(env.problem), 2)
        assert s.actions.shape == (2, env.num_groups) and int(s.actions.max()) < env.num_devices


def test_reinforce_with_gnn_learns_one_chain_per_device():
    env, best, random_mean = chain_per_device_task()
    policy = make_policy("gnn", env.problem, hidden=16, layers=2)
    algo = make_algo("reinforce", policy, env, samples_per_update=16, lr=2e-2, entropy_coef=0.01, seed=0)
    stats = [algo.update() for _ in range(60)]
    late = np.mean([s.rewards.mean() for s in stats[-5:]])
    assert late > random_mean + 0.2, (late, random_mean)
    assert max(s.rewards.max() for s in stats) == pytest.approx(best)
    assert stats[-1].entropy < stats[0].entropy


def test_extractor_rejects_a_foreign_observation_space():
    space = spaces.Dict({"node_mask": spaces.Box(0, 1, (4,)), "action_mask": spaces.Box(0, 1, (2,)),
                         "edge_mask": spaces.Box(0, 1, (3,)), "node_features": spaces.Box(0, 1, (4 * 5,))})
    with pytest.raises(ValueError, match="node columns"):
        GNNExtractor(space)


def test_extractor_batches_and_caches_embeddings_without_changing_outputs():
    # one encoder pass per distinct graph of a batch, and a rollout reuses it while the weights stay the same
    envs = [make_env(layered_dag(3, 4, seed=s), "cpu+4gpu", num_groups=10, max_groups=14, max_edges=40)
            for s in (5, 6)]
    obs_list = []
    for env in envs:
        obs, _ = env.reset(seed=0)
        for a in (1, 2, 0):
            obs_list.append(obs)
            obs, *_ = env.step(a)
    torch.manual_seed(3)
    ext = GNNExtractor(envs[0].observation_space, hidden=16, layers=2)

    def run(obs_rows):
        b = batch(obs_rows)
        b["current_group"] = torch.tensor([[o["current_group"]] for o in obs_rows], dtype=torch.float32)
        return ext(b)

    one_by_one = torch.cat([run([o]) for o in obs_list])  # grad enabled: no cache
    assert torch.allclose(run(obs_list), one_by_one, atol=1e-6)  # two graphs in one batch
    assert torch.allclose(run(obs_list[:3]), one_by_one[:3], atol=1e-6)  # one graph: a single encoder pass
    with torch.no_grad():
        assert torch.allclose(run(obs_list[:1]), one_by_one[:1], atol=1e-6)
        assert ext._cached is not None
        assert torch.allclose(run(obs_list[1:2]), one_by_one[1:2], atol=1e-6)  # cached embedding
        assert torch.allclose(run(obs_list[3:4]), one_by_one[3:4], atol=1e-6)  # another graph: recomputed
    # a gradient step changes the weights: the cache must not serve the old embedding
    loss = run(obs_list[:3]).square().sum()
    loss.backward()
    torch.optim.SGD(ext.parameters(), lr=0.1).step()
    with torch.no_grad():
        cached_now = run(obs_list[3:4])
    assert torch.allclose(cached_now, run(obs_list[3:4]).detach(), atol=1e-6)
    assert not torch.allclose(cached_now, one_by_one[3:4], atol=1e-4)


def test_env_load_columns_are_the_shared_device_load_features():
    # the observation's compute_load / memory_used columns and the GNN's pair features come from one function
    from envs.problem import DEVICE_STATIC_FEATURES, device_load_features

    env = make_env(layered_dag(3, 4, seed=2), "cpu+4gpu", num_groups=10)
    p = env.problem
    obs, _ = env.reset(seed=0)
    time_used, mem_used = np.zeros(p.num_devices), np.zeros(p.num_devices)
    ns, d = len(DEVICE_STATIC_FEATURES), p.num_devices
    for g in range(p.num_groups):
        a = g % d
        obs, *_ = env.step(a)
        time_used[a] += p.time_s[g, a]
        mem_used[a] += p.mem_bytes[g]
        load, mem = device_load_features(time_used, mem_used, np.maximum(p.time_s.sum(axis=0), 1e-30),
                                         p.capacity_bytes)
        dev = obs["device_features"].reshape(env.max_devices, -1)[:d]
        np.testing.assert_allclose(dev[:, ns], load.astype(np.float32), rtol=1e-6)
        np.testing.assert_allclose(dev[:, ns + 1], mem.astype(np.float32), rtol=1e-6)
    assert load.sum() > 0 and np.isclose(load, [p.time_s[np.arange(p.num_groups) % d == k, k].sum()
                                                / p.time_s[:, k].sum() for k in range(d)]).all()
