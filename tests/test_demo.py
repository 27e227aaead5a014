"""The README's main command, end to end with a tiny budget: every promised file exists and parses."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_writes_every_file(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # gpt small (the default is gpt medium, minutes of measuring): the same steps in seconds
    r = subprocess.run([sys.executable, "-m", "placer.app.cli", "demo", "--graph", "gpt-small", "--budget", "4",
                        "--steps", "1", "--rounds", "2", "--microbatches", "2", "--runs-dir", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| Graph | Cluster |" in r.stdout and "| RL |" in r.stdout
    # the plans table: the winner measured beside Single and the even split, each under its best schedule (on
    # gpt small, steps of milliseconds, that is often none x1: the plan search's choice, not asserted here)
    assert "| Single | all on cpu:0 | none x1 |" in r.stdout and "| even split | even-layers |" in r.stdout
    assert "| winner: " in r.stdout
    # the simulator took today's op costs from a Single run on the workers; the export is for the shipped graph
    # (load_placement below checks its hash against the shipped gpt-small)
    assert "op costs of the day: ops sum to" in r.stdout
    assert "learning curve (" in r.stdout and "the last part's mean" in r.stdout
    (out,) = list(tmp_path.glob("demo__gpt-small__*"))
    summary = json.loads((out / "demo.json").read_text())
    files = {k: Path(v) for k, v in summary["files"].items()}
    for key in ("placement", "compare.md", "compare.csv", "timeline", "trace", "learning_curve", "plans"):
        assert key in files and files[key].exists(), key

    from graphs.data import load_benchmark_graph
    from placer.core.cluster import get_cluster
    from placer.io.document import load_placement

    loaded = load_placement(files["placement"], load_benchmark_graph("gpt-small"), get_cluster("cpu-2"))
    doc = loaded.doc
    # the demo calibrates cpu-2 first, so that the simulator it trains on describes these workers
    assert doc["measured"] is not None and doc["measured"]["source"] == "engine:cpu-2-calibrated"
    assert doc["measured"]["step_time_s"] > 0 and doc["predicted"]["step_time_s"] > 0
    rows = list(csv.DictReader(files["compare.csv"].open()))
    assert len(rows) == 1 and rows[0]["graph"] == "gpt-small"
    plans = {p["plan"].split(":")[0]: p for p in summary["plans"]}
    assert set(plans) == {"Single", "even split", "winner"}
    for p in plans.values():
        assert len(p["real_rounds_s"]) == 2 and p["real_s"] > 0 and p["sim_s"] > 0
    assert doc["schedule"]["name"] == summary["best_schedule"]
    for png in (files["timeline"], files["learning_curve"]):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads(files["trace"].read_text())
    assert trace["traceEvents"]
    run_dir = files["train_run"]
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "config.json").exists()
