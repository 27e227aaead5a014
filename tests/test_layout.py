"""The layering of docs/architecture.md: package prefixes, lowest first; nothing imports upward or sideways, and
no two modules import each other (directly or round a longer loop), counting imports inside functions.

Imports under ``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("graphs", "placer", "envs", "policies")

# (package prefix, level). A module may import a lower level, or its own package; never a higher level, nor
# another package of its own level (engine and baselines do not know each other).
LAYERS: tuple[tuple[str, int], ...] = (
    ("graphs", 0),
    ("placer.core", 1),
    ("placer", 1),  # placer/__init__.py: the version only
    ("placer.costmodel", 2),
    ("placer.engine", 3),
    ("placer.baselines", 3),
    ("placer.io", 4),
    ("envs", 5),
    ("policies", 6),
    ("placer.app", 7),
)


def layer(module: str) -> tuple[str, int] | None:
    """The longest matching prefix and its level, or None for a module outside the project."""
    best = None
    for prefix, lv in LAYERS:
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, lv)
    return best


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports(path: Path, known: set[str] | None = None) -> list[str]:
    """Modules ``path`` imports at run time, anywhere in the file (``from a import b`` gives ``a.b`` when that is a
    module in ``known``, else ``a``)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            hits = [s for s in subs if known is not None and s in known]
            out += hits
            if len(hits) < len(subs):
                out.append(node.module)
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def import_graph() -> nx.DiGraph:
    mods = project_modules()
    known = set(mods)
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    for mod, path in mods.items():
        for imp in imports(path, known):
            if imp in known and imp != mod:
                g.add_edge(mod, imp)
    return g


def violations(g: nx.DiGraph) -> list[str]:
    out = []
    for a, b in g.edges:
        la, lb = layer(a), layer(b)
        if la is None or lb is None:
            continue
        if lb[1] > la[1] or (lb[1] == la[1] and lb[0] != la[0]):
            out.append(f"{a} ({la[0]}, level {la[1]}) imports {b} ({lb[0]}, level {lb[1]})")
    return out


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer(m) is None] == []


def test_nothing_imports_upward_or_sideways():
    assert violations(import_graph()) == []


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(import_graph()) if len(c) > 1]
    assert cycles == []


def test_checker_catches_violations_and_cycles(tmp_path):
    # the checker itself must be able to fail
    assert layer("placer.app.cli") == ("placer.app", 7) and layer("placer.costmodel.sim")[1] == 2
    assert layer("torch") is None
    bad = tmp_path / "x.py"
    bad.write_text("from policies.seq2seq import Seq2Seq\nimport envs\nif TYPE_CHECKING:\n    import placer.app\n"
                   "def f():\n    from placer.engine import measurer\n")
    assert imports(bad, {"placer.engine.measurer"}) == ["policies.seq2seq", "envs", "placer.engine.measurer"]
    g = nx.DiGraph([("placer.engine.x", "placer.baselines.y"), ("placer.core.a", "placer.app.b"),
                    ("placer.costmodel.s", "graphs.ir")])
    assert len(violations(g)) == 2
    g.add_edge("graphs.ir", "placer.costmodel.s")
    assert any(len(c) > 1 for c in nx.strongly_connected_components(g))


# ---------------------------------------------------------------------------------------------- the document
DOC = ROOT / "docs" / "architecture.md"


def doc_layers(text: str) -> dict[str, int]:
    """``{prefix: level}`` from the layer table of docs/architecture.md (rows ``| 3 | `placer.engine` | ... |``)."""
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\|\s*(\d+)\s*\|\s*`([\w.]+)`\s*\|", text, re.M)}


def doc_module_paths(text: str) -> set[str]:
    """Module files the document names (`` `placer/costmodel/sim.py` ``) inside the project's packages."""
    packages = "|".join(PACKAGES)
    return {m.group(1) for m in re.finditer(rf"`((?:{packages})/[\w/]+\.py)`", text)}


def test_architecture_doc_has_the_layers_of_this_test():
    want = {prefix: lv for prefix, lv in LAYERS if prefix != "placer"}  # placer/__init__: the version only
    assert doc_layers(DOC.read_text()) == want, "docs/architecture.md's layer table and LAYERS differ"


def test_architecture_doc_lists_every_module_and_no_other():
    files = {str(p.relative_to(ROOT)) for p in project_modules().values()}
    # package __init__ files that only re-export or hold a docstring need no line of their own
    files = {f for f in files if not f.endswith("__init__.py") or len((ROOT / f).read_text().splitlines()) > 5}
    named = doc_module_paths(DOC.read_text())
    assert sorted(files - named) == [], "modules missing from docs/architecture.md (add one line each)"
    assert sorted(named - {str(p.relative_to(ROOT)) for p in project_modules().values()}) == [], \
        "docs/architecture.md names modules that do not exist"


def test_doc_checkers_can_fail():
    text = "| 0 | `graphs` | x |\n| 3 | `placer.engine` | y |\nsee `placer/costmodel/sim.py` and `tests/x.py`"
    assert doc_layers(text) == {"graphs": 0, "placer.engine": 3}
    assert doc_module_paths(text) == {"placer/costmodel/sim.py"}


def test_package_data_ships_every_data_file_in_the_packages():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    tracked = subprocess.run(["git", "ls-files", *PACKAGES], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout (an unpacked sdist): nothing to compare
        return
    globs = [f"{pkg.replace('.', '/')}/{pattern}" for pkg, patterns in data.items() for pattern in patterns]
    shipped = [f for f in tracked if f.endswith(".py") or any(fnmatch.fnmatch(f, g) for g in globs)]
    assert sorted(set(tracked) - set(shipped)) == [], "files a wheel would leave out: add them to package-data"
