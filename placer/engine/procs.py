"""Process helpers shared by every engine process (the measuring workers, the calibration workers, the torchrun
entry point): die with the parent, pin to cores, a free port, one-line error reasons.

Kept free of heavy imports at module level (torch is imported inside :func:`pin_process`), so a worker pays only
for what it uses.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from typing import Sequence

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
"""``prctl`` option: the signal the kernel sends this process when its parent thread exits (Linux)."""


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make sure this process does not outlive its parent: ``PR_SET_PDEATHSIG`` (Linux; ignored elsewhere) and,
    given the parent's pid, a watchdog thread that exits (status 17) once the parent is gone (belt and braces,
    and the only guard where ``prctl`` does not exist)."""
    try:  # Linux: the kernel kills us when the parent thread goes away
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if parent_pid is None:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(17)
            time.sleep(1.0)

    if os.getppid() != parent_pid:
        os._exit(17)
    threading.Thread(target=watch, daemon=True, name="placer-parent-watch").start()


def pin_process(cores: Sequence[int], threads: int) -> None:
    """Pin this process to ``cores`` (none: leave it unpinned) and give torch ``threads`` intra-op threads and one
    inter-op thread."""
    import torch  # noqa: PLC0415 - the calibration and measuring workers import torch after forking

    if cores and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(cores))
        except OSError as e:  # a restricted cpuset: run unpinned rather than not at all
            log.warning("cannot pin to cores %s: %s", list(cores), e)
    torch.set_num_threads(max(1, int(threads)))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (a second start in one process)
        pass


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(e: BaseException) -> str:
    """``Type: first line of the message (its notes)``, at most 300 characters (the reason a failed result
    carries); the notes (``at op 'view_3', micro-batch 0``, added by the executor) are kept when the message is
    cut."""
    msg = str(e).strip().splitlines()
    notes = "; ".join(str(n) for n in getattr(e, "__notes__", ()))
    tail = f" ({notes})"[:150] if notes else ""
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300 - len(tail)] + tail


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (host ``MemoryError`` or a CUDA one)."""
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError"
