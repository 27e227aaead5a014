"""Bad input, class by class, several inputs each: every case is one ``placer: error:`` line naming what it is
about, exit status 2, no traceback, and nothing (half-)written left behind."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.test_cli import placer, placer_in_process


def one_line_error(r, *needles: str) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("placer: error: "), r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def placement(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("placement")
    r = placer("baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "expert", "--out",
               work / "p.json", cwd=work)
    assert r.returncode == 0, r.stderr
    return work / "p.json"


def bad_outputs(tmp_path: Path) -> list[tuple[Path | str, str]]:
    """(unwritable output path, what the message says about it): an existing folder, paths under a file, a device
    (an atomic write would replace /dev/full by a plain file), a folder no file can be created in."""
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    cases = [(tmp_path / "a_folder", "not a regular file"), (tmp_path / "a_file" / "x.json", "is a file"),
             (tmp_path / "a_file" / "sub" / "x.json", "is a file"), (Path("/dev/full"), "not a regular file"),
             (Path("/proc/placer-out/x.json"), "cannot create a file in /proc"),
             ("", "give a file path"), ("-", "give a file path")]  # not standard output: refused, no file "-"
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        cases.append((ro / "x.json", "cannot create a file in"))
    return cases


@pytest.mark.parametrize("command", ["baseline", "export-json", "export-torch", "graph-build", "show-timeline",
                                     "run-timeline", "place"])
def test_unwritable_outputs_are_refused_up_front(tmp_path, placement, command):
    for k, (out, why) in enumerate(bad_outputs(tmp_path)):
        args = {"baseline": ["baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "single", "--out", out],
                "export-json": ["export", placement, "--out", out],
                "export-torch": ["export", placement, "--format", "torch", "--out", out],
                "graph-build": ["graph", "build", "tests.fixtures_models:mlp", "--profile", "none", "--out", out],
                "show-timeline": ["show", placement, "--timeline", out],
                "run-timeline": ["run", placement, "--timeline", out],
                "place": ["place", "--policy-from", "nosuch", "--graph", "rnnlm", "--cluster", "cpu-2", "--out", out]
                }[command]
        before = listing(tmp_path)
        r = (placer if k == 0 else placer_in_process)(*args, cwd=tmp_path)  # the script once, then in-process
        one_line_error(r, str(out), why)
        assert listing(tmp_path) == before, command
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # still the device


def test_unusable_runs_folders_are_refused_before_anything_runs(tmp_path):
    (tmp_path / "a_file").write_text("x")
    cases = [(tmp_path / "a_file", "is not a folder"), (tmp_path / "a_file" / "runs", "is a file"),
             (Path("/dev/full"), "is not a folder"), (Path("/proc/placer-runs"), "cannot create a file in /proc"),
             ("", "is an empty path")]
    for runs_dir, why in cases:
        for args in (["train", "--graph", "rnnlm", "--budget", "5s"],
                     ["compare", "--graphs", "rnnlm", "--clusters", "cpu-2", "--methods", "single"],
                     ["demo", "--graph", "rnnlm", "--no-real", "--budget", "5s"]):
            before = listing(tmp_path)
            r = placer_in_process(*args, "--runs-dir", runs_dir, cwd=tmp_path)
            one_line_error(r, str(runs_dir), why)
            assert listing(tmp_path) == before


@pytest.mark.parametrize("args, match", [
    (["train", "--graph", "rnnlm", "--budget=infs"], "not a duration: 'infs'"),
    (["train", "--graph", "rnnlm", "--budget", "nan"], "not a duration: 'nan'"),
    (["train", "--graph", "rnnlm", "--budget", "-1"], "not a duration: '-1'"),
    (["train", "--graph", "rnnlm", "--budget", "0s"], "budget must be positive"),
    (["train", "--graph", "rnnlm", "--microbatches", "0"], "microbatches must be a whole number >= 1, got 0"),
    (["train", "--graph", "rnnlm", "--max-updates", "-3"], "max_updates must be a whole number >= 1"),
    (["train", "--graph", "rnnlm", "--num-groups", "0"], "num_groups must be a whole number >= 1"),
    (["train", "--graph", "rnnlm", "--failure-penalty=-inf"], "'-inf' is not a finite number"),
    (["train", "--graph", "rnnlm", "--engine-timeout", "inf"], "not a duration: 'inf'"),
    (["train", "--graph", "rnnlm", "--top-k-real", "0"], "top_k_real must be a whole number >= 1"),
    (["train", "--graph", "rnnlm", "--lr", "nan"], "'nan' is not a finite number"),
    (["train", "--graph", "rnnlm", "--torch-threads", "1000000"], "torch_threads must be at most 1024"),
    (["train", "--graph", "rnnlm", "--baselines", "single,zzz"], "unknown baseline(s) 'zzz'; choose from"),
    (["train", "--graph", "rnnlm", "--run-name", "../escape"], "run name '../escape' must be a folder name"),
    (["run", "PLACEMENT", "--microbatches", "0"], "--microbatches: 0 is below the smallest allowed value, 1"),
    (["run", "PLACEMENT", "--steps", "-1"], "--steps: -1 is below"),
    (["run", "PLACEMENT", "--warmup", "-1"], "--warmup: -1 is below"),
    (["run", "PLACEMENT", "--timeout", "inf"], "not a duration: 'inf'"),
    (["run", "PLACEMENT", "--timeout", "0"], "--timeout must be positive"),
    (["baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "single", "--microbatches", "-2"],
     "--microbatches: -2 is below"),
    (["baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "single", "--schedule", "gpipe",
      "--microbatches", "16"], "rnnlm-small has a batch of 8, which does not split into 16 equal micro-batches"),
    (["baseline", "--graph", "rnnlm", "--cluster", "cpu-2", "--method", "single", "--schedule", "gpipe",
      "--microbatches", "1000000000"], "1000000000 micro-batches: at most 65536 per step"),
    (["graph", "show", "rnnlm", "--groups", "0"], "--groups: 0 is below"),
    (["graph", "build", "rnnlm", "--estimate", "H100,TPU", "--out", "g.json"], "--estimate: unknown GPU(s) TPU"),
    (["graph", "build", "tests.fixtures_models:mlp", "--batch", "0", "--out", "g.json"], "--batch: 0 is below"),
    (["demo", "--graph", "rnnlm", "--budget", "0"], "--budget must be positive"),
    (["compare", "--graphs", "rnnlm", "--clusters", "cpu-2", "--microbatches", "0"], "--microbatches: 0 is below"),
    (["compare", "--graphs", ",", "--clusters", "cpu-2"], "--graphs names nothing to compare"),
    (["cluster", "calibrate", "--devices", "64", "--out", "c.json"], "--devices 64 x --threads 1 needs 64 cores"),
    (["cluster", "calibrate", "--devices", "1", "--out", "c.json"], "--devices: 1 is below"),
])
def test_out_of_range_and_non_finite_numbers_are_refused(tmp_path, placement, args, match):
    args = [str(placement) if a == "PLACEMENT" else a for a in args]
    one_line_error(placer_in_process(*args, cwd=tmp_path), match)
    assert listing(tmp_path) == set()  # no run folder, no runs/ folder, no output file


def test_a_graph_with_a_non_finite_op_cost_is_refused(tmp_path):
    from graphs.data import load_benchmark_graph

    for bad, why in ((float("inf"), "has an infinite fwd_s on 'cpu'"), (float("nan"), "has negative or NaN fwd_s"),
                     (-1.0, "has negative or NaN fwd_s")):
        d = load_benchmark_graph("rnnlm").to_json()
        d["costs"]["cpu"]["fwd_s"][3] = bad
        d.pop("hash", None)
        path = tmp_path / "g.json"
        path.write_text(json.dumps(d))  # Infinity / NaN: what json.dumps writes for them
        for args in (["graph", "show", path], ["baseline", "--graph", path, "--cluster", "cpu-2", "--method", "heft"]):
            line = one_line_error(placer(*args, cwd=tmp_path), "g.json", why)
            assert f"op '{d['ops']['name'][3]}'" in line  # names the op, not only the file


def test_refused_runs_leave_no_run_folder(tmp_path):
    runs = tmp_path / "runs"
    for args, match in ((["--policy-options", "nonsense=1"], "does not take policy_options nonsense"),
                        (["--graphs", "nmt", "--warm-start", "heft"], "trains with the sim reward and no warm start"),
                        (["--refine", "10s", "--reward", "real"], "refine_s needs reward 'sim'")):
        r = placer_in_process("train", "--graph", "rnnlm", "--budget", "5s", "--runs-dir", runs, "--no-progress", *args,
                   cwd=tmp_path)
        one_line_error(r, match)
        assert not runs.exists()
    r = placer_in_process("compare", "--graphs", "rnnlm", "--clusters", "cpu-2", "--methods", "single,nosuch",
                          "--runs-dir", runs, cwd=tmp_path)
    one_line_error(r, "unknown placement method 'nosuch'")
    assert not runs.exists()


def test_messages_name_the_file_they_are_about(tmp_path, placement):
    run = tmp_path / "run"
    run.mkdir()
    for text, match in (('{"graph": "rnnlm",', "is not valid JSON"), ("[1, 2]", "not a training config"),
                        ('{"graph": "rnnlm", "budget_s": "soon"}', "budget_s must be a finite number"),
                        ('{"graph": "rnnlm", "algo_config": {}, "colour": 1}',
                         "unknown training config field(s): colour")):
        (run / "config.json").write_text(text)
        line = one_line_error(placer_in_process("train", "--resume", run, cwd=tmp_path), match)
        assert f"{run / 'config.json'}" in line, line  # the file the message is about
    doc = json.loads(placement.read_text())
    doc.pop("graph")
    (tmp_path / "nograph.json").write_text(json.dumps(doc))
    for command in ("run", "show", "export"):
        extra = ["--out", tmp_path / "x.json"] if command == "export" else []
        one_line_error(placer_in_process(command, tmp_path / "nograph.json", *extra, cwd=tmp_path), "nograph.json",
                       "'graph' is a required property")
    (tmp_path / "result.json").write_text('{"step_time_s": 1.0}')
    one_line_error(placer_in_process("show", tmp_path / "result.json", cwd=tmp_path),
                   "result.json: a step result without its field 'source'")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    for args in (["show", tmp_path / "deep.json"], ["graph", "show", tmp_path / "deep.json"]):
        one_line_error(placer_in_process(*args, cwd=tmp_path), "deep.json", "nested too deeply")
    one_line_error(placer_in_process("run", tmp_path, cwd=tmp_path), str(tmp_path), "without a placement.json")


def test_a_worker_hung_at_start_up_honours_run_timeout(tmp_path):
    import time

    r = placer("graph", "build", "tests.fixtures_hang:mlp", "--profile", "cpu", "--estimate", "none", "--out",
               tmp_path / "built.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "built.json").read_text())
    doc["meta"]["source"]["factory"] = "tests.fixtures_hang:hang"  # what the workers call at start-up
    doc.pop("hash")
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    r = placer("baseline", "--graph", tmp_path / "graph.json", "--cluster", "cpu-2", "--method", "single", "--out",
               tmp_path / "p.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t0 = time.monotonic()
    r = placer("run", tmp_path / "p.json", "--timeout", "5s", cwd=tmp_path)
    assert time.monotonic() - t0 < 60  # was 182 s with --timeout 20: start-up waited its own 180 s
    one_line_error(r, "measurement failed", "within 5 s")


def test_metis_c_library_prints_nothing_to_the_output(tmp_path):
    r = placer("baseline", "--graph", "rnnlm-paper", "--cluster", "cpu+4gpu", "--method", "metis", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "***" not in r.stdout + r.stderr and r.stdout.startswith("metis on cpu+4gpu: step ")


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import errno

    import torch

    from graphs.jsonio import write_json_atomic
    from placer.app.runs import save_torch_atomic

    def disk_full(self, *args, **kwargs):  # half the file is written, then the disk is full
        with open(self, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    (tmp_path / "p.json").write_text('{"old": 1}\n')
    torch.save({"old": 1}, tmp_path / "c.pt")
    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_json_atomic(tmp_path / "p.json", {"new": 2})
    monkeypatch.setattr(torch, "save", lambda obj, path: disk_full(path))
    with pytest.raises(OSError, match="No space left"):
        save_torch_atomic({"new": 2}, tmp_path / "c.pt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "p.json"]  # no temporary left
    assert json.loads((tmp_path / "p.json").read_text()) == {"old": 1}
    assert torch.load(tmp_path / "c.pt") == {"old": 1}


def test_outputs_are_written_through_symbolic_links(tmp_path, placement):
    import torch

    from graphs.jsonio import write_json_atomic
    from placer.app.runs import save_torch_atomic

    for name, write, read in (("p.json", lambda p: write_json_atomic(p, {"new": 2}),
                               lambda p: json.loads(p.read_text())),
                              ("c.pt", lambda p: save_torch_atomic({"new": 2}, p), torch.load)):
        target, link = tmp_path / "data" / name, tmp_path / f"link_{name}"
        target.parent.mkdir(exist_ok=True)
        target.write_text("old")
        link.symlink_to(target)
        write(link)
        assert link.is_symlink() and read(target) == {"new": 2}  # the link still points to the file it wrote
    out_link = tmp_path / "out.json"
    out_link.symlink_to(tmp_path / "data" / "exported.json")  # dangling: the export creates its target
    r = placer("export", placement, "--out", out_link, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out_link.is_symlink() and json.loads((tmp_path / "data" / "exported.json").read_text())
