"""Run folders as users chain them: a fresh run of a user's model feeds ``placer run``, ``show`` and ``export`` with
no extra flags; run folders never collide; the best placement on disk never gets worse; the summaries label
every number's source."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.test_cli import placer


@pytest.fixture(scope="module")
def user_run(tmp_path_factory) -> Path:
    """A fresh run folder of a graph built from a user factory (``tests.fixtures_models:mlp``)."""
    work = tmp_path_factory.mktemp("user_run")
    r = placer("graph", "build", "tests.fixtures_models:mlp", "--profile", "cpu", "--estimate", "none",
               "--out", work / "mlp.json", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "traced with: torch.fx" in r.stdout  # graph build says which tracer ran
    r = placer("train", "--graph", work / "mlp.json", "--cluster", "cpu-2", "--budget", "30s", "--max-updates", "2",
               "--baselines", "single,expert", "--no-progress", "--runs-dir", work / "runs", "--run-name", "mlp_run",
               cwd=work)
    assert r.returncode == 0, r.stderr
    run = work / "runs" / "mlp_run"
    (work / "mlp.json").unlink()  # the run folder alone must be enough
    return run


def test_run_show_and_export_take_a_fresh_run_folder_with_no_extra_flags(user_run, tmp_path):
    for target in (user_run, user_run / "placement.json"):
        r = placer("show", target, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("mlp on cpu-2: rl:seq2seq+reinforce: step ") and "(sim)" in r.stdout
        r = placer("run", target, "--steps", "2", "--warmup", "1", "--timeline", tmp_path / "t.png", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "measured step" in r.stdout and (tmp_path / "t.png").exists()
        r = placer("export", target, "--out", tmp_path / "exported.json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        exported = json.loads((tmp_path / "exported.json").read_text())
        assert exported == json.loads((user_run / "placement.json").read_text())


def test_a_placement_copied_out_finds_its_graph_beside_it_or_asks_for_it(user_run, tmp_path):
    shutil.copy(user_run / "placement.json", tmp_path / "p.json")
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)  # no graph.json, no shipped 'mlp', no cluster.json
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "p.json: made for graph 'mlp'" in lines[0] and "pass --graph" in lines[0]
    (tmp_path / "notes.json").write_text('{"not": "a graph"}')
    shutil.copy(user_run / "graph.json", tmp_path / "g.json")  # any name, as `placer baseline --graph g.json` has it
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("mlp on cpu-2"), r.stderr
    (tmp_path / "g.json").rename(tmp_path / "mlp.json")  # <name>.json beside it
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("mlp on cpu-2"), r.stderr
    r = placer("show", tmp_path / "p.json", "--graph", user_run / "graph.json", "--cluster", "cpu-2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_shipped_graphs_placement_is_found_by_name_and_a_calibrated_cluster_beside_it(tmp_path):
    r = placer("baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "expert", "--out",
               tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("rnnlm-small on cpu-2"), r.stderr
    doc = json.loads((tmp_path / "p.json").read_text())
    doc["cluster"] = "cpu-2-calibrated"  # what a run with --reward sim+real writes; not a preset
    (tmp_path / "p.json").write_text(json.dumps(doc))
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 2 and "made for cluster 'cpu-2-calibrated'" in r.stderr, r.stderr
    import dataclasses

    from placer.core.cluster import get_cluster

    dataclasses.replace(get_cluster("cpu-2"), name="cpu-2-calibrated").save(tmp_path / "cluster.json")
    r = placer("show", tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("rnnlm-small on cpu-2-calibrated"), r.stderr


def test_a_multi_graph_run_folder_asks_which_placement(tmp_path):
    (tmp_path / "placement_a.json").write_text("{}")
    (tmp_path / "placement_b.json").write_text("{}")
    r = placer("show", tmp_path, cwd=tmp_path)
    assert r.returncode == 2 and "placement_a.json, placement_b.json" in r.stderr, r.stderr
    r = placer("run", tmp_path / "placement_a.json", cwd=tmp_path)
    assert r.returncode == 2 and "is not a placement JSON" in r.stderr and "placement_a.json" in r.stderr


def test_run_folders_started_together_never_collide(tmp_path):
    from placer.app.runs import new_run_dir

    made, errors = [], []

    def start():
        try:
            made.append(new_run_dir(tmp_path / "runs", "same-second"))
        except Exception as e:  # noqa: BLE001 - the test reports any
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(made) == 12 and len({p.name for p in made}) == 12
    assert all(p.is_dir() for p in made)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot create a run folder under .*file"):
        new_run_dir(tmp_path / "file", "run")


def test_a_resumed_run_never_makes_the_placement_on_disk_worse(tmp_path, caplog):
    from placer.app.train import TrainConfig, train
    from tests.test_train import tiny

    first = train(tiny(tmp_path, max_updates=2))
    path = first.run_dir / "placement.json"
    doc = json.loads(path.read_text())
    # a better placement written just before a kill, after the last checkpoint
    doc["predicted"]["step_time_s"] = better_s = first.predicted.step_time_s / 10
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING):
        resumed = train(TrainConfig(resume=first.run_dir.name, runs_dir=str(tmp_path), max_updates=3,
                                    progress=False, checkpoint_every_s=0.0))
    assert json.loads(path.read_text())["predicted"]["step_time_s"] == better_s
    assert resumed.kept_on_disk and "placement.json keeps its" in resumed.kept_on_disk
    assert any("placement.json keeps its" in r.message for r in caplog.records)
    # a worse one on disk is replaced as before
    doc["predicted"]["step_time_s"] = first.predicted.step_time_s * 10
    path.write_text(json.dumps(doc))
    again = train(TrainConfig(resume=first.run_dir.name, runs_dir=str(tmp_path), max_updates=4, progress=False,
                              checkpoint_every_s=0.0))
    assert json.loads(path.read_text())["predicted"]["step_time_s"] == pytest.approx(again.predicted.step_time_s)
    assert again.kept_on_disk is None


def test_an_unreadable_checkpoint_is_one_line_and_a_failed_resume_changes_nothing(tmp_path):
    from placer.app.place import place_zero_shot
    from placer.app.train import TrainConfig, train
    from tests.test_train import tiny

    first = train(tiny(tmp_path, max_updates=1))
    ckpt = first.run_dir / "checkpoint.pt"
    for junk in (b"", b"not a pickle", ckpt.read_bytes()[:100], b"\x80\x04K\x05."):  # empty, junk, cut, an int
        ckpt.write_bytes(junk)
        before = {p.name: p.read_bytes() for p in first.run_dir.iterdir() if p.is_file()}
        with pytest.raises(ValueError, match="checkpoint.pt: not a (readable|placer) checkpoint"):
            train(TrainConfig(resume=first.run_dir.name, runs_dir=str(tmp_path), max_updates=5, budget_s=99.0,
                              progress=False))
        after = {p.name: p.read_bytes() for p in first.run_dir.iterdir() if p.is_file()}
        assert after == before  # config.json (budget, max_updates) included: the run is as it was
        with pytest.raises(ValueError, match="checkpoint.pt: not a (readable|placer) checkpoint"):
            place_zero_shot(first.run_dir.name, "rnnlm", "cpu-2", runs_dir=tmp_path)
    (first.run_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: not a run config"):
        place_zero_shot(first.run_dir.name, "rnnlm", "cpu-2", runs_dir=tmp_path)


def _summary(measured=None, failed=0, refined=None):
    from placer.core.result import StepResult

    def result(t, source):
        return StepResult(step_time_s=t, source=source, devices=("cpu:0",), busy_s=np.array([t]),
                          peak_memory_bytes=np.zeros(1), bytes_moved=np.zeros(1))

    out = SimpleNamespace(predicted=result(1.078, "sim"), measured=measured and result(measured, "engine"),
                          baselines={"expert": 0.9, "single": 1.2, "scotch": float("inf")},
                          reference_step_time_s=0.9, failed_measurements=failed, kept_on_disk=None, refined=refined,
                          history=[{"mean_step_time_s": m, "best_step_time_s": 1.078}
                                   for m in (1.5, 1.5, 1.4, 1.4, 1.3, 1.3, 1.2, 1.2, 1.1, 1.1)])
    return SimpleNamespace(only=out, samples=64, updates=8, elapsed_s=95.0, trained_s=90.0, wall_s=150.0,
                           setup_s=40.0, outside_s=20.0, run_dir=Path("runs/x"))


def test_train_summary_compares_like_with_like_and_labels_every_number(capsys):
    from placer.app.cli_train import print_train_summary

    print_train_summary(_summary(measured=0.6248, failed=2), budget_s=90.0)
    text = capsys.readouterr().out
    lines = text.splitlines()
    listed = [line for line in lines if line.startswith("  ")]
    # the RL row among the baselines is its simulated time, in order; the engine's number is its own line
    assert [line.split(":")[0].strip() for line in listed] == ["expert", "RL (this run)", "single", "scotch"]
    assert all(line.endswith("(sim)") for line in listed)
    assert "1078.00 ms (sim)" in text and "624.80 ms (engine, median)" in text
    assert "the baselines were not measured" in text
    assert "2 engine measurement(s) failed" in text
    assert "in 90 s (the budget, 90 s, bounds this); the command took 150 s: 40 s before training" in text
    assert "20 s outside the budget (baselines, refinement, final engine re-measurement" in text
    # the learning curve in one line: the per-update mean by fifths, and how far its end is from the best
    assert ("learning curve (10 updates in 5 parts): mean step 1.5, 1.4, 1.3, 1.2, 1.1 s; best 1.078 s, the last "
            "part's mean 2.0% above it") in text
    # a refined plan is the planner's row; the policy's own best is its own row
    refined = SimpleNamespace(policy_step_s=1.5, evaluations=42, source="refined from heft")
    print_train_summary(_summary(measured=None, failed=0, refined=refined), budget_s=90.0, refine_s=30.0)
    text = capsys.readouterr().out
    listed = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  ")]
    assert listed == ["expert", "RL + refinement", "single", "RL alone", "scotch"]
    assert "refinement (30 s, 42 plans scored): refined from heft; the plan: none x1" in text
    print_train_summary(_summary(measured=None, failed=0), budget_s=90.0, refine_s=30.0)
    assert "refinement (30 s): nothing faster than the run's best" in capsys.readouterr().out


def test_failed_remeasurements_are_warned_and_counted(caplog):
    from placer.app.training.callbacks import Remeasure
    from placer.core.result import StepResult

    ok = StepResult(step_time_s=0.5, source="engine", devices=("cpu:0",), busy_s=np.array([0.5]),
                    peak_memory_bytes=np.zeros(1), bytes_moved=np.zeros(1))
    bad = StepResult.failed("worker 1 timed out", source="engine", devices=("cpu:0",))
    sim = SimpleNamespace(step_time_s=0.4)
    top = [SimpleNamespace(real=bad, sim=sim, device_of_group=[0]), SimpleNamespace(real=ok, sim=sim,
                                                                                     device_of_group=[1])]
    slot = SimpleNamespace(env=SimpleNamespace(backend=SimpleNamespace(remeasure_top=lambda k, rounds: top)),
                           tag="", measured=None, measured_groups=None, graph=SimpleNamespace(name="g"))
    trainer = SimpleNamespace(writer=SimpleNamespace(add_scalar=lambda *a: None), samples=8, elapsed=lambda: 1.0)
    cb = Remeasure(top_k=2, every_s=0.0)
    with caplog.at_level(logging.WARNING):
        cb._remeasure(trainer, slot, final=True)
        cb._remeasure(trainer, slot, final=True)
    assert cb.failures == 2 and slot.measured is ok
    assert any("1 of 2 engine re-measurements failed (worker 1 timed out)" in r.message for r in caplog.records)
    restored = Remeasure(top_k=2, every_s=0.0)
    restored.load_state_dict(slot, cb.state_dict(slot))
    assert restored.failures == 2


def test_progress_off_a_terminal_is_plain_lines(capsys):
    from placer.app.runs import Progress

    bar = Progress(True, budget_s=60.0, done_s=0.0)  # pytest's captured stdout is not a terminal
    assert bar.bar is None and bar.plain
    bar.update(12.0, "best 0.001234 s | 50 samples/s | update 3")
    bar.close()
    out = capsys.readouterr().out
    assert out == "training 12/60 s: best 0.001234 s | 50 samples/s | update 3\n"


def test_piped_output_is_wide_and_plain(tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_cli import ROOT

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    r = subprocess.run([sys.executable, "-m", "placer.app.cli", "graph", "show", "nmt", "--top", "3"], cwd=tmp_path,
                       env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and "\x1b[" not in r.stdout  # nothing cut, no colour codes in a pipe
    assert max(map(len, r.stdout.splitlines())) > 80  # the summary table is not squeezed to 80 columns
    assert "{'" not in r.stdout  # the source in words, not a Python dict
    assert "benchmark nmt, config small" in r.stdout and "output.mean()" in r.stdout  # the loss default


def test_graph_show_imports_no_torch():
    from tests.test_cli import python_output

    code = ("import sys; from placer.app.cli import main; rc = main(['graph', 'show', 'nmt', '--top', '2']); "
            "print('RESULT', rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_geometric')))")
    assert python_output(code) == "RESULT 0 []"  # benchmarks/bench_cli.py: well under 1.5 s


def test_sigterm_stops_a_training_run_like_ctrl_c_keeping_what_it_learned(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.test_cli import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "placer.app.cli", "train", "--graph", "rnnlm", "--budget", "120",
                             "--no-progress", "--runs-dir", str(tmp_path), "--run-name", "t"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "t"
    deadline = time.monotonic() + 60
    while not list(run.glob("events.out.tfevents.*")) and time.monotonic() < deadline:  # training has started
        time.sleep(0.2)
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)  # what `kill` and job schedulers send
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "placer: terminated", err
    assert (run / "checkpoint.pt").exists() and (run / "placement.json").exists()
    r = placer("export", run, "--out", tmp_path / "p.json", cwd=tmp_path)  # the folder is usable
    assert r.returncode == 0, r.stderr
