"""Registration by file: a package whose modules register themselves (baselines, policies) imports them all here,
so adding one is adding one file (and its test), with no import line to remember."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str], *, skip: Iterable[str] = ()) -> list[str]:
    """Import every module of ``package`` (its ``__path__``) except private ones (``_x``) and ``skip``, sorted by
    name so that registration order is the same on every machine; returns the names imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path))
                   if not m.name.startswith("_") and m.name not in set(skip))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
