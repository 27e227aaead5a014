"""Run folders written before the trainers were merged (checkpoint versions 1 and 2, flat config.json) still resume,
exactly where they stopped, or fail with a one-line error saying why."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from envs.synthetic import layered_dag
from placer.app.train import TrainConfig, train
from tests.policy_helpers import one_thread  # noqa: F401 - an autouse fixture

ALGO_FIELDS = ("samples_per_update", "lr", "entropy_coef", "baseline", "top_fraction", "baseline_decay",
               "max_grad_norm", "self_imitation_coef", "self_imitation_size")
"""The algorithm fields the first one-graph TrainConfig had at its top level."""


def one_graph(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(graph=layered_dag(3, 3, seed=11), cluster="cpu+4gpu", budget_s=120.0, hidden=16, num_groups=8,
                       algo_config={"samples_per_update": 8}, runs_dir=str(tmp_path), progress=False,
                       checkpoint_every_s=0.0, baselines=("expert", "heft"), **kw)


def as_version_1(run_dir) -> None:
    """Rewrite a run folder as the first one-graph trainer wrote it: a flat config.json, a version-1 checkpoint."""
    cfg = json.loads((run_dir / "config.json").read_text())
    algo = cfg.pop("algo_config")
    for key in ("graphs", "random_dags", "preset"):
        cfg.pop(key)
    cfg.update({k: algo[k] for k in ALGO_FIELDS})
    (run_dir / "config.json").write_text(json.dumps(cfg))
    new = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    (g,) = new["graphs"]
    old = {"version": 1, "policy": new["policy"], "algo": g["algo"], "rng": new["rng"],
           "best": {"device_of_group": g["best"]["device_of_group"], "step_time_s": g["best"]["step_time_s"],
                    "measured_device_of_group": None, "measured": None},
           "counters": dict(new["counters"]), "history": g["history"], "real": []}
    torch.save(old, run_dir / "checkpoint.pt")


def test_a_version_1_run_folder_resumes_exactly(tmp_path):
    straight = train(one_graph(tmp_path / "a", max_updates=4))
    first = train(one_graph(tmp_path / "b", max_updates=2))
    as_version_1(first.run_dir)
    resumed = train(TrainConfig(resume=str(first.run_dir), max_updates=4, progress=False, checkpoint_every_s=0.0))
    key = lambda r: [(h["samples"], h["best_step_time_s"], h["mean_step_time_s"]) for h in r.history]  # noqa: E731
    assert (resumed.updates, resumed.samples) == (4, 32) and key(resumed) == key(straight)
    saved = json.loads((first.run_dir / "config.json").read_text())
    assert saved["algo_config"]["samples_per_update"] == 8 and "samples_per_update" not in saved  # rewritten
    assert torch.load(first.run_dir / "checkpoint.pt", weights_only=False)["version"] == 3


def multi(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(random_dags=2, cluster="cpu+4gpu", policy="gnn", algo_config={"samples_per_update": 4},
                       hidden=8, policy_options={"layers": 1}, num_groups=16, seed=3, runs_dir=str(tmp_path),
                       progress=False, **kw)


def as_version_2(run_dir) -> list[str]:
    """Rewrite a multi-graph run folder as the first multi-graph trainer wrote it; returns its graph names."""
    cfg = json.loads((run_dir / "config.json").read_text())
    algo = cfg["algo_config"]
    new = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    names = [g["name"] for g in new["graphs"]]
    old_cfg = {"graphs": [], "random_dags": 2, "graph_config": "small", "cluster": "cpu+4gpu", "policy": "gnn",
               "algo": "reinforce", "budget_s": 600.0, "max_rounds": cfg["max_updates"], "seed": 3, "num_groups": 16,
               "reference": "expert", **{k: algo[k] for k in ("samples_per_update", "lr", "entropy_coef",
                                                              "baseline", "top_fraction", "self_imitation_coef")},
               "hidden": 8, "policy_options": {"layers": 1}, "checkpoint_every_s": 60.0, "runs_dir": cfg["runs_dir"],
               "torch_threads": 1, "run_name": run_dir.name, "resume": None, "graph_names": names, "multi": True}
    (run_dir / "config.json").write_text(json.dumps(old_cfg))
    (run_dir / "cluster.json").unlink()  # the first multi-graph trainer wrote none
    old = {"version": 2, "policy": new["policy"], "algos": [g["algo"] for g in new["graphs"]],
           "rng": {"torch": new["rng"]["torch"], "numpy": new["rng"]["numpy"]},
           "best": {g["name"]: g["best"]["step_time_s"] for g in new["graphs"]},
           "best_groups": {g["name"]: g["best"]["device_of_group"] for g in new["graphs"]},
           "rounds": new["counters"]["updates"], "samples": new["counters"]["samples"],
           "elapsed_s": new["counters"]["elapsed_s"]}
    torch.save(old, run_dir / "checkpoint.pt")
    return names


def test_a_version_2_multi_graph_run_folder_resumes_exactly(tmp_path):
    straight = train(multi(tmp_path / "a", max_updates=4))
    first = train(multi(tmp_path / "b", max_updates=2))
    backup = tmp_path / "backup"
    shutil.copytree(first.run_dir, backup)
    names = as_version_2(first.run_dir)
    again = train(TrainConfig(resume=str(first.run_dir), max_updates=4, progress=False))
    assert again.updates == 4 and list(again.outcomes) == names
    a = torch.load(straight.run_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(again.run_dir / "checkpoint.pt", weights_only=False)
    assert a["counters"]["samples"] == b["counters"]["samples"]
    for k, v in a["policy"].items():
        assert torch.equal(v, b["policy"][k]), k
    for ga, gb in zip(a["graphs"], b["graphs"]):
        assert ga["best"]["step_time_s"] == gb["best"]["step_time_s"]
        assert np.array_equal(ga["best"]["device_of_group"], gb["best"]["device_of_group"])
    # what cannot be continued says why, in one line
    shutil.rmtree(first.run_dir)
    shutil.copytree(backup, first.run_dir)
    as_version_2(first.run_dir)
    state = torch.load(first.run_dir / "checkpoint.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "algos"}, first.run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="predates resumable multi-graph runs") as e:
        train(TrainConfig(resume=str(first.run_dir), max_updates=4, progress=False))
    assert "\n" not in str(e.value)
    torch.save({**state, "version": 7}, first.run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint version 7 is not one this placer reads"):
        train(TrainConfig(resume=str(first.run_dir), max_updates=4, progress=False))
