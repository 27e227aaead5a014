"""What the parent sends to its workers: typed, frozen commands, with the engine's defaults in one place.

:class:`MeasureCommand` carries everything one measurement needs (the placement, each device's task order and
the run options); :class:`placer.engine.measurer.EngineConfig` takes its optimizer defaults from here, and the
workers (:mod:`placer.engine.runtime`, :mod:`placer.engine.pipelining`) read the fields, never a dict with
fallbacks of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from placer.costmodel.task import Task

OPTIMIZERS = ("sgd", "adam")
"""Parameter updates a worker can run."""
DEFAULT_OPTIMIZER = "sgd"
"""The engine's update: plain SGD (no optimizer state, so measurements compare placements, not Adam's memory)."""
DEFAULT_LR = 0.01
"""Learning rate of :data:`DEFAULT_OPTIMIZER`."""
BACKENDS = ("ops", "pipelining")
"""``ops``: the op-level executor (any placement); ``pipelining``: ``torch.distributed.pipelining``."""
FAULTS = ("crash", "hang", "oom", "error")
"""Test hooks a worker can inject midway through its last step."""


def check_optimizer(name: str) -> None:
    """One-line ``ValueError`` unless ``name`` is in :data:`OPTIMIZERS`."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


@dataclass(frozen=True, kw_only=True, eq=False)
class MeasureCommand:
    """Measure one placement: plan, warm up, then time ``steps`` training steps (every rank gets the same one)."""

    device_of_op: np.ndarray
    """``(n,)`` device index of every op."""
    tasks: list[list[Task]]
    """Each device's task order (:func:`placer.engine.ordering.device_tasks`)."""
    microbatches: int = 1
    """Micro-batches per step (the batch is split along its first dimension)."""
    steps: int
    """Measured steps."""
    warmup: int
    """Unmeasured steps before them."""
    schedule: str = "none"
    """The schedule the tasks come from (``pipelining`` builds its own from the name)."""
    recompute: tuple[int, ...] = ()
    """Devices that recompute activations (each fused segment or stage checkpointed)."""
    backend: str = "ops"
    """One of :data:`BACKENDS`."""
    update: bool = True
    """Run the optimizer step (False: forward and backward only, the weights stay as they are)."""
    collect: bool = False
    """Send back each owned parameter and its gradient after the last step (tests compare them)."""
    optimizer: str = DEFAULT_OPTIMIZER
    """One of :data:`OPTIMIZERS`."""
    lr: float = DEFAULT_LR
    """Learning rate of ``optimizer``."""
    track_memory: bool = True
    """CPU devices: account activation memory in the first step (``executor.MemoryTracker``)."""
    fault: str | None = None
    """A test hook from :data:`FAULTS`, injected on rank :attr:`fault_rank`."""
    fault_rank: int | None = None
    """Rank that injects :attr:`fault` (``None``: the last rank)."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown engine backend {self.backend!r}; choose {' or '.join(BACKENDS)}")
        if self.fault is not None and self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={self.steps}, warmup={self.warmup}")
        check_optimizer(self.optimizer)


@dataclass(frozen=True, kw_only=True)
class LoadCommand:
    """Rebuild the model of another graph in the same processes and process group."""

    factory: Callable[[], Any]
    """Zero-argument picklable callable returning a ``graphs.trace.TracedModel``."""
    op_names: tuple[str, ...]
    """The graph's op names; the rebuilt trace must match them exactly."""


@dataclass(frozen=True)
class PingCommand:
    """Answer ``ok`` (a liveness check)."""


@dataclass(frozen=True)
class StopCommand:
    """Leave the process group and exit."""


Command = MeasureCommand | LoadCommand | PingCommand | StopCommand
"""Everything a worker understands."""
