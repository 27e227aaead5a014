"""Subprocess smoke runs of the `placer` CLI: the commands work and every expected failure is one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def placer(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "placer.app.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def placer_in_process(*args, cwd):
    """:func:`placer` without a new interpreter (what the ``placer`` script runs: ``sys.exit(main(argv))``), for
    the many commands that are refused before any work: each subprocess paid ~2.5 s of imports."""
    import contextlib
    import io
    from types import SimpleNamespace

    from placer.app.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's usage errors
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def test_graph_build_and_show_user_factory(tmp_path):
    out = tmp_path / "mlp.json"
    r = placer("graph", "build", "tests.fixtures_models:mlp", "--profile", "cpu", "--out", out)
    assert r.returncode == 0, r.stderr
    g = json.loads(out.read_text())
    assert g["schema"] == "placer.opgraph/v1" and set(g["costs"]) >= {"cpu", "K80", "H100"}
    assert g["costs"]["cpu"]["provenance"]["method"] == "measured"
    assert g["costs"]["K80"]["provenance"]["method"] == "estimated"
    r = placer("graph", "show", out)
    assert r.returncode == 0, r.stderr
    assert "critical path" in r.stdout and "top 10 ops" in r.stdout


def test_shipped_graphs_show():
    for name in ("rnnlm", "nmt", "inception_v3"):
        r = placer("graph", "show", name, "--top", "3")
        assert r.returncode == 0, r.stderr
        assert f"{name}-small" in r.stdout


def cyclic_graph(tmp_path):
    from graphs.data import load_benchmark_graph

    d = load_benchmark_graph("rnnlm").to_json()
    d["edges"]["src"].append(d["edges"]["dst"][-1])
    d["edges"]["dst"].append(d["edges"]["src"][0])
    d["edges"]["bytes"].append(4)
    d.pop("hash")
    path = tmp_path / "cyclic.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("args, match", [
    (["graph", "show", "{bad"], "is not valid JSON"),
    (["graph", "show", "CYCLIC"], "goes against the topological order"),
    (["graph", "build", "nosuch", "--out", "x.json"], "unknown model 'nosuch'"),
    (["graph", "build", "tests.fixtures_models:untraceable", "--out", "x.json"], "cannot trace"),
    (["graph", "build", "rnnlm", "--set", "colour=red", "--out", "x.json"], "colour"),
    (["cluster", "show", "tpu-pod"], "unknown cluster 'tpu-pod'"),
    (["baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "nope"], "--method: invalid choice: 'nope'"),
    (["train", "--graph", "rnnlm", "--policy", "nope"], "--policy: invalid choice: 'nope' (choose from 'gnn'"),
    (["train", "--graph", "rnnlm", "--budget", "soon"], "not a duration: 'soon'"),
    (["compare", "--graphs", "rnnlm", "--clusters", "cpu-2", "--train-budget", "5s", "--rl", "lstm+sgd"],
     "unknown policy family 'lstm+sgd'"),
])
def test_errors_are_one_line(tmp_path, args, match):
    bad = tmp_path / "bad.json"
    bad.write_text("{bad")
    args = [str(bad) if a == "{bad" else str(cyclic_graph(tmp_path)) if a == "CYCLIC" else a for a in args]
    r = placer_in_process(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("placer: error: ") and match in lines[0], r.stderr


def test_baseline_then_export_json_and_torch(tmp_path):
    import torch

    placement = tmp_path / "p.json"
    r = placer("baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "expert", "--out", placement)
    assert r.returncode == 0, r.stderr
    assert json.loads(placement.read_text())["modules"]["layers.1"] == 1
    r = placer("export", placement, "--format", "json", "--out", tmp_path / "copy.json")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "copy.json").read_text()) == json.loads(placement.read_text())
    r = placer("export", placement, "--format", "torch", "--out", tmp_path / "p.pt")
    assert r.returncode == 0, r.stderr
    d = torch.load(tmp_path / "p.pt")
    assert d["modules"]["layers.0"] == "cpu:0" and d["modules"]["layers.1"] == "cpu:1"
    r = placer("export", tmp_path / "missing", "--out", tmp_path / "x.json")
    assert r.returncode == 2 and r.stderr.startswith("placer: error: cannot read placement file")


def test_compare_adds_one_column_per_policy_family_and_per_trained_run(tmp_path):
    runs = tmp_path / "runs"
    r = placer("train", "--graph", "rnnlm", "--cluster", "cpu-2", "--policy", "gnn", "--budget", "3s",
               "--max-updates", "2", "--runs-dir", runs, "--no-progress", "--run-name", "gnn_run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = placer("compare", "--graphs", "rnnlm", "--clusters", "cpu-2", "--methods", "single,expert",
               "--train-budget", "3s", "--rl", "seq2seq+reinforce,gnn+reinforce", "--policy-from", "gnn_run",
               "--runs-dir", runs, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.startswith("|"))
    for col in ("Single", "Expert", "RL", "RL:gnn+reinforce", "zero-shot:gnn_run"):
        assert f" {col} |" in header, header
    doc = json.loads(next(runs.glob("compare__*/compare.json")).read_text())
    assert doc["meta"]["train_budget_s"] == 3.0
    cells = doc["rows"][0]["cells"]
    assert all(cells[c]["status"] == "ok" for c in ("RL", "RL:gnn+reinforce", "zero-shot:gnn_run")), cells


def python_output(code: str) -> str:
    """The last line ``code`` prints in a fresh interpreter with this checkout on the path (it must exit 0)."""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_importing_the_cli_loads_neither_the_policies_nor_the_trainer():
    code = ("import sys, placer.app.cli; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch_geometric', 'policies', 'torch') or m.startswith('placer.app.train')); print(bad)")
    assert python_output(code) == "[]"
    r = placer("--help")
    assert r.returncode == 0 and "train" in r.stdout and "place" in r.stdout


def test_train_help_is_generated_from_the_configs_and_the_registries():
    from envs.rewards import BACKENDS
    from policies.registry import ALGOS, POLICIES

    r = placer("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    for flag in ("--budget DURATION", "--max-updates N", "--engine-timeout DURATION", "--warm-start-steps N",
                 "--failure-penalty X", "--torch-threads N", "--clip-range X", "--self-imitation-size N",
                 "--finish-dropout X", "--config CONFIG", "--no-progress"):
        assert flag in text, flag
    assert "{" + ",".join(sorted(POLICIES)) + "}" in text and "{" + ",".join(sorted(ALGOS)) + "}" in text
    assert "{" + ",".join(sorted(BACKENDS)) + "}" in text
    assert "At most this many groups per graph" in text  # TrainConfig.num_groups' docstring


@pytest.mark.parametrize("args, match", [
    (["--clip-range", "0.1"], "--clip-range is a hyper-parameter of ppo, not of --algo reinforce"),
    (["--policy", "gnn", "--algo", "ppo", "--baseline", "ema"], "--baseline is a hyper-parameter of reinforce"),
    (["--lr", "-1"], "lr must be positive"),
])
def test_train_refuses_inapplicable_hyperparameters_in_one_line(tmp_path, args, match):
    r = placer_in_process("train", "--graph", "rnnlm", "--runs-dir", tmp_path, *args, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("placer: error: ") and match in lines[0], \
        r.stderr
    assert not any(tmp_path.iterdir())  # refused before a run folder exists


def test_graph_build_and_show_say_how_the_step_was_traced(tmp_path):
    # a model whose reshape bakes in the batch size: both commands say it cannot be micro-batched, and where
    out = tmp_path / "hcb.json"
    r = placer("graph", "build", "tests.fixtures_models:hard_coded_batch", "--profile", "cpu", "--estimate", "none",
               "--out", out)
    assert r.returncode == 0, r.stderr
    assert "traced with: torch.fx (inside composite modules" in r.stdout and "kept whole: none" in r.stdout
    assert "micro-batchable: no: op 'view'" in r.stdout
    show = placer("graph", "show", out).stdout
    assert "micro-batchable" in show and "'view'" in show and "step loss" in show
    # a shipped graph built before these records says so instead of claiming the new tracer
    old = placer("graph", "show", "nmt").stdout
    assert "built before tracing went inside composite modules" in old and "micro-batchable" not in old
