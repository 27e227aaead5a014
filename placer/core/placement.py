"""A placement: one device index per op of a graph, for one cluster."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from graphs.grouping import colocation_first

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster


@dataclass(frozen=True, eq=False)
class Placement:
    """``device_of_op[i]`` is the index (into ``cluster.devices``) of the device running op ``i``."""

    device_of_op: np.ndarray

    def __post_init__(self) -> None:
        arr = np.array(self.device_of_op, dtype=np.int64).reshape(-1)
        arr.setflags(write=False)
        object.__setattr__(self, "device_of_op", arr)

    @property
    def n(self) -> int:
        return int(self.device_of_op.shape[0])

    @classmethod
    def single(cls, graph: "OpGraph", device: int = 0) -> "Placement":
        return cls(np.full(graph.n, device, dtype=np.int64))

    @classmethod
    def from_groups(cls, group_of_op: Sequence[int] | np.ndarray,
                    device_of_group: Sequence[int] | np.ndarray) -> "Placement":
        """Expand a per-group placement to ops (the RL acts on groups, the engine on ops)."""
        return cls(np.asarray(device_of_group, dtype=np.int64)[np.asarray(group_of_op, dtype=np.int64)])

    def validate(self, graph: "OpGraph", cluster: "Cluster") -> "Placement":
        """Raise a one-line ``ValueError`` unless this placement fits the graph and the cluster."""
        if self.n != graph.n:
            raise ValueError(f"placement has {self.n} ops but graph {graph.name!r} has {graph.n}")
        d = cluster.num_devices
        bad = np.flatnonzero((self.device_of_op < 0) | (self.device_of_op >= d))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"op {graph.op_names[i]!r} is placed on device {int(self.device_of_op[i])}, "
                f"but cluster {cluster.name!r} has devices 0..{d - 1}"
            )
        # ops of one colocation group must share a device
        first_dev: dict[int, int] = {}
        for i, (g, dev) in enumerate(zip(graph.colocation.tolist(), self.device_of_op.tolist())):
            if first_dev.setdefault(g, dev) != dev:
                raise ValueError(
                    f"op {graph.op_names[i]!r} is on device {dev} but its colocation group {g} is on {first_dev[g]}"
                )
        return self

    def colocated(self, graph: "OpGraph") -> "Placement":
        """Move every op to the device of the first op of its colocation group (repairs a sampled placement)."""
        return Placement(self.device_of_op[colocation_first(graph)])

    @property
    def key(self) -> str:
        """Stable hash of the assignment (used to cache rewards)."""
        return hashlib.sha1(self.device_of_op.astype("<i8").tobytes()).hexdigest()[:16]

    def devices_used(self) -> np.ndarray:
        return np.unique(self.device_of_op)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and np.array_equal(self.device_of_op, other.device_of_op)

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        counts = np.bincount(self.device_of_op) if self.n else []
        return f"Placement(n={self.n}, ops_per_device={list(map(int, counts))})"
