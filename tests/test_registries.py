"""The registries are the one source of names: the placement schema's enums and the CLI's help and choices agree
with them (docs/architecture.md, "Extension points").

Registries: baselines (:data:`placer.baselines.BASELINES`), schedules (:data:`placer.costmodel.schedules.SCHEDULES`),
cluster presets (:data:`placer.core.cluster.PRESETS`), policies and algorithms (:data:`policies.POLICIES`,
:data:`policies.ALGOS`) and reward backends (:data:`envs.rewards.BACKENDS`).

The CLI is checked from the outside, on ``placer <command> --help`` run in a subprocess, so the check survives the
parser being rewritten (argparse today, generated from the config dataclasses tomorrow): the block of help text of
an option must name every registered name, and when it shows ``{a,b,...}`` choices they must be exactly the
registry's.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from placer.io import schema_gen

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- registries
def registry(kind: str) -> list[str]:
    """Registered names of one registry (imported on use: policies and envs load torch)."""
    if kind == "baselines":
        from placer.baselines import BASELINES as names
    elif kind == "schedules":
        from placer.costmodel.schedules import SCHEDULES as names
    elif kind == "schedule-choices":  # what --schedule accepts: the schedules and auto
        from placer.costmodel.plans import schedule_choices

        names = schedule_choices()
    elif kind == "presets":
        from placer.core.cluster import PRESETS as names
    elif kind == "policies":
        from policies import POLICIES as names
    elif kind == "algos":
        from policies import ALGOS as names
    elif kind == "backends":
        from envs.rewards import BACKENDS as names
    else:
        raise KeyError(kind)
    return list(names)


# ---------------------------------------------------------------------------------------------- placement schema
def test_placement_schema_enums_are_the_registries():
    problems = schema_gen.disagreements(schema_gen.read_schema())
    assert problems == [], "regenerate the schema: python -m placer.io.schema_gen\n" + "\n".join(problems)
    assert schema_gen.schedule_names() == registry("schedules")


def test_placement_schema_file_is_the_generators_output():
    text = schema_gen.SCHEMA_FILE.read_text()
    assert schema_gen.render(schema_gen.generate(schema_gen.read_schema())) == text, \
        "placement.schema.json is not in generated form: run python -m placer.io.schema_gen"


def test_schema_check_fails_when_a_schedule_is_registered_and_generation_fixes_it(monkeypatch, tmp_path):
    from placer.costmodel import schedules

    monkeypatch.setitem(schedules.SCHEDULES, "zero-bubble", schedules.SCHEDULES["gpipe"])
    schema = schema_gen.read_schema()
    assert schema_gen.disagreements(schema) == [
        "schedule.name: the schema has ['none', 'gpipe', '1f1b', 'interleaved-1f1b', 'dataflow'], the registry "
        "['none', 'gpipe', '1f1b', 'interleaved-1f1b', 'dataflow', 'zero-bubble']"]
    copy = tmp_path / "placement.schema.json"
    copy.write_text(schema_gen.SCHEMA_FILE.read_text())
    assert schema_gen.main(["--check", "--file", str(copy)]) == 1
    assert schema_gen.main(["--file", str(copy)]) == 0
    assert schema_gen.main(["--check", "--file", str(copy)]) == 0
    generated = schema_gen.read_schema(copy)
    doc = {"name": "zero-bubble", "microbatches": 4}
    jsonschema.validate(doc, generated["properties"]["schedule"])  # the new name is accepted
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema["properties"]["schedule"])  # and the stale file refused it


# ---------------------------------------------------------------------------------------------- CLI help
BOX = " \t│┃|╭╮╰╯─━"
"""Frame characters a rich-formatted help (tyro) draws around options; stripped before parsing."""
TOKEN = re.compile(r"[A-Za-z0-9_+\-]+")
"""A name as registries spell them (``sim+real``, ``interleaved-1f1b``, ``v100x8-nvlink``)."""


@functools.cache
def cli_help(*command: str) -> str:
    """``placer COMMAND --help``, run through the ``placer`` entry point that pyproject.toml declares."""
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1]
    module, func = re.search(r'^placer\s*=\s*"([\w.]+):(\w+)"', scripts, re.M).groups()  # no tomllib on 3.10
    code = f"import sys; sys.argv[0] = 'placer'; from {module} import {func}; sys.exit({func}())"
    # COLUMNS: no wrapping, which would split a name at its hyphen
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="1000", NO_COLOR="1", TERM="dumb")
    r = subprocess.run([sys.executable, "-c", code, *command, "--help"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"placer {' '.join(command)} --help failed: {r.stderr.strip()[-500:]}"
    return r.stdout


def option_block(help_text: str, option: str) -> str | None:
    """The help of ``option`` (``--policy``, or a positional's name): its line and those after it up to the next
    option; None when the help has no such option."""
    lines, out = [line.strip(BOX) for line in help_text.splitlines()], None
    for line in lines:
        flags = re.split(r"\s{2,}", line, maxsplit=1)[0]  # argparse and tyro leave 2+ spaces before the help
        if option.startswith("-"):
            starts = line.startswith("-")
            here = starts and option in re.findall(r"-{1,2}[A-Za-z0-9][\w.-]*", flags)
        else:  # a positional: its name first on its line
            starts = here = flags.split(" ")[0] == option
        if out is not None and starts and not here:
            break
        if here and out is None:
            out = []
        if out is not None:
            out.append(line)
    return None if out is None else "\n".join(out)


def disagreement(block: str, names: list[str]) -> str | None:
    """Why an option's help disagrees with a registry's ``names``, or None."""
    choices = re.search(r"\{([^{}\s]+)\}", block)
    if choices is not None and set(choices.group(1).split(",")) != set(names):
        return f"its choices {{{choices.group(1)}}} are not the registry's {sorted(names)}"
    missing = sorted(set(names) - set(TOKEN.findall(block)))
    if missing == sorted(set(names)):
        return f"its help names none of the registry's {missing}"
    if missing:
        return f"its help does not name {missing} (registry: {sorted(names)})"
    return None


CLI_OPTIONS = [
    (("baseline",), "--method", "baselines"),
    (("baseline",), "--schedule", "schedule-choices"),
    (("baseline",), "--cluster", "presets"),
    (("compare",), "--methods", "baselines"),
    (("compare",), "--schedule", "schedule-choices"),
    (("compare",), "--clusters", "presets"),
    (("train",), "--policy", "policies"),
    (("train",), "--algo", "algos"),
    (("train",), "--schedule", "schedule-choices"),
    (("train",), "--cluster", "presets"),
    (("train",), "--reward", "backends"),
    (("run",), "--schedule", "schedule-choices"),
    (("cluster", "show"), "cluster", "presets"),
    (("place",), "--cluster", "presets"),
    (("place",), "--schedule", "schedule-choices"),
    (("demo",), "--cluster", "presets"),
]
"""(command, option, registry): the options whose values are registered names. Rename an option here when the
CLI renames it."""


@pytest.mark.parametrize("command, option, kind", CLI_OPTIONS,
                         ids=[f"{' '.join(c)} {o}" for c, o, _ in CLI_OPTIONS])
def test_cli_help_names_what_the_registry_has(command, option, kind):
    block = option_block(cli_help(*command), option)
    where = f"placer {' '.join(command)} {option}"
    assert block is not None, f"{where}: no such option in --help (renamed? update CLI_OPTIONS)"
    why = disagreement(block, registry(kind))
    if why is not None:  # the trainer/CLI rework generates these from the registries
        pytest.fail(f"{where}: {why}; generate its help and choices from the {kind} registry", pytrace=False)


HELP = """usage: placer train [-h] [--policy POLICY]

options:
  -h, --help            show this help message and exit
  --policy {gnn,seq2seq}
                        policy (default seq2seq)
  --algo ALGO           training algorithm: reinforce or ppo
  -s, --schedule SCHEDULE   none, gpipe
  --runs-dir RUNS_DIR
╭─ tyro-style options ─────────────────────────╮
│ --cluster STR    preset (cpu-2, h200x8) or   │
│                  a cluster JSON              │
│ --seed INT       (default: 0)                │
╰──────────────────────────────────────────────╯
positional arguments:
  cluster     preset name (cpu-2, h200x8) or JSON file
"""


def test_help_parser_finds_blocks_and_catches_disagreements():
    # the checker itself must be able to fail
    assert option_block(HELP, "--policy").splitlines() == ["--policy {gnn,seq2seq}", "policy (default seq2seq)"]
    assert option_block(HELP, "--schedule") == "-s, --schedule SCHEDULE   none, gpipe"
    assert option_block(HELP, "--cluster") == "--cluster STR    preset (cpu-2, h200x8) or\na cluster JSON"
    assert option_block(HELP, "cluster") == "cluster     preset name (cpu-2, h200x8) or JSON file"
    assert option_block(HELP, "--reward") is None and option_block(HELP, "--run") is None
    assert disagreement(option_block(HELP, "--policy"), ["gnn", "seq2seq"]) is None
    assert "choices {gnn,seq2seq}" in disagreement(option_block(HELP, "--policy"), ["gnn", "seq2seq", "hier"])
    assert disagreement(option_block(HELP, "--algo"), ["reinforce", "ppo"]) is None
    assert "does not name ['a2c']" in disagreement(option_block(HELP, "--algo"), ["reinforce", "ppo", "a2c"])
    # a name inside a longer one does not count: 1f1b is not named by interleaved-1f1b
    assert "['1f1b']" in disagreement("--schedule S   none, interleaved-1f1b", ["none", "1f1b"])
    assert disagreement(option_block(HELP, "--cluster"), ["cpu-2", "h200x8"]) is None
