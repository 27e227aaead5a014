"""Measure a CPU cluster of worker processes: link latency/bandwidth between every pair, and per-worker speed.

``calibrate_cluster`` spawns one process per device (``torch.multiprocessing`` spawn), each pinned with
``os.sched_setaffinity`` to its own cores when the machine has enough, joined in a gloo group on 127.0.0.1.

* **Links.** For every pair ``(i, j)`` rank ``i`` ping-pongs tensors of several sizes with ``j`` the way the
  engine sends: the receive is posted (``irecv``) before the ``isend``, one size at a time, ascending, after
  warm-up; one-way time = half the round trip. The fit ``t = latency + bytes / bandwidth`` (:func:`fit_link`)
  uses the :data:`LINK_PERCENTILE` percentile per size: on a loaded machine a woken receiver can wait
  milliseconds for its core, which stretches some round trips but shortens none (medians, minima and a
  blocking ``send``/``recv`` median are recorded in ``meta`` too).
* **Speed.** A fixed fp32 matmul workload is timed on each worker alone, then on all workers at once, in the
  thread's CPU time (minimum of several runs), so other jobs taking the core away do not count but sharing
  caches and memory bandwidth with the other worker does: ``speed_d = alone / worker d's time while all work``
  (the ``cpu`` op profile is measured on one worker alone).
* **Waited receives.** Per pair, a receiver posts its receive and blocks while the sender computes for 2-6 ms, as
  an engine worker waits for its next input; ``meta["waited_receive_s"]`` records the median time from the send
  to the receiver's ``wait()`` returning, and ``meta["message_wakeup_s"]`` its excess over the link latency (the
  OS wake-up of a receiver that slept; ``benchmarks/bench_latency.py`` measures it at length); it becomes the
  simulator's ``recv_overhead_s`` below.
* **Engine overheads.** :func:`placer.engine.calibrate_engine.engine_message_costs` runs the engine's toy chain
  on one device (fused and op by op) and split over two, and stores the per-segment (forward, backward) and
  per-message costs and the start-up cost of a step that spans devices in ``meta`` (``segment_fwd_overhead_s``,
  ``segment_bwd_overhead_s``, ``send_overhead_s``, ``recv_overhead_s``, ``step_overhead_s``), where
  :mod:`placer.costmodel.sim` reads them. The chain's messages are tiny and all waited for, so with
  ``fit_graph`` (default :data:`~placer.engine.calibrate_engine.FIT_GRAPH`) the wake-up is left at 0 (the
  chain's step cost then keeps it) and the per-message send cost is fitted on whole engine steps of that graph
  (:func:`~placer.engine.calibrate_engine.fit_message_costs`; ``meta["engine_fit"]`` records it).

It cannot hang: the process group has a timeout, every child has a watchdog and dies with its parent
(``PR_SET_PDEATHSIG``), the parent joins with a deadline and kills all children on error or timeout.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from placer.core.cluster import Cluster, Device
from placer.engine.calibrate_engine import FIT_GRAPH, chain_message_costs, engine_message_costs, fit_message_costs
from placer.engine.procs import die_with_parent, free_port, pin_process

if TYPE_CHECKING:
    from graphs.ir import OpGraph

log = logging.getLogger(__name__)

__all__ = ["calibrate_cluster", "fit_link", "engine_op_costs", "engine_message_costs", "chain_message_costs",
           "fit_message_costs"]

DEFAULT_SIZES_BYTES: tuple[int, ...] = (1 << 10, 1 << 16, 1 << 20, 1 << 22, 1 << 24)
"""1 KiB to 16 MiB: small sizes pin the latency, large ones the bandwidth."""


LINK_PERCENTILE = 10.0
"""Percentile of the one-way times that the link fit uses (robust to load; the median is recorded too)."""


WAITED_DELAY_S: tuple[float, float] = (0.002, 0.006)
"""A waited receive: the sender computes for a uniform time in this range after the receive is posted."""


def _waited_receives(peer: int, sender: bool, trials: int, seed: int) -> list[float]:
    """Extra wait of a receiver that has waited: it posts ``irecv`` at a step's start and blocks while the sender
    computes (busy, :data:`WAITED_DELAY_S`), then sends its ``perf_counter()``; per trial, the receiver's time
    when ``wait()`` returned minus that (one clock for all processes of one host). Empty on the sender."""
    import torch
    import torch.distributed as dist

    rng = np.random.default_rng(seed)
    go, msg = torch.zeros(1), torch.zeros(2, dtype=torch.float64)
    extra: list[float] = []
    for _ in range(trials):
        delay_s = float(rng.uniform(*WAITED_DELAY_S))
        if sender:
            dist.send(go, peer)  # the step starts: the receiver posts its receive now
            end = time.perf_counter() + delay_s
            while time.perf_counter() < end:  # computing, not sleeping, like a worker running ops
                pass
            msg[0] = time.perf_counter()
            dist.send(msg, peer)
        else:
            dist.recv(go, peer)
            dist.irecv(msg, src=peer).wait()
            extra.append(time.perf_counter() - float(msg[0]))
    return extra


def _ping_pong(t: Any, peer: int, first: bool, blocking: bool) -> None:
    """One round trip of ``t`` with ``peer``; non-blocking = the receive is posted before the send, as the engine
    pre-posts every receive of a step."""
    import torch.distributed as dist

    if blocking:
        if first:
            dist.send(t, peer)
            dist.recv(t, peer)
        else:
            dist.recv(t, peer)
            dist.send(t, peer)
        return
    if first:
        r = dist.irecv(t, src=peer)
        dist.isend(t, dst=peer).wait()
        r.wait()
    else:
        dist.irecv(t, src=peer).wait()
        dist.isend(t, dst=peer).wait()


def _one_way_times(t: Any, peer: int, first: bool, repeats: int, *, blocking: bool) -> list[float]:
    """Half of each of ``repeats`` round trips of ``t`` with ``peer``, after five warm-up round trips."""
    out = []
    for k in range(repeats + 5):
        t0 = time.perf_counter()
        _ping_pong(t, peer, first, blocking=blocking)
        if k >= 5:
            out.append((time.perf_counter() - t0) / 2)
    return out


def _worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, threads: int,
            cores: list[list[int]] | None, out_dir: str, matmul_n: int, matmul_iters: int, timeout_s: float) -> None:
    import threading

    die_with_parent()
    watchdog = threading.Timer(timeout_s, os._exit, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    pin_process(cores[rank] if cores is not None else (), threads)
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=timeout_s))
    out: dict[str, Any] = {"rank": rank, "pairs": {}, "pairs_median": {}, "pairs_min": {}, "blocking": {},
                           "waited": {}}
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
                    samples[si] = _one_way_times(buf[s], peer, rank == i, repeats, blocking=False)
                # blocking send/recv for the record: on a loaded box the blocked receiver sleeps and wakes late
                blocking = _one_way_times(buf[sizes[0]], peer, rank == i, repeats, blocking=True)
                waited = _waited_receives(peer, rank == i, repeats, seed=i * world + j)
                if rank == j:
                    out["waited"][f"{i}-{j}"] = float(np.median(waited))
                if rank == i:
                    # the fit uses a low percentile: a round trip is never shortened by other jobs on the
                    # machine, only stretched when a woken receiver waits for its core (milliseconds when loaded)
                    out["pairs"][f"{i}-{j}"] = [float(np.percentile(x, LINK_PERCENTILE)) for x in samples]
                    out["pairs_median"][f"{i}-{j}"] = [float(np.median(x)) for x in samples]
                    out["pairs_min"][f"{i}-{j}"] = [float(np.min(x)) for x in samples]
                    out["blocking"][f"{i}-{j}"] = float(np.median(blocking))
        a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)

        def work() -> float:
            # CPU time of this thread: other jobs that take the core away do not count, sharing caches and
            # memory bandwidth with the other worker does (that is the contention a placed step sees)
            t0 = time.thread_time()
            for _ in range(matmul_iters):
                torch.mm(a, b)
            return time.thread_time() - t0

        work()  # warm-up
        # minimum of several short runs: other jobs on the machine inflate some runs, never shorten them
        alone = []
        for r in range(world):
            for _ in range(7):
                dist.barrier()
                if rank == r:
                    alone.append(work())
        together = []
        for _ in range(7):
            dist.barrier()
            together.append(work())
        out["alone_s"] = float(np.min(alone))
        out["together_s"] = float(np.min(together))
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


def _run_workers(num_devices: int, sizes: list[int], repeats: int, threads_per_device: int,
                 cores: list[list[int]] | None, matmul_n: int, matmul_iters: int,
                 timeout_s: float) -> list[dict[str, Any]]:
    """Spawn the gloo workers, wait for them (killing any left at the deadline) and read their results; a
    one-line ``RuntimeError`` on any failure."""
    import torch.multiprocessing as mp

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="placer-calib-") as tmp:
        ctx = mp.start_processes(_worker, args=(num_devices, free_port(), sizes, repeats, threads_per_device,
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
            return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(num_devices)]
        except (OSError, ValueError) as e:
            raise RuntimeError(f"cluster calibration failed: a worker left no result ({e})") from None


def _fit_links(results: list[dict[str, Any]], sizes: list[int], num_devices: int
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Latency and bandwidth matrices fitted per pair (:func:`fit_link`), and the records that go to ``meta``."""
    lat = np.zeros((num_devices, num_devices))
    bw = np.zeros((num_devices, num_devices))
    fits: dict[str, Any] = {}
    medians: dict[str, list[float]] = {}
    minima: dict[str, list[float]] = {}
    medians_all: dict[str, list[float]] = {}
    for r in results:
        minima.update(r["pairs_min"])
        medians_all.update(r["pairs_median"])
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
    records = {"one_way_median_s": medians_all, "one_way_fitted_s": medians, "link_percentile": LINK_PERCENTILE,
               "one_way_min_s": minima,
               "blocking_one_way_median_s": {k: v for r in results for k, v in r["blocking"].items()},
               "fit": fits}
    waited = {k: v for r in results for k, v in r["waited"].items()}
    if waited:  # beyond the link's latency (the message is 16 bytes): what waking the receiver costs
        records["waited_receive_s"] = waited
        records["message_wakeup_s"] = float(np.median(
            [max(0.0, v - lat[tuple(map(int, k.split("-")))]) for k, v in waited.items()]))
    return lat, bw, records


def calibrate_cluster(num_devices: int = 2, *, sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES, repeats: int = 20,
                      threads_per_device: int = 1, matmul_n: int = 384, matmul_iters: int = 40,
                      timeout_s: float = 60.0, name: str | None = None, engine_overheads: bool = True,
                      engine_steps: int = 15, fit_graph: str | None = FIT_GRAPH) -> Cluster:
    """Spawn ``num_devices`` gloo workers, measure links and speeds, and return the cluster (``meta`` records the
    date, sizes, raw medians and the fit). Any failure or timeout is a one-line ``RuntimeError``; no child
    outlives the call."""
    if num_devices < 2:
        raise ValueError("calibration needs at least 2 devices (it measures the links between them)")
    if repeats < 1 or threads_per_device < 1 or engine_steps < 1 or not sizes_bytes:
        raise ValueError("repeats, threads_per_device and engine_steps must be >= 1 and sizes_bytes non-empty")
    sizes = sorted({int(s) for s in sizes_bytes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError("need at least two distinct positive sizes to fit latency and bandwidth")
    avail = sorted(os.sched_getaffinity(0))
    pinned = len(avail) >= num_devices * threads_per_device
    cores = ([avail[r * threads_per_device:(r + 1) * threads_per_device] for r in range(num_devices)]
             if pinned else None)
    started = time.monotonic()
    results = _run_workers(num_devices, sizes, repeats, threads_per_device, cores, matmul_n, matmul_iters, timeout_s)
    elapsed = time.monotonic() - started
    lat, bw, link_records = _fit_links(results, sizes, num_devices)
    alone = float(np.min([r["alone_s"] for r in results]))
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
        **link_records,
        "matmul": {"n": matmul_n, "iters": matmul_iters, "alone_median_s": alone,
                   "together_s": [r["together_s"] for r in results], "speed": speeds},
        "elapsed_s": round(elapsed, 2),
        "memory_bandwidth_Bps": {"cpu": round(measure_memory_bandwidth_Bps(), -6)},
    }
    if engine_overheads:
        msg = engine_message_costs(devices[:2], latency_s=float(lat[0, 1]), bandwidth_Bps=float(bw[0, 1]),
                                   threads_per_device=threads_per_device, steps=engine_steps, timeout_s=timeout_s,
                                   wakeup_s=None if fit_graph else link_records.get("message_wakeup_s"))
        meta.update({k: {"cpu": msg[k]} for k in ("send_overhead_s", "recv_overhead_s", "segment_fwd_overhead_s",
                                                  "segment_bwd_overhead_s")})
        meta.update({"step_overhead_s": msg["step_overhead_s"], "engine_chain": msg})
        if fit_graph:  # the chain under-measures what real graphs' messages and steps cost: fit on one
            partial = Cluster(name="calibrating", devices=tuple(devices), bandwidth_Bps=bw, latency_s=lat, meta=meta)
            fit = fit_message_costs(partial, graph_name=fit_graph, steps=max(engine_steps // 3, 2),
                                    timeout_s=timeout_s, threads_per_device=threads_per_device)
            meta.update({"send_overhead_s": {"cpu": fit["send_overhead_s"]}, "engine_fit": fit})
        meta["elapsed_s"] = round(time.monotonic() - started, 2)
    log.info("calibrated %d workers in %.1f s: %s", num_devices, elapsed,
             ", ".join(f"{k}: {v['latency_s'] * 1e6:.0f} us + {v['bandwidth_Bps'] / 1e9:.2f} GB/s"
                       for k, v in link_records["fit"].items()))
    return Cluster(name=name or f"cpu-{num_devices}-calibrated", devices=tuple(devices), bandwidth_Bps=bw,
                   latency_s=lat, meta=meta)


def measure_memory_bandwidth_Bps(*, nbytes: int = 64 << 20, repeats: int = 7) -> float:
    """One core's streaming bandwidth as the simulator uses it (optimizer updates, weight traffic per micro-batch:
    :data:`placer.costmodel.costs.PARAM_TRAFFIC_PER_MICROBATCH`): ``a += b`` over ``nbytes`` buffers on one thread,
    3 x ``nbytes`` moved (read a and b, write a), median of ``repeats``."""
    import torch  # noqa: PLC0415 - torch only where something is measured

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.ones(nbytes // 4), torch.ones(nbytes // 4)
        a.add_(b)  # first touch of the pages
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a.add_(b)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(prev)
    return 3 * nbytes / float(np.median(times))


def engine_op_costs(graph: "OpGraph", measurer: Any, *, device: int = 0, steps: int = 10, warmup: int = 3,
                    kind: str = "cpu") -> "OpGraph":
    """``graph`` with its ``kind`` op costs replaced by the per-op times the engine itself spends on them.

    The profile of :mod:`graphs.profile` replays each op alone, with Python between replays, which over-counts
    the many ~20-50 us ops of a small graph by 20-50% against the whole step (see the README's limits). Here
    ``measurer`` (a warm :class:`placer.engine.Measurer` on ``graph``) runs the whole graph on one ``device``
    and the forward and backward time of every op is read off the engine's timeline of its median step, in
    context (warm caches, the executor's own per-op cost included). Ops with no event (no backward) cost 0.
    """
    import torch  # noqa: PLC0415

    from graphs.ir import OpCosts, Provenance  # noqa: PLC0415
    from placer.core.placement import Placement  # noqa: PLC0415

    res = measurer.measure(Placement.single(graph, device), steps=steps, warmup=warmup)
    if not res.ok:
        raise RuntimeError(f"engine op costs: the single-device run failed: {res.failure}")
    index = {name: i for i, name in enumerate(graph.op_names)}
    fwd, bwd = np.zeros(graph.n), np.zeros(graph.n)
    for e in res.timeline:
        i = index.get(e.op)
        if i is None or e.phase not in ("fwd", "bwd") or "->" in e.track:
            continue
        (fwd if e.phase == "fwd" else bwd)[i] += e.end_s - e.start_s
    old = graph.costs.get(kind)
    note = (f"engine in situ: per-op task times of the median of {steps} single-device steps on "
            f"{res.devices[device]} (step {res.step_time_s * 1e3:.3f} ms, ops {float((fwd + bwd).sum()) * 1e3:.3f} ms)"
            + (f"; replaced {old.provenance.method} costs of {old.provenance.date}" if old is not None else ""))
    prov = Provenance(device=kind, threads=old.provenance.threads if old is not None else 1,
                      torch_version=torch.__version__, date=_dt.date.today().isoformat(), method="measured",
                      note=note)
    return graph.with_costs(kind, OpCosts(fwd_s=fwd, bwd_s=bwd, provenance=prov))
