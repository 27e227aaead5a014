"""Measure a CPU cluster of worker processes: link latency/bandwidth between every pair, and per-worker speed.

``calibrate_cluster`` spawns one process per device (``torch.multiprocessing`` spawn), each pinned with
``os.sched_setaffinity`` to its own cores when the machine has enough, joined in a gloo group on 127.0.0.1.

* **Links.** For every pair ``(i, j)`` rank ``i`` ping-pongs tensors of several sizes with ``j`` (blocking
  ``send``/``recv``, one size at a time, ascending); one-way time = half the round trip, median over ``repeats``
  after warm-up. ``t = latency + bytes / bandwidth`` fitted over the sizes (:func:`fit_link`) gives the link
  (the same both ways).
* **Speed.** A fixed fp32 matmul workload is timed on each worker alone, then on all workers at once;
  ``speed_d = median alone time / worker d's time while all work``: the ``cpu`` op profile is measured on one
  worker alone, but during a placed step every worker computes, sharing caches and memory bandwidth.

It cannot hang: the process group has a timeout, every child has a watchdog and dies with its parent
(``PR_SET_PDEATHSIG``), the parent joins with a deadline and kills all children on error or timeout.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from placer.cluster import Cluster, Device

log = logging.getLogger(__name__)

DEFAULT_SIZES_BYTES: tuple[int, ...] = (1 << 10, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
"""1 KiB to 16 MiB: small sizes pin the latency, large ones the bandwidth."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    try:  # Linux: the kernel kills us if the parent dies, so no orphan survives a crashed caller
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, threads: int,
            cores: list[list[int]] | None, out_dir: str, matmul_n: int, matmul_iters: int, timeout_s: float) -> None:
    import threading

    _die_with_parent()
    watchdog = threading.Timer(timeout_s, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    if cores is not None:
        os.sched_setaffinity(0, cores[rank])
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=timeout_s))
    out: dict[str, Any] = {"rank": rank, "pairs": {}, "pairs_min": {}}
    try:
        buf = {s: torch.zeros(s, dtype=torch.uint8) for s in sizes}
        for i in range(world):
            for j in range(i + 1, world):
                dist.barrier()
                if rank not in (i, j):
                    continue
                peer = j if rank == i else i
                samples: list[list[float]] = [[] for _ in sizes]
                # one size at a time, ascending, after warm-up (OSU-style steady state): a small message right
                # after a multi-MB one can take milliseconds on loopback gloo, which is not the link's latency
                for si, s in enumerate(sizes):
                    t = buf[s]
                    for k in range(repeats + 5):  # five warm-up round trips
                        if rank == i:
                            t0 = time.perf_counter()
                            dist.send(t, peer)
                            dist.recv(t, peer)
                            if k >= 5:
                                samples[si].append((time.perf_counter() - t0) / 2)
                        else:
                            dist.recv(t, peer)
                            dist.send(t, peer)
                if rank == i:
                    out["pairs"][f"{i}-{j}"] = [float(np.median(x)) for x in samples]
                    out["pairs_min"][f"{i}-{j}"] = [float(np.min(x)) for x in samples]
        a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)

        def work() -> float:
            t0 = time.perf_counter()
            for _ in range(matmul_iters):
                torch.mm(a, b)
            return time.perf_counter() - t0

        work()  # warm-up
        alone = []
        for r in range(world):
            for _ in range(3):
                dist.barrier()
                if rank == r:
                    alone.append(work())
        together = []
        for _ in range(3):
            dist.barrier()
            together.append(work())
        out["alone_s"] = float(np.median(alone))
        out["together_s"] = float(np.median(together))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    watchdog.cancel()


def fit_link(sizes_bytes: Sequence[int], one_way_s: Sequence[float]) -> tuple[float, float, float]:
    """Fit ``t = latency + bytes / bandwidth``: ``(latency_s, bandwidth_Bps, r2)``.

    The line goes through the smallest message (its time *is* the latency, up to a few bytes of copying) and
    its slope is the least-squares fit of the other sizes. A free intercept is decided by the multi-MB points,
    whose noise is larger than the latency itself; relative-error weighting instead lets the small sizes set
    the slope, which underestimates large transfers (loopback bandwidth falls with size as caches overflow).
    A non-positive slope falls back to the largest size's rate, so the result is always a valid link.
    """
    x = np.asarray(sizes_bytes, dtype=np.float64)
    y = np.asarray(one_way_s, dtype=np.float64)
    i0 = int(np.argmin(x))
    dx, dy = x - x[i0], y - y[i0]
    den = float((dx * dx).sum())
    slope = float((dx * dy).sum()) / den if den > 0 else 0.0
    if slope <= 0:
        slope = float(y[np.argmax(x)] / x.max())
    lat = max(float(y[i0] - slope * x[i0]), 0.0)
    pred = lat + slope * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return lat, 1.0 / slope, r2


def calibrate_cluster(num_devices: int = 2, *, sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES, repeats: int = 20,
                      threads_per_device: int = 1, matmul_n: int = 384, matmul_iters: int = 40,
                      timeout_s: float = 60.0, name: str | None = None) -> Cluster:
    """Spawn ``num_devices`` gloo workers, measure links and speeds, and return the cluster (``meta`` records the
    date, sizes, raw medians and the fit). Any failure or timeout is a one-line ``RuntimeError``; no child
    outlives the call."""
    import torch.multiprocessing as mp

    if num_devices < 2:
        raise ValueError("calibration needs at least 2 devices (it measures the links between them)")
    if repeats < 1 or threads_per_device < 1 or not sizes_bytes:
        raise ValueError("repeats and threads_per_device must be >= 1 and sizes_bytes non-empty")
    sizes = sorted({int(s) for s in sizes_bytes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError("need at least two distinct positive sizes to fit latency and bandwidth")
    avail = sorted(os.sched_getaffinity(0))
    pinned = len(avail) >= num_devices * threads_per_device
    cores = ([avail[r * threads_per_device:(r + 1) * threads_per_device] for r in range(num_devices)]
             if pinned else None)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="placer-calib-") as tmp:
        ctx = mp.start_processes(_worker, args=(num_devices, _free_port(), sizes, repeats, threads_per_device,
                                                cores, tmp, matmul_n, matmul_iters, timeout_s),
                                 nprocs=num_devices, join=False, start_method="spawn")
        try:
            deadline = started + timeout_s + 15.0  # children time out first; this is the backstop
            while not ctx.join(timeout=0.25):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"calibration did not finish within {deadline - started:.0f} s")
        except Exception as e:  # noqa: BLE001 - one line for the caller, children are killed below
            lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            why = lines[-1] if lines else ""
            raise RuntimeError(f"cluster calibration failed: {type(e).__name__}: {why}") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        try:
            results = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(num_devices)]
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cluster calibration failed: a worker left no result ({e})") from None
    elapsed = time.monotonic() - started

    lat = np.zeros((num_devices, num_devices))
    bw = np.zeros((num_devices, num_devices))
    fits: dict[str, Any] = {}
    medians: dict[str, list[float]] = {}
    minima: dict[str, list[float]] = {}
    for r in results:
        minima.update(r["pairs_min"])
        for pair, ys in r["pairs"].items():
            i, j = map(int, pair.split("-"))
            la, b, r2 = fit_link(sizes, ys)
            lat[i, j] = lat[j, i] = la
            bw[i, j] = bw[j, i] = b
            medians[pair] = ys
            fits[pair] = {"latency_s": la, "bandwidth_Bps": b, "r2": r2}
    off = ~np.eye(num_devices, dtype=bool)
    np.fill_diagonal(lat, 0.0)
    np.fill_diagonal(bw, float(bw[off].max()))
    alone = float(np.median([r["alone_s"] for r in results]))
    speeds = [alone / r["together_s"] for r in results]
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    devices = [Device(name=f"cpu:{r}", kind="cpu", memory_bytes=int(mem_total // num_devices),
                      speed=round(speeds[r], 3)) for r in range(num_devices)]
    meta = {
        "source": "calibrated",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "num_devices": num_devices,
        "threads_per_device": threads_per_device,
        "pinned_cores": cores,
        "sizes_bytes": sizes,
        "repeats": repeats,
        "one_way_median_s": medians,
        "one_way_min_s": minima,
        "fit": fits,
        "matmul": {"n": matmul_n, "iters": matmul_iters, "alone_median_s": alone,
                   "together_s": [r["together_s"] for r in results], "speed": speeds},
        "elapsed_s": round(elapsed, 2),
    }
    log.info("calibrated %d workers in %.1f s: %s", num_devices, elapsed,
             ", ".join(f"{k}: {v['latency_s'] * 1e6:.0f} us + {v['bandwidth_Bps'] / 1e9:.2f} GB/s"
                       for k, v in fits.items()))
    return Cluster(name=name or f"cpu-{num_devices}-calibrated", devices=tuple(devices), bandwidth_Bps=bw,
                   latency_s=lat, meta=meta)
