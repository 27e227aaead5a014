"""Transformers on the engine: ``nn.Transformer`` and Hugging Face GPT-2, Llama and BERT built from tiny configs (no
weights, nothing downloaded) trace, place, run gpipe and 1f1b at 4 micro-batches with the loss and gradients of
single-process training, and re-load with :func:`placer.io.loaders.apply`.

Hugging Face models need ``transformers`` (the ``test`` extra); without it those tests skip.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # `tests.` factories

from graphs.build import build_graph, rebuild_traced  # noqa: E402
from graphs.batch import batched_tensors, split_inputs  # noqa: E402
from placer.core.cluster import get_cluster  # noqa: E402
from placer.core.placement import Placement  # noqa: E402
from placer.engine import EngineConfig, Measurer, reference_step  # noqa: E402
from placer.io.document import placement_to_json, save_placement  # noqa: E402
from placer.io.loaders import apply, placed_devices, stage_modules  # noqa: E402
from tests import fixtures_models as fm  # noqa: E402
from tests import fixtures_state as fst  # noqa: E402
from tests import fixtures_steps as fs  # noqa: E402

pytestmark = pytest.mark.slow

CPU2 = get_cluster("cpu-2")
MICROBATCHES = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _needs(name: str) -> None:
    if name.startswith("hf_"):
        pytest.importorskip("transformers")


_GRAPHS: dict[str, object] = {}


def _graph(name: str, method: str = "auto"):
    """The factory's graph; ``method="export"`` forces the torch.export fallback (rebuilt the same way by the
    engine's workers, from the graph's meta)."""
    if (name, method) not in _GRAPHS:
        module = next(m for m in (fs, fst, fm) if hasattr(m, name)).__name__
        source = f"{module}:{name}"
        _GRAPHS[name, method] = build_graph(source, profile=None) if method == "auto" else rebuild_traced(
            {"source": {"factory": source, "seed": 0}, "trace": method, "kept_whole": {}}).graph
    return _GRAPHS[name, method]


def _random_placement(graph, seed: int) -> Placement:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 2, size=int(graph.colocation.max()) + 1)
    dev = groups[graph.colocation]
    dev[graph.colocation == graph.colocation[-1]] = 1 - dev[0]  # both devices take part
    return Placement(dev)


@pytest.fixture(scope="module")
def pool():
    """Warm workers shared by the module's models (switched per graph)."""
    with Measurer(_graph("mlp"), CPU2, config=EngineConfig(timeout_s=300)) as m:
        yield m


@pytest.mark.parametrize("name, method, tracer", [
    ("nn_transformer", "auto", "fx"), ("hf_gpt2", "auto", "fx"), ("hf_llama", "auto", "fx"), ("hf_bert", "auto", "fx"),
    ("hf_gpt2", "export", "export"),  # the fallback's dynamic batch dimension micro-batches too
    ("keyed_batch", "auto", "fx"),  # the batch in a dict: every tensor in it is split
    ("encoded_batch", "auto", "fx"),  # ... or in a UserDict such as a tokenizer's BatchEncoding
    ("unpacked_batch", "auto", "fx"),  # model(**batch): fx could not unpack a dict input
    ("unpacked_batch", "export", "export"),  # ... and export returned (loss,) and a static batch for it
    ("plain_python_inputs", "auto", "fx"),  # None, a flag and a count beside the batch: passed whole
    ("item_assignment", "auto", "export"),  # h[:, 0] = 0: fx cannot; export's fill_ through a view, functionalized
    ("view_update", "auto", "export"),  # h[:, 0].add_(1): fx recorded it as an update of the view alone
    ("in_place_function", "auto", "fx"),  # torch.relu_(h), h read after it
    ("mask_routing", "auto", "export"),  # out[mask] = expert(x[mask]): export's index_put_ chain
    ("input_written_in_place", "auto", "fx"),  # x.mul_(2) on the batch: each run of the step scaled it again
    ("hf_bart", "auto", "export"),  # export's views held only for the traced strides: failed on every split
    ("hf_t5", "auto", "export"),  # ... and T5's exported step failed on its own batch (fx kept it whole)
    ("hf_qwen2_moe", "auto", "export"),  # tokens sorted by expert id were taken for mixing samples: M = 1 only
])
def test_pipeline_schedules_equal_single_process_training(pool, name, method, tracer):
    _needs(name)
    graph = _graph(name, method)
    assert graph.meta["trace"] == tracer and graph.meta["microbatchable"] is True
    traced = rebuild_traced(graph.meta)
    init = {k: v.clone() for k, v in traced.gm.state_dict().items()}
    ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs, microbatches=1)  # the whole batch
    traced.gm.load_state_dict(init)
    pool.switch_graph(graph)
    for schedule, seed in (("gpipe", 0), ("1f1b", 1)):
        out = pool.run_step(_random_placement(graph, seed), schedule=schedule, microbatches=MICROBATCHES,
                            update=False)
        assert out.result.ok, out.result.failure
        assert out.result.microbatches == MICROBATCHES
        assert out.loss == pytest.approx(ref_loss, rel=1e-4)
        assert set(out.grads) == set(ref_grads)
        for pname, g in ref_grads.items():
            torch.testing.assert_close(out.grads[pname], g, rtol=1e-3, atol=1e-5 * max(1.0, float(g.abs().max())),
                                       msg=lambda m: f"{schedule} {pname}: {m}")  # noqa: B023 - called at once


def test_a_view_that_holds_only_for_eager_strides_runs_split(pool):
    """Every op on the other device than its producer (each value crosses, contiguous): the user's ``.view`` is
    run as a reshape there, with eager's loss and gradients."""
    graph = _graph("view_after_transposes")
    traced = rebuild_traced(graph.meta)
    ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs, microbatches=1)
    assert "view" in graph.op_kinds
    pool.switch_graph(graph)
    out = pool.run_step(Placement(np.arange(graph.n) % 2), update=False)
    assert out.result.ok, out.result.failure
    assert out.loss == pytest.approx(ref_loss, rel=1e-6)
    for pname, g in ref_grads.items():
        torch.testing.assert_close(out.grads[pname], g)


def test_a_step_with_nothing_to_train_runs_forward_only(pool):
    """Every parameter frozen: the workers give the loss and no gradient, as one process does (whose reference
    step raised: no backward to run)."""
    graph = _graph("all_frozen")
    traced = rebuild_traced(graph.meta)
    ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs, microbatches=2)
    assert ref_grads == {}
    pool.switch_graph(graph)
    out = pool.run_step(_random_placement(graph, 0), schedule="gpipe", microbatches=2, update=True)
    assert out.result.ok, out.result.failure
    assert out.loss == pytest.approx(ref_loss, rel=1e-6) and not any(g is not None for g in out.grads.values())


@pytest.mark.parametrize("name", ["buffer_updates", "buffer_assignments"])
def test_buffers_updated_in_place_are_updated_on_the_workers(pool, name):
    """The engine reads a buffer after the step's in-place update of it, on one device and with the buffer's
    readers on the other (it read the old value before the update became a dependency of its readers); also
    where ``forward`` writes ``buffer += y`` or ``self.buffer = value`` (recorded as ``copy_``: run in place, it
    changed the buffer before a reader of its old value on the other device had it, 1 of these 4 placements)."""
    graph = _graph(name)
    torch.manual_seed(0)  # as graphs.build seeds the factory: the workers' model
    model, (x,) = getattr(fst, name)()
    eager = model(x).item()
    pool.switch_graph(graph)
    for placement in (Placement.single(graph, 0), *(_random_placement(graph, seed) for seed in range(4))):
        out = pool.run_step(placement, update=False)
        assert out.result.ok, out.result.failure
        assert out.loss == pytest.approx(eager, rel=1e-5)


def test_buffers_updated_in_place_carry_from_step_to_step_as_in_eager_training(pool):
    """Three SGD steps on the workers: each step reads the buffers (a step counter, a running sum, an exponential
    moving average) the previous one left, as eager training does. The engine runs the updates out of place, and
    the buffers were read afresh every step (step 2's loss was step 1's with new parameters). A later command
    starts again from the model as built."""
    graph = _graph("buffer_assignments")
    torch.manual_seed(0)  # as graphs.build seeds the factory: the workers' model
    model, (x,) = fst.buffer_assignments()
    lr = pool.config.lr
    want = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss = model(x)
        loss.backward()
        want.append(loss.item())
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    pool.switch_graph(graph)
    for placement in (Placement.single(graph, 1), _random_placement(graph, 0), _random_placement(graph, 1)):
        got = [pool.run_step(placement, steps=k, update=True).loss for k in (3, 1, 2)]
        assert got == pytest.approx([want[2], want[0], want[1]], rel=1e-5)


def test_an_autocast_block_runs_in_its_precision_on_the_workers(pool):
    """A ``torch.autocast`` block in ``forward`` (traced by torch.export as one op run under its autocast): the
    workers' loss is eager's, bfloat16 inside the block, on one device and split over two."""
    graph = _graph("autocast_block")
    assert graph.meta["trace"] == "export"
    torch.manual_seed(0)  # as graphs.build seeds the factory: the workers' model
    model, (x,) = fst.autocast_block()
    eager = model(x).item()
    pool.switch_graph(graph)
    for placement in (Placement.single(graph, 0), _random_placement(graph, 0), _random_placement(graph, 1)):
        out = pool.run_step(placement, update=False)
        assert out.result.ok, out.result.failure
        assert out.loss == pytest.approx(eager, rel=1e-6)


@pytest.mark.parametrize("name, first_of_stage_1", [("keyed_batch", "fc"), ("encoded_batch", "fc"),
                                                     ("in_place_function", "relu_"), ("input_written_in_place", "a")])
def test_pipelining_backend_stages_equal_single_process_training(pool, name, first_of_stage_1):
    """torch.distributed.pipelining on the workers, 1F1B over two stages, is single-process training. The batch
    one dict (or a tokenizer's UserDict): stage 0 gets each micro-batch's slice of every tensor in it (the labels
    cross to stage 1). Stage 1 starting with ``torch.relu_(h)`` on the activation stage 0 sends: in torch's
    PipelineStage that tensor is an autograd leaf, and the in-place op failed the stage; the stages now run it out
    of place, as the op engine does. A stage 0 that writes its slice of the batch in place (``x.mul_(2)``, the ids
    of the dict) computes what one process does."""
    graph = _graph(name)
    traced = rebuild_traced(graph.meta)
    ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs, microbatches=1)
    pool.switch_graph(graph)
    cut = graph.index(first_of_stage_1)
    out = pool.run_step(Placement(np.array([0 if i < cut else 1 for i in range(graph.n)])), schedule="1f1b",
                        microbatches=MICROBATCHES, update=False, backend="pipelining")
    assert out.result.ok, out.result.failure
    assert out.loss == pytest.approx(ref_loss, rel=1e-4)
    for pname, g in ref_grads.items():
        torch.testing.assert_close(out.grads[pname], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")  # noqa: B023


@pytest.mark.parametrize("name, cut", [("hf_gpt2", 0.7), ("hf_bart", 0.5), ("hf_t5", 0.5)])
def test_pipelining_backend_runs_tied_weights_and_exported_steps_as_one_process(pool, name, cut):
    """Interleaved 1F1B through torch.distributed.pipelining, the tied embedding and head on device 0 (stages 0
    and 3): torch divides each stage's gradients by M, so the shared weight's was divided twice (GPT-2's off by
    57%). BART and T5 are torch.export steps taking a dict batch: their stage 0 took the dict, not export's
    placeholders, and a value crossing a cut laid out as a transpose failed gloo's receive."""
    _needs(name)
    graph = _graph(name)
    traced = rebuild_traced(graph.meta)
    ref_loss, ref_grads, _ = reference_step(traced.gm, traced.example_inputs, microbatches=1)
    dev = (np.arange(graph.n) >= int(graph.n * cut)).astype(np.int64)
    for group in np.unique(graph.colocation):  # a tied weight's readers on one device: the later one's
        dev[graph.colocation == group] = dev[graph.colocation == group].max()
    pool.switch_graph(graph)
    out = pool.run_step(Placement(dev), schedule="interleaved-1f1b", microbatches=MICROBATCHES, update=False,
                        backend="pipelining")
    assert out.result.ok, out.result.failure
    assert out.loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(out.grads) == set(ref_grads)
    for pname, g in ref_grads.items():
        torch.testing.assert_close(out.grads[pname], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")  # noqa: B023


@pytest.mark.parametrize("name", ["hf_qwen2_moe", "hf_llama"])  # torch.export's step, fx's
def test_a_layer_split_of_a_traced_model_is_two_pipeline_stages(name):
    """torch.export put every parameter read first: the layers after the cut had ops at the top of the graph, so
    no layer split was one run of ops per device and no pipeline stage could be cut (the placement JSON had no
    stages; 1F1B ran as GPipe). Reads now sit where they are first used, as fx puts them."""
    from graphs.ir import OpCosts, Provenance
    from placer import baselines
    from placer.costmodel.schedules import is_stage_contiguous

    _needs(name)
    prov = Provenance(device="cpu", threads=1, torch_version="", date="", method="estimated", note="test")
    graph = _graph(name)
    graph = graph.with_costs("cpu", OpCosts(fwd_s=np.full(graph.n, 1e-4), bwd_s=np.full(graph.n, 2e-4),
                                            provenance=prov))
    placement = baselines.place("even-layers", graph, CPU2)
    assert is_stage_contiguous(graph, placement) and len(set(placement.device_of_op)) == 2


@pytest.mark.parametrize("name", ["hf_gpt2", "hf_llama", "hf_bert"])
def test_hf_models_trace_place_and_reload(tmp_path, name):
    _needs(name)
    graph = _graph(name)
    assert graph.meta["microbatchable"] is True and graph.meta["kept_whole"] == {}
    for layer in range(fm.HF_LAYERS):  # per-layer ops: the layer's Linear layers are ops of their own
        linears = [k for k, p in zip(graph.op_kinds, graph.module_paths) if f".{layer}." in p
                   and k in ("Linear", "Conv1D")]
        assert len(linears) >= 4, f"layer {layer}: {linears}"
    cluster = get_cluster("cpu-2")
    placement = _random_placement(graph, 2)
    path = save_placement(tmp_path / "p.json", graph, cluster, placement, method="random", schedule="gpipe",
                          microbatches=MICROBATCHES)
    model, inputs = getattr(fm, name)()
    with torch.no_grad():
        before = model(*inputs)
    apply(model, path, device_map={"cpu:0": "cpu", "cpu:1": "cpu"})
    assert placed_devices(model)  # modules were placed
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), before)


@pytest.mark.parametrize("name", ["nn_transformer", "hf_gpt2", "hf_llama", "keyed_batch", "one_key_dict",
                                  "encoded_batch", "hf_t5", "hf_qwen2_moe"])  # the last two: torch.export steps
def test_pipeline_stages_of_a_micro_batch_compose_to_the_step(name):
    """The loaders' stages (``stage_modules``, what ``pipeline_stages`` hands to torch) at 4 micro-batches: the
    stages built for one micro-batch compute that micro-batch's loss, batch-size values included."""
    _needs(name)
    graph = _graph(name)
    traced = rebuild_traced(graph.meta)
    cut = graph.n // 2  # colocation not enforced: stage_modules cuts where it is told
    doc = placement_to_json(graph, CPU2, Placement.single(graph), method="test", schedule="1f1b",
                            microbatches=MICROBATCHES)
    doc["stages"] = [{"device": 0, "first_op": graph.op_names[0], "last_op": graph.op_names[cut - 1]},
                     {"device": 1, "first_op": graph.op_names[cut], "last_op": graph.op_names[-1]}]
    stages = stage_modules(traced, doc)
    for m in range(MICROBATCHES):
        mb = split_inputs(traced.example_inputs, MICROBATCHES, m)
        out = stages[1](*stages[0](*mb))
        torch.testing.assert_close(out, traced.gm(*mb), rtol=1e-5, atol=1e-6)
        fed = stages[1](*stages[0](*batched_tensors(mb)))  # how torch's PipelineStage feeds it: tensors only
        torch.testing.assert_close(fed, out, rtol=0, atol=0)


def test_placer_run_pipelines_a_hugging_face_model_from_the_command_line(tmp_path):
    # the user's path end to end: graph build from a factory, a baseline placement, placer run with 1f1b x4
    pytest.importorskip("transformers")
    from tests.test_cli import placer

    graph, placement = tmp_path / "gpt2.json", tmp_path / "p.json"
    r = placer("graph", "build", "tests.fixtures_models:hf_gpt2", "--profile", "cpu", "--estimate", "none",
               "--out", graph)
    assert r.returncode == 0, r.stderr
    assert "micro-batchable: yes" in r.stdout
    r = placer("baseline", "--graph", graph, "--cluster", "cpu-2", "--method", "pipedream-dp", "--out", placement)
    assert r.returncode == 0, r.stderr
    for schedule in ("gpipe", "1f1b"):
        r = placer("run", placement, "--graph", graph, "--schedule", schedule, "--microbatches", "4",
                   "--steps", "1", "--warmup", "1", "--timeout", "120s", "--timeline", tmp_path / f"{schedule}.png")
        assert r.returncode == 0, r.stderr
        assert f"{schedule} x4" in r.stdout and "measured step" in r.stdout, r.stdout
