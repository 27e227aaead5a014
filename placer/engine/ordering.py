"""The per-device task order the engine executes, from :mod:`placer.costmodel.schedules`.

A task is a :class:`placer.costmodel.task.Task` ``(op, microbatch, phase)`` with phase ``fwd``, ``bwd`` or ``update``
(``op = microbatch = -1``), the same type the schedules build.
The simulator (``placer/costmodel/sim.py``) models the same orders, so the engine runs exactly what
:func:`device_tasks` returns: within a micro-batch a device runs forwards in op-index order and backwards in
reverse op-index order, and ends with one update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from placer.costmodel.task import Task

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.placement import Placement

__all__ = ["Task", "device_tasks", "tasks_from_schedule"]


def device_tasks(graph: "OpGraph", placement: "Placement", num_devices: int, *, schedule: str,
                 microbatches: int) -> tuple[list[list[Task]], str, str]:
    """Per-device ordered task lists, the order actually built and why it differs from ``schedule`` (a 1F1B order
    that would deadlock falls back to ``gpipe``; see :mod:`placer.costmodel.schedules`; "" when it does not)."""
    from placer.costmodel.schedules import build_schedule  # noqa: PLC0415 - workers import Task only, not the kernels

    sched = build_schedule(schedule, graph, placement, num_devices, microbatches=microbatches)
    return tasks_from_schedule(sched, num_devices), str(sched.order), str(sched.note)


def tasks_from_schedule(sched: Any, num_devices: int) -> list[list[Task]]:
    """``placer.costmodel.schedules.Schedule`` as :class:`Task` lists per device."""
    return [sched.tasks(d) for d in range(num_devices)]
