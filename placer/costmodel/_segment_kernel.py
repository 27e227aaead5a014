"""numba kernel of the engine's fused-segment rule on a schedule's arrays, for :mod:`placer.costmodel.sim`
(the rule itself: :mod:`placer.engine.segments`; ``tests/test_sim_segments.py`` checks both agree)."""

from __future__ import annotations

import numba as nb
import numpy as np

from placer.costmodel._sim_kernel import task_positions


@nb.njit(cache=True)
def segment_starts(dev_ptr, t_op, t_mb, t_phase, dev, pred_ptr, pred_idx, succ_ptr, succ_idx, grad_in, num_mb,
                   n):  # pragma: no cover - numba
    """Which tasks start one of the engine's fused segments (:mod:`placer.engine.segments`, the same rule on the
    schedule's arrays): 1 a forward segment, 2 a backward segment, 0 neither (updates: 0).

    A forward task joins the run of the task before it on its device when that one is a forward of the same
    micro-batch, the task waits for no remote value (one not yet used by this micro-batch on this device), its
    backward comes right before the previous op's backward, and the previous op gets no gradient from a remote
    consumer (``grad_in``). A run of several ops whose local consumers outside it would run their backward after
    the run's is split into single ops. A segment's backward starts at the backward of its last op.
    """
    n_tasks = dev_ptr[dev_ptr.shape[0] - 1]
    start = np.zeros(n_tasks, np.int8)
    fpos, bpos = task_positions(t_op[:n_tasks], t_mb, t_phase, num_mb, n, -1)
    seen = np.zeros((num_mb, n), np.int64)  # d + 1 once device d received producer p's value for micro-batch m
    for d in range(dev_ptr.shape[0] - 1):
        a = -1  # first task of the open run (-1: none)
        k = dev_ptr[d]
        while k <= dev_ptr[d + 1]:
            close = k == dev_ptr[d + 1] or t_phase[k] != 0
            if not close:
                op = t_op[k]
                m = t_mb[k]
                waits = False
                for j in range(pred_ptr[op], pred_ptr[op + 1]):
                    p = pred_idx[j]
                    if dev[p] != d and seen[m, p] != d + 1:
                        seen[m, p] = d + 1
                        waits = True
                if a >= 0:
                    prev = t_op[k - 1]
                    bl = bpos[m, prev]
                    if (t_mb[k - 1] == m and not waits and bl >= 0 and bpos[m, op] == bl - 1
                            and not grad_in[prev]):
                        k += 1
                        continue
                close = a >= 0
            if close and a >= 0:  # the run a..k-1 ends: mark its segments
                b = k - 1
                m = t_mb[a]
                ok = True
                if b > a:
                    first_b = bpos[m, t_op[b]]
                    for r in range(a, b + 1):
                        for j in range(succ_ptr[t_op[r]], succ_ptr[t_op[r] + 1]):
                            c = succ_idx[j]
                            if dev[c] == d and not (a <= fpos[m, c] <= b) and bpos[m, c] >= first_b:
                                ok = False
                for r in range(a, b + 1):
                    if ok and r > a:
                        continue
                    start[r] = 1
                    last = b if ok else r
                    for q in range(last, (a if ok else r) - 1, -1):  # first existing backward, last op first
                        if bpos[m, t_op[q]] >= 0:
                            start[bpos[m, t_op[q]]] = 2
                            break
                a = -1
            if k < dev_ptr[d + 1] and t_phase[k] == 0:
                a = k
            k += 1
    return start


@nb.njit(cache=True)
def recompute_walk(dev_ptr, t_op, t_mb, t_phase, starts, recompute, stash_mb, temp_mb, out_mb, dur_f, pred_ptr,
                   pred_idx, num_mb, n):  # pragma: no cover - numba
    """Activation peaks and recomputation seconds of the devices that recompute (``recompute[d]``), walking
    their orders as :func:`placer.costmodel._sim_kernel.activation_peaks` does for the others.

    On such a device each fused segment (``starts``) runs its forward under activation checkpointing: it keeps
    only its inputs (values it reads from outside the segment; an input op keeps its batch) until its backward;
    its backward first runs the segment's forward again (``extra_s`` of the backward segment's first task = the
    segment's forward seconds), which brings back the whole segment's stash, then frees it op by op and the
    inputs at the segment's end. Returns ``(peak per device, extra seconds per task)`` (0 for other devices).
    """
    n_tasks = dev_ptr[dev_ptr.shape[0] - 1]
    num_dev = dev_ptr.shape[0] - 1
    peak = np.zeros(num_dev)
    extra = np.zeros(n_tasks)
    seg_of = np.full(n_tasks, -1, np.int64)    # per forward task, the position that starts its segment
    fpos, bpos = task_positions(t_op[:n_tasks], t_mb, t_phase, num_mb, n, -1)
    held = np.zeros(n_tasks)    # per segment start: the bytes its checkpoint keeps
    stash = np.zeros(n_tasks)   # per segment start: the stash its recomputation brings back
    redo = np.zeros(n_tasks)    # per segment start: its forward seconds
    counted = np.full((num_mb, n), -1, np.int64)
    for d in range(num_dev):
        if not recompute[d]:
            continue
        cur = 0.0
        best = 0.0
        a = -1      # the open forward segment
        open_b = -1  # the forward segment whose backward is running
        for k in range(dev_ptr[d], dev_ptr[d + 1]):
            op = t_op[k]
            if op < 0:
                continue
            m = t_mb[k]
            if t_phase[k] == 0:
                if starts[k] == 1 or a < 0:
                    a = k
                seg_of[k] = a
                add = 0.0
                if pred_ptr[op + 1] == pred_ptr[op]:
                    add += stash_mb[op]  # an input op: the batch stays
                for j in range(pred_ptr[op], pred_ptr[op + 1]):
                    p = pred_idx[j]
                    pk = fpos[m, p]
                    inside = pk >= 0 and seg_of[pk] == a
                    if not inside and counted[m, p] != a:
                        counted[m, p] = a
                        add += out_mb[p]
                held[a] += add
                if bpos[m, op] >= 0 and pred_ptr[op + 1] > pred_ptr[op]:
                    stash[a] += stash_mb[op]
                redo[a] += dur_f[op]
                cur += add
                level = cur + temp_mb[op]
            else:
                if starts[k] == 2:
                    if open_b >= 0:
                        cur -= held[open_b]
                    open_b = seg_of[fpos[m, op]]
                    cur += stash[open_b]
                    extra[k] = redo[open_b]
                level = cur + temp_mb[op]
                if pred_ptr[op + 1] > pred_ptr[op]:  # an input op's batch goes with the segment's inputs
                    cur -= stash_mb[op]
                nxt = k + 1
                if open_b >= 0 and (nxt == dev_ptr[d + 1] or t_phase[nxt] != 1 or starts[nxt] == 2):
                    cur -= held[open_b]
                    open_b = -1
            if level > best:
                best = level
        peak[d] = best
    return peak, extra
