"""Zero-shot placement (Placeto): multi-graph training, then ``placer place`` on graphs the policy never saw."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from envs.placement_env import make_env
from envs.synthetic import layered_dag, two_chains
from placer.core.cluster import get_cluster
from placer.io.document import load_placement
from placer.app.place import add_place_arguments, place_zero_shot, run_place
from placer.app.train import TrainConfig, train
from tests.policy_helpers import one_thread, pair  # noqa: F401 - one_thread is an autouse fixture


@pytest.fixture(scope="module")
def chains_run(tmp_path_factory):
    """A GNN trained with REINFORCE on two chains of 4 ops and one random DAG (never on longer chains)."""
    tmp = tmp_path_factory.mktemp("zs")
    two_chains(4).save(tmp / "chains4.json")
    pair().save(tmp / "pair.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the autouse fixture
    torch.manual_seed(0)
    res = train(TrainConfig(
        graphs=(str(tmp / "chains4.json"),), random_dags=1, cluster=str(tmp / "pair.json"), policy="gnn",
        algo="reinforce", max_updates=60, algo_config={"samples_per_update": 16, "lr": 2e-2}, hidden=16,
        policy_options={"layers": 2}, num_groups=64, runs_dir=str(tmp), reference="single", seed=0,
        progress=False))
    torch.set_num_threads(threads)
    return tmp, res


def test_multi_graph_run_writes_its_folder(chains_run):
    tmp, res = chains_run
    assert res.updates == 60 and len(res.outcomes) == 2
    assert res.run_dir.name.startswith("multi-2__gnn__reinforce__0__")
    for name in ("config.json", "cluster.json", "checkpoint.pt", "placement_two-chains-4.json"):
        assert (res.run_dir / name).exists(), name
    with pytest.raises(ValueError, match="read result.outcomes"):
        res.placement  # noqa: B018 - a one-graph accessor on a run of two graphs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(res.run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"charts/best_step_time_s/two-chains-4", "charts/reward/two-chains-4"} <= tags  # per graph
    assert "charts/best_step_time_s" not in tags
    # it solved the training graph: one chain per device
    env = make_env(two_chains(4), pair(), num_groups=64, reference="single")
    assert res.outcomes["two-chains-4"].best_step_time_s == pytest.approx(env.evaluate([0, 1] * 4)[1].step_time_s)


def test_zero_shot_places_a_longer_chain_pair_optimally(chains_run):
    tmp, res = chains_run
    graph = two_chains(7)  # never seen: 14 groups instead of 8
    zs = place_zero_shot(res.run_dir, graph, pair())
    env = make_env(graph, pair(), num_groups=64, reference="single")
    optimum = env.evaluate([0, 1] * 7)[1].step_time_s
    rng = np.random.default_rng(0)
    random_mean = np.mean([env.evaluate(rng.integers(0, 2, 14))[1].step_time_s for _ in range(200)])
    assert zs.predicted.ok and zs.method == "rl:gnn+reinforce+zero-shot"
    assert zs.predicted.step_time_s < random_mean
    assert zs.predicted.step_time_s == pytest.approx(optimum, rel=0.02)


def test_placer_place_cli_writes_a_valid_placement_for_an_unseen_graph_and_cluster(chains_run, capsys):
    tmp, res = chains_run
    graph = layered_dag(4, 3, seed=99)  # unseen, on a cluster with 5 devices instead of 2
    graph.save(tmp / "unseen.json")
    parser = argparse.ArgumentParser()
    add_place_arguments(parser)
    args = parser.parse_args(["--policy-from", res.run_dir.name, "--runs-dir", str(tmp), "--graph",
                              str(tmp / "unseen.json"), "--cluster", "cpu+4gpu", "--out", str(tmp / "p.json"),
                              "--samples", "4"])
    out = run_place(args)
    doc = load_placement(tmp / "p.json", graph, get_cluster("cpu+4gpu"))
    assert doc.placement == out.placement and doc.doc["provenance"]["method"] == "rl:gnn+reinforce+zero-shot"
    assert doc.doc["predicted"]["step_time_s"] == pytest.approx(out.predicted.step_time_s)
    assert "placed layered-4x3-s99 on cpu+4gpu" in capsys.readouterr().out
    # seeded by the baselines by default: the document says where the placement came from and which plan it is
    assert doc.doc["provenance"]["source"] == out.source
    assert doc.doc["schedule"]["chosen_by"] == "auto"
    assert doc.doc["schedule"]["name"] == out.predicted.schedule


def test_placer_place_is_never_worse_than_the_best_baseline_and_says_when_one_won(chains_run):
    from placer import baselines
    from placer.app.training.trainer import evaluate_baselines

    tmp, res = chains_run
    graph = layered_dag(4, 3, seed=99)
    alone = place_zero_shot(res.run_dir, graph, "cpu+4gpu", schedule="auto")
    seeded = place_zero_shot(res.run_dir, graph, "cpu+4gpu", schedule="auto", seed_baselines=True)
    scored = evaluate_baselines(graph, get_cluster("cpu+4gpu"), baselines.names(), schedule="auto")
    best_m = min(scored, key=lambda m: (scored[m][1].step_time_s, m))
    best_s = scored[best_m][1].step_time_s
    assert alone.source == "policy"
    assert seeded.predicted.step_time_s == pytest.approx(min(alone.predicted.step_time_s, best_s))
    if best_s < alone.predicted.step_time_s:  # the policy lost: the baseline's plan, labelled
        assert seeded.source == f"seeded by {best_m}" and seeded.placement == scored[best_m][0]
    else:
        assert seeded.source == "policy" and seeded.placement == alone.placement


def test_zero_shot_from_a_single_graph_ppo_run(tmp_path):
    run = train(TrainConfig(graph=layered_dag(3, 3, seed=11), cluster="cpu+4gpu", policy="gnn", algo="ppo",
                            budget_s=60.0, max_updates=1, algo_config={"samples_per_update": 2}, hidden=8, num_groups=8,
                            runs_dir=str(tmp_path), progress=False, baselines=("expert",)))
    zs = place_zero_shot(run.run_dir, layered_dag(3, 5, seed=12), "cpu+4gpu")
    assert zs.placement.device_of_op.shape == (16,) and zs.method == "rl:gnn+ppo+zero-shot"


def test_bad_runs_and_mismatched_policies_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="no trained run 'nope'"):
        place_zero_shot("nope", layered_dag(2, 2), pair(), runs_dir=tmp_path)
    run = train(TrainConfig(graph=layered_dag(2, 2, seed=1), cluster="cpu+4gpu", policy="seq2seq",
                            budget_s=60.0, max_updates=1, algo_config={"samples_per_update": 2}, hidden=8, num_groups=4,
                            runs_dir=str(tmp_path), progress=False, baselines=("expert",)))
    with pytest.raises(ValueError, match="does not fit") as e:
        place_zero_shot(run.run_dir, layered_dag(2, 2), pair())  # seq2seq's head is sized for 5 devices
    assert "\n" not in str(e.value)


def test_graphs_option_parses_into_a_multi_graph_config():
    from placer.app.cli_train import _train_parser, config_from_args

    parser = argparse.ArgumentParser()
    _train_parser(parser)
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm, nmt", "--random-dags", "3", "--policy",
                                              "gnn", "--algo", "ppo", "--max-updates", "2"]))
    assert cfg.graphs == ("rnnlm", "nmt") and cfg.random_dags == 3 and cfg.algo == "ppo" and cfg.max_updates == 2
    assert cfg.policy_options == {} and cfg.num_graphs == 5 and cfg.mode == "multi-graph"
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--policy", "gnn", "--finish-dropout", "0.5"]))
    assert cfg.policy_options == {"finish_dropout": 0.5}
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--policy-options", "layers=2"]))
    assert cfg.policy_options == {"layers": 2}
    # learning options left unset take the multi-graph preset (the benchmark's), not one graph's; set, they win
    assert (cfg.algo_config.samples_per_update, cfg.algo_config.top_fraction, cfg.algo_config.lr) == (32, 0.25, 3e-3)
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--top-fraction", "0.5", "--lr", "1e-2"]))
    assert (cfg.algo_config.top_fraction, cfg.algo_config.lr, cfg.algo_config.samples_per_update) == (0.5, 1e-2, 32)
    with pytest.raises(ValueError, match="--finish-dropout needs --policy gnn --algo reinforce"):
        config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--policy", "gnn", "--algo", "ppo",
                                            "--finish-dropout", "0.5"]))
    with pytest.raises(ValueError, match="needs a graph"):
        TrainConfig(graphs=(), random_dags=0)
    with pytest.raises(ValueError, match="sim reward"):
        train(TrainConfig(graphs=("rnnlm", "nmt"), reward="sim+real", policy="gnn", runs_dir="/nonexistent"))


def test_multi_graph_ppo_shares_one_gnn(tmp_path):
    res = train(TrainConfig(random_dags=2, cluster="cpu+4gpu", policy="gnn", algo="ppo", max_updates=2,
                            algo_config={"samples_per_update": 2}, hidden=8, policy_options={"layers": 1},
                            num_groups=16, runs_dir=str(tmp_path), seed=1, progress=False))
    assert res.updates == 2 and all(np.isfinite([o.best_step_time_s for o in res.outcomes.values()]))
    zs = place_zero_shot(res.run_dir, layered_dag(3, 2, seed=5), "cpu+4gpu")
    assert zs.predicted.ok and zs.method == "rl:gnn+ppo+zero-shot"


def test_a_resumed_multi_graph_run_continues_where_it_stopped(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    common = dict(random_dags=2, cluster="cpu+4gpu", policy="gnn", algo="reinforce",
                  algo_config={"samples_per_update": 4}, hidden=8, policy_options={"layers": 1}, num_groups=16,
                  seed=3, progress=False)
    straight = train(TrainConfig(**common, max_updates=4, runs_dir=str(tmp_path / "a")))
    first = train(TrainConfig(**common, max_updates=2, runs_dir=str(tmp_path / "b")))
    assert first.updates == 2
    again = train(TrainConfig(resume=first.run_dir.name, max_updates=4, runs_dir=str(tmp_path / "b"),
                              progress=False))
    assert again.run_dir == first.run_dir and again.updates == 4
    # the same weights, RNG streams and best placements as a run that was never stopped
    a = torch.load(straight.run_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(again.run_dir / "checkpoint.pt", weights_only=False)
    assert a["counters"]["samples"] == b["counters"]["samples"]
    assert [g["best"]["step_time_s"] for g in a["graphs"]] == [g["best"]["step_time_s"] for g in b["graphs"]]
    for k, v in a["policy"].items():
        assert torch.equal(v, b["policy"][k]), k
    # the CLI's --resume continues it too
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "placer.app.cli", "train", "--resume", str(first.run_dir),
                        "--max-updates", "5", "--budget", "1m"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stderr
    assert torch.load(first.run_dir / "checkpoint.pt", weights_only=False)["counters"]["updates"] == 5


def test_random_training_graphs_cover_four_families_reproducibly():
    from envs.synthetic import branch_blocks, recurrent_grid
    from placer.app.training.families import random_graphs

    graphs = random_graphs(8, seed=3)
    families = [g.meta["synthetic"]["generator"] for g in graphs]
    assert families == ["layered_dag", "recurrent_grid", "branch_blocks", "seq2seq_grid"] * 2
    assert [g.content_hash for g in random_graphs(8, seed=3)] == [g.content_hash for g in graphs]
    g = recurrent_grid(3, 5, seed=1)
    cells0 = [i for i, name in enumerate(g.op_names) if name.startswith("cell0_")]
    assert len(cells0) == 5 and len(set(g.colocation[cells0].tolist())) == 1  # one layer's calls share weights
    assert (g.param_bytes[cells0[1:]] == 0).all() and g.param_bytes[cells0[0]] > 0
    assert len(np.unique(g.colocation)) == 6  # embedding, 3 cells, projection, loss
    succ = g.successors()
    assert g.index("cell2_4") in succ[g.index("cell2_3")] and g.index("cell2_4") in succ[g.index("cell1_4")]
    b = branch_blocks(4, seed=2)
    cats = [i for i, k in enumerate(b.op_kinds) if k == "cat"]
    assert len(cats) == 4 and all(len(b.predecessors()[i]) >= 2 for i in cats)
    big = branch_blocks(30, seed=2, max_branches=5, max_chain=5)
    pred = big.predecessors()
    cats = [i for i, k in enumerate(big.op_kinds) if k == "cat"]
    assert len(cats) == 30 and max(len(pred[i]) for i in cats) == 5  # some block has 5 branches, none more
    assert max(int(n.split("_")[2]) for n in big.op_names if n.count("_") == 2) == 4  # chains of up to 5 convs
    conv = np.array([k == "Conv2d" for k in big.op_kinds])
    cpu, gpu = big.costs["cpu"].fwd_s[conv], big.costs["K80"].fwd_s[conv]
    assert 10e6 < np.median(big.param_bytes[conv] / cpu) < 40e6  # Inception-V3's ~20 MB per CPU-second
    assert ((cpu / gpu >= 15) & (cpu / gpu <= 30)).all()
    assert all(6 <= g.meta["synthetic"]["n_blocks"] <= 14 for g in graphs[2::4])  # near Inception-V3's size
    with pytest.raises(ValueError, match="max_branches >= 2"):
        branch_blocks(3, max_branches=1)
    with pytest.raises(ValueError, match="n_layers >= 1"):
        recurrent_grid(0, 3)


def test_seq2seq_grid_is_an_attentional_encoder_decoder():
    from envs.synthetic import seq2seq_grid

    g = seq2seq_grid(2, 4, 3, seed=5)
    idx, pred = g.index, g.predecessors()
    group = lambda prefix: {int(g.colocation[i]) for i, n in enumerate(g.op_names) if n.startswith(prefix)}  # noqa
    # every layer's calls, the attention's score and combine, the projection and the loss terms share weights
    for prefix in ("enc0_", "enc1_", "dec0_", "dec1_", "score_", "combine_", "proj_", "xent_"):
        assert len(group(prefix)) == 1, prefix
    assert len(group("weights_")) == 3 and len(group("context_")) == 3  # per-step softmax and context: unshared
    assert set(pred[idx("dec1_0")]) == {idx("dec0_0"), idx("enc1_3")}  # decoder layer 1 starts from encoder 1
    assert set(pred[idx("memory")]) == {idx(f"enc1_{t}") for t in range(4)}  # the top encoder outputs
    assert set(pred[idx("context_2")]) == {idx("weights_2"), idx("memory")}
    assert set(pred[idx("proj_2")]) == {idx("combine_2")}
    assert len(pred[idx("loss")]) == 3
    assert g.content_hash == seq2seq_grid(2, 4, 3, seed=5).content_hash != seq2seq_grid(2, 4, 3, seed=6).content_hash
    with pytest.raises(ValueError, match="seq2seq_grid needs"):
        seq2seq_grid(2, 0, 3)


def test_zero_shot_tries_both_finish_views_of_a_dropout_policy(tmp_path, monkeypatch):
    from policies.gnn import GNNPolicy

    res = train(TrainConfig(random_dags=2, cluster="cpu+4gpu", policy="gnn", algo="reinforce", max_updates=2,
                            algo_config={"samples_per_update": 4}, hidden=8, num_groups=16, runs_dir=str(tmp_path),
                            policy_options={"finish_dropout": 0.5}, progress=False))
    seen = []
    sample = GNNPolicy.sample

    def spy(self, *args, **kwargs):
        seen.append((self.finish_feature, kwargs.get("greedy", False)))
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(GNNPolicy, "sample", spy)
    zs = place_zero_shot(res.run_dir, layered_dag(4, 3, seed=9), "cpu+4gpu", samples=3)
    assert zs.predicted.ok
    assert seen == [(True, True), (True, False), (False, True), (False, False)]
    no_dropout = train(TrainConfig(random_dags=1, cluster="cpu+4gpu", policy="gnn", algo="reinforce",
                                   max_updates=1, algo_config={"samples_per_update": 2}, hidden=8, num_groups=16,
                                   runs_dir=str(tmp_path), progress=False, baselines=("expert",)))
    seen.clear()
    place_zero_shot(no_dropout.run_dir, layered_dag(4, 3, seed=9), "cpu+4gpu")
    assert seen == [(True, True)]
