"""Message latency between two engine workers: what a receiver that has *waited* pays on top of the wire.

Two processes, pinned to cores 0 and 1 with one torch thread each (as the engine's ``cpu-2`` workers), joined by a
gloo process group (the engine's transport). Measured, in ``--rounds`` interleaved rounds:

* ``pingpong``: a 16-float tensor sent back and forth ``--pings`` times; half the median round trip. Both sides
  are in ``wait()`` only for a few microseconds each time, like the calibration's latency probe.
* ``waiting receiver``: the receiver posts ``irecv`` at the start of a "step" and waits while the sender computes
  (busy loop) for 5-20 ms, then sends a tensor carrying its own ``perf_counter()``; the receiver notes when its
  wait returned. ``perf_counter`` is one monotonic clock for both processes on one host, so the difference is the
  extra wait, i.e. latency as the engine sees it. Receiver modes:

  - ``wait``: ``work.wait()`` at once (what the engine's executor does);
  - ``poll``: spin on ``work.is_completed()`` for up to ``--spin-ms``, then ``wait()``;
  - ``pipe``: no gloo: a blocking read of an OS pipe (``multiprocessing.Pipe``), the same wake-up without the
    transport, to tell the OS scheduler's share from gloo's.

* ``exchange``: both workers compute (0.3 / 0.5 ms) and then ``isend`` to the other, ``--exchanges`` times, as in
  an interleaved 1F1B order; how long the ``isend`` *call* blocks on the worker whose peer's message arrived
  while it computed, plain and after ``os.sched_yield()`` (what the engine's executor does before every send).

* ``early send``: a step's first messages, sent 0.5 ms into the step while the sender goes on computing, with
  the receives posted right after the step's barrier or before it (what the engine does): gloo writes the data
  from the ``isend`` call only if it has already read the receiver's "receive posted" notice.

Prints per-round medians and, at the end::

    figure: message_latency_ms = X     # median over rounds of the median extra wait, mode wait (the engine's)
    figure: message_latency_ms[MODE] = X (spread A-B over rounds)
    figure: isend_blocked_ms[plain|yield] = X  # mean time an isend call blocks, exchange above
    figure: early_send_latency_ms[posted after barrier|posted first] = X  # mean send-to-receipt, early send

Findings (2026-12-03, this 2-vCPU VM, load average ~3 from other sessions; 3 rounds x 40 trials):

* a waiting receiver's extra wait is 0.24 ms (spread 0.23-0.28) against 0.045 ms one way in ping-pong; a
  blocking read of an OS pipe pays 0.19 ms (0.17-0.21), so nearly all of it is the OS waking a process whose
  vCPU went idle (``cpuidle`` driver ``haltpoll`` with ``guest_halt_poll_ns = 0``: the vCPU halts at once), not
  gloo. No 3 ms here, with or without a busy job on the receiver's core (``--hog``: 0.27 ms, 0.22-0.39).
* gloo's ``irecv`` cannot be polled: ``is_completed()`` stayed false until ``wait()`` in 0 of 120 trials (its
  receive completes inside ``wait()``), so spinning before the blocking wait cannot cut anything.
* The millisecond lumps come from a receiver that must win its core back from another runnable thread: with
  ``--hog``, ping-pong (short waits, so no sleeper credit) takes 1.4 ms one way (1.29-1.44) instead of 0.045.
  Other jobs on the machine do that; so did the engine itself under ``torchrun`` with two nodes on one host
  (each rank took both cores with two OpenMP threads; fixed in ``placer.engine.worker``: RNNLM-small
  round-robin 1f1b x4 went from 0.18-0.60 s to 0.06-0.09 s a step).

Found 2026-12-03 (evening, machine otherwise idle): the engine's ~3-5 ms lumps in interleaved / 1F1B steps were
``isend`` calls that blocked (a 8-byte send for 4.4 ms inside a forward task; at times both workers at once): a
message that arrived while the worker computed has woken gloo's transport thread (``gloo_tcp_loop``), which
shares the worker's core and takes the pair's lock to read it; an ``isend`` issued before that thread has run
waited for it for up to a scheduler tick. Exchange, 3 rounds x 300: plain ``isend`` blocked 0.285 ms on average
(0.191-0.318), over 1 ms in 21-24 of 300; with ``os.sched_yield()`` first, 0.033 ms (0.029-0.048), over 1 ms in 0
of 300. The larger cut: a step's first messages left late (``early send``: 1.93 ms mean, spread 1.51-2.05, from the
send to the receipt) because gloo writes the data from the ``isend`` call only once it has read the receiver's
"receive posted" notice, and an unread notice waits for the transport thread, which gets the core only when the
compute thread blocks; with the receives posted before the step's barrier (the engine since then), 0.104 ms
(0.100-0.104).

Run: ``python3 benchmarks/bench_latency.py`` (about 30 s). Other jobs on the two cores distort the figures (a
waiting process that is woken has to be scheduled again); the load average is printed at the start.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

MODES = ("wait", "poll", "pipe")


def _busy_until(deadline: float) -> None:
    while time.perf_counter() < deadline:  # the sender computes; it does not sleep
        pass


def _pingpong(rank: int, pings: int) -> list[float]:
    buf = torch.zeros(16)
    half_rtt: list[float] = []
    for _ in range(pings):
        if rank == 0:
            t0 = time.perf_counter()
            dist.send(buf, 1)
            dist.recv(buf, 1)
            half_rtt.append((time.perf_counter() - t0) / 2)
        else:
            dist.recv(buf, 0)
            dist.send(buf, 0)
    return half_rtt


def _receive(mode: str, spin_s: float, conn: Any) -> tuple[float, bool]:
    """Wait for the sender's message in ``mode``: (when the data was in hand minus the sender's timestamp, whether
    ``is_completed()`` turned true while polling)."""
    if mode == "pipe":
        t_send = conn.recv()
        return time.perf_counter() - t_send, False
    buf = torch.zeros(16, dtype=torch.float64)
    work = dist.irecv(buf, src=0)
    completed = False
    if mode == "poll":
        give_up = time.perf_counter() + spin_s
        while not completed and time.perf_counter() < give_up:
            completed = work.is_completed()
    work.wait()
    return time.perf_counter() - float(buf[0]), completed


def _waiting(rank: int, mode: str, args: argparse.Namespace, conn: Any, seed: int) -> tuple[list[float], int]:
    rng = random.Random(seed)
    go = torch.zeros(1)
    extra: list[tuple[float, bool]] = []
    spin_s = args.spin_ms / 1e3
    for _ in range(args.trials):
        delay_s = rng.uniform(*args.delay_ms) / 1e3
        if rank == 0:
            dist.send(go, 1)  # the step starts: the receiver posts its receive now
            _busy_until(time.perf_counter() + delay_s)
            t_send = time.perf_counter()
            if mode == "pipe":
                conn.send(t_send)
            else:
                dist.send(torch.full((16,), t_send, dtype=torch.float64), 1)
        else:
            dist.recv(go, 0)
            extra.append(_receive(mode, spin_s, conn))
        dist.barrier()
    return [x for x, _ in extra] if rank == 1 else [], sum(c for _, c in extra)


def _exchange(rank: int, yield_first: bool, exchanges: int) -> list[float]:
    """Both workers compute (0.3 / 0.5 ms), then ``isend`` to the other, as workers do in an interleaved 1F1B
    order; returns how long each ``isend`` call blocked (rank 1's, whose peer's message arrives while it computes).
    ``yield_first``: ``os.sched_yield()`` before the ``isend`` (what the engine's executor does)."""
    a, b = torch.randn(4096), torch.empty(4096)
    blocked: list[float] = []
    for it in range(exchanges):
        dist.barrier()
        r = dist.irecv(b, 1 - rank, tag=it)
        _busy_until(time.perf_counter() + (0.3e-3 if rank == 0 else 0.5e-3))
        t0 = time.perf_counter()
        if yield_first:
            os.sched_yield()
        s = dist.isend(a, 1 - rank, tag=it)
        blocked.append(time.perf_counter() - t0)
        _busy_until(time.perf_counter() + 0.2e-3)
        r.wait()
        s.wait()
    return blocked if rank == 1 else []


def _early_send(rank: int, posted_first: bool, trials: int) -> list[float]:
    """A step's first messages: both workers post 8 receives; rank 0 computes 0.5 ms, sends 8 messages (each
    carrying its send time) and computes 5 ms more; rank 1 waits for the first. ``posted_first``: the receives
    are posted before the step's barrier (what the engine does), else right after it. Returns rank 1's
    receive time minus the send time."""
    n, late = 8, []
    a = torch.zeros(256, dtype=torch.float64)
    bufs = [torch.empty(256, dtype=torch.float64) for _ in range(n)]
    for it in range(trials):
        base = 10_000 + it * 2 * n  # clear of the other sections' tags
        tags = [base + k + (n if rank == 0 else 0) for k in range(n)]  # rank 1 receives base .. base + n - 1
        recvs = [dist.irecv(bufs[k], 1 - rank, tag=tags[k]) for k in range(n)] if posted_first else []
        dist.barrier()
        if not posted_first:
            recvs = [dist.irecv(bufs[k], 1 - rank, tag=tags[k]) for k in range(n)]
        if rank == 0:
            _busy_until(time.perf_counter() + 0.5e-3)
            a[0] = time.perf_counter()
            sends = [dist.isend(a, 1, tag=base + k) for k in range(n)]
            _busy_until(time.perf_counter() + 5e-3)
        else:
            recvs[0].wait()
            late.append(time.perf_counter() - float(bufs[0][0]))
            for w in recvs[1:]:
                w.wait()
            sends = [dist.isend(a, 0, tag=base + n + k) for k in range(n)]
        for w in sends + (recvs if rank == 0 else []):
            w.wait()
    return late


def _hog(core: int) -> None:
    """Another job on the receiver's core (``--hog``): the situation of a loaded machine."""
    os.sched_setaffinity(0, {core % os.cpu_count()})
    while True:
        pass


def _worker(rank: int, init: str, args: argparse.Namespace, conn: Any, out: Any) -> None:
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    _pingpong(rank, 20)  # warm the connection
    for rnd in range(args.rounds):
        pp = _pingpong(rank, args.pings)
        if rank == 0:
            out.put(("pingpong", rnd, statistics.median(pp)))
        for mode in args.modes:
            extra, completed = _waiting(rank, mode, args, conn, seed=rnd)
            if rank == 1:
                out.put((mode, rnd, statistics.median(extra)))
                if mode == "poll":
                    out.put(("poll_completed", rnd, completed))
        for label, posted_first in (("early send", False), ("early send, posted first", True)):
            late = _early_send(rank, posted_first, args.trials)
            if rank == 1:
                out.put((label, rnd, statistics.mean(late)))
        for label, yield_first in (("isend", False), ("yield+isend", True)):
            blocked = _exchange(rank, yield_first, args.exchanges)
            if rank == 1:
                out.put((label, rnd, statistics.mean(blocked)))
                out.put((label + " >1ms", rnd, sum(b > 1e-3 for b in blocked)))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=40, help="waiting-receiver trials per mode and round")
    ap.add_argument("--pings", type=int, default=200)
    ap.add_argument("--delay-ms", type=float, nargs=2, default=(5.0, 20.0),
                    help="the sender computes for a uniform time in this range before it sends")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--exchanges", type=int, default=300, help="compute-then-isend exchanges per round")
    ap.add_argument("--hog", action="store_true", help="run a busy process on the receiver's core meanwhile")
    ap.add_argument("--spin-ms", type=float, default=25.0, help="poll mode: longest spin before a blocking wait")
    args = ap.parse_args(argv)
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; torch {torch.__version__}")
    ctx = mp.get_context("spawn")
    hog = ctx.Process(target=_hog, args=(1,), daemon=True) if args.hog else None
    if hog is not None:
        hog.start()
    out = ctx.Queue()
    a, b = ctx.Pipe()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        procs = [ctx.Process(target=_worker, args=(r, init, args, b if r == 0 else a, out)) for r in (0, 1)]
        for p in procs:
            p.start()
        n = args.rounds * (1 + len(args.modes) + ("poll" in args.modes) + 6)
        rows = [out.get(timeout=600) for _ in range(n)]
        for p in procs:
            p.join(60)
    if hog is not None:
        hog.kill()
        hog.join(5)
    by: dict[str, list[float]] = {}
    for name, rnd, v in sorted(rows, key=lambda r: (r[1], r[0])):
        if name == "poll_completed":
            print(f"round {rnd}: poll      is_completed() turned true before wait() in {v} of {args.trials} trials")
            continue
        if name.endswith(">1ms"):
            print(f"round {rnd}: {name[:-5]} blocked over 1 ms in {v} of {args.exchanges} exchanges")
            continue
        print(f"round {rnd}: {name:11s} {'mean' if 'send' in name else 'median'} {v * 1e3:7.3f} ms")
        by.setdefault(name, []).append(v * 1e3)
    for name in ("pingpong", *args.modes):
        v = by[name]
        print(f"figure: message_latency_ms[{name}] = {statistics.median(v):.3f} "
              f"(spread {min(v):.3f}-{max(v):.3f} over {len(v)} rounds)")
    for name, label in (("early send", "posted after barrier"), ("early send, posted first", "posted first")):
        v = by[name]
        print(f"figure: early_send_latency_ms[{label}] = {statistics.median(v):.3f} (mean per message; spread "
              f"{min(v):.3f}-{max(v):.3f} over {len(v)} rounds)")
    for name, label in (("isend", "plain"), ("yield+isend", "yield")):
        v = by[name]
        print(f"figure: isend_blocked_ms[{label}] = {statistics.median(v):.3f} (mean per isend; spread "
              f"{min(v):.3f}-{max(v):.3f} over {len(v)} rounds)")
    if "wait" in by:
        print(f"figure: message_latency_ms = {statistics.median(by['wait']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
