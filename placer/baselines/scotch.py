"""``scotch`` and ``mincut``: static mapping of the op graph with the real Scotch library (ColocRL's baselines).

ColocRL (Mirhoseini et al., ICML 2017, §4) compared against "Scotch static mapper" (Pellegrini & Roman, 1996):
the op graph with op costs as vertex weights and data volumes as edge weights is mapped onto the devices, whose
compute and communication capacities form the target architecture; **MinCut** is the same optimiser with the
CPU left out. Neither accounts for memory, so their placements can OOM (the simulator reports it).

We call ``libscotch`` from the ``pyscotch`` wheel (``pyscotch/_libs/lib64/libscotch.so``) through ctypes. That
build suffixes every public symbol with ``_64`` and uses a 64-bit ``SCOTCH_Num``; a system Scotch without the
suffix is accepted when ``SCOTCH_numSizeof()`` says 8 bytes. Symbols used: ``SCOTCH_graphSizeof/Init/Build/
Check/Exit``, ``SCOTCH_archSizeof/Init/Cmpltw/Build2/Exit``, ``SCOTCH_stratSizeof/Init/Exit``,
``SCOTCH_graphMap``, ``SCOTCH_randomSeed``, ``SCOTCH_randomReset`` and ``SCOTCH_version``.

- Source graph: one vertex per colocation group; vertex weight = the group's forward+backward time on the
  reference (fastest) device in integer units; edge weight = bytes between the two groups (both directions
  summed, symmetric adjacency, no duplicates) in integer units.
- Target: with uniform links, a weighted complete graph (``SCOTCH_archCmpltw``) whose terminal weights are the
  devices' relative throughputs on this graph, so Scotch loads each device in proportion to its speed. With
  non-uniform links, ``SCOTCH_archBuild2`` over a complete device graph with the same vertex weights and edge
  weights proportional to the time of a mean-sized transfer over each link.
- Strategy: the library default (an empty ``SCOTCH_Strat``); ``SCOTCH_randomSeed(seed)`` then
  ``SCOTCH_randomReset()`` make one seed give one mapping.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import threading
from ctypes import POINTER, c_double, c_int, c_int64, c_void_p
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import Groups, accelerators, finish, groups_of, int_weights
from placer.core.placement import Placement

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster

log = logging.getLogger(__name__)

_Num = c_int64
_NumP = POINTER(c_int64)
_LOCK = threading.Lock()  # Scotch's random state is process-global: one mapping at a time
_LIB: "_Scotch | None" = None


class _Scotch:
    """The few libscotch entry points we need, with argument types declared."""

    def __init__(self, lib: ctypes.CDLL, suffix: str, capture: ctypes.CDLL | None, path: Path) -> None:
        self.path = path
        self._capture = capture
        sig: dict[str, tuple[object, list[object]]] = {
            "SCOTCH_graphSizeof": (c_int, []),
            "SCOTCH_archSizeof": (c_int, []),
            "SCOTCH_stratSizeof": (c_int, []),
            "SCOTCH_graphInit": (c_int, [c_void_p]),
            "SCOTCH_graphBuild": (c_int, [c_void_p, _Num, _Num, _NumP, _NumP, _NumP, _NumP, _Num, _NumP, _NumP]),
            "SCOTCH_graphCheck": (c_int, [c_void_p]),
            "SCOTCH_graphExit": (None, [c_void_p]),
            "SCOTCH_archInit": (c_int, [c_void_p]),
            "SCOTCH_archCmpltw": (c_int, [c_void_p, _Num, _NumP]),
            "SCOTCH_archBuild2": (c_int, [c_void_p, c_void_p, _Num, _NumP]),
            "SCOTCH_archExit": (None, [c_void_p]),
            "SCOTCH_stratInit": (c_int, [c_void_p]),
            "SCOTCH_stratExit": (None, [c_void_p]),
            "SCOTCH_graphMap": (c_int, [c_void_p, c_void_p, c_void_p, _NumP]),
            "SCOTCH_randomSeed": (None, [_Num]),
            "SCOTCH_randomReset": (None, []),
            "SCOTCH_version": (None, [POINTER(c_int), POINTER(c_int), POINTER(c_int)]),
        }
        for name, (res, args) in sig.items():
            fn = getattr(lib, name + suffix)
            fn.restype, fn.argtypes = res, args
            setattr(self, name[len("SCOTCH_"):], fn)

    def messages(self) -> str:
        """Error text Scotch printed since the last call (when the pyscotch capture shim is loaded)."""
        if self._capture is None:
            return ""
        text = (self._capture.pyscotch_err_get() or b"").decode("utf-8", "replace")
        self._capture.pyscotch_err_clear()
        return " ".join(text.split())


def _lib_dir() -> Path:
    env = os.environ.get("PLACER_LIBSCOTCH_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("pyscotch")  # locate the wheel without importing it (it prints on import)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("scotch: the pyscotch package is not installed (pip install pyscotch)")
    return Path(list(spec.submodule_search_locations)[0]) / "_libs" / "lib64"


def load_scotch() -> _Scotch:
    """Load libscotch once (a ``ValueError`` naming the problem if it cannot be loaded)."""
    global _LIB
    if _LIB is not None:
        return _LIB
    d = _lib_dir()
    path = d / "libscotch.so"
    if not path.exists():
        raise ValueError(f"scotch: no libscotch.so in {d}")
    glob = ctypes.RTLD_GLOBAL
    for soname in ("libz.so.1", "libz.so"):  # libscotch calls zlib without declaring it
        try:
            ctypes.CDLL(soname, mode=glob)
            break
        except OSError:
            continue
    capture = None
    if (d / "libpyscotch_compat.so").exists():  # must come first so SCOTCH_errorPrint binds to the capturing shim
        try:
            capture = ctypes.CDLL(str(d / "libpyscotch_compat.so"), mode=glob)
            capture.pyscotch_err_get.restype, capture.pyscotch_err_get.argtypes = ctypes.c_char_p, []
            capture.pyscotch_err_clear.restype, capture.pyscotch_err_clear.argtypes = None, []
        except (OSError, AttributeError):
            capture = None
    try:
        if (d / "libscotcherr.so").exists():
            ctypes.CDLL(str(d / "libscotcherr.so"), mode=glob)
        lib = ctypes.CDLL(str(path), mode=glob)
    except OSError as e:
        raise ValueError(f"scotch: cannot load {path}: {e}") from None
    if hasattr(lib, "SCOTCH_graphInit_64"):
        suffix = "_64"
    elif hasattr(lib, "SCOTCH_graphInit") and hasattr(lib, "SCOTCH_numSizeof") and lib.SCOTCH_numSizeof() == 8:
        suffix = ""
    else:
        raise ValueError(f"scotch: {path} has no 64-bit SCOTCH_Num entry points")
    _LIB = _Scotch(lib, suffix, capture, path)
    return _LIB


def scotch_version() -> str:
    """Version string of the loaded libscotch, e.g. ``7.0.5``."""
    lib = load_scotch()
    v, r, p = c_int(), c_int(), c_int()
    lib.version(ctypes.byref(v), ctypes.byref(r), ctypes.byref(p))
    return f"{v.value}.{r.value}.{p.value}"


def _opaque(size: int) -> ctypes.Array:
    return (c_double * ((size + 7) // 8 + 1))()  # 8-byte aligned, zeroed storage for an opaque Scotch struct


def _ptr(a: np.ndarray):  # noqa: ANN202
    return a.ctypes.data_as(_NumP)


def _check(lib: _Scotch, ret: int, what: str) -> None:
    if ret != 0:
        msg = lib.messages()
        raise ValueError(f"scotch: {what} failed (code {ret})" + (f": {msg}" if msg else ""))


def _csr(num: int, src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric CSR (verttab, edgetab, edlotab) of an undirected graph given once per edge."""
    a = np.concatenate([src, dst]).astype(np.int64)
    b = np.concatenate([dst, src]).astype(np.int64)
    ww = np.concatenate([w, w]).astype(np.int64)
    order = np.lexsort((b, a))
    a, b, ww = a[order], b[order], ww[order]
    vert = np.searchsorted(a, np.arange(num + 1)).astype(np.int64)
    return vert, np.ascontiguousarray(b), np.ascontiguousarray(ww)


def scotch_map(groups: Groups, cluster: "Cluster", devices: list[int], *, seed: int) -> np.ndarray:
    """Map the groups onto ``devices`` with ``SCOTCH_graphMap``; returns the device (cluster index) per group."""
    lib = load_scotch()
    k = len(devices)
    if k == 1 or groups.num == 0:
        return np.full(groups.num, devices[0], dtype=np.int64)
    thr = groups.throughput(devices)
    ref = devices[int(np.argmax(thr))]
    velo = int_weights(groups.time_s[:, ref])
    # Keep the arrays alive until graphExit: SCOTCH_graphBuild does not copy them.
    vert, edge, edlo = _csr(groups.num, groups.src, groups.dst, int_weights(groups.edge_bytes))
    dev_w = np.maximum(1, np.rint(thr / thr.max() * 1000)).astype(np.int64)
    bw = cluster.bandwidth_Bps[np.ix_(devices, devices)]
    lat = cluster.latency_s[np.ix_(devices, devices)]
    off = ~np.eye(k, dtype=bool)
    uniform = np.allclose(bw[off], bw[off][0]) and np.allclose(lat[off], lat[off][0])
    graph_buf, arch_buf, strat_buf = _opaque(lib.graphSizeof()), _opaque(lib.archSizeof()), _opaque(lib.stratSizeof())
    tgt_buf = _opaque(lib.graphSizeof())
    parttab = np.zeros(groups.num, dtype=np.int64)
    with _LOCK:
        lib.messages()
        _check(lib, lib.graphInit(graph_buf), "SCOTCH_graphInit")
        _check(lib, lib.archInit(arch_buf), "SCOTCH_archInit")
        _check(lib, lib.stratInit(strat_buf), "SCOTCH_stratInit")
        tgt_init = False
        try:
            _check(lib, lib.graphBuild(graph_buf, 0, groups.num, _ptr(vert), None, _ptr(velo), None,
                                       int(edge.size), _ptr(edge), _ptr(edlo)), "SCOTCH_graphBuild")
            _check(lib, lib.graphCheck(graph_buf), "SCOTCH_graphCheck")
            if uniform:
                _check(lib, lib.archCmpltw(arch_buf, k, _ptr(dev_w)), "SCOTCH_archCmpltw")
            else:
                mean_b = float(groups.edge_bytes.mean()) if groups.edge_bytes.size else 0.0
                iu, ju = np.nonzero(np.triu(off))
                link_s = (lat + mean_b / bw)[iu, ju] + (lat + mean_b / bw)[ju, iu]
                tvert, tedge, tedlo = _csr(k, iu, ju, int_weights(link_s, total=1e4 * link_s.size))
                tlist = np.arange(k, dtype=np.int64)
                _check(lib, lib.graphInit(tgt_buf), "SCOTCH_graphInit")
                tgt_init = True
                _check(lib, lib.graphBuild(tgt_buf, 0, k, _ptr(tvert), None, _ptr(dev_w), None, int(tedge.size),
                                           _ptr(tedge), _ptr(tedlo)), "SCOTCH_graphBuild (devices)")
                _check(lib, lib.archBuild2(arch_buf, tgt_buf, k, _ptr(tlist)), "SCOTCH_archBuild2")
            lib.randomSeed(int(seed))
            lib.randomReset()
            _check(lib, lib.graphMap(graph_buf, arch_buf, strat_buf, _ptr(parttab)), "SCOTCH_graphMap")
        finally:
            lib.stratExit(strat_buf)
            lib.archExit(arch_buf)
            lib.graphExit(graph_buf)
            if tgt_init:
                lib.graphExit(tgt_buf)
    if parttab.min() < 0 or parttab.max() >= k:
        raise ValueError(f"scotch: SCOTCH_graphMap returned terminal ids outside 0..{k - 1}")
    return np.asarray(devices, dtype=np.int64)[parttab]


@register("scotch")
def place_scotch(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """Scotch static mapping onto every device, CPU included (ColocRL's "Scotch"). Memory is ignored, as in
    ColocRL: an over-full device shows up as OOM in the simulator."""
    groups = groups_of(graph, cluster)
    return finish(graph, cluster, groups, scotch_map(groups, cluster, list(range(cluster.num_devices)), seed=seed))


@register("mincut")
def place_mincut(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> Placement:
    """Scotch static mapping onto the accelerators only (ColocRL's "MinCut": the same optimiser without the
    CPU). A CPU-only cluster keeps all its devices, so there ``mincut`` equals ``scotch``. Memory is ignored."""
    groups = groups_of(graph, cluster)
    devs = accelerators(cluster)
    if all(d.is_cpu for d in cluster.devices):
        log.debug("mincut on CPU-only cluster %s: using all devices", cluster.name)
    return finish(graph, cluster, groups, scotch_map(groups, cluster, devs, seed=seed))
