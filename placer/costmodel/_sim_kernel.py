"""numba kernels of the event sweep, shared by :mod:`placer.costmodel.schedules` (deadlock check) and
:mod:`placer.costmodel.sim`; the kernels that build the task orders are in :mod:`placer.costmodel._schedule_kernel`.

Everything here works on flat int64/float64 arrays so one compiled function serves every graph; ``cache=True``
keeps the compile (a few seconds) out of all but the first process that imports it.

Task encoding (the same as :class:`placer.costmodel.schedules.Schedule`): device ``d`` runs tasks
``dev_ptr[d]:dev_ptr[d+1]`` in order; task ``k`` is ``(t_op[k], t_mb[k], t_phase[k])`` with phase 0 = forward,
1 = backward, 2 = parameter update (``t_op = -1``).
"""

from __future__ import annotations

import numba as nb
import numpy as np

FWD, BWD, UPDATE = 0, 1, 2

# sweep() status codes
OK, DEADLOCK = 0, 1


@nb.njit(cache=True)
def csr(keys: np.ndarray, values: np.ndarray, weights: np.ndarray, n: int):  # pragma: no cover - numba
    """Compressed rows: ``idx[ptr[i]:ptr[i+1]]`` are the ``values`` whose key is ``i`` (stable)."""
    order = np.argsort(keys, kind="mergesort")
    ptr = np.zeros(n + 1, np.int64)
    for k in range(keys.shape[0]):
        ptr[keys[k] + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    idx = values[order].copy()
    w = weights[order].copy()
    return ptr, idx, w


@nb.njit(cache=True)
def transfer_table(dev, succ_ptr, succ_idx, succ_bytes, num_devices):  # pragma: no cover - numba
    """One transfer per (producer op, remote device that reads it).

    A tensor read by several ops on one remote device is sent once (TensorFlow's send/recv pairs did the same);
    its size is the largest edge from that producer to that device. Returns ``tid_of[op, device]`` (-1 when no
    transfer) and per transfer: producer, source device, destination device, bytes, number of consuming edges.
    """
    n = dev.shape[0]
    e = succ_idx.shape[0]
    tid_of = np.full((n, num_devices), -1, np.int64)
    prod = np.empty(e, np.int64)
    src = np.empty(e, np.int64)
    dst = np.empty(e, np.int64)
    nbytes = np.zeros(e, np.int64)
    ncons = np.zeros(e, np.int64)
    t_count = 0
    for p in range(n):
        dp = dev[p]
        for k in range(succ_ptr[p], succ_ptr[p + 1]):
            ds = dev[succ_idx[k]]
            if ds == dp:
                continue
            t = tid_of[p, ds]
            if t < 0:
                t = t_count
                t_count += 1
                tid_of[p, ds] = t
                prod[t] = p
                src[t] = dp
                dst[t] = ds
            if succ_bytes[k] > nbytes[t]:
                nbytes[t] = succ_bytes[k]
            ncons[t] += 1
    return tid_of, prod[:t_count], src[:t_count], dst[:t_count], nbytes[:t_count], ncons[:t_count]


@nb.njit(cache=True)
def task_positions(t_op, t_mb, t_phase, num_mb, n, fill):  # pragma: no cover - numba
    """``(fpos, bpos)``, each ``(num_mb, n)``: the task index of ``(op, micro-batch)``'s forward and backward
    (``fill`` where there is none)."""
    fpos = np.full((num_mb, n), fill, np.int64)
    bpos = np.full((num_mb, n), fill, np.int64)
    for k in range(t_op.shape[0]):
        if t_phase[k] == 0:
            fpos[t_mb[k], t_op[k]] = k
        elif t_phase[k] == 1:
            bpos[t_mb[k], t_op[k]] = k
    return fpos, bpos


@nb.njit(cache=True)
def activation_peaks(dev_ptr, t_op, t_phase, stash_mb, temp_mb):  # pragma: no cover - numba
    """Peak bytes of stashed activations plus the running op's temporaries, walking each device's order.

    A forward adds its op's per-micro-batch stash, the matching backward frees it, so the peak reflects how many
    micro-batches the schedule really keeps in flight (GPipe: all M; 1F1B: at most stages - stage).
    """
    num_dev = dev_ptr.shape[0] - 1
    peak = np.zeros(num_dev)
    for d in range(num_dev):
        cur = 0.0
        best = 0.0
        for k in range(dev_ptr[d], dev_ptr[d + 1]):
            op = t_op[k]
            if op < 0:
                continue
            if t_phase[k] == 0:
                cur += stash_mb[op]
                level = cur + temp_mb[op]
            else:
                level = cur + temp_mb[op]
                cur -= stash_mb[op]
            if level > best:
                best = level
        peak[d] = best
    return peak


@nb.njit(cache=True)
def sweep(dev_ptr, t_op, t_mb, t_phase, dev, pred_ptr, pred_idx, succ_ptr, succ_idx,
          tid_of, x_src, x_dst, x_ncons, x_time_s, dur_f, dur_b, upd_s, num_mb, record):  # pragma: no cover
    """:func:`sweep_costed` without per-message or per-step overheads (the schedules' deadlock check)."""
    num_dev = dev_ptr.shape[0] - 1
    zero = np.zeros(num_dev)
    return sweep_costed(dev_ptr, t_op, t_mb, t_phase, dev, pred_ptr, pred_idx, succ_ptr, succ_idx, tid_of, x_src,
                        x_dst, x_ncons, x_time_s, dur_f, dur_b, upd_s, num_mb, record, zero, zero,
                        np.zeros(x_src.shape[0], np.bool_), np.ones(x_src.shape[0], np.bool_), zero,
                        np.zeros(dev_ptr[num_dev]))


@nb.njit(cache=True)
def sweep_costed(dev_ptr, t_op, t_mb, t_phase, dev, pred_ptr, pred_idx, succ_ptr, succ_idx,
                 tid_of, x_src, x_dst, x_ncons, x_time_s, dur_f, dur_b, upd_s, num_mb, record,
                 send_o, recv_o, x_msg, x_grad, start_s, task_extra_s):  # pragma: no cover
    """Run every device's task list in order (an in-order executor per device) and time it.

    A task starts when its device is free and its inputs are there: forward of (op, m) waits for forward of its
    predecessors in micro-batch m (local: finished; remote: transfer arrived); backward waits for its own forward
    and for the backward of its successors (remote: the gradient transfer arrived). A remote tensor's gradient is
    sent back once, after the last of its consumers on that device ran its backward. Transfers queue FIFO per
    directed link; they are issued in the sender's task order, which is also their issue-time order, so
    processing devices in any order that respects dependencies gives the event-driven answer.

    Per-message CPU costs (gloo's send/recv work runs on the worker's own core): a task that posts ``s``
    messages (activations after a forward, gradients after a backward) keeps its device busy ``s x send_o[d]``
    longer and the messages leave at its end; a task whose device sat idle waiting for a message that it is the
    first to use (per transfer and micro-batch) is preceded by one ``recv_o[d]``: waking a blocked worker.
    Only transfers with ``x_msg[t]`` (non-empty tensors) are messages; only those with ``x_grad[t]`` (the value
    depends on a parameter, so autograd produces its gradient) send a gradient back: for the others the
    producer's backward does not wait and nothing moves. Device ``d`` is free from ``start_s[d]``
    on (a fixed start-up cost of multi-device steps, see :mod:`placer.costmodel.sim`); it counts as busy time.
    Task ``k`` takes ``task_extra_s[k]`` longer (the fixed cost of a fused segment it starts).

    Returns ``(status, step_s, busy_s[D], critical_path_s, task_start, task_end, x_start[2, T, M],
    x_end[2, T, M], stuck_task[D])`` (x index 0: activation, 1: gradient); ``status`` is ``DEADLOCK`` when
    some device waits forever (``stuck_task[d]`` is its blocked task index, -1 if it finished).
    """
    num_dev = dev_ptr.shape[0] - 1
    n = dev.shape[0]
    num_x = x_src.shape[0]
    # [..., 0] finish/arrival time (-1: not yet), [..., 1] critical path up to it: one cache line for both
    opf = np.full((num_mb, n, 2), -1.0)
    opb = np.full((num_mb, n, 2), -1.0)
    xf = np.full((num_mb, num_x, 2), -1.0)
    xb = np.full((num_mb, num_x, 2), -1.0)
    cp_grad = np.zeros((num_mb, num_x))
    got_f = np.zeros((num_mb, num_x), np.bool_)  # activation message already paid for by a consumer
    got_b = np.zeros((num_mb, num_x), np.bool_)  # gradient message already paid for
    zero_t = np.empty(num_x + 1, np.int64)  # transfers whose gradient a backward task sends
    pend = np.empty((num_mb, num_x), np.int64)
    for m in range(num_mb):
        for t in range(num_x):
            pend[m, t] = x_ncons[t]
    link_free = np.zeros((num_dev, num_dev))
    dev_free = start_s.copy()
    busy = start_s.copy()
    cp_dev = np.zeros(num_dev)
    n_tasks = dev_ptr[num_dev]
    if record:
        task_start = np.full(n_tasks, -1.0)
        task_end = np.full(n_tasks, -1.0)
        x_start = np.full((2, num_x, num_mb), -1.0)
        x_end = np.full((2, num_x, num_mb), -1.0)
    else:
        task_start = np.empty(0)
        task_end = np.empty(0)
        x_start = np.empty((2, 0, 0))
        x_end = np.empty((2, 0, 0))
    ptr = dev_ptr[:num_dev].copy()
    critical = 0.0
    # devices to (re)run: a device runs until its next task is blocked, then waits for the device that owes the
    # missing input and is re-queued only once that device has made progress (not rescanned every round)
    stack = np.arange(num_dev)[::-1].copy()
    top = num_dev
    queued = np.ones(num_dev, np.bool_)
    waiter = np.zeros((num_dev, num_dev), np.bool_)
    need = np.zeros(num_dev, np.int64)  # the task (flat index) a waiting device needs done on its blocker
    pos_f, pos_b = task_positions(t_op[:n_tasks], t_mb, t_phase, num_mb, n, 0)
    while top > 0:
        top -= 1
        d = stack[top]
        queued[d] = False
        progressed = False
        end_k = dev_ptr[d + 1]
        while ptr[d] < end_k:
            k = ptr[d]
            op = t_op[k]
            m = t_mb[k]
            ph = t_phase[k]
            ready = dev_free[d]
            cp_in = 0.0
            blocker = -1
            n_recv = 0
            n_send = 0
            n_zero = 0
            if ph == 0:
                for j in range(pred_ptr[op], pred_ptr[op + 1]):
                    p = pred_idx[j]
                    if dev[p] == d:
                        f = opf[m, p, 0]
                        c = opf[m, p, 1]
                    else:
                        t = tid_of[p, d]
                        f = xf[m, t, 0]
                        c = xf[m, t, 1]
                    if f < 0.0:
                        blocker = dev[p]
                        need[d] = pos_f[m, p]
                        break
                    if f > ready:
                        ready = f
                    if c > cp_in:
                        cp_in = c
                if blocker < 0 and recv_o[d] > 0.0 and ready > dev_free[d]:
                    for j in range(pred_ptr[op], pred_ptr[op + 1]):
                        p = pred_idx[j]
                        if dev[p] != d:
                            t = tid_of[p, d]
                            if x_msg[t] and not got_f[m, t] and xf[m, t, 0] > dev_free[d]:
                                got_f[m, t] = True
                                n_recv = 1
                for q in range(num_dev):
                    t = tid_of[op, q]
                    if t >= 0 and x_msg[t]:
                        n_send += 1
                dur = dur_f[op]
            elif ph == 1:
                if opf[m, op, 0] < 0.0:
                    blocker = d
                    need[d] = pos_f[m, op]
                else:
                    cp_in = opf[m, op, 1]
                    for j in range(succ_ptr[op], succ_ptr[op + 1]):
                        s = succ_idx[j]
                        if dev[s] == d:
                            f = opb[m, s, 0]
                            c = opb[m, s, 1]
                        else:
                            t = tid_of[op, dev[s]]
                            f = xb[m, t, 0]
                            c = xb[m, t, 1]
                        if f < 0.0:
                            blocker = dev[s]
                            need[d] = pos_b[m, s]  # a gradient may also wait for other readers: re-checked then
                            break
                        if f > ready:
                            ready = f
                        if c > cp_in:
                            cp_in = c
                    if blocker < 0:
                        if recv_o[d] > 0.0 and ready > dev_free[d]:
                            for j in range(succ_ptr[op], succ_ptr[op + 1]):
                                s = succ_idx[j]
                                if dev[s] != d:
                                    t = tid_of[op, dev[s]]
                                    if x_msg[t] and x_grad[t] and not got_b[m, t] and xb[m, t, 0] > dev_free[d]:
                                        got_b[m, t] = True
                                        n_recv = 1
                        # gradients of received values whose last local consumer this is go back now
                        for j in range(pred_ptr[op], pred_ptr[op + 1]):
                            p = pred_idx[j]
                            if dev[p] == d:
                                continue
                            t = tid_of[p, d]
                            pend[m, t] -= 1
                            if pend[m, t] == 0:
                                zero_t[n_zero] = t
                                n_zero += 1
                dur = dur_b[op]
            else:
                cp_in = cp_dev[d]
                dur = upd_s[d]
            if blocker >= 0:
                waiter[blocker, d] = True
                break
            if ph == 1:
                for z in range(n_zero):
                    if x_msg[zero_t[z]] and x_grad[zero_t[z]]:
                        n_send += 1
            dur += n_recv * recv_o[d] + n_send * send_o[d] + task_extra_s[k]
            end = ready + dur
            dev_free[d] = end
            busy[d] += dur
            cp_out = cp_in + dur
            if cp_out > critical:
                critical = cp_out
            if record:
                task_start[k] = ready
                task_end[k] = end
            if ph == 0:
                opf[m, op, 0] = end
                opf[m, op, 1] = cp_out
                for q in range(num_dev):
                    t = tid_of[op, q]
                    if t < 0:
                        continue
                    xs = link_free[d, q]
                    if end > xs:
                        xs = end
                    xe = xs + x_time_s[t]
                    link_free[d, q] = xe
                    xf[m, t, 0] = xe
                    xf[m, t, 1] = cp_out + x_time_s[t]
                    if record:
                        x_start[0, t, m] = xs
                        x_end[0, t, m] = xe
            elif ph == 1:
                opb[m, op, 0] = end
                opb[m, op, 1] = cp_out
                if cp_out > cp_dev[d]:
                    cp_dev[d] = cp_out
                for j in range(pred_ptr[op], pred_ptr[op + 1]):
                    p = pred_idx[j]
                    if dev[p] == d:
                        continue
                    t = tid_of[p, d]
                    if cp_out > cp_grad[m, t]:
                        cp_grad[m, t] = cp_out
                for z in range(n_zero):  # last local consumer done: send the accumulated gradient back
                    t = zero_t[z]
                    if not x_grad[t]:  # no gradient exists: the producer's backward need not wait
                        xb[m, t, 0] = end
                        xb[m, t, 1] = cp_grad[m, t]
                        continue
                    q = x_src[t]
                    xs = link_free[d, q]
                    if end > xs:
                        xs = end
                    xe = xs + x_time_s[t]
                    link_free[d, q] = xe
                    xb[m, t, 0] = xe
                    xb[m, t, 1] = cp_grad[m, t] + x_time_s[t]
                    if record:
                        x_start[1, t, m] = xs
                        x_end[1, t, m] = xe
            ptr[d] = k + 1
            progressed = True
        if progressed:
            for w in range(num_dev):
                if waiter[d, w] and ptr[d] > need[w]:
                    waiter[d, w] = False
                    if not queued[w]:
                        queued[w] = True
                        stack[top] = w
                        top += 1
    status = OK
    stuck = np.full(num_dev, -1, np.int64)
    for d in range(num_dev):
        if ptr[d] < dev_ptr[d + 1]:
            status = DEADLOCK
            stuck[d] = ptr[d]
    step = 0.0
    for d in range(num_dev):
        if dev_free[d] > step:
            step = dev_free[d]
    return status, step, busy, critical, task_start, task_end, x_start, x_end, stuck

