"""The op-graph IR shared by every layer of placer.

An :class:`OpGraph` is one training step of a model, seen as a DAG of forward ops. Each op's backward runs on
the same device as its forward (TensorFlow colocated gradients the same way, and ColocRL relied on it), so
one node carries both its forward and backward cost.

Ops are indexed ``0..n-1`` in a topological order; every data edge goes from a lower to a higher index.
Per-op arrays are numpy, read-only; the graph is immutable and validated on construction, so any code holding
an ``OpGraph`` can trust it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from graphs.jsonio import JsonFile

SCHEMA = "placer.opgraph/v1"


def _frozen_array(values: Any, dtype: Any, n: int | None = None, *, what: str) -> np.ndarray:
    arr = np.array(values, dtype=dtype)  # always a copy: callers cannot mutate the graph through it
    if n is not None and arr.shape != (n,):
        raise ValueError(f"{what}: expected {n} values, got shape {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where a set of op costs came from."""

    device: str
    """Device the costs describe, e.g. ``cpu`` (this machine's core), ``cuda:NVIDIA H100``, or ``V100``."""
    threads: int
    """Intra-op threads used while profiling (``torch.get_num_threads()``); 0 when estimated."""
    torch_version: str
    """``torch.__version__`` at profiling time."""
    date: str
    """ISO date of the measurement or estimate."""
    method: Literal["measured", "estimated"]
    """``measured`` on the real device, or ``estimated`` by the roofline model for absent hardware."""
    note: str = ""
    """Free text: repeats, CPU model, roofline parameters, ..."""

    def __post_init__(self) -> None:
        if self.method not in ("measured", "estimated"):
            raise ValueError(f"provenance method must be 'measured' or 'estimated', got {self.method!r}")


@dataclass(frozen=True, kw_only=True, eq=False)
class OpCosts:
    """Forward and backward time of every op on one kind of device (full batch, one step)."""

    fwd_s: np.ndarray
    """Forward time per op, seconds."""
    bwd_s: np.ndarray
    """Backward time per op, seconds (gradients w.r.t. inputs and parameters)."""
    provenance: Provenance
    microbatch_s: Mapping[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    """Measured ``(fwd_s, bwd_s)`` per op of ONE micro-batch of ``batch / M``, keyed by ``M`` (> 1); a count absent
    here is derived by the simulator (:func:`placer.costmodel.sim.per_microbatch_s`). Omitted from JSON when empty."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fwd_s", _frozen_array(self.fwd_s, np.float64, what="fwd_s"))
        object.__setattr__(self, "bwd_s", _frozen_array(self.bwd_s, np.float64, what="bwd_s"))
        mb = {int(m): tuple(_frozen_array(a, np.float64, self.fwd_s.shape[0], what=f"microbatch_s[{m}]") for a in v)
              for m, v in sorted(self.microbatch_s.items(), key=lambda kv: int(kv[0]))}
        if self.fwd_s.shape != self.bwd_s.shape or any(m < 2 or not (np.r_[v] >= 0).all() for m, v in mb.items()):
            raise ValueError("fwd_s and bwd_s must have the same length; microbatch_s keys >= 2, times >= 0")
        object.__setattr__(self, "microbatch_s", mb)

    @property
    def step_s(self) -> np.ndarray:
        """Forward plus backward time per op."""
        return self.fwd_s + self.bwd_s

    def to_json(self) -> dict[str, Any]:
        return {
            "fwd_s": [float(x) for x in self.fwd_s],
            "bwd_s": [float(x) for x in self.bwd_s],
            "provenance": dataclasses.asdict(self.provenance),
            **({"microbatch_s": {str(m): {"fwd_s": f.tolist(), "bwd_s": b.tolist()} for m, (f, b) in
                                 self.microbatch_s.items()}} if self.microbatch_s else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OpCosts":
        mb = {int(m): (v["fwd_s"], v["bwd_s"]) for m, v in d.get("microbatch_s", {}).items()}
        return cls(fwd_s=d["fwd_s"], bwd_s=d["bwd_s"], provenance=Provenance(**d["provenance"]), microbatch_s=mb)


@dataclass(frozen=True, kw_only=True, eq=False)
class OpGraph(JsonFile):
    """An immutable, validated op graph of one training step.

    Per-op sequences all have length ``n`` and are in topological order. Byte counts are for the full batch.
    """

    JSON_WHAT = "graph"

    name: str
    """Graph name, e.g. ``rnnlm-small``."""
    op_names: tuple[str, ...]
    """Unique op names (for traced models: the torch.fx node names)."""
    op_kinds: tuple[str, ...]
    """Op type, e.g. ``LSTMCell``, ``Linear``, ``add``, ``input``, ``loss``."""
    module_paths: tuple[str, ...]
    """Dotted path of the ``nn.Module`` that owns the op ('' for top-level functional ops); used by trainers."""
    out_shapes: tuple[tuple[int, ...], ...]
    """Shape of each op's (first) output tensor; ``()`` for scalars or non-tensor outputs."""
    out_bytes: np.ndarray
    """Bytes of each op's outputs."""
    param_bytes: np.ndarray
    """Bytes of parameters the op owns (shared parameters are counted at their first user only)."""
    stash_bytes: np.ndarray
    """Bytes saved for backward by the op (activations kept between forward and backward)."""
    temp_bytes: np.ndarray
    """Peak temporary bytes while the op runs, beyond its inputs and outputs."""
    flops: np.ndarray
    """Forward floating-point operations (used by the roofline estimate)."""
    colocation: np.ndarray
    """Colocation group id per op: ops of one group must share a device (e.g. calls of one shared module)."""
    edge_index: np.ndarray
    """Data edges, shape ``(2, E)``, ``edge_index[0] < edge_index[1]``, no duplicates."""
    edge_bytes: np.ndarray
    """Bytes carried by each edge (activation forward, same-size gradient backward)."""
    costs: Mapping[str, OpCosts] = field(default_factory=dict)
    """Per-device-kind costs, e.g. ``{"cpu": ..., "K80": ...}``."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """JSON-able facts about the source: model, config, batch, factory path, trace method."""

    def __post_init__(self) -> None:
        n = len(self.op_names)
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 -- frozen dataclass
        set_("op_names", tuple(str(x) for x in self.op_names))
        set_("op_kinds", tuple(str(x) for x in self.op_kinds))
        set_("module_paths", tuple(str(x) for x in self.module_paths))
        set_("out_shapes", tuple(tuple(int(d) for d in s) for s in self.out_shapes))
        for key in ("op_kinds", "module_paths", "out_shapes"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"{key}: expected {n} values, got {len(getattr(self, key))}")
        for key in ("out_bytes", "param_bytes", "stash_bytes", "temp_bytes"):
            set_(key, _frozen_array(getattr(self, key), np.int64, n, what=key))
        set_("flops", _frozen_array(self.flops, np.float64, n, what="flops"))
        set_("colocation", _frozen_array(self.colocation, np.int64, n, what="colocation"))
        ei = np.array(self.edge_index, dtype=np.int64).reshape(2, -1)
        ei.setflags(write=False)
        set_("edge_index", ei)
        set_("edge_bytes", _frozen_array(self.edge_bytes, np.int64, ei.shape[1], what="edge_bytes"))
        set_("costs", dict(self.costs))
        set_("meta", json.loads(json.dumps(dict(self.meta))))  # detached, JSON-able copy
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        n = self.n
        seen: dict[str, int] = {}
        for i, name in enumerate(self.op_names):
            if not name:
                raise ValueError(f"op {i} has an empty name")
            if name in seen:
                raise ValueError(f"duplicate op name {name!r} (ops {seen[name]} and {i})")
            seen[name] = i
        for key in ("out_bytes", "param_bytes", "stash_bytes", "temp_bytes", "flops"):
            arr = getattr(self, key)
            bad = np.flatnonzero(~(arr >= 0))
            if bad.size:
                raise ValueError(f"op {self.op_names[bad[0]]!r} has negative or NaN {key}: {arr[bad[0]]}")
            if np.isinf(arr).any():
                raise ValueError(f"op {self.op_names[int(np.flatnonzero(np.isinf(arr))[0])]!r} has an infinite {key}")
        if self.colocation.size and self.colocation.min() < 0:
            i = int(np.argmin(self.colocation))
            raise ValueError(f"op {self.op_names[i]!r} has a negative colocation group")
        src, dst = self.edge_index
        if src.size:
            if src.min() < 0 or dst.min() < 0 or src.max() >= n or dst.max() >= n:
                raise ValueError(f"edge_index refers to ops outside 0..{n - 1}")
            back = np.flatnonzero(src >= dst)
            if back.size:
                e = back[0]
                a, b = self.op_names[src[e]], self.op_names[dst[e]]
                if src[e] == dst[e]:
                    raise ValueError(f"self-loop on op {a!r}")
                raise ValueError(
                    f"edge {a!r} -> {b!r} goes against the topological order "
                    f"(the graph is cyclic or its ops are not topologically sorted)"
                )
            keys = src * n + dst
            if np.unique(keys).size != keys.size:
                _, idx, counts = np.unique(keys, return_index=True, return_counts=True)
                e = idx[counts > 1][0]
                raise ValueError(f"duplicate edge {self.op_names[src[e]]!r} -> {self.op_names[dst[e]]!r}")
            bad = np.flatnonzero(self.edge_bytes < 0)
            if bad.size:
                e = bad[0]
                raise ValueError(f"edge {self.op_names[src[e]]!r} -> {self.op_names[dst[e]]!r} has negative bytes")
        for kind, c in self.costs.items():
            if c.fwd_s.shape != (n,):
                raise ValueError(f"costs[{kind!r}]: expected {n} values, got {c.fwd_s.shape[0]}")
            for key in ("fwd_s", "bwd_s"):
                arr = getattr(c, key)
                bad = np.flatnonzero(~(arr >= 0))
                if bad.size:
                    raise ValueError(
                        f"op {self.op_names[bad[0]]!r} has negative or NaN {key} on {kind!r}: {arr[bad[0]]}"
                    )
                bad = np.flatnonzero(np.isinf(arr))  # an op that never finishes: every step time would be inf
                if bad.size:
                    raise ValueError(f"op {self.op_names[bad[0]]!r} has an infinite {key} on {kind!r} (op costs are "
                                     f"finite seconds)")

    # ------------------------------------------------------------------ accessors
    @property
    def n(self) -> int:
        """Number of ops."""
        return len(self.op_names)

    @property
    def num_edges(self) -> int:
        return int(self.edge_index.shape[1])

    def index(self, name: str) -> int:
        """Index of the op called ``name`` (KeyError naming it if absent)."""
        try:
            return self._name_index[name]
        except KeyError:
            raise KeyError(f"unknown op {name!r} in graph {self.name!r}") from None

    @property
    def _name_index(self) -> dict[str, int]:
        cache = self.__dict__.get("_name_index_cache")
        if cache is None:
            cache = {name: i for i, name in enumerate(self.op_names)}
            object.__setattr__(self, "_name_index_cache", cache)
        return cache

    def predecessors(self) -> list[np.ndarray]:
        """``preds[i]``: indices of ops whose output op ``i`` reads."""
        return _adjacency(self.edge_index[1], self.edge_index[0], self.n)

    def successors(self) -> list[np.ndarray]:
        """``succs[i]``: indices of ops reading op ``i``'s output."""
        return _adjacency(self.edge_index[0], self.edge_index[1], self.n)

    def cost(self, kind: str | None = None) -> OpCosts:
        """Costs for device kind ``kind`` (the first one stored when None)."""
        if not self.costs:
            raise ValueError(f"graph {self.name!r} has no op costs; profile it first (placer graph build --profile)")
        if kind is None:
            return self.costs[self.default_cost_kind]
        try:
            return self.costs[kind]
        except KeyError:
            raise KeyError(f"graph {self.name!r} has no costs for device kind {kind!r}; "
                           f"has {sorted(self.costs)}") from None

    @property
    def default_cost_kind(self) -> str:
        """The cost set used when none is named: a measured one (``cpu`` first), else the first by name."""
        if not self.costs:
            raise ValueError(f"graph {self.name!r} has no op costs; profile it first (placer graph build --profile)")
        kinds = sorted(self.costs, key=lambda k: (self.costs[k].provenance.method != "measured", k != "cpu", k))
        return kinds[0]

    def depth(self) -> np.ndarray:
        """Topological depth of each op (0 for sources)."""
        d = np.zeros(self.n, dtype=np.int64)
        src, dst = self.edge_index
        order = np.argsort(dst, kind="stable")
        for e in order:  # dst ascending is a valid processing order since src < dst
            d[dst[e]] = max(d[dst[e]], d[src[e]] + 1)
        return d

    def critical_path_s(self, kind: str | None = None) -> float:
        """Longest forward+backward path on one device of ``kind``, ignoring transfers (seconds)."""
        step = self.cost(kind).step_s
        finish = step.copy()
        src, dst = self.edge_index
        for e in np.argsort(dst, kind="stable"):
            finish[dst[e]] = max(finish[dst[e]], finish[src[e]] + step[dst[e]])
        return float(finish.max()) if self.n else 0.0

    def replace(self, **changes: Any) -> "OpGraph":
        """A new validated graph with some fields replaced (e.g. ``costs=``)."""
        return dataclasses.replace(self, **changes)

    def with_costs(self, kind: str, costs: OpCosts) -> "OpGraph":
        return self.replace(costs={**self.costs, kind: costs})

    # ------------------------------------------------------------------ serialisation
    def to_json(self) -> dict[str, Any]:
        d = {
            "schema": SCHEMA,
            "name": self.name,
            "ops": {
                "name": list(self.op_names),
                "kind": list(self.op_kinds),
                "module": list(self.module_paths),
                "out_shape": [list(s) for s in self.out_shapes],
                "out_bytes": self.out_bytes.tolist(),
                "param_bytes": self.param_bytes.tolist(),
                "stash_bytes": self.stash_bytes.tolist(),
                "temp_bytes": self.temp_bytes.tolist(),
                "flops": [float(x) for x in self.flops],
                "colocation": self.colocation.tolist(),
            },
            "edges": {"src": self.edge_index[0].tolist(), "dst": self.edge_index[1].tolist(),
                      "bytes": self.edge_bytes.tolist()},
            "costs": {k: c.to_json() for k, c in sorted(self.costs.items())},
            "meta": dict(self.meta),
        }
        d["hash"] = _content_hash(d)
        return d

    @property
    def content_hash(self) -> str:
        """sha256 (hex, first 16 chars) of the canonical JSON form; stable across save/load."""
        cache = self.__dict__.get("_hash_cache")
        if cache is None:
            cache = self.to_json()["hash"]
            object.__setattr__(self, "_hash_cache", cache)
        return cache

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "OpGraph":
        if not isinstance(d, Mapping):
            raise ValueError("graph JSON must be an object")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"unsupported graph schema {d.get('schema')!r}; expected {SCHEMA!r}")
        try:
            ops, edges = d["ops"], d["edges"]
            g = cls(
                name=d["name"],
                op_names=ops["name"],
                op_kinds=ops["kind"],
                module_paths=ops["module"],
                out_shapes=ops["out_shape"],
                out_bytes=ops["out_bytes"],
                param_bytes=ops["param_bytes"],
                stash_bytes=ops["stash_bytes"],
                temp_bytes=ops["temp_bytes"],
                flops=ops["flops"],
                colocation=ops["colocation"],
                edge_index=[edges["src"], edges["dst"]],
                edge_bytes=edges["bytes"],
                costs={k: OpCosts.from_json(v) for k, v in d.get("costs", {}).items()},
                meta=d.get("meta", {}),
            )
        except KeyError as e:
            raise ValueError(f"graph JSON is missing field {e.args[0]!r}") from None
        except (TypeError, AttributeError, OverflowError) as e:  # costs: 5; an integer beyond 64 bits
            raise ValueError(f"graph JSON has a malformed field: {e}") from None
        if "hash" in d and d["hash"] != g.content_hash:
            raise ValueError(f"graph JSON hash mismatch: file says {d['hash']}, content gives {g.content_hash}")
        return g

    @classmethod
    def build(
        cls,
        *,
        name: str,
        ops: Sequence[Mapping[str, Any]],
        edges: Sequence[tuple[str, str] | tuple[str, str, int]],
        costs: Mapping[str, OpCosts] | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> "OpGraph":
        """Build a graph from op dicts and named edges (handy for tests and hand-made graphs).

        Each op dict needs ``name``; optional ``kind``, ``module``, ``out_shape``, ``out_bytes``, ``param_bytes``,
        ``stash_bytes``, ``temp_bytes``, ``flops``, ``colocation``, and ``fwd_s``/``bwd_s`` (which become a
        ``cpu`` cost set, provenance ``estimated``, when ``costs`` is not given). Ops must be listed in a
        topological order. An edge's bytes default to the source op's ``out_bytes``.
        """
        names = [o["name"] for o in ops]
        idx = {nm: i for i, nm in enumerate(names)}
        for e in edges:
            for end in e[:2]:
                if end not in idx:
                    raise ValueError(f"edge {e[0]!r} -> {e[1]!r} names unknown op {end!r}")
        get = lambda k, default: [o.get(k, default) for o in ops]  # noqa: E731
        out_bytes = get("out_bytes", 0)
        if costs is None and any("fwd_s" in o for o in ops):
            costs = {"cpu": OpCosts(
                fwd_s=get("fwd_s", 0.0), bwd_s=get("bwd_s", 0.0),
                provenance=Provenance(device="cpu", threads=0, torch_version="", date="", method="estimated",
                                      note="hand-made"),
            )}
        return cls(
            name=name,
            op_names=names,
            op_kinds=get("kind", "op"),
            module_paths=get("module", ""),
            out_shapes=get("out_shape", ()),
            out_bytes=out_bytes,
            param_bytes=get("param_bytes", 0),
            stash_bytes=get("stash_bytes", 0),
            temp_bytes=get("temp_bytes", 0),
            flops=get("flops", 0.0),
            colocation=[o.get("colocation", i) for i, o in enumerate(ops)],
            edge_index=[[idx[e[0]] for e in edges], [idx[e[1]] for e in edges]],
            edge_bytes=[e[2] if len(e) > 2 else out_bytes[idx[e[0]]] for e in edges],
            costs=costs or {},
            meta=meta or {},
        )


def _adjacency(keys: np.ndarray, values: np.ndarray, n: int) -> list[np.ndarray]:
    order = np.argsort(keys, kind="stable")
    bounds = np.searchsorted(keys[order], np.arange(n + 1))
    vals = values[order]
    return [vals[bounds[i]:bounds[i + 1]] for i in range(n)]


def _content_hash(d: Mapping[str, Any]) -> str:
    blob = json.dumps({k: v for k, v in d.items() if k != "hash"}, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def toposort_order(n: int, edges: Sequence[tuple[int, int]], names: Sequence[str] | None = None) -> list[int]:
    """A stable topological order of ``n`` nodes (Kahn, lowest index first); ``ValueError`` naming a cycle op."""
    import heapq

    indeg = [0] * n
    succ: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    heap = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        i = heapq.heappop(heap)
        order.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(heap, j)
    if len(order) != n:
        stuck = next(i for i in range(n) if indeg[i] > 0)
        label = names[stuck] if names else str(stuck)
        raise ValueError(f"graph is cyclic: op {label!r} is on or after a cycle")
    return order
