"""The per-device task order the engine executes, from :mod:`placer.costmodel.schedules`.

A task is a :class:`placer.costmodel.task.Task` ``(op, microbatch, phase)`` with phase ``fwd``, ``bwd`` or ``update``
(``op = microbatch = -1``), the same type the schedules build.
The simulator (``placer/costmodel/sim.py``) models the same orders, so the engine runs exactly what
:func:`device_tasks` returns: within a micro-batch a device runs forwards in op-index order and backwards in
reverse op-index order (``dataflow``: in the order its list schedule found), and ends with one update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from placer.costmodel.task import Task

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement

__all__ = ["Task", "device_tasks", "tasks_from_schedule"]


def device_tasks(graph: "OpGraph", placement: "Placement", num_devices: int, *, schedule: str,
                 microbatches: int, cluster: "Cluster | None" = None) -> tuple[list[list[Task]], str, str]:
    """Per-device ordered task lists, the order actually built and why it differs from ``schedule`` (a 1F1B order
    that would deadlock falls back to ``gpipe``; see :mod:`placer.costmodel.schedules`; "" when it does not).

    A schedule ordered by costs (``dataflow``) is built from the simulator of ``graph`` on ``cluster`` (the one
    that predicts the step, so both run the same lists)."""
    from placer.costmodel.schedules import COSTED, build_schedule  # noqa: PLC0415 - workers import Task only

    sim = None
    if schedule in COSTED:
        if cluster is None:
            raise ValueError(f"schedule {schedule!r} orders tasks by their costs: it needs the cluster")
        from placer.costmodel.sim import get_simulator  # noqa: PLC0415

        sim = get_simulator(graph, cluster)
    sched = build_schedule(schedule, graph, placement, num_devices, microbatches=microbatches, sim=sim)
    return tasks_from_schedule(sched, num_devices), str(sched.order), str(sched.note)


def tasks_from_schedule(sched: Any, num_devices: int) -> list[list[Task]]:
    """``placer.costmodel.schedules.Schedule`` as :class:`Task` lists per device."""
    return [sched.tasks(d) for d in range(num_devices)]
