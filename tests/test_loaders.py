"""Loaders for trainers: ``apply`` (single-process model parallel) and ``pipeline_stages`` (pipelining)."""

from __future__ import annotations

import copy
import datetime
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from graphs.build import build_graph, rebuild_traced
from graphs.data import load_benchmark_graph
from graphs.trace import trace_model
from placer.baselines import place
from placer.core.cluster import get_cluster
from placer.io.document import load_placement, placement_to_json, save_placement
from placer.io.loaders import apply, pipeline_schedule, pipeline_stages, placed_devices, stage_modules
from placer.core.placement import Placement

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- apply


class TwoModules(nn.Module):
    """``b(relu(a(x)))`` squared and averaged: two parameterised modules, one functional op between them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))).pow(2).mean()


def two_modules():
    torch.manual_seed(0)
    return TwoModules(), torch.randn(16, 4)


@pytest.fixture
def two_doc(tmp_path):
    """Placement of TwoModules on cpu-2: ``a`` (and the input) on cpu:0, ``b`` and the loss on cpu:1."""
    model, x = two_modules()
    graph = trace_model(model, (x,), name="two").graph
    first_b = graph.module_paths.index("b")
    placement = Placement(np.array([0 if i < first_b else 1 for i in range(graph.n)]))
    path = save_placement(tmp_path / "two.json", graph, get_cluster("cpu-2"), placement, method="test")
    return path


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_apply_trains_like_unplaced(two_doc):
    assert load_placement(two_doc).doc["modules"] == {"a": 0, "b": 1}
    ref_model, x = two_modules()
    placed, _ = two_modules()
    assert apply(placed, two_doc) is placed  # chaining
    assert placed_devices(placed) == {"a": torch.device("cpu:0"), "b": torch.device("cpu:1")}
    ref, got = train(ref_model, x), train(placed, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[2] < ref[0]  # it trains


def test_apply_moves_parameters_and_inputs(two_doc):
    # "meta" is a real second device on a CPU-only machine: b's weights move there, and b's forward would
    # fail on a cpu input unless the pre-hook moved it too.
    model, x = two_modules()
    apply(model, two_doc, device_map={"cpu:1": "meta"})
    assert model.a.weight.device.type == "cpu" and model.b.weight.device.type == "meta"
    assert model(x).device.type == "meta"
    model, x = two_modules()
    apply(apply(model, two_doc, device_map={"cpu:1": "cpu"}), two_doc)  # again: replaces the hooks, no stacking
    assert len(model.b._forward_pre_hooks) == 1 and placed_devices(model)["b"] == torch.device("cpu:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_across_cpu_and_cuda(two_doc):
    ref_model, x = two_modules()
    placed, _ = two_modules()
    apply(placed, two_doc, device_map={"cpu:0": "cpu", "cpu:1": "cuda:0"})
    assert placed.a.weight.device.type == "cpu" and placed.b.weight.device == torch.device("cuda:0")
    np.testing.assert_allclose(train(placed, x), train(ref_model, x), rtol=1e-4)


def one_line_error(fn, *args, match, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_apply_errors(two_doc):
    doc = load_placement(two_doc).doc
    model, _ = two_modules()
    bad = copy.deepcopy(doc)
    bad["modules"]["c.inner"] = 1
    one_line_error(apply, model, bad, match=r"module 'c\.inner' is not in model TwoModules")
    bad = copy.deepcopy(doc)
    bad["devices"][1] = "cuda:3"
    if torch.cuda.device_count() <= 3:
        one_line_error(apply, model, bad, match=r"'cuda:3'.*does not exist here.*device_map")
    bad["devices"][1] = "gpu:0"
    one_line_error(apply, model, bad, match=r"'gpu:0'.*not a torch device name.*device_map")
    apply(model, bad, device_map={"gpu:0": "cpu"})  # the remedy the message suggests
    one_line_error(apply, model, doc, device_map={"cuda:0": "cpu"}, match=r"device_map names 'cuda:0'")
    one_line_error(apply, model, two_doc.parent / "missing.json", match="cannot read placement file")
    # another model whose module names overlap the placement's: a layer more is under no placed module
    bigger, _ = two_modules()
    bigger.extra = nn.Linear(2, 2)
    one_line_error(apply, bigger, doc, match=r"parameter 'extra\.weight' of TwoModules is under no module of the "
                   r"placement .*made for another model")
    # the parameters never moved when validation failed
    assert all(p.device.type == "cpu" for p in model.parameters())
    # a parameter of the root module itself (a ViT's position embedding) is under no module, yet the model's own:
    # it goes where the op reading it is placed
    with_root, _ = two_modules()
    with_root.pos = nn.Parameter(torch.zeros(2))
    rooted = copy.deepcopy(doc)
    rooted["ops"]["pos"] = 1
    apply(with_root, rooted, device_map={doc["devices"][0]: "cpu", doc["devices"][1]: "meta"})
    assert with_root.pos.device.type == "meta" and isinstance(with_root.pos, nn.Parameter)


# ---------------------------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def rnnlm():
    graph = load_benchmark_graph("rnnlm")
    doc = placement_to_json(graph, get_cluster("cpu-2"), Placement.single(graph), method="test",
                            schedule="gpipe", microbatches=2)
    return graph, doc


@pytest.fixture(scope="module")
def rnnlm_reference(rnnlm):
    """The traced small RNNLM with its single-process loss and gradients."""
    traced = rebuild_traced(rnnlm[0].meta)
    loss = traced.gm(*traced.example_inputs)
    loss.backward()
    return traced, loss.detach(), {n: p.grad.clone() for n, p in traced.gm.named_parameters()}


def with_cuts(graph, doc, cuts):
    """``doc`` with contiguous stages cut before each op index in ``cuts`` (colocation not enforced)."""
    bounds = [0, *cuts, graph.n]
    out = copy.deepcopy(doc)
    names = graph.op_names
    out["stages"] = [{"device": s % 2, "first_op": names[bounds[s]], "last_op": names[bounds[s + 1] - 1]}
                     for s in range(len(bounds) - 1)]
    return out


@pytest.mark.parametrize("cuts", [
    [23],                 # the middle: h, c, targets, the embedding and two losses cross
    [5],                  # right after layer 0's first cell: its (h, c) tuple crosses as two tensors
    [2, 5, 30],           # stage 0 holds only the inputs; values skip stages
    [1, 2, 3, 4, 40],     # single-op stages
])
def test_stage_modules_compose_to_the_model(rnnlm, rnnlm_reference, cuts):
    graph, doc = rnnlm
    traced, ref, ref_grads = rnnlm_reference
    traced.gm.zero_grad(set_to_none=True)
    stages = stage_modules(traced, with_cuts(graph, doc, cuts))
    assert len(stages) == len(cuts) + 1
    out = traced.example_inputs
    for stage in stages:
        out = stage(*out)
        if stage is not stages[-1]:
            assert isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)
    assert out.dim() == 0
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    out.backward()
    for name, p in traced.gm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-6, atol=1e-8)
    # each parameterised op's parameters belong to the stage that runs it
    first_layer = graph.op_names.index("layers_0")
    owner = stages[sum(c <= first_layer for c in cuts)]
    assert any(p is traced.gm.get_parameter("layers.0.weight_ih") for p in owner.parameters())


def test_stages_on_recomputing_devices_checkpoint_and_compute_the_same_step(rnnlm, rnnlm_reference):
    graph, doc = rnnlm
    traced, ref, ref_grads = rnnlm_reference
    traced.gm.zero_grad(set_to_none=True)
    cut = with_cuts(graph, doc, [5, 23])
    cut["schedule"] = {**cut["schedule"], "recompute": [0]}  # stages 0 and 2 are on device 0
    stages = stage_modules(traced, cut)
    assert [s.recompute for s in stages] == [True, False, True]
    out = traced.example_inputs
    for stage in stages:
        out = stage(*out)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    out.backward()
    for name, p in traced.gm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-6, atol=1e-8)


def test_stage_modules_of_an_nn_module(rnnlm):
    from graphs.models import build_model

    graph, doc = rnnlm
    model, inputs, _ = build_model("rnnlm", "small", seed=0)
    stages = stage_modules(model, with_cuts(graph, doc, [23]), example_inputs=inputs)
    out = stages[1](*stages[0](*inputs))
    torch.testing.assert_close(out, model(*inputs), rtol=1e-6, atol=0)
    one_line_error(stage_modules, model, with_cuts(graph, doc, [23]), match="need example_inputs")


class SizeModel(nn.Module):
    """Reads ``h.size(0)`` (a Python int under fx) and, under torch.export, its parameters via get_attr."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 3))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return (self.b(torch.relu(h)) * self.w).sum() / h.size(0) + y.float().mean()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_stage_modules_python_values_and_get_attr(method):
    torch.manual_seed(0)
    model, x, y = SizeModel(), torch.randn(8, 4), torch.randint(0, 5, (8,))
    traced = trace_model(model, (x, y), name="size", method=method)
    graph = traced.graph
    doc = placement_to_json(graph, get_cluster("cpu-2"), Placement.single(graph), method="test",
                            schedule="gpipe", microbatches=2)
    doc = with_cuts(graph, doc, [graph.op_names.index("relu")])
    ref = traced.gm(x, y)
    stages = stage_modules(traced, doc, microbatches=1)  # shapes of the whole batch
    torch.testing.assert_close(stages[1](*stages[0](x, y)), ref, rtol=1e-6, atol=0)
    # parameters go with the stage that uses them, also when the graph reads them with get_attr (export)
    assert sum(p.numel() for p in stages[0].parameters()) == 4 * 8 + 8
    assert sum(p.numel() for p in stages[1].parameters()) == 8 * 3 + 3 + 3
    if method == "fx":  # (an exported graph is specialised to the batch it was traced with)
        half = traced.gm(x[:4], y[:4])
        stages = stage_modules(traced, doc)  # micro-batches of 4
        torch.testing.assert_close(stages[1](*stages[0](x[:4], y[:4])), half, rtol=1e-6, atol=0)
        # fx computes h.size(0) after the sum: cut there, and the int 4 crosses as a constant
        cut = with_cuts(graph, doc, [graph.op_names.index("truediv")])
        stages = stage_modules(traced, cut)
        torch.testing.assert_close(stages[1](*stages[0](x[:4], y[:4])), half, rtol=1e-6, atol=0)
        one_line_error(lambda: stages[1](*stages[0](x, y)), match=r"stage 1 was built for .*size = 4")


def test_pipeline_stages_errors(rnnlm, rnnlm_reference):
    graph, doc = rnnlm
    traced = rnnlm_reference[0]
    gap = with_cuts(graph, doc, [23])
    gap["stages"][1]["first_op"] = graph.op_names[24]
    other = with_cuts(graph, doc, [23])
    other["ops"] = {f"x{i}": 0 for i in range(graph.n)}
    cases = [
        (lambda: pipeline_stages(traced, doc | {"stages": None}, 0), "no 'stages'.*not stage-contiguous"),
        (lambda: pipeline_stages(traced, with_cuts(graph, doc, [23]), 2), "rank 2 has no stage"),
        (lambda: pipeline_stages(traced, with_cuts(graph, doc, [23]), 0),
         r"parameter 'layers\.0\.\w+' is used by stages 0 and 1"),
        (lambda: stage_modules(traced, gap), "stage 1 .* does not continue stage 0"),
        (lambda: stage_modules(traced, other), "does not match the traced model"),
        (lambda: pipeline_stages(traced, with_cuts(graph, doc, [4]), 0), "not initialised"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value)  # one line


# ---------------------------------------------------------------------------------------------- 2 ranks


def expert_like_rnnlm(tmp_path: Path) -> tuple[Path, dict]:
    """One-step RNNLM (small, seq_len 1) split in two at the colocation-valid cut nearest the middle:
    embedding and LSTM layer 0 on cpu:0, layer 1, projection and softmax on cpu:1 (ColocRL's expert rule for two
    devices). With more time steps every cell module is called on both sides of any middle cut."""
    graph = build_graph("rnnlm", overrides={"seq_len": 1}, profile=None)
    cluster = get_cluster("cpu-2")
    coloc = graph.colocation

    def valid(k: int) -> bool:
        return all(len({i < k for i in np.flatnonzero(coloc == g)}) == 1 for g in np.unique(coloc))

    cut = min((k for k in range(1, graph.n) if valid(k)), key=lambda k: abs(k - graph.n // 2))
    placement = Placement(np.array([0] * cut + [1] * (graph.n - cut)))
    path = save_placement(tmp_path / "rnnlm-2stage.json", graph, cluster, placement, method="expert-like",
                          schedule="gpipe", microbatches=2)
    return path, graph.meta


def _pipeline_worker(rank: int, world: int, port: int, path: str, meta: dict, out_dir: str) -> None:
    """One rank: a GPipe and a 1F1B step; compare with the single-process step of an identical model."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for schedule_name in ("gpipe", "1f1b"):
            traced = rebuild_traced(meta)
            reference = rebuild_traced(meta)
            ref_loss = reference.gm(*reference.example_inputs)
            ref_loss.backward()
            ref_grads = {n: p.grad for n, p in reference.gm.named_parameters()}
            doc = json.loads(Path(path).read_text())
            doc["schedule"]["name"] = schedule_name
            stage = pipeline_stages(traced, doc, rank)
            sched = pipeline_schedule(stage, doc)
            names = {id(p): n for n, p in traced.gm.named_parameters()}
            inputs = traced.example_inputs
            losses: list[torch.Tensor] = []
            sched.step(*(inputs if stage.is_first else ()),
                       target=torch.zeros(inputs[0].shape[0]) if stage.is_last else None,
                       losses=losses if stage.is_last else None, return_outputs=False)
            owned = list(stage.submod.parameters())
            grad_err = max(float((p.grad - ref_grads[names[id(p)]]).abs().max()) for p in owned)
            results[schedule_name] = {
                "loss": float(torch.stack(losses).mean()) if losses else None,
                "microbatches": len(losses), "ref_loss": float(ref_loss), "grad_err": grad_err,
                "params": sorted(names[id(p)] for p in owned),
            }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_rank_pipeline_step_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    path, meta = expert_like_rnnlm(tmp_path)
    doc = load_placement(path).doc
    assert [s["device"] for s in doc["stages"]] == [0, 1]
    ctx = mp.start_processes(_pipeline_worker, args=(2, free_port(), str(path), meta, str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "2-rank pipeline step timed out"
    finally:
        for p in ctx.processes:  # no orphans, whatever happened
            if p.is_alive():
                p.kill()
            p.join()
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    for name in ("gpipe", "1f1b"):
        assert r0[name]["loss"] is None and r1[name]["microbatches"] == 2
        np.testing.assert_allclose(r1[name]["loss"], r1[name]["ref_loss"], rtol=1e-5)
        assert r0[name]["grad_err"] < 1e-6 and r1[name]["grad_err"] < 1e-6
        # expert-like: embedding and layer 0 on rank 0; layer 1 and the projection on rank 1
        assert {p.split(".")[0] for p in r0[name]["params"]} == {"embed", "layers"}
        assert all(p.startswith("layers.0.") for p in r0[name]["params"] if p.startswith("layers"))
        assert {p.split(".")[0] for p in r1[name]["params"]} == {"layers", "proj"}


# ---------------------------------------------------------------------------------------------- example


def test_example_trainer_apply_mode(tmp_path):
    from graphs.models import build_model

    graph, cluster = load_benchmark_graph("rnnlm"), get_cluster("cpu-2")
    path = save_placement(tmp_path / "placement.json", graph, cluster, place("expert", graph, cluster),
                          method="expert")
    script = ROOT / "examples" / "train_with_placement.py"
    run = subprocess.run([sys.executable, str(script), "--placement", str(path), "--mode", "apply", "--steps", "2"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "layers.0->cpu:0" in run.stdout and "layers.1->cpu:1" in run.stdout
    losses = [float(v) for v in re.findall(r"step \d+ loss ([0-9.]+)", run.stdout)]
    model, inputs, _ = build_model("rnnlm", "small", seed=0)
    assert len(losses) == 2 and losses[1] < losses[0]
    assert losses[0] == pytest.approx(model(*inputs).item(), abs=1e-5)
    # pipeline mode needs stages; the expert RNNLM placement interleaves layers in op order, so it has none
    run = subprocess.run([sys.executable, str(script), "--placement", str(path), "--mode", "pipeline"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode != 0 and "not stage-contiguous" in run.stderr and "Traceback" not in run.stderr


def test_one_stage_type_for_the_loaders_and_the_engine():
    # the trainers' loaders and the engine's pipelining backend build the same StageModule
    import placer.engine.pipelining as engine_pipelining
    from placer.engine.stages import StageModule as EngineStageModule
    from placer.io.loaders import StageModule

    assert StageModule is EngineStageModule
    assert engine_pipelining.split_stages.__module__ == "placer.engine.stages"
    assert not hasattr(engine_pipelining, "StageModule") or engine_pipelining.StageModule is StageModule
