"""The engine's typed worker commands (placer.engine.command) and process helpers (placer.engine.procs): one place
for the defaults, one-line errors, no process started."""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from placer.costmodel.task import Task
from placer.engine.command import (DEFAULT_LR, DEFAULT_OPTIMIZER, LoadCommand, MeasureCommand, StopCommand,
                                   check_optimizer)
from placer.engine.measurer import EngineConfig
from placer.engine.procs import free_port, is_oom, one_line


def command(**kw) -> MeasureCommand:
    base = dict(device_of_op=np.zeros(2, dtype=np.int64), tasks=[[Task(0, 0, "fwd"), Task(-1, -1, "update")]],
                steps=1, warmup=0)
    return MeasureCommand(**(base | kw))


def test_defaults_live_in_one_place():
    assert (DEFAULT_OPTIMIZER, DEFAULT_LR) == ("sgd", 0.01)
    cmd, cfg = command(), EngineConfig()
    assert (cmd.optimizer, cmd.lr) == (cfg.optimizer, cfg.lr) == (DEFAULT_OPTIMIZER, DEFAULT_LR)
    assert cmd.backend == "ops" and cmd.update and not cmd.collect and cmd.fault is None


def test_commands_are_frozen_and_pickle_with_their_tasks():
    cmd = command(microbatches=2, schedule="gpipe")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.steps = 3  # type: ignore[misc]
    back = pickle.loads(pickle.dumps(cmd))
    assert back.tasks == cmd.tasks and back.tasks[0][0].phase == "fwd" and back.tasks[0][0] == (0, 0, "fwd")
    assert pickle.loads(pickle.dumps(StopCommand())) == StopCommand()
    assert pickle.loads(pickle.dumps(LoadCommand(factory=int, op_names=("a",)))).op_names == ("a",)


@pytest.mark.parametrize("kw, match", [
    (dict(backend="nope"), "unknown engine backend 'nope'"),
    (dict(fault="boom"), "unknown fault 'boom'"),
    (dict(steps=0), "need steps >= 1"),
    (dict(warmup=-1), "warmup >= 0"),
    (dict(optimizer="lamb"), "optimizer must be one of sgd, adam, got 'lamb'"),
])
def test_bad_commands_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        command(**kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        EngineConfig(optimizer="lamb")
    check_optimizer("adam")


def test_process_helpers():
    assert one_line(ValueError("first line\nsecond")) == "ValueError: first line"
    assert len(one_line(RuntimeError("x" * 1000))) == 300
    failed = RuntimeError("view size is not compatible\n" + "y" * 1000)
    failed.add_note("at op 'view_14', micro-batch 0")  # the executor names the op that failed
    reason = one_line(failed)
    assert reason.startswith("RuntimeError: view size") and reason.endswith(" (at op 'view_14', micro-batch 0)")
    failed = RuntimeError("z" * 1000)
    failed.add_note("at op 'mm', micro-batch 3")
    assert len(one_line(failed)) == 300 and one_line(failed).endswith("(at op 'mm', micro-batch 3)")
    assert is_oom(MemoryError()) and is_oom(RuntimeError("CUDA out of memory")) and not is_oom(ValueError("no"))
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # still free


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_die_with_parent_kills_an_orphan():
    # parent starts a child that calls die_with_parent, then exits: the child must not survive it
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import os, time; from placer.engine.procs import die_with_parent; die_with_parent(os.getppid()); "
            "print(os.getpid(), flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
        print(child.stdout.readline().strip(), flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    pid = int(out.stdout.strip())
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail("the orphaned child outlived its parent")
