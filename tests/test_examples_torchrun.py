"""``examples/train_with_placement.py --mode pipeline`` under torchrun as two "nodes" of this machine (issue #20).

Two ``torchrun`` processes (``--nnodes 2 --nproc-per-node 1``, node ranks 0 and 1, rendezvous on 127.0.0.1 at a
free port) train gpt ``small`` from a two-stage placement JSON with torch.distributed.pipelining; the losses
rank 0 prints must be single-process training's (same seed, same SGD). Time-bounded: both process groups are
killed on timeout, so no process outlives the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from graphs.data import load_benchmark_graph
from graphs.models import build_model
from placer.core.cluster import get_cluster
from placer.core.placement import Placement
from placer.engine.procs import free_port
from placer.io.document import save_placement
from placer.io.parts import split_after

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_with_placement.py"
TIMEOUT_S = 50.0
STEPS, LR = 2, 0.1


def single_process_losses(steps: int, lr: float) -> list[float]:
    """gpt small trained in this process: the reference the pipeline must reproduce."""
    model, inputs, _ = build_model("gpt", "small", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(*inputs)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def run_two_nodes(placement: Path, cwd: Path) -> list[subprocess.CompletedProcess]:
    """Node ranks 0 and 1, one process each; both killed (whole process groups) after :data:`TIMEOUT_S`."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(SCRIPT), "--placement", str(placement), "--mode", "pipeline", "--steps", str(STEPS),
               "--lr", str(LR)]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, start_new_session=True))
    deadline = time.monotonic() + TIMEOUT_S
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"two-node torchrun did not finish within {TIMEOUT_S:g} s")
    finally:
        for p in procs:  # the launcher and its worker share the session: kill the whole group
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
    return done


@pytest.mark.parametrize("schedule, cuts, owns", [
    ("1f1b", ("blocks.0",), "stage 0 owns tok_emb, pos_emb, blocks.0; stage 1 owns blocks.1, ln_f, head, loss"),
    # four stages going round the two nodes (virtual stages): the interleaved plan placer searches, as torch runs it
    ("interleaved-1f1b", ("pos_emb", "blocks.0", "blocks.1"),
     "stage 0 owns tok_emb, pos_emb; stage 1 owns blocks.0; stage 2 owns blocks.1; stage 3 owns ln_f, head, loss"),
])
def test_gpt_trains_on_two_torchrun_nodes_like_one_process(tmp_path, schedule, cuts, owns):
    graph, cluster = load_benchmark_graph("gpt-small"), get_cluster("cpu-2")
    stages = split_after(graph, *cuts)  # stage k on device k
    placement = Placement(stages.device_of_op % cluster.num_devices)
    # integer token ids enter stage 0 (torch 2.13 hung there until PipelineStage got input_args/output_args)
    path = save_placement(tmp_path / "gpt.json", graph, cluster, placement, method="test", schedule=schedule,
                          microbatches=4)
    node0, node1 = run_two_nodes(path, tmp_path)
    for node in (node0, node1):
        assert node.returncode == 0, node.stderr[-3000:]
    assert f"{len(cuts) + 1} stages, {schedule} with 4 micro-batches" in node0.stdout
    assert owns in node0.stdout
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", node0.stdout)]
    reference = single_process_losses(STEPS, LR)
    assert len(losses) == STEPS
    assert losses == pytest.approx(reference, rel=1e-5)  # step 1's loss also checks step 0's gradients
    assert losses[1] < losses[0]
