"""Command-line options generated from ``@dataclass`` configs: one option per field, its help the field's docstring.

A field ``num_groups: int`` becomes ``--num-groups N``; a float field whose name ends in ``_s`` takes a duration
without the suffix (``budget_s`` -> ``--budget 10m``); ``bool`` fields get ``--x`` / ``--no-x``; ``Literal``
fields their values as ``choices``; ``tuple`` fields a comma list; ``dict`` fields ``KEY=VALUE`` pairs. Every
option defaults to ``argparse.SUPPRESS``, so the namespace holds exactly the options given and the dataclass
keeps the one copy of the defaults (shown in the help). Types are read from the annotation strings, so configs
whose annotations name classes imported only for type checking work too.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from placer.app.cli_base import finite_float, parse_duration


@dataclass(frozen=True)
class Option:
    """One generated option."""

    field: str
    """The dataclass field it sets."""
    flags: tuple[str, ...]
    """``--name`` first, then aliases."""
    kwargs: dict[str, Any]
    """``add_argument`` keywords."""


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal after its annotation in the class body), whitespace folded."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _first_sentences(doc: str, limit: int = 400) -> str:
    """The docstring up to ``limit`` characters, cut at a sentence end, without reST markup; ``%`` escaped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc).replace("``", "")
    if len(text) > limit:
        cut = text.rfind(". ", 0, limit)
        text = text[:cut + 1] if cut > 0 else text[:limit] + "..."
    return text.replace("%", "%%")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if isinstance(value, tuple):
        value = ",".join(map(str, value)) or "none"
    return f" (default {value})"


def _pairs(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (``layers=2``, ``finish_dropout=0.5``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} must look like KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.strip(), value


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def option_kwargs(name: str, annotation: str) -> tuple[str, dict[str, Any]]:
    """(flag, ``add_argument`` keywords) for a field of this name and annotation string."""
    flag = "--" + name.replace("_", "-")
    kinds = {part.strip() for part in annotation.split("|")} - {"None"}
    literal = re.fullmatch(r"Literal\[(.*)\]", annotation.strip())
    if literal:
        return flag, {"choices": list(ast.literal_eval(f"[{literal.group(1)}]"))}
    if kinds == {"bool"}:
        return flag, {"action": argparse.BooleanOptionalAction}
    if kinds == {"int"}:
        return flag, {"type": int, "metavar": "N"}
    if kinds == {"float"}:
        if name.endswith("_s"):
            return flag[:-2], {"type": parse_duration, "metavar": "DURATION"}
        return flag, {"type": finite_float, "metavar": "X"}
    if annotation.startswith("tuple["):
        return flag, {"type": _comma_list, "metavar": "A,B,..."}
    if annotation.startswith("dict["):
        return flag, {"type": _pairs, "nargs": "*", "metavar": "KEY=VALUE"}
    return flag, {"metavar": name.split("_")[-1].upper()}


def options_of(cls: type, *, skip: Iterable[str] = (), aliases: dict[str, tuple[str, ...]] | None = None,
               choices: dict[str, Callable[[], list[str]]] | None = None,
               notes: dict[str, str] | None = None, metavars: dict[str, str] | None = None,
               show_default: bool = True) -> list[Option]:
    """The options of ``cls``'s fields (except ``skip``): ``aliases`` adds flags, ``choices`` the allowed values
    (from a registry, called now), ``notes`` a sentence after the docstring, ``metavars`` names for values;
    ``show_default`` ends the help with the field's default."""
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        flag, kwargs = option_kwargs(f.name, annotation)
        if choices and f.name in choices:
            kwargs["choices"] = list(choices[f.name]())
            kwargs.pop("metavar", None)
        if metavars and f.name in metavars:
            kwargs["metavar"] = metavars[f.name]
        note = f" {notes[f.name]}" if notes and f.name in notes else ""
        default = _default_text(f).replace("%", "%%") if show_default else ""
        kwargs["help"] = _first_sentences(docs.get(f.name, "")) + note + default
        kwargs["default"] = argparse.SUPPRESS
        kwargs["dest"] = f.name
        out.append(Option(f.name, (flag, *(aliases or {}).get(f.name, ())), kwargs))
    return out


def add_options(parser: argparse.ArgumentParser | Any, options: Iterable[Option]) -> None:
    for opt in options:
        parser.add_argument(*opt.flags, **opt.kwargs)


def given(args: argparse.Namespace, options: Iterable[Option]) -> dict[str, Any]:
    """The fields of ``options`` given on the command line (dict options collected from their pairs)."""
    out = {}
    for opt in options:
        if hasattr(args, opt.field):
            value = getattr(args, opt.field)
            out[opt.field] = dict(value) if opt.kwargs.get("nargs") == "*" else value
    return out
