"""Size limits of docs/architecture.md: no module over 450 lines and no function over 80 lines in the packages.

Functions compiled by numba (decorated with ``njit`` or ``jit``, bare or called, plain or as ``numba.``/``nb.``
attributes) are exempt from the function limit: a kernel's loop nest is one function so that numba can compile it
whole. The module limit holds for every module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("placer", "envs", "policies", "graphs")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
NUMBA_DECORATORS = frozenset({"njit", "jit"})


def _decorator_name(node: ast.expr) -> str:
    """``njit`` for ``@njit``, ``@njit(cache=True)``, ``@numba.njit`` and ``@nb.njit(...)``."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def is_numba_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(_decorator_name(d) in NUMBA_DECORATORS for d in fn.decorator_list)


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int]]:
    """``(qualified name, lines)`` of every function or method in ``path`` longer than ``limit`` lines (from the
    ``def`` line to the last line of the body), numba kernels and functions nested in them left out."""
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if is_numba_kernel(child):
                    continue
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1
                if lines > limit:
                    out.append((name, lines))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text()), "")
    return out


def module_lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def module_offenders(paths: list[Path], limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{_rel(p)}: {n} lines" for p in paths if (n := module_lines(p)) > limit]


def function_offenders(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    return [f"{_rel(p)}::{name}: {n} lines" for p in paths for name, n in long_functions(p, limit)]


def test_no_module_over_450_lines():
    offenders = module_offenders(project_files())
    if offenders:  # pytest.fail, not assert: the list alone, without pytest's repr of it
        pytest.fail(f"{len(offenders)} modules over {MAX_MODULE_LINES} lines (split them by concern):\n  "
                    + "\n  ".join(offenders), pytrace=False)


def test_no_function_over_80_lines_outside_numba_kernels():
    offenders = function_offenders(project_files())
    if offenders:
        pytest.fail(f"{len(offenders)} functions over {MAX_FUNCTION_LINES} lines (numba kernels exempt):\n  "
                    + "\n  ".join(offenders), pytrace=False)


def _function(name: str, body_lines: int, decorator: str = "") -> str:
    """A function of exactly ``1 + body_lines`` lines (plus its decorator line)."""
    return (f"{decorator}\n" if decorator else "") + f"def {name}(x):\n" + "    x += 1\n" * body_lines


def test_checker_measures_functions_and_exempts_numba_kernels(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import numba\nimport numba as nb\nfrom numba import njit\n"
                   + _function("fits", 79)                                  # 80 lines: allowed
                   + _function("too_long", 80)                              # 81 lines
                   + _function("kernel", 200, "@njit(cache=True)")
                   + _function("kernel2", 200, "@numba.jit(nopython=True)")
                   + _function("kernel3", 200, "@nb.njit")
                   + _function("cached", 200, "@functools.lru_cache")       # not numba: counted
                   + "class C:\n" + "".join("    " + line + "\n" for line in _function("method", 90).splitlines())
                   + "def outer():\n" + "".join("    " + line + "\n" for line in _function("inner", 85).splitlines()))
    found = dict(long_functions(src))
    assert found == {"too_long": 81, "cached": 201, "C.method": 91, "outer": 87, "outer.inner": 86}
    msgs = function_offenders([src])
    assert f"{src}::too_long: 81 lines" in msgs and len(msgs) == 5
    assert function_offenders([src], limit=1000) == []


def test_checker_measures_modules(tmp_path):
    ok, big = tmp_path / "ok.py", tmp_path / "big.py"
    ok.write_text("x = 1\n" * MAX_MODULE_LINES)
    big.write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert module_offenders([ok, big]) == [f"{big}: {MAX_MODULE_LINES + 1} lines"]
