"""One graph resolver (graphs.data.resolve_graph) with one meaning of a bare name: the ``small`` config, for the
env, the CLI and compare alike."""

from __future__ import annotations

import pytest

from envs.placement_env import resolve_graph as env_resolve
from graphs.data import DEFAULT_CONFIG, available, resolve_graph
from graphs.ir import OpGraph
from placer.app.cli_base import load_graph_arg
from placer.app.compare import compare

needs_data = pytest.mark.skipif("rnnlm-small" not in available() or "rnnlm-paper" not in available(),
                                reason="shipped graphs missing")


@needs_data
def test_a_bare_name_means_small_everywhere(tmp_path):
    assert DEFAULT_CONFIG == "small"
    assert resolve_graph("rnnlm").name == "rnnlm-small"
    assert env_resolve("rnnlm").name == "rnnlm-small"
    assert load_graph_arg("rnnlm").name == "rnnlm-small"
    table = compare(["rnnlm"], ["cpu-2"], methods=["round-robin"], out_dir=None)
    assert table.rows[0].graph == "rnnlm-small"
    assert resolve_graph("rnnlm-paper").name == "rnnlm-paper" == resolve_graph("rnnlm", config="paper").name


def test_paths_and_graphs_pass_through(tmp_path):
    g = OpGraph.build(name="tiny", ops=[dict(name="a", fwd_s=1.0)], edges=[])
    assert resolve_graph(g) is g
    g.save(tmp_path / "tiny.json")
    assert resolve_graph(tmp_path / "tiny.json").name == "tiny"
    assert resolve_graph(str(tmp_path / "tiny.json")).name == "tiny"


def test_unknown_name_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown graph 'nosuch'") as e:
        resolve_graph("nosuch")
    assert "\n" not in str(e.value) and "shipped graph 'nosuch-small'" in str(e.value)
