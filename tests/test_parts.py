"""Model parts and the placement JSON's ``module_fqns_per_model_part`` (torchtitan's form of a pipeline split)."""

from __future__ import annotations

import numpy as np
import pytest

from graphs.data import load_benchmark_graph
from graphs.models import build_model
from placer.core.cluster import get_cluster
from placer.core.placement import Placement
from placer.io.document import contiguous_stages, load_placement, placement_to_json, save_placement
from placer.io.loaders import module_fqns_per_model_part
from placer.io.parts import model_part_fqns, model_parts, part_of_path, split_after

GPT_PARTS = ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "ln_f", "head", "loss"]


@pytest.fixture(scope="module")
def gpt():
    return load_benchmark_graph("gpt-small")


def test_part_of_path():
    assert part_of_path("blocks.3.attn.qkv") == "blocks.3"
    assert part_of_path("blocks.3") == "blocks.3"
    assert part_of_path("ln_f") == "ln_f"
    assert part_of_path("encoder.rnn") == "encoder"
    assert part_of_path("") == ""


def test_model_parts_of_gpt_in_execution_order(gpt):
    assert model_parts(gpt) == GPT_PARTS


@pytest.mark.parametrize("last", GPT_PARTS[:-1])
def test_split_after_each_part_is_a_valid_contiguous_two_stage_placement(gpt, last):
    cluster = get_cluster("cpu-2")
    placement = split_after(gpt, last)
    placement.validate(gpt, cluster)
    doc = placement_to_json(gpt, cluster, placement, method="test")
    k = GPT_PARTS.index(last) + 1
    assert [s["device"] for s in doc["stages"]] == [0, 1]
    assert doc["module_fqns_per_model_part"] == [GPT_PARTS[:k], GPT_PARTS[k:]]
    assert doc["stages"][0]["first_op"] == gpt.op_names[0]  # the model inputs feed the first stage


def test_split_after_errors(gpt):
    with pytest.raises(ValueError, match="no model part 'blocks.9'"):
        split_after(gpt, "blocks.9")
    with pytest.raises(ValueError, match="distinct parts in order"):
        split_after(gpt, "blocks.1", "blocks.0")
    with pytest.raises(ValueError, match="before the last part 'loss'"):
        split_after(gpt, "loss")


def test_stages_going_round_the_devices_are_interleaved_stages(gpt):
    """Four stages on two devices, stage k on device k mod 2 (the layout of torch's interleaved schedules): the
    placement JSON has them and each one's parts (it had no stages: "not stage-contiguous")."""
    four = split_after(gpt, "pos_emb", "blocks.0", "blocks.1").device_of_op  # stage k on device k
    doc = placement_to_json(gpt, get_cluster("cpu-2"), Placement(four % 2), method="test",
                            schedule="interleaved-1f1b", microbatches=4)
    assert [st["device"] for st in doc["stages"]] == [0, 1, 0, 1]
    assert doc["module_fqns_per_model_part"] == [GPT_PARTS[:2], ["blocks.0"], ["blocks.1"], GPT_PARTS[4:]]
    assert contiguous_stages(gpt, Placement(np.array([0, 1, 1, 0])[four]), interleaved=True) is None  # not round
    assert contiguous_stages(gpt, Placement(four % 2)) is None  # a plan of another schedule: one stage a device


def test_no_fqns_when_a_cut_is_inside_a_part_or_there_are_no_stages(gpt):
    cut = gpt.op_names.index("blocks_0_attn_proj")  # inside block 0
    inside = Placement(np.array([0 if i < cut else 1 for i in range(gpt.n)]))
    assert model_part_fqns(gpt, contiguous_stages(gpt, inside)) is None
    assert model_part_fqns(gpt, None) is None
    alternating = Placement(np.array([0] * gpt.n))
    doc = placement_to_json(gpt, get_cluster("cpu-2"), alternating, method="test")
    assert doc["module_fqns_per_model_part"] == [GPT_PARTS]  # one stage owns every part


def test_loader_reads_fqns_back_and_checks_them_against_the_model(gpt, tmp_path):
    path = save_placement(tmp_path / "p.json", gpt, get_cluster("cpu-2"), split_after(gpt, "blocks.0"),
                          method="test")
    model, _, _ = build_model("gpt", "small", seed=0)
    fqns = module_fqns_per_model_part(path, model)
    assert fqns == [GPT_PARTS[:3], GPT_PARTS[3:]]
    for stage in fqns:
        for fqn in stage:
            model.get_submodule(fqn)  # every name is a module of the model torchtitan would split
    doc = load_placement(path).doc
    del model.head  # a model that is not the one the placement was made for
    with pytest.raises(ValueError, match=r"placement module 'head' is not in model GPT \(1 unknown"):
        module_fqns_per_model_part(doc, model)
    with pytest.raises(ValueError, match="no module_fqns_per_model_part .a stage boundary cuts a module"):
        module_fqns_per_model_part(doc | {"module_fqns_per_model_part": None})
    with pytest.raises(ValueError, match="not stage-contiguous"):
        module_fqns_per_model_part(doc | {"module_fqns_per_model_part": None, "stages": None})


def test_documents_without_the_field_still_load(gpt, tmp_path):
    doc = placement_to_json(gpt, get_cluster("cpu-2"), split_after(gpt, "head"), method="test")
    del doc["module_fqns_per_model_part"]  # a placement JSON written before the field existed
    from placer.io.document import placement_from_document
    assert placement_from_document(doc, gpt).placement.device_of_op.tolist() == \
        split_after(gpt, "head").device_of_op.tolist()
