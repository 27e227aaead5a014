"""The placement schema's enumerated names, generated from the registries.

``placer/io/schemas/placement.schema.json`` is the published schema (a trainer can validate a placement.json with
it without importing placer), so it stays a file; this module treats it as a template and fills its enums from
the registries, which are the one source of names:

- ``schedule.name``: the keys of :data:`placer.costmodel.schedules.SCHEDULES`, in registration order.

Nothing else in the document is a closed set: ``cluster`` is a preset *or* a file's name, ``provenance.method`` a
baseline name, ``single:<kind>`` or an RL label, and device names are the cluster's.

``python -m placer.io.schema_gen`` rewrites the file after a registry changed; ``--check`` only reports (exit
status 1) where the file and the registries disagree. ``tests/test_registries.py`` runs the same check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Callable

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "placement.schema.json"


def schedule_names() -> list[str]:
    from placer.costmodel.schedules import SCHEDULES

    return list(SCHEDULES)


ENUMS: dict[tuple[str, ...], Callable[[], list[str]]] = {
    ("properties", "schedule", "properties", "name"): schedule_names,
}
"""Where in the schema each generated enum lives (a path of keys), and the registry names that fill it."""


def _node(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        schema = schema[key]
    return schema


def _label(path: tuple[str, ...]) -> str:
    return ".".join(k for k in path if k != "properties")


def read_schema(path: Path = SCHEMA_FILE) -> dict[str, Any]:
    return json.loads(path.read_text())


def generate(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``schema`` with every enum of :data:`ENUMS` set to its registry's names."""
    out = copy.deepcopy(schema)
    for path, names in ENUMS.items():
        _node(out, path)["enum"] = names()
    return out


def disagreements(schema: dict[str, Any]) -> list[str]:
    """One line per enum of ``schema`` that differs from its registry (empty when they agree)."""
    out = []
    for path, names in ENUMS.items():
        have, want = _node(schema, path).get("enum"), names()
        if have != want:
            out.append(f"{_label(path)}: the schema has {have}, the registry {want}")
    return out


def render(schema: dict[str, Any], width: int = 120) -> str:
    """The file's text for ``schema``: keys in the template's order, a value on one line when it fits in
    ``width`` columns, else one line per member with 2-space indents (short leaves stay readable at a glance)."""
    return _render(schema, 0, width) + "\n"


def _render(value: Any, indent: int, width: int, lead: int = 0) -> str:
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or not value or indent + lead + len(flat) <= width:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {_render(v, indent + 2, width, len(json.dumps(k)) + 2)}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [pad + _render(v, indent + 2, width) for v in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placer.io.schema_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report disagreements, write nothing")
    parser.add_argument("--file", type=Path, default=SCHEMA_FILE, help="schema file (default: the shipped one)")
    args = parser.parse_args(argv)
    schema = read_schema(args.file)
    problems = disagreements(schema)
    if args.check:
        for line in problems:
            print(f"{args.file}: {line}", file=sys.stderr)
        return 1 if problems else 0
    text = render(generate(schema))
    if text != args.file.read_text():
        args.file.write_text(text)
        print(f"wrote {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
