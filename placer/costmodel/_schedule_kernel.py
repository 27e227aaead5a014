"""numba kernels that build the schedules' task orders (:mod:`placer.costmodel.schedules`): chunks of contiguous
ops per device (virtual stages), their topological ranks, the pipeline block orders expanded to tasks, and the
list scheduling of the ``dataflow`` order (:func:`list_order`).

Split from :mod:`placer.costmodel._sim_kernel` (the event sweep); same conventions: flat int64 arrays, one compiled
function for every graph, ``cache=True``. Task encoding as in :class:`placer.costmodel.schedules.Schedule`.
"""

from __future__ import annotations

import heapq

import numba as nb
import numpy as np


@nb.njit(cache=True)
def virtual_chunks(dev, pred_ptr, pred_idx, num_devices):  # pragma: no cover - numba
    """Chunk level of every op on its device: cut only where a path leaves the device and comes back.

    An op starts a new chunk (level + 1) on its device exactly when a path reaches it from an earlier chunk of the
    same device through another device (dev0 -> dev1 -> dev0). Chunks play the role of Megatron's virtual
    pipeline stages. The graph of these chunks can still have a cycle made of separate paths (dev0 -> dev1 by one
    path, dev1 -> dev0 by another); :func:`chunk_stages` reports it and callers then use :func:`ordered_chunks`.
    """
    n = dev.shape[0]
    level = np.zeros(n, np.int64)
    anc = np.full((n, num_devices), -1, np.int64)  # highest chunk level of each device among ancestors
    for i in range(n):
        d = dev[i]
        c = 0
        for j in range(pred_ptr[i], pred_ptr[i + 1]):
            p = pred_idx[j]
            if dev[p] == d:
                if level[p] > c:
                    c = level[p]
            elif anc[p, d] >= 0 and anc[p, d] + 1 > c:
                c = anc[p, d] + 1
            for q in range(num_devices):
                if anc[p, q] > anc[i, q]:
                    anc[i, q] = anc[p, q]
        level[i] = c
        anc[i, d] = c
    return level


@nb.njit(cache=True)
def ordered_chunks(dev, pred_ptr, pred_idx, num_devices):  # pragma: no cover - numba
    """Chunk level of every op such that the graph of chunks is acyclic by construction.

    Ops are taken in index order; each joins the earliest existing virtual stage of its device that comes no
    earlier than its same-device inputs and strictly after its other-device inputs, or opens a new virtual stage
    at the end. Virtual stages are numbered in creation order, so every cross-chunk edge goes to a higher number.
    """
    n = dev.shape[0]
    vs = np.zeros(n, np.int64)
    owner = np.empty(n, np.int64)
    count = 0
    for i in range(n):
        d = dev[i]
        lb = 0
        for j in range(pred_ptr[i], pred_ptr[i + 1]):
            p = pred_idx[j]
            need = vs[p] if dev[p] == d else vs[p] + 1
            if need > lb:
                lb = need
        v = lb
        while v < count and owner[v] != d:
            v += 1
        if v >= count:
            v = count
            owner[count] = d
            count += 1
        vs[i] = v
    # level = rank of the virtual stage among its device's stages
    level_of_vs = np.zeros(count, np.int64)
    seen = np.zeros(num_devices, np.int64)
    for v in range(count):
        level_of_vs[v] = seen[owner[v]]
        seen[owner[v]] += 1
    level = np.empty(n, np.int64)
    for i in range(n):
        level[i] = level_of_vs[vs[i]]
    return level


@nb.njit(cache=True)
def chunk_stages(dev, level, src, dst, num_devices):  # pragma: no cover - numba
    """Topological rank of every chunk (ties: lowest first op) and each device's stage (rank of its chunk 0
    among the devices' first chunks; -1 when unused). Chunk id = device * L + level. ``acyclic`` is False when
    the chunk graph has a cycle (some chunks then stay unranked)."""
    n = dev.shape[0]
    num_levels = 1
    for i in range(n):
        if level[i] + 1 > num_levels:
            num_levels = level[i] + 1
    num_c = num_devices * num_levels
    first = np.full(num_c, n, np.int64)
    for i in range(n):
        c = dev[i] * num_levels + level[i]
        if i < first[c]:
            first[c] = i
    # chunk edges in compressed rows (duplicates are harmless for Kahn: counted and released alike)
    indeg = np.zeros(num_c, np.int64)
    cnt = np.zeros(num_c + 1, np.int64)
    for e in range(src.shape[0]):
        a = dev[src[e]] * num_levels + level[src[e]]
        b = dev[dst[e]] * num_levels + level[dst[e]]
        if a != b:
            cnt[a + 1] += 1
            indeg[b] += 1
    for c in range(num_c):
        cnt[c + 1] += cnt[c]
    fill = cnt[:num_c].copy()
    adj = np.empty(cnt[num_c], np.int64)
    for e in range(src.shape[0]):
        a = dev[src[e]] * num_levels + level[src[e]]
        b = dev[dst[e]] * num_levels + level[dst[e]]
        if a != b:
            adj[fill[a]] = b
            fill[a] += 1
    heap = [(np.int64(0), np.int64(0))]
    heap.pop()
    for c in range(num_c):
        if first[c] < n and indeg[c] == 0:
            heapq.heappush(heap, (first[c], np.int64(c)))
    rank = np.full(num_c, -1, np.int64)
    stage = np.full(num_devices, -1, np.int64)
    r = 0
    s = 0
    while len(heap) > 0:
        _, c = heapq.heappop(heap)
        rank[c] = r
        r += 1
        if c % num_levels == 0:
            stage[c // num_levels] = s
            s += 1
        for j in range(cnt[c], cnt[c + 1]):
            b = adj[j]
            indeg[b] -= 1
            if indeg[b] == 0:
                heapq.heappush(heap, (first[b], b))
    acyclic = True
    for c in range(num_c):
        if first[c] < n and rank[c] < 0:
            acyclic = False
    return stage, rank, acyclic


@nb.njit(cache=True)
def _alternate(blk, k, fwd, bwd, warm):  # pragma: no cover - numba
    """Write ``warm`` forwards, then forward/backward pairs, then the remaining backwards into ``blk`` from row k."""
    total = fwd.shape[0]
    w = min(warm, total)
    for i in range(w):
        blk[k, 0], blk[k, 1], blk[k, 2] = fwd[i, 0], fwd[i, 1], 0
        k += 1
    for i in range(total - w):
        blk[k, 0], blk[k, 1], blk[k, 2] = fwd[w + i, 0], fwd[w + i, 1], 0
        blk[k + 1, 0], blk[k + 1, 1], blk[k + 1, 2] = bwd[i, 0], bwd[i, 1], 1
        k += 2
    for i in range(total - w, total):
        blk[k, 0], blk[k, 1], blk[k, 2] = bwd[i, 0], bwd[i, 1], 1
        k += 1
    return k


@nb.njit(cache=True)
def pipeline_blocks(kind, stage, nchunks, num_stages, num_mb):  # pragma: no cover - numba
    """Per-device block lists ``(microbatch, chunk, phase)``; ``kind`` 0 none, 1 gpipe, 2 1f1b, 3 interleaved.

    none: F(m) B(m) for each m. gpipe: F(0..M-1) then B(0..M-1). 1f1b: ``S - s - 1`` warm-up forwards, then
    alternate. interleaved (Megatron-LM): forwards in micro-batch groups of ``S``, chunk by chunk
    (``(m, c)`` for group g, chunk c, m in g); backwards the same with chunks reversed; warm-up
    ``2 (S - s - 1) + (v - 1) S`` (all forwards when M == S).
    """
    num_dev = stage.shape[0]
    total = 0
    for d in range(num_dev):
        if stage[d] >= 0:
            total += 2 * num_mb * (nchunks[d] if kind == 3 else 1)
    blk = np.empty((total, 3), np.int64)
    ptr = np.zeros(num_dev + 1, np.int64)
    k = 0
    for d in range(num_dev):
        if stage[d] >= 0:
            v = nchunks[d] if kind == 3 else 1
            fwd = np.empty((num_mb * v, 2), np.int64)
            bwd = np.empty((num_mb * v, 2), np.int64)
            i = 0
            for g0 in range(0, num_mb, num_stages):
                g1 = min(g0 + num_stages, num_mb)
                for c in range(v):
                    for m in range(g0, g1):
                        fwd[i, 0], fwd[i, 1] = m, c
                        bwd[i, 0], bwd[i, 1] = m, v - 1 - c
                        i += 1
            if kind == 0:
                for m in range(num_mb):
                    blk[k, 0], blk[k, 1], blk[k, 2] = m, 0, 0
                    blk[k + 1, 0], blk[k + 1, 1], blk[k + 1, 2] = m, 0, 1
                    k += 2
            elif kind == 1:
                k = _alternate(blk, k, fwd, bwd, num_mb)
            elif kind == 2:
                k = _alternate(blk, k, fwd, bwd, num_stages - stage[d] - 1)
            else:
                warm = (num_stages - stage[d] - 1) * 2 + (v - 1) * num_stages
                if num_mb == num_stages:
                    warm = num_mb * v
                k = _alternate(blk, k, fwd, bwd, warm)
        ptr[d + 1] = k
    return ptr, blk


@nb.njit(cache=True)
def expand_blocks(blk_ptr, blk, dev, level, num_levels):  # pragma: no cover - numba
    """Task arrays from block lists: a forward block runs the chunk's ops ascending, a backward block descending;
    a device with blocks ends with its update task (op -1, micro-batch -1, phase 2)."""
    num_dev = blk_ptr.shape[0] - 1
    n = dev.shape[0]
    num_c = num_dev * num_levels
    co_ptr = np.zeros(num_c + 1, np.int64)
    for i in range(n):
        co_ptr[dev[i] * num_levels + level[i] + 1] += 1
    for c in range(num_c):
        co_ptr[c + 1] += co_ptr[c]
    fill = co_ptr[:num_c].copy()
    co_ops = np.empty(n, np.int64)
    for i in range(n):  # ascending op index within each chunk
        c = dev[i] * num_levels + level[i]
        co_ops[fill[c]] = i
        fill[c] += 1
    total = 0
    for d in range(num_dev):
        for b in range(blk_ptr[d], blk_ptr[d + 1]):
            c = d * num_levels + blk[b, 1]
            total += co_ptr[c + 1] - co_ptr[c]
        if blk_ptr[d + 1] > blk_ptr[d]:
            total += 1
    t_op = np.empty(total, np.int64)
    t_mb = np.empty(total, np.int64)
    t_ph = np.empty(total, np.int64)
    ptr = np.zeros(num_dev + 1, np.int64)
    k = 0
    for d in range(num_dev):
        for b in range(blk_ptr[d], blk_ptr[d + 1]):
            c = d * num_levels + blk[b, 1]
            lo, hi = co_ptr[c], co_ptr[c + 1]
            for j in range(hi - lo):
                t_op[k] = co_ops[lo + j] if blk[b, 2] == 0 else co_ops[hi - 1 - j]
                t_mb[k] = blk[b, 0]
                t_ph[k] = blk[b, 2]
                k += 1
        if blk_ptr[d + 1] > blk_ptr[d]:
            t_op[k], t_mb[k], t_ph[k] = -1, -1, 2
            k += 1
        ptr[d + 1] = k
    return ptr, t_op, t_mb, t_ph


# ---------------------------------------------------------------------- dataflow: list scheduling
@nb.njit(cache=True)
def _push(key, val, base, size, d, k, v):  # pragma: no cover - numba
    """Push ``(k, v)`` on device ``d``'s binary min-heap stored at ``key/val[base[d]:]``."""
    i = size[d]
    size[d] += 1
    b = base[d]
    while i > 0:
        p = (i - 1) // 2
        if key[b + p] <= k:
            break
        key[b + i] = key[b + p]
        val[b + i] = val[b + p]
        i = p
    key[b + i] = k
    val[b + i] = v


@nb.njit(cache=True)
def _pop(key, val, base, size, d):  # pragma: no cover - numba
    """Pop the smallest ``(key, value)`` of device ``d``'s heap."""
    b = base[d]
    top_k, top_v = key[b], val[b]
    size[d] -= 1
    n = size[d]
    k, v = key[b + n], val[b + n]
    i = 0
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and key[b + c + 1] < key[b + c]:
            c += 1
        if key[b + c] >= k:
            break
        key[b + i] = key[b + c]
        val[b + i] = val[b + c]
        i = c
    key[b + i] = k
    val[b + i] = v
    return top_k, top_v


@nb.njit(cache=True)
def list_order(dev, num_devices, num_mb, dur_f, dur_b, pred_ptr, pred_idx, pred_x, succ_ptr, succ_idx, succ_x,
               grad_x):  # pragma: no cover - numba
    """Per-device task lists of ``dataflow`` (:mod:`placer.costmodel.schedules`) as ``(device_ptr, op, mb, phase)``.

    ``pred_x`` / ``succ_x``: the activation's transfer time along each CSR entry (0 on one device); ``grad_x``
    per op: 1.0 when its gradient travels back (it depends on a parameter), else 0.0 (the backward still waits)."""
    n = dev.shape[0]
    # longest remaining path of each task (backward chains run towards lower op indices: src < dst)
    bl_b = np.zeros(n)
    for i in range(n):
        best = 0.0
        for j in range(pred_ptr[i], pred_ptr[i + 1]):
            c = pred_x[j] * grad_x[pred_idx[j]] + bl_b[pred_idx[j]]
            if c > best:
                best = c
        bl_b[i] = dur_b[i] + best
    bl_f = np.zeros(n)
    for i in range(n - 1, -1, -1):
        best = bl_b[i]
        for j in range(succ_ptr[i], succ_ptr[i + 1]):
            c = succ_x[j] + bl_f[succ_idx[j]]
            if c > best:
                best = c
        bl_f[i] = dur_f[i] + best
    scale = 4.0 * (bl_f.max() + 1.0) if n else 1.0
    # tasks: forward (i, m) = m * n + i, backward = (num_mb + m) * n + i
    num_t = 2 * num_mb * n
    ndep = np.empty(num_t, np.int64)
    ready = np.zeros(num_t)
    for m in range(num_mb):
        for i in range(n):
            ndep[m * n + i] = pred_ptr[i + 1] - pred_ptr[i]
            ndep[(num_mb + m) * n + i] = 1 + succ_ptr[i + 1] - succ_ptr[i]
    per_dev = np.zeros(num_devices + 1, np.int64)
    for i in range(n):
        per_dev[dev[i] + 1] += 2 * num_mb
    for d in range(num_devices):
        per_dev[d + 1] += per_dev[d]
    base = per_dev[:num_devices].copy()
    pend_k, pend_v, pend_n = np.empty(num_t), np.empty(num_t, np.int64), np.zeros(num_devices, np.int64)
    av_k, av_v, av_n = np.empty(num_t), np.empty(num_t, np.int64), np.zeros(num_devices, np.int64)
    for m in range(num_mb):
        for i in range(n):
            if ndep[m * n + i] == 0:
                _push(pend_k, pend_v, base, pend_n, dev[i], 0.0, m * n + i)
    free = np.zeros(num_devices)
    out_t = np.empty(num_t, np.int64)
    out_n = np.zeros(num_devices, np.int64)
    for _ in range(num_t):
        # the device that can start a task earliest (causal: later releases are ready later still)
        d_best, t_best = -1, np.inf
        for d in range(num_devices):
            if av_n[d] > 0:
                t = free[d]
            elif pend_n[d] > 0:
                t = max(free[d], pend_k[base[d]])
            else:
                continue
            if d_best < 0 or t < t_best:  # the first candidate even at t = inf (overflowing link costs)
                d_best, t_best = d, t
        d = d_best
        while pend_n[d] > 0 and pend_k[base[d]] <= t_best:
            _, k = _pop(pend_k, pend_v, base, pend_n, d)
            ph, rest = divmod(k, num_mb * n)
            m, i = divmod(rest, n)
            prio = (2.0 * m + (1.0 - ph)) * scale - (bl_f[i] if ph == 0 else bl_b[i])
            _push(av_k, av_v, base, av_n, d, prio, k)
        _, k = _pop(av_k, av_v, base, av_n, d)
        ph, rest = divmod(k, num_mb * n)
        m, i = divmod(rest, n)
        end = t_best + (dur_f[i] if ph == 0 else dur_b[i])
        free[d] = end
        out_t[per_dev[d] + out_n[d]] = k
        out_n[d] += 1
        if ph == 0:
            kb = (num_mb + m) * n + i
            ready[kb] = max(ready[kb], end)
            ndep[kb] -= 1
            if ndep[kb] == 0:
                _push(pend_k, pend_v, base, pend_n, d, ready[kb], kb)
            for j in range(succ_ptr[i], succ_ptr[i + 1]):
                s = succ_idx[j]
                ks = m * n + s
                ready[ks] = max(ready[ks], end + succ_x[j])
                ndep[ks] -= 1
                if ndep[ks] == 0:
                    _push(pend_k, pend_v, base, pend_n, dev[s], ready[ks], ks)
        else:
            for j in range(pred_ptr[i], pred_ptr[i + 1]):
                p = pred_idx[j]
                kp = (num_mb + m) * n + p
                ready[kp] = max(ready[kp], end + pred_x[j] * grad_x[p])
                ndep[kp] -= 1
                if ndep[kp] == 0:
                    _push(pend_k, pend_v, base, pend_n, dev[p], ready[kp], kp)
    # flatten, one update per used device
    used = 0
    for d in range(num_devices):
        if out_n[d] > 0:
            used += 1
    ptr = np.zeros(num_devices + 1, np.int64)
    op = np.empty(num_t + used, np.int64)
    mb = np.empty(num_t + used, np.int64)
    phase = np.empty(num_t + used, np.int64)
    w = 0
    for d in range(num_devices):
        for r in range(out_n[d]):
            k = out_t[per_dev[d] + r]
            ph, rest = divmod(k, num_mb * n)
            op[w], mb[w], phase[w] = rest % n, rest // n, ph
            w += 1
        if out_n[d] > 0:
            op[w], mb[w], phase[w] = -1, -1, 2
            w += 1
        ptr[d + 1] = w
    return ptr, op, mb, phase
