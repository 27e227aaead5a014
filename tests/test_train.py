"""placer.app.train: run folder artefacts, resume, CLI options, the compare hook."""

from __future__ import annotations

import argparse
import json
import logging
import math

import numpy as np
import pytest
import torch

from envs.synthetic import layered_dag
from placer.core.cluster import Cluster, get_cluster
from placer.io.document import load_placement
from placer.core.placement import Placement
from placer.app.train import TrainConfig, train, train_and_place
from tests.policy_helpers import SimMeasurer, chain, cpus

MiB = 1 << 20

TAGS = {"charts/best_step_time_s", "charts/mean_step_time_s", "charts/reward", "charts/entropy",
        "charts/samples_per_s", "losses/policy", "baseline/expert_step_time_s", "baseline/heft_step_time_s"}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, **kw) -> TrainConfig:
    base = dict(graph=layered_dag(3, 3, seed=11), cluster="cpu+4gpu", budget_s=120.0, max_updates=4,
                algo_config={"samples_per_update": 8}, hidden=16, num_groups=8, runs_dir=str(tmp_path),
                progress=False, checkpoint_every_s=0.0)
    base.update(kw)
    return TrainConfig(**base)


def scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_train_writes_every_artefact(tmp_path):
    res = train(tiny(tmp_path))
    run = res.run_dir
    assert run.parent == tmp_path and run.name.startswith("layered-3x3-s11__seq2seq__reinforce__0__")
    for name in ("config.json", "graph.json", "cluster.json", "checkpoint.pt", "placement.json",
                 "learning_curve.png"):
        assert (run / name).exists(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["run_name"] == run.name and cfg["graph"] == "layered-3x3-s11"
    # the algorithm's own config, nested and resolved: the one-graph preset with the given field replacing it
    assert cfg["algo_config"] == {**cfg["algo_config"], "samples_per_update": 8, "lr": 1e-3, "top_fraction": 0.1,
                                  "baseline": "quantile", "self_imitation_coef": 0.5, "seed": 0}
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    doc = load_placement(run / "placement.json", layered_dag(3, 3, seed=11), get_cluster("cpu+4gpu"))
    assert doc.placement == res.placement
    assert doc.doc["predicted"]["step_time_s"] == pytest.approx(res.predicted.step_time_s)
    assert doc.doc["provenance"]["method"] == "rl:seq2seq+reinforce"
    assert res.updates == 4 and res.samples == 32 and len(res.history) == 4
    assert res.best_step_time_s == pytest.approx(res.predicted.step_time_s)  # reward simulates the op graph
    bests = [h["best_step_time_s"] for h in res.history]
    assert bests == sorted(bests, reverse=True)
    tags = scalars(run)
    assert TAGS <= set(tags), TAGS - set(tags)
    assert tags["charts/best_step_time_s"][-1] == (32, pytest.approx(res.best_step_time_s))
    assert tags["baseline/expert_step_time_s"][0][1] == pytest.approx(res.baselines["expert"])


def test_resume_continues_the_run_exactly(tmp_path):
    straight = train(tiny(tmp_path / "a", max_updates=4))
    first = train(tiny(tmp_path / "b", max_updates=2))
    resumed = train(TrainConfig(resume=first.run_dir.name, runs_dir=str(tmp_path / "b"), max_updates=4,
                                progress=False, checkpoint_every_s=0.0))
    assert resumed.run_dir == first.run_dir
    assert (resumed.updates, resumed.samples) == (4, 32)
    # RNG, optimizer and baseline were restored: the same trajectory as the uninterrupted run
    key = lambda r: [(h["samples"], h["best_step_time_s"], h["mean_step_time_s"]) for h in r.history]  # noqa: E731
    assert key(resumed) == key(straight)
    doc = load_placement(resumed.run_dir / "placement.json")
    assert doc.placement == resumed.placement
    steps = [s for s, _ in scalars(resumed.run_dir)["charts/best_step_time_s"]]
    assert steps == [8, 16, 24, 32]


def test_warm_start_is_labelled_and_starts_from_the_baseline(tmp_path):
    res = train(tiny(tmp_path, warm_start="heft", max_updates=1))
    doc = json.loads((res.run_dir / "placement.json").read_text())
    assert doc["provenance"]["method"] == "rl:seq2seq+reinforce+warm:heft"
    # the first batch already samples around HEFT's placement
    assert res.history[0]["best_step_time_s"] <= res.baselines["heft"] * 1.25
    with pytest.raises(ValueError, match="warm start 'nope'"):
        train(tiny(tmp_path / "bad", warm_start="nope"))
    assert not (tmp_path / "bad").exists()


def test_bad_names_fail_before_a_run_folder_exists(tmp_path):
    for kw, msg in (({"policy": "nope"}, "unknown policy"), ({"algo": "nope"}, "unknown algorithm"),
                    ({"reward": "nope"}, "unknown reward backend"), ({"budget_s": 0}, "budget")):
        with pytest.raises(ValueError, match=msg):
            train(tiny(tmp_path, **kw))
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="no run"):
        train(TrainConfig(resume="missing", runs_dir=str(tmp_path), progress=False))


def test_run_folders_never_collide_and_are_found_by_name_or_path(tmp_path):
    from placer.app.runs import find_run, new_run_dir, safe_name, stamped_name

    name = stamped_name("nmt/paper v2", "gnn", "ppo", 3)
    assert name.startswith("nmt-paper-v2__gnn__ppo__3__") and safe_name("a/b c.json") == "a-b-c.json"
    first, second = new_run_dir(tmp_path, name), new_run_dir(tmp_path, name)  # the same second
    assert first.name == name and second.name == name + "_" and second.is_dir()
    (second / "config.json").write_text("{}")
    assert find_run(second.name, tmp_path) == second == find_run(second, "elsewhere")
    with pytest.raises(ValueError, match="has no checkpoint.pt"):
        find_run(second.name, tmp_path, checkpoint=True)
    with pytest.raises(ValueError, match=f"no run '{first.name}'"):  # a folder without a config.json
        find_run(first.name, tmp_path)


def test_cli_options_build_the_config():
    from placer.app.cli_train import _train_parser, config_from_args

    parser = argparse.ArgumentParser()
    _train_parser(parser)
    args = parser.parse_args(["--graph", "nmt", "--cluster", "cpu+4gpu", "--budget", "2m", "--reward", "sim+real",
                              "--seed", "3", "--samples-per-update", "8", "--no-progress", "--self-imitation", "0.25"])
    cfg = config_from_args(args)
    assert (cfg.graph, cfg.cluster, cfg.budget_s, cfg.reward, cfg.seed, cfg.progress) == (
        "nmt", "cpu+4gpu", 120.0, "sim+real", 3, False)
    assert cfg.policy == "seq2seq" and cfg.algo == "reinforce"
    algo = cfg.algo_config
    assert (algo.samples_per_update, algo.self_imitation_coef, algo.seed) == (8, 0.25, 3)
    with pytest.raises(ValueError, match="--graph"):
        config_from_args(parser.parse_args([]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--budget", "soon"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--graph", "nmt", "--policy", "nope"])  # choices come from the registry


def test_every_config_field_is_a_cli_option():
    import dataclasses

    from placer.app.cli_train import train_options
    from policies.registry import ALGOS

    run, per_algo = train_options()
    assert {o.field for o in run} == {f.name for f in dataclasses.fields(TrainConfig)} - {"algo_config"}
    for name, spec in ALGOS.items():
        assert {o.field for o in per_algo[name]} == {f.name for f in dataclasses.fields(spec.config_class)} - {"seed"}
    helps = {o.field: o.kwargs["help"] for o in run}
    assert helps["num_groups"].startswith("At most this many groups per graph")  # the field's docstring


def test_explicit_options_win_over_the_preset_whatever_their_value():
    from placer.app.cli_train import _train_parser, config_from_args

    parser = argparse.ArgumentParser()
    _train_parser(parser)
    # several graphs: the multi-graph preset (the zero-shot figures' setting) for what is not given ...
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--policy", "gnn"]))
    assert cfg.mode == "multi-graph"
    assert (cfg.algo_config.samples_per_update, cfg.algo_config.lr, cfg.algo_config.top_fraction) == (32, 3e-3, 0.25)
    # ... and an explicit --lr 1e-3, the one-graph preset's value, stays 1e-3
    cfg = config_from_args(parser.parse_args(["--graphs", "rnnlm,nmt", "--policy", "gnn", "--lr", "1e-3"]))
    assert cfg.algo_config.lr == 1e-3 and cfg.algo_config.samples_per_update == 32
    cfg = config_from_args(parser.parse_args(["--graph", "rnnlm", "--lr", "3e-3", "--preset", "multi-graph"]))
    assert cfg.algo_config.lr == 3e-3 and cfg.algo_config.samples_per_update == 32
    assert TrainConfig(graph="rnnlm", algo_config={"lr": 1e-3}, preset="multi-graph").algo_config.lr == 1e-3


def test_inapplicable_or_unknown_hyperparameters_are_refused():
    from placer.app.cli_train import _train_parser, config_from_args
    from policies.ppo import PPOConfig

    parser = argparse.ArgumentParser()
    _train_parser(parser)
    with pytest.raises(ValueError, match="--clip-range is a hyper-parameter of ppo, not of --algo reinforce"):
        config_from_args(parser.parse_args(["--graph", "rnnlm", "--clip-range", "0.1"]))
    with pytest.raises(ValueError, match="--top-fraction is a hyper-parameter of reinforce, not of --algo ppo"):
        config_from_args(parser.parse_args(["--graph", "rnnlm", "--policy", "gnn", "--algo", "ppo",
                                            "--top-fraction", "0.5"]))
    with pytest.raises(ValueError, match="does not take --lr"):
        config_from_args(parser.parse_args(["--resume", "somewhere", "--lr", "0.1"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--graph", "rnnlm", "--no-such-option", "1"])
    with pytest.raises(ValueError, match="'reinforce' has no hyper-parameter clip_range"):
        TrainConfig(graph="rnnlm", algo_config={"clip_range": 0.1})
    with pytest.raises(ValueError, match="takes a ReinforceConfig, not a PPOConfig"):
        TrainConfig(graph="rnnlm", algo_config=PPOConfig())


def test_train_and_place_gives_a_valid_placement(tmp_path):
    g = layered_dag(3, 3, seed=12)
    placement, result = train_and_place(g, "cpu+4gpu", budget_s=60, seed=1, runs_dir=str(tmp_path),
                                        max_updates=2, algo_config={"samples_per_update": 4}, hidden=16)
    assert isinstance(placement, Placement)
    placement.validate(g, get_cluster("cpu+4gpu"))
    assert result.ok and result.source == "sim" and np.isfinite(result.step_time_s)


class _FakeMeasurer(SimMeasurer):
    """'Measures' the simulated step plus 1 ms."""

    offset_s = 1e-3


def test_sim_real_run_reports_the_best_measured_placement(tmp_path, monkeypatch):
    import envs.rewards as rewards

    monkeypatch.setattr(rewards, "load_measurer_class", lambda: _FakeMeasurer)
    g = layered_dag(3, 3, seed=11)
    g = g.replace(meta={**g.meta, "source": {"factory": "fake:fake"}})
    res = train(tiny(tmp_path, graph=g, reward="sim+real", top_k_real=3, max_updates=3))
    assert res.measured is not None and res.measured.source == "engine"
    assert res.measured.step_time_s == pytest.approx(res.predicted.step_time_s + 1e-3)
    doc = json.loads((res.run_dir / "placement.json").read_text())
    assert doc["measured"]["source"] == "engine:cpu+4gpu"
    assert doc["measured"]["step_time_s"] == pytest.approx(res.measured.step_time_s)
    tags = scalars(res.run_dir)
    assert {"real/best_step_time_s", "real/top1_step_time_s"} <= set(tags)


def test_engine_rewards_calibrate_an_uncalibrated_cpu_preset(monkeypatch, tmp_path, caplog):
    import dataclasses

    import placer.engine.calibrate as calibrate
    from placer.core.cluster import get_cluster
    from placer.app.train import maybe_calibrate, needs_calibration

    cpu2, gpus = get_cluster("cpu-2"), get_cluster("cpu+4gpu")
    assert needs_calibration(cpu2)
    assert not needs_calibration(cpu2, uses_engine=False)
    assert not needs_calibration(gpus)  # not this machine's workers
    assert not needs_calibration(cpu2, mode="never")
    assert needs_calibration(cpu2, mode="always", uses_engine=False)
    with pytest.raises(ValueError, match="calibrate must be"):
        needs_calibration(cpu2, mode="sometimes")

    measured = dataclasses.replace(cpu2, name="cpu-2-calibrated", meta={"source": "calibrated"},
                                   devices=tuple(dataclasses.replace(d, name=f"w{i}", speed=0.9)
                                                 for i, d in enumerate(cpu2.devices)))
    calls = []
    monkeypatch.setattr(calibrate, "calibrate_cluster", lambda n, name=None: calls.append(n) or measured)
    got = maybe_calibrate(cpu2)
    assert got.meta["source"] == "calibrated" and got.device_names == cpu2.device_names
    assert [d.speed for d in got.devices] == [0.9, 0.9]
    assert not needs_calibration(got)  # a calibrated cluster is used as it is
    with caplog.at_level(logging.WARNING, logger="placer.app.train"):
        assert maybe_calibrate(cpu2, uses_engine=False) is cpu2  # simulated as it is, with a warning
        assert [r.getMessage().split(":")[0] for r in caplog.records] == ["cpu-2 is not calibrated"]
        caplog.clear()
        for quiet in (maybe_calibrate(cpu2, mode="never", uses_engine=False), maybe_calibrate(got, uses_engine=False),
                      maybe_calibrate(gpus, uses_engine=False)):
            assert quiet.name in ("cpu-2", "cpu-2-calibrated", "cpu+4gpu")
        assert not caplog.records

    # train(): a sim reward does not calibrate; sim+real does, and the run's cluster.json is what it simulated
    import envs.rewards as rewards

    monkeypatch.setattr(rewards, "load_measurer_class", lambda: _FakeMeasurer)
    g = layered_dag(3, 3, seed=11)
    g = g.replace(meta={**g.meta, "source": {"factory": "fake:fake"}})
    res = train(tiny(tmp_path, graph=g, cluster="cpu-2", max_updates=1))
    assert calls == [2] and Cluster.load(res.run_dir / "cluster.json").meta["source"] == "preset"
    res = train(tiny(tmp_path, graph=g, cluster="cpu-2", reward="sim+real", top_k_real=2, max_updates=1))
    assert calls == [2, 2] and Cluster.load(res.run_dir / "cluster.json").meta["source"] == "calibrated"


def test_a_seeded_run_never_reports_worse_than_the_best_baseline(tmp_path):
    plain = train(tiny(tmp_path / "a", max_updates=1)).only
    seeded_res = train(tiny(tmp_path / "b", max_updates=1, seed_baselines=True))
    seeded = seeded_res.only
    ok = {m: t for m, t in seeded.baselines.items() if math.isfinite(t)}
    best_m = min(ok, key=lambda m: (ok[m], m))
    env = seeded_res.run_dir  # the placement file carries the label
    doc = json.loads((env / "placement.json").read_text())
    assert plain.source is None and "source" not in json.loads(
        (train(tiny(tmp_path / "c", max_updates=1)).run_dir / "placement.json").read_text())["provenance"]
    assert seeded.best_step_time_s <= plain.best_step_time_s
    if seeded.best_step_time_s < plain.best_step_time_s:  # the baseline's placement is what the run reports
        assert seeded.source == f"seeded by {best_m}"
    assert seeded.source in ("policy", f"seeded by {best_m}")
    assert doc["provenance"]["source"] == seeded.source


def test_refinement_reports_its_faster_op_plan_labelled_and_simulating_to_its_time(tmp_path):
    from placer.costmodel.plans import simulate_plan

    res = train(tiny(tmp_path, max_updates=1, refine_s=2.0))
    out, graph = res.only, layered_dag(3, 3, seed=11)
    doc = json.loads((res.run_dir / "placement.json").read_text())
    # one update of a fresh policy leaves room: the refined plan beats it, and every baseline (refinement starts
    # from their placements too)
    assert out.refined is not None and out.source == out.refined.source == doc["provenance"]["source"]
    assert out.source.startswith("refined from ") and out.refined.evaluations > 0
    assert out.predicted.step_time_s < out.refined.policy_step_s
    assert out.predicted.step_time_s <= min(out.baselines.values())
    assert out.best_step_time_s == out.predicted.step_time_s
    # the file holds the refined op placement and its plan; they simulate to the time reported
    assert [doc["ops"][n] for n in graph.op_names] == out.placement.device_of_op.tolist()
    assert doc["schedule"]["name"] == out.predicted.schedule and doc["schedule"]["chosen_by"] == "auto"
    again = simulate_plan(graph, get_cluster("cpu+4gpu"), out.placement, schedule="auto")
    assert again.step_time_s == pytest.approx(out.predicted.step_time_s) == pytest.approx(
        doc["predicted"]["step_time_s"])
    assert "charts/refined_step_time_s" in scalars(res.run_dir)
    # without refine_s nothing is refined
    assert train(tiny(tmp_path / "plain", max_updates=1)).only.refined is None


def test_refinement_finds_a_plan_where_every_sampled_placement_is_out_of_memory(tmp_path):
    # 8 ops of 32 MiB of parameters (128 MiB with Adam's states) on 4 devices of 300 MiB: a device holds two ops.
    # The policy places 2 groups of 4 ops, so every sample is out of memory; refinement moves single ops and
    # starts from the baselines and the splits too
    graph, cluster = chain(8, fwd_s=1e-3, out_bytes=MiB, param_bytes=32 * MiB), cpus(4, memory_bytes=300 * MiB)
    kw = dict(graph=graph, cluster=cluster, num_groups=2, max_updates=1)
    with pytest.raises(ValueError, match="no placement of chain8 sampled in training ran"):
        train(tiny(tmp_path / "plain", **kw))
    res = train(tiny(tmp_path, refine_s=2.0, **kw))
    out = res.only
    assert out.device_of_group is None and out.refined is not None and out.predicted.ok
    assert out.refined.policy_step_s == math.inf and out.best_step_time_s == out.predicted.step_time_s
    assert np.bincount(out.placement.device_of_op, minlength=4).tolist() == [2, 2, 2, 2]
    doc = json.loads((res.run_dir / "placement.json").read_text())
    assert doc["provenance"]["source"] == out.source and out.source.startswith("refined from ")


@pytest.mark.parametrize("kw, match", [(dict(refine_s=-1.0), "refine_s must not be negative"),
                                       (dict(refine_s=math.inf), "refine_s must be a finite number"),
                                       (dict(refine_s=1.0, reward="real"), "refine_s needs reward 'sim'"),
                                       (dict(refine_s=1.0, schedule="1f1b"), "refine_s needs schedule 'auto'"),
                                       (dict(refine_s=1.0, random_dags=1), "refine_s refines one graph")])
def test_refine_s_outside_its_use_is_refused(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(tmp_path, **kw)


def test_a_graph_whose_ops_cost_nothing_is_refused_before_a_run_folder_exists(tmp_path):
    from graphs.ir import OpGraph

    free = OpGraph.build(name="free", ops=[dict(name="x", kind="input", out_bytes=4, fwd_s=0.0, bwd_s=0.0)],
                         edges=[])
    with pytest.raises(ValueError, match="reference step .* takes 0.0 s"):
        train(tiny(tmp_path, graph=free, cluster="cpu-2"))
    assert not any(tmp_path.iterdir())
