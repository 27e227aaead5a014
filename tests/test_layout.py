"""The import direction of ARCHITECTURE.md: graphs -> placer core -> envs -> policies -> placer.train/compare/cli."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {"placer.train", "placer.train_multi", "placer.place", "placer.compare", "placer.cli", "placer.demo"}
LEVEL = {"graphs": 0, "placer": 1, "envs": 2, "policies": 3}


def level(module: str) -> int | None:
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return 4
    return LEVEL.get(module.split(".")[0])


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
            out += [f"{node.module}.{a.name}" for a in node.names]
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_nothing_imports_upward():
    violations = []
    for pkg in LEVEL:
        for path in (ROOT / pkg).rglob("*.py"):
            mod = module_name(path)
            own = level(mod)
            for imp in imports(path):
                lv = level(imp)
                if lv is not None and lv > own:
                    violations.append(f"{mod} (level {own}) imports {imp} (level {lv})")
    assert not violations, "\n".join(violations)


def test_checker_catches_a_violation(tmp_path):
    # the checker itself must be able to fail
    assert level("placer.cli") == 4 and level("placer.sim") == 1 and level("envs.placement") == 2
    assert level("torch") is None
    bad = tmp_path / "x.py"
    bad.write_text("from policies.seq2seq import Seq2Seq\nimport envs\n")
    assert imports(bad) == ["policies.seq2seq", "policies.seq2seq.Seq2Seq", "envs"]
