"""Real multi-device execution of placed graphs (torch.distributed workers).

- :class:`Measurer` — warm workers (one per device) measuring many placements; failures become failed
  :class:`~placer.core.result.StepResult` objects, never hangs or orphans.
- :func:`measure` — one-shot measurement of one placement.
- :func:`reference_step` — the single-process (optionally micro-batched) step the engine must reproduce.
- ``python -m placer.engine.worker`` — the same workers under ``torchrun`` (see :mod:`placer.engine.worker`).
- :mod:`placer.engine.command` — the typed commands the parent sends its workers, with the engine defaults;
  :mod:`placer.engine.procs` — process helpers (die with the parent, pin to cores, one-line reasons).

Names are imported lazily so that a worker process (which imports :mod:`placer.engine.worker`) does not pay
for the parent-side modules (schedules and their compiled kernels).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EngineConfig", "Measurer", "StepOutputs", "measure", "reference_step"]

_WHERE = {"EngineConfig": "measurer", "Measurer": "measurer", "StepOutputs": "measurer", "measure": "measurer",
          "reference_step": "reference"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"placer.engine.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'placer.engine' has no attribute {name!r}")
