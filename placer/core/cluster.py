"""Clusters: the devices a graph is placed on and the links between them.

A :class:`Device` names the cost set it runs with (``kind``, a key of ``OpGraph.costs``) and a ``speed``
relative to that profile, so one measured ``cpu`` profile can describe a faster host CPU (speed > 1) and a
roofline ``K80`` profile describes the ColocRL-era GPUs. Links are a dense ``(D, D)`` matrix of bandwidth and
latency; a transfer of ``b`` bytes from ``i`` to ``j`` takes ``latency_s[i, j] + b / bandwidth_Bps[i, j]``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from graphs.jsonio import JsonFile

SCHEMA = "placer.cluster/v1"
GiB = 1 << 30


META_NUMBERS: dict[str, bool] = {
    "dispatch_overhead_s": False, "send_overhead_s": False, "recv_overhead_s": False, "message_wakeup_s": False,
    "segment_fwd_overhead_s": False, "segment_bwd_overhead_s": False, "step_overhead_s": False,
    "param_traffic_per_microbatch": False, "cache_bytes": False, "memory_bandwidth_Bps": True}
"""The ``meta`` entries the cost model reads, each a number or ``{device kind: number}``; True: must be positive
(a bandwidth), else >= 0. All must be finite."""


def _real(x: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_meta(cluster: str, meta: Any) -> None:
    """A one-line ``ValueError`` for a ``meta`` that is not a mapping or holds a :data:`META_NUMBERS` entry that is
    not a finite number in range (or a ``{kind: number}`` mapping of them)."""
    if not isinstance(meta, Mapping):
        raise ValueError(f"cluster {cluster!r}: meta must be an object, got {type(meta).__name__}")
    for key, positive in META_NUMBERS.items():
        if key not in meta:
            continue
        v = meta[key]
        for x in (v.values() if isinstance(v, Mapping) else (v,)):
            if not _real(x) or not (x > 0 if positive else x >= 0):
                raise ValueError(f"cluster {cluster!r}: meta {key} must be a finite number "
                                 f"{'> 0' if positive else '>= 0'} (or {{kind: number}}), got {x!r}")


def is_cuda_name(name: str) -> bool:
    """Whether the engine runs the device called ``name`` on a CUDA GPU: a torch device string ``cuda`` or
    ``cuda:N``. Every other device, a simulated preset's ``gpu:0`` included, runs on a host CPU core."""
    return name.startswith("cuda")


@dataclass(frozen=True, kw_only=True)
class Device:
    name: str
    """Unique device name, e.g. ``cpu:0``, ``cuda:1`` or ``gpu:0`` (torch device strings where real)."""
    kind: str
    """Cost set this device uses: a key of ``OpGraph.costs`` (``cpu``, ``K80``, ``V100`` ...)."""
    memory_bytes: int
    """Memory available for parameters, optimizer state, activations and temporaries."""
    speed: float = 1.0
    """Speed relative to the ``kind`` profile: op time = profiled time / speed."""

    @property
    def is_cpu(self) -> bool:
        """A host CPU: its cost set is ``cpu`` or its name is ``cpu...`` (the one "is this a CPU" rule: ColocRL's
        MinCut and Expert leave these out when GPUs exist, the policies see it as a device feature)."""
        return self.kind.lower() == "cpu" or self.name.lower().startswith("cpu")

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a device name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"device {self.name!r}: kind must be a non-empty string, got {self.kind!r}")
        if not _real(self.memory_bytes) or self.memory_bytes < 1:
            raise ValueError(f"device {self.name!r}: memory_bytes must be a finite number >= 1, "
                             f"got {self.memory_bytes!r}")
        if not _real(self.speed) or not self.speed > 0:
            raise ValueError(f"device {self.name!r}: speed must be a finite positive number, got {self.speed!r}")


@dataclass(frozen=True, kw_only=True, eq=False)
class Cluster(JsonFile):
    """Devices plus a dense link model."""

    JSON_WHAT = "cluster"

    name: str
    devices: tuple[Device, ...]
    bandwidth_Bps: np.ndarray
    """``(D, D)`` bytes per second from device i to device j (diagonal unused)."""
    latency_s: np.ndarray
    """``(D, D)`` seconds of fixed cost per transfer from i to j (diagonal unused)."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Provenance: ``preset`` or ``calibrated`` with date and measurements."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        d = len(self.devices)
        if d == 0:
            raise ValueError("a cluster needs at least one device")
        names = [dev.name for dev in self.devices]
        if len(set(names)) != d:
            raise ValueError(f"cluster {self.name!r} has duplicate device names: {names}")
        for key in ("bandwidth_Bps", "latency_s"):
            arr = np.array(getattr(self, key), dtype=np.float64)
            if arr.shape != (d, d):
                raise ValueError(f"cluster {self.name!r}: {key} must be {d}x{d}, got {arr.shape}")
            off = ~np.eye(d, dtype=bool)
            if not np.isfinite(arr[off]).all():
                raise ValueError(f"cluster {self.name!r}: {key} must be finite between devices")
            if key == "bandwidth_Bps" and not (arr[off] > 0).all():
                raise ValueError(f"cluster {self.name!r}: bandwidth must be positive between devices")
            if key == "latency_s" and not (arr[off] >= 0).all():
                raise ValueError(f"cluster {self.name!r}: latency must be non-negative")
            arr.setflags(write=False)
            object.__setattr__(self, key, arr)
        _check_meta(self.name, self.meta)
        object.__setattr__(self, "meta", json.loads(json.dumps(dict(self.meta))))

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def device_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.devices)

    def index(self, name: str) -> int:
        for i, d in enumerate(self.devices):
            if d.name == name:
                return i
        raise KeyError(f"unknown device {name!r} in cluster {self.name!r}; has {list(self.device_names)}")

    def transfer_s(self, src: int, dst: int, nbytes: float) -> float:
        """Seconds to move ``nbytes`` from device ``src`` to ``dst`` (0 on the same device)."""
        if src == dst or nbytes <= 0:
            return 0.0
        return float(self.latency_s[src, dst] + nbytes / self.bandwidth_Bps[src, dst])

    def subset(self, indices: Sequence[int], name: str | None = None) -> "Cluster":
        """The cluster restricted to some devices (e.g. MinCut: the GPUs without the CPU)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Cluster(
            name=name or f"{self.name}[{','.join(str(int(i)) for i in idx)}]",
            devices=tuple(self.devices[i] for i in idx),
            bandwidth_Bps=self.bandwidth_Bps[np.ix_(idx, idx)],
            latency_s=self.latency_s[np.ix_(idx, idx)],
            meta=dict(self.meta, parent=self.name),
        )

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "name": self.name,
            "devices": [dataclasses.asdict(d) for d in self.devices],
            "bandwidth_Bps": self.bandwidth_Bps.tolist(),
            "latency_s": self.latency_s.tolist(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Cluster":
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA:
            raise ValueError(f"not a cluster file (schema {SCHEMA!r} expected)")
        try:
            return cls(
                name=d["name"],
                devices=tuple(Device(**dev) for dev in d["devices"]),
                bandwidth_Bps=d["bandwidth_Bps"],
                latency_s=d["latency_s"],
                meta=d.get("meta", {}),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed cluster JSON: {e}") from None

    @classmethod
    def uniform(
        cls,
        name: str,
        devices: Sequence[Device],
        *,
        bandwidth_Bps: float,
        latency_s: float,
        meta: Mapping[str, Any] | None = None,
    ) -> "Cluster":
        """All pairs joined by identical links."""
        d = len(devices)
        return cls(
            name=name,
            devices=tuple(devices),
            bandwidth_Bps=np.full((d, d), float(bandwidth_Bps)),
            latency_s=np.full((d, d), float(latency_s)),
            meta=meta or {"source": "preset"},
        )


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, Callable[[], Cluster]] = {}


def register_preset(name: str) -> Callable[[Callable[[], Cluster]], Callable[[], Cluster]]:
    def deco(fn: Callable[[], Cluster]) -> Callable[[], Cluster]:
        PRESETS[name] = fn
        return fn

    return deco


@register_preset("cpu-2")
def _cpu2() -> Cluster:
    # This machine: two gloo worker processes, each pinned to one core. Link numbers measured 2026-11-25
    # (shared/REFERENCES.md): ~160 us one-way for a small tensor, ~1.5 GB/s for 4 MB on loopback.
    devs = [Device(name=f"cpu:{i}", kind="cpu", memory_bytes=10 * GiB, speed=1.0) for i in range(2)]
    return Cluster.uniform("cpu-2", devs, bandwidth_Bps=1.5e9, latency_s=160e-6,
                           meta={"source": "preset", "note": "2 pinned CPU workers, gloo over loopback"})


def _host_plus_gpus(name: str, num_gpus: int, gpu_kind: str, gpu_memory_bytes: int) -> Cluster:
    # ColocRL's machines: one multi-core host CPU plus K80-class GPUs on PCIe 3 (~8 GB/s effective,
    # ~15 us per transfer through the host). The host CPU runs ops from the 1-core ``cpu`` profile,
    # sped up by its extra cores (TF used all of them, with imperfect scaling).
    devs = [Device(name="cpu:0", kind="cpu", memory_bytes=64 * GiB, speed=6.0)]
    devs += [Device(name=f"gpu:{i}", kind=gpu_kind, memory_bytes=gpu_memory_bytes) for i in range(num_gpus)]
    return Cluster.uniform(name, devs, bandwidth_Bps=8e9, latency_s=15e-6,
                           meta={"source": "preset", "note": f"host CPU + {num_gpus}x {gpu_kind} on PCIe"})


@register_preset("cpu+2gpu")
def _cpu_2gpu() -> Cluster:
    return _host_plus_gpus("cpu+2gpu", 2, "K80", 12 * GiB)


@register_preset("cpu+4gpu")
def _cpu_4gpu() -> Cluster:
    return _host_plus_gpus("cpu+4gpu", 4, "K80", 12 * GiB)


@register_preset("v100x8-nvlink")
def _v100x8() -> Cluster:
    devs = [Device(name=f"cuda:{i}", kind="V100", memory_bytes=16 * GiB) for i in range(8)]
    return Cluster.uniform("v100x8-nvlink", devs, bandwidth_Bps=45e9, latency_s=8e-6,
                           meta={"source": "preset", "note": "DGX-1 class, NVLink (uniform approximation)"})


@register_preset("h100x8")
def _h100x8() -> Cluster:
    # Op costs: the ``H100`` cost set, measured on a lent H100 for the shipped graphs, else the roofline estimate.
    devs = [Device(name=f"cuda:{i}", kind="H100", memory_bytes=80 * GiB) for i in range(8)]
    return Cluster.uniform("h100x8", devs, bandwidth_Bps=400e9, latency_s=5e-6,
                           meta={"source": "preset", "note": "HGX H100, NVLink 4 via NVSwitch"})


@register_preset("h100x8-tight")
def _h100x8_tight() -> Cluster:
    # h100x8 with 5.5 GiB per device: tight for gpt-1.3b (batch 4, M = 4). From
    # placer.costmodel.tight.tight_report(h100x8, gpt-1.3b): its memory-balanced 8-stage split peaks at 5.13 GiB
    # under 1F1B x4 and 7.99 GiB under GPipe x4; the whole step on one device needs 45.9 GiB. Other graphs get
    # their own capacity from placer.costmodel.tight.memory_tight.
    devs = [Device(name=f"cuda:{i}", kind="H100", memory_bytes=int(5.5 * GiB)) for i in range(8)]
    return Cluster.uniform("h100x8-tight", devs, bandwidth_Bps=400e9, latency_s=5e-6,
                           meta={"source": "preset", "note": "h100x8 links, 5.5 GiB per device (tight for gpt-1.3b)"})


@register_preset("mixed")
def _mixed() -> Cluster:
    # 4x A100 80 GB + 4x H100 80 GB on NVLink-class links. Op costs: the graphs' ``A100`` and ``H100`` cost sets
    # (measured where a graph has them, else roofline estimates). Links: 300 GB/s, 5 us -- A100's NVLink 3
    # (600 GB/s both ways), which bounds every pair that involves an A100; uniform for simplicity.
    devs = [Device(name=f"cuda:{i}", kind="A100", memory_bytes=80 * GiB) for i in range(4)]
    devs += [Device(name=f"cuda:{i}", kind="H100", memory_bytes=80 * GiB) for i in range(4, 8)]
    return Cluster.uniform("mixed", devs, bandwidth_Bps=300e9, latency_s=5e-6,
                           meta={"source": "preset", "note": "4x A100 80GB + 4x H100 80GB, NVLink-class links"})


@register_preset("h200x8")
def _h200x8() -> Cluster:
    # Op costs: the ``H200`` cost set, measured on a lent H200 where a graph has one (graphs/data), else the
    # roofline estimate. Links as the HGX H100 (same NVLink 4 / NVSwitch).
    devs = [Device(name=f"cuda:{i}", kind="H200", memory_bytes=140 * GiB) for i in range(8)]
    return Cluster.uniform("h200x8", devs, bandwidth_Bps=400e9, latency_s=5e-6,
                           meta={"source": "preset", "note": "HGX H200, NVLink 4 via NVSwitch"})


def get_cluster(name_or_path: str | Path) -> Cluster:
    """A preset by name, or a cluster JSON file; a clear ``ValueError`` otherwise."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    path = Path(key)
    if path.suffix == ".json" or path.exists():
        return Cluster.load(path)
    raise ValueError(f"unknown cluster {key!r}: not a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
