"""JSON files the way every placer artefact is read and written: atomic writes, one-line errors on read."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def atomic_target(path: str | Path) -> Path:
    """The file an atomic write of ``path`` renames onto: ``path``, or, for a symbolic link, the file it points to
    (a rename onto the link would replace the link by a plain file and leave its target stale)."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_json_atomic(path: str | Path, doc: Mapping[str, Any], *, indent: int = 1) -> Path:
    """Write sorted-key JSON through a temporary file and rename, so readers never see half a file; a write that
    fails (a full disk) leaves neither the temporary file nor a damaged ``path``. A symbolic link is written
    through (:func:`atomic_target`)."""
    path = atomic_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share one
    try:
        tmp.write_text(json.dumps(doc, indent=indent, sort_keys=True) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


MAX_JSON_BYTES = 256 << 20
"""The largest JSON file placer reads (the largest shipped graph is 0.6 MB; /dev/zero never ends)."""


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; an unreadable, oversized (:data:`MAX_JSON_BYTES`), non-UTF-8 or malformed file is a
    one-line ``ValueError`` naming ``what``."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e.strerror}") from None
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path}: more than {MAX_JSON_BYTES >> 20} MiB, too large for a {what} file")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): not a {what} file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None


class JsonFile:
    """``save(path)`` / ``load(path)`` for a type with ``to_json()`` / ``from_json(doc)``; ``JSON_WHAT`` names the
    kind of file in read errors (``graph``, ``cluster``), and a content error is prefixed with the file's path."""

    JSON_WHAT = "JSON"

    def save(self, path: str | Path) -> None:
        """Write JSON atomically."""
        write_json_atomic(path, self.to_json())  # type: ignore[attr-defined]

    @classmethod
    def load(cls, path: str | Path) -> Any:
        """Read the file; any problem is a one-line ``ValueError``."""
        doc = read_json(path, cls.JSON_WHAT)
        try:
            return cls.from_json(doc)  # type: ignore[attr-defined]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
