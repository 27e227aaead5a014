"""The placement JSON (schema ``placer.placement/v1``): write, read and validate.

The file is what trainers consume: ``ops`` maps op names to device indices, ``modules`` maps ``nn.Module`` paths
to device indices (what a single-process model-parallel trainer needs), and ``stages`` gives the contiguous
pipeline split when there is one, ``module_fqns_per_model_part`` the same split as torchtitan names it (the
model parts each stage owns, :mod:`placer.io.parts`). ``placer/io/schemas/placement.schema.json`` is the JSON
Schema; keys are sorted and files are written atomically, so a placement.json is always complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from graphs.ir import OpGraph
from graphs.jsonio import read_json, write_json_atomic
from placer.core.cluster import Cluster
from placer.core.placement import Placement
from placer.core.result import StepResult
from placer.io.parts import model_part_fqns

SCHEMA = "placer.placement/v1"

SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "placement.schema.json"


def module_devices(graph: OpGraph, placement: Placement) -> dict[str, int]:
    """Device per module path: the device of the module's parameter-owning op, else of most of its ops."""
    votes: dict[str, Counter] = {}
    owner: dict[str, int] = {}
    for i, path in enumerate(graph.module_paths):
        if not path:
            continue
        dev = int(placement.device_of_op[i])
        votes.setdefault(path, Counter())[dev] += 1
        if graph.param_bytes[i] > 0 and path not in owner:
            owner[path] = dev
    return {p: owner.get(p, c.most_common(1)[0][0]) for p, c in sorted(votes.items())}


def contiguous_stages(graph: OpGraph, placement: Placement, *, interleaved: bool = False
                      ) -> list[dict[str, Any]] | None:
    """Stages ``[{device, first_op, last_op}]`` if each device holds one contiguous run of ops, or, ``interleaved``
    (a plan of ``interleaved-1f1b``), the runs go round the ``D`` devices in turn (stage ``k`` on stage
    ``k mod D``'s device, the layout of torch's interleaved schedules: virtual stages); else None.

    Input placeholders and parameter reads (``input``/``get_attr`` ops) do not break contiguity: a pipeline feeds
    every model input to the first stage and reads parameters where they are used (:mod:`placer.io.loaders`).
    Stage ``i`` covers every op from its ``first_op`` up to the op before stage ``i+1``'s ``first_op``.
    """
    if graph.n == 0:
        return None
    movable = np.array([k in ("input", "get_attr") for k in graph.op_kinds], dtype=bool)
    idx = np.flatnonzero(~movable)
    if idx.size == 0:
        return None
    dev = placement.device_of_op[idx]
    cut = np.flatnonzero(dev[1:] != dev[:-1]) + 1
    devs = dev[np.concatenate([[0], cut])]
    d = len(set(devs.tolist()))
    if len(devs) > d and (not interleaved or len(devs) % d or any(devs[k] != devs[k % d] for k in range(len(devs)))):
        return None
    starts = np.concatenate([[0], idx[cut]])
    ends = np.concatenate([idx[cut] - 1, [graph.n - 1]])
    return [{"device": int(d), "first_op": graph.op_names[s], "last_op": graph.op_names[e]}
            for d, s, e in zip(devs, starts, ends)]


def _time_entry(result: StepResult | None, cluster: Cluster) -> dict[str, Any] | None:
    if result is None:
        return None
    return {
        "step_time_s": float(result.step_time_s) if result.ok else None,
        "source": f"{result.source}:{cluster.name}",
        "failure": result.failure if not result.ok else None,
        # a 1F1B order that would deadlock runs GPipe's: say which order the time is of
        **({"schedule_ran": result.order, "schedule_note": result.schedule_note}
           if result.order != result.schedule else {}),
    }


def _schedule_entry(graph: OpGraph, cluster: Cluster, placement: Placement, schedule: str, microbatches: int,
                    *results: StepResult | None) -> dict[str, Any]:
    """The plan's schedule part: name, micro-batches, stages and virtual stages per device, the devices that
    recompute activations (the first result's). ``schedule="auto"`` records what the search chose, read from the
    first result given (its ``schedule``, ``microbatches`` and ``recompute``)."""
    from placer.costmodel.plans import AUTO, make_plan

    chosen_by = "given"
    res = next((r for r in results if r is not None), None)
    if schedule == AUTO:
        if res is None:
            raise ValueError("schedule 'auto' needs the predicted or measured result that says what was chosen")
        schedule, microbatches, chosen_by = res.schedule, res.microbatches, AUTO
    plan = make_plan(graph, placement, cluster.num_devices, schedule, microbatches,
                     res.recompute if res is not None else ())
    return {**plan.to_json(), "chosen_by": chosen_by}


def placement_to_json(
    graph: OpGraph,
    cluster: Cluster,
    placement: Placement,
    *,
    method: str,
    seed: int = 0,
    run: str | None = None,
    schedule: str = "none",
    microbatches: int = 1,
    predicted: StepResult | None = None,
    measured: StepResult | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    placement.validate(graph, cluster)
    from placer import __version__

    stages = contiguous_stages(graph, placement, interleaved=schedule == "interleaved-1f1b")
    return {
        "schema": SCHEMA,
        "graph": {"name": graph.name, "hash": graph.content_hash, "num_ops": graph.n},
        "cluster": cluster.name,
        "devices": list(cluster.device_names),
        "ops": {name: int(d) for name, d in zip(graph.op_names, placement.device_of_op.tolist())},
        "modules": module_devices(graph, placement),
        "stages": stages,
        # torchtitan's form of the split, for trainers that build stages from module names
        "module_fqns_per_model_part": model_part_fqns(graph, stages),
        "schedule": _schedule_entry(graph, cluster, placement, schedule, microbatches, predicted, measured),
        "predicted": _time_entry(predicted, cluster),
        "measured": _time_entry(measured, cluster),
        "provenance": {
            "method": method,
            "run": run,
            **({"source": source} if source else {}),
            "seed": int(seed),
            "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "placer_version": __version__,
        },
    }


def save_placement(path: str | Path, graph: OpGraph, cluster: Cluster, placement: Placement, **kw: Any) -> Path:
    """Write a placement JSON (see :func:`placement_to_json` for the keyword arguments)."""
    return write_json_atomic(path, placement_to_json(graph, cluster, placement, **kw))


@dataclass(frozen=True)
class LoadedPlacement:
    placement: Placement
    doc: dict[str, Any]


def validate_document(doc: Any) -> None:
    """Check a placement document against the JSON Schema; one-line ``ValueError`` on failure."""
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ValueError(f"placement JSON invalid at {where}: {e.message.splitlines()[0]}") from None


def load_placement(path: str | Path, graph: OpGraph | None = None, cluster: Cluster | None = None) -> LoadedPlacement:
    """Read a placement JSON; with ``graph``/``cluster``, check it belongs to them (hash, op and device names)."""
    doc = read_json(path, "placement")
    return placement_from_document(doc, graph, cluster, where=str(path))


def placement_from_document(doc: Any, graph: OpGraph | None = None, cluster: Cluster | None = None, *,
                            where: str = "placement") -> LoadedPlacement:
    validate_document(doc)
    _check_references(doc, where)
    devices = doc["devices"]
    if cluster is not None and list(cluster.device_names) != list(devices):
        raise ValueError(f"{where}: devices {devices} do not match cluster {cluster.name!r} "
                         f"{list(cluster.device_names)}")
    if graph is None:
        return LoadedPlacement(Placement(np.array(list(doc["ops"].values()), dtype=np.int64)), doc)
    if doc["graph"]["hash"] != graph.content_hash:
        raise ValueError(f"{where}: made for graph {doc['graph']['name']!r} ({doc['graph']['hash']}), "
                         f"not {graph.name!r} ({graph.content_hash})")
    missing = [n for n in graph.op_names if n not in doc["ops"]]
    if missing:
        raise ValueError(f"{where}: no device for op {missing[0]!r} ({len(missing)} ops missing)")
    extra = set(doc["ops"]) - set(graph.op_names)
    if extra:
        raise ValueError(f"{where}: unknown op {sorted(extra)[0]!r} not in graph {graph.name!r}")
    placement = Placement(np.array([doc["ops"][n] for n in graph.op_names], dtype=np.int64))
    if cluster is not None:
        placement.validate(graph, cluster)
    return LoadedPlacement(placement, doc)


def _check_references(doc: Mapping[str, Any], where: str) -> None:
    """What the schema cannot say: every device index names a listed device (ops, modules, stages, recompute), the
    devices are distinct, some op is placed, and the step times are finite numbers (or null)."""
    devices = doc["devices"]
    if len(set(devices)) != len(devices):
        raise ValueError(f"{where}: devices {devices} list a device twice")
    if not doc["ops"]:
        raise ValueError(f"{where}: places no op")
    sched = doc["schedule"]
    refs = [*((f"op {k!r} is on", d) for k, d in doc["ops"].items()),
            *((f"module {k!r} is on", d) for k, d in (doc.get("modules") or {}).items()),
            *(("schedule.recompute names", d) for d in sched.get("recompute", ())),
            *((f"stage {i} is on", st.get("device", 0)) for i, st in enumerate(doc.get("stages") or ()))]
    for what, d in refs:
        if not 0 <= d < len(devices):
            raise ValueError(f"{where}: {what} device {d}, but only {len(devices)} devices are listed")
    for key in ("stages", "virtual_stages"):  # one entry per device; a stage rank below the device count
        per_device = sched.get(key)
        if per_device is not None and (len(per_device) != len(devices)
                                       or (key == "stages" and max(per_device, default=0) >= len(devices))):
            raise ValueError(f"{where}: schedule.{key} {per_device} is not one entry per device "
                             f"({len(devices)} devices)")
    for key in ("predicted", "measured"):
        t = (doc.get(key) or {}).get("step_time_s")
        if t is not None and not math.isfinite(t):
            raise ValueError(f"{where}: {key}.step_time_s is {t}, not a finite number of seconds")


PlacementLike = Mapping[str, Any] | str | os.PathLike
"""A placement document (dict), a path to a placement JSON, or a :class:`LoadedPlacement`."""


def document_of(placement: Any) -> dict[str, Any]:
    """The validated placement document from a dict, a path or a :class:`LoadedPlacement`."""
    if isinstance(placement, LoadedPlacement):
        return placement.doc
    if isinstance(placement, (str, os.PathLike)):
        return load_placement(placement).doc
    if isinstance(placement, Mapping):
        return placement_from_document(dict(placement)).doc
    raise ValueError(f"placement must be a placement JSON path or document, got {type(placement).__name__}")
