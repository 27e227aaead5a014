"""``metis``: k-way graph partitioning of the op graph with METIS (Karypis & Kumar, 1998) through ``pymetis``.

Vertices are colocation groups weighted by their forward+backward time on the fastest device; edges carry the
bytes between groups. Partition ``p`` goes to device ``p``, and ``tpwgts`` (target part weights) are the
devices' relative throughputs on this graph, so a faster device receives proportionally more work. METIS
balances load and minimises the edge cut only: it knows neither memory nor link speeds, so over-full devices
appear as OOM in the simulator. ``seed`` is METIS's ``seed`` option.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import tempfile
import warnings
from typing import TYPE_CHECKING, Iterator

import numpy as np

from placer.baselines.registry import register
from placer.baselines._common import finish, groups_of, int_weights

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from graphs.ir import OpGraph
    from placer.core.cluster import Cluster
    from placer.core.placement import Placement


@contextlib.contextmanager
def _c_stdout_to_log() -> Iterator[None]:
    """METIS's C library writes warnings ("***Cannot bisect a graph with 0 vertices!") straight to file
    descriptor 1, past Python, into a user's terminal or piped output: they go to the debug log instead."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)  # C stdio buffers a pipe's output: flush it into the sink first
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode(errors="replace").strip()
            if text:
                log.debug("METIS printed: %s", " | ".join(line.strip() for line in text.splitlines()))


@register("metis")
def place_metis(graph: "OpGraph", cluster: "Cluster", *, seed: int = 0) -> "Placement":
    """METIS k-way partition into ``D`` parts with speed-proportional target weights."""
    import pymetis

    groups = groups_of(graph, cluster)
    k = cluster.num_devices
    if k == 1 or groups.num <= 1:
        # METIS rejects nparts=1; one group goes to the fastest device
        best = int(np.argmin(groups.time_s.sum(axis=0))) if groups.num else 0
        return finish(graph, cluster, groups, np.full(groups.num, best if k > 1 else 0, dtype=np.int64))
    thr = groups.throughput()
    ref = int(np.argmax(thr))
    devices = np.arange(k)
    if groups.num < k:
        # METIS refuses (and prints to stdout) when asked for more parts than vertices: use the fastest devices
        devices = np.sort(np.argsort(-thr, kind="stable")[: groups.num])
        thr, k = thr[devices], groups.num
    a = np.concatenate([groups.src, groups.dst])
    b = np.concatenate([groups.dst, groups.src])
    w = np.tile(int_weights(groups.edge_bytes), 2)
    order = np.lexsort((b, a))
    xadj = np.searchsorted(a[order], np.arange(groups.num + 1)).astype(np.int64)
    tpwgts = (thr / thr.sum() * (1 - 1e-9)).tolist()  # METIS requires the sum to be at most 1
    try:
        with warnings.catch_warnings(), _c_stdout_to_log():
            warnings.simplefilter("ignore", DeprecationWarning)
            res = pymetis.part_graph(
                k,
                adjacency=pymetis.CSRAdjacency(adj_starts=xadj, adjacent=b[order].astype(np.int64)),
                vweights=int_weights(groups.time_s[:, ref]).tolist(),
                eweights=w[order].tolist(),
                tpwgts=tpwgts,
                options=pymetis.Options(seed=int(seed)),
            )
    except Exception as e:  # pymetis raises RuntimeError with METIS's status
        raise ValueError(f"metis: part_graph failed: {e}") from None
    parts = np.asarray(res[1], dtype=np.int64)
    return finish(graph, cluster, groups, devices[parts])
