"""JSON files the way every placer artefact is read and written: atomic writes, one-line errors on read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping


def write_json_atomic(path: str | Path, doc: Mapping[str, Any], *, indent: int = 1) -> Path:
    """Write sorted-key JSON through a temporary file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=indent, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def read_json(path: str | Path, what: str) -> Any:
    """Parse a JSON file; an unreadable or malformed file is a one-line ``ValueError`` naming ``what``."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read {what} file {path}: {e.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
