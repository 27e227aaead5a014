"""numba kernels of :class:`envs.problem.FinishEstimate`: an insertion-based list schedule (HEFT's, Topcuoglu et
al. 2002, section 4.1) tracked for ``S`` partial placements at once.

Each device keeps its busy intervals sorted by start: ``starts[s, d, :count[s, d]]`` and ``ends[s, d, ...]``. A
node that becomes ready at ``r`` and runs ``w`` seconds takes the earliest idle gap of length ``w`` that starts at
or after ``r`` (possibly before work placed earlier, unlike an append-only schedule), else goes after the last
interval.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True)
def _earliest_start(starts, ends, count, ready, duration):  # pragma: no cover - numba
    """Earliest ``x >= ready`` with ``[x, x + duration)`` free of the sorted intervals; and the insertion index."""
    # first interval that ends after `ready` (ends are sorted too: intervals never overlap)
    lo, hi = 0, count
    while lo < hi:
        mid = (lo + hi) // 2
        if ends[mid] <= ready:
            lo = mid + 1
        else:
            hi = mid
    x = ready
    k = lo
    while k < count:
        if starts[k] >= x + duration:
            break
        if ends[k] > x:
            x = ends[k]
        k += 1
    return x, k


@nb.njit(cache=True)
def _insert(starts, ends, count, k, start, end):  # pragma: no cover - numba
    for j in range(count, k, -1):
        starts[j] = starts[j - 1]
        ends[j] = ends[j - 1]
    starts[k] = start
    ends[k] = end


@nb.njit(cache=True)
def group_finishes(t, nodes, node_s, in_ptr, in_src, in_bytes, group_of_node, where_group, finish_s, latency_s,
                   s_per_byte, starts, ends, count):  # pragma: no cover - numba
    """``(S, K, D)`` finish of each of group ``t``'s ``K`` nodes if the group went to each device (nothing is
    recorded). ``where_group[s, g]`` is the device of groups ``g < t``; producers in later groups are ignored."""
    num_s = where_group.shape[0]
    num_k = nodes.shape[0]
    num_d = node_s.shape[1]
    out = np.zeros((num_s, num_k, num_d))
    cap = starts.shape[2]
    tmp_starts = np.empty(cap)
    tmp_ends = np.empty(cap)
    local = np.full(finish_s.shape[1], -1, np.int64)
    for k in range(num_k):
        local[nodes[k]] = k
    for s in range(num_s):
        for d in range(num_d):
            c = count[s, d]
            tmp_starts[:c] = starts[s, d, :c]
            tmp_ends[:c] = ends[s, d, :c]
            for k in range(num_k):
                v = nodes[k]
                ready = 0.0
                for e in range(in_ptr[v], in_ptr[v + 1]):
                    u = in_src[e]
                    gu = group_of_node[u]
                    if gu == t:
                        r = out[s, local[u], d]
                    elif gu < t:
                        du = where_group[s, gu]
                        r = finish_s[s, u] + 2.0 * (latency_s[du, d] + in_bytes[e] * s_per_byte[du, d])
                    else:
                        continue
                    if r > ready:
                        ready = r
                w = node_s[v, d]
                x, pos = _earliest_start(tmp_starts, tmp_ends, c, ready, w)
                _insert(tmp_starts, tmp_ends, c, pos, x, x + w)
                c += 1
                out[s, k, d] = x + w
    return out


@nb.njit(cache=True)
def record(nodes, node_s, device, node_ends, finish_s, starts, ends, count):  # pragma: no cover - numba
    """Put group nodes ``nodes`` on ``device[s]`` with the finishes ``node_ends[s, k, device[s]]`` that
    :func:`group_finishes` computed (the same gaps it chose, inserted in the same order)."""
    for s in range(device.shape[0]):
        d = device[s]
        for k in range(nodes.shape[0]):
            v = nodes[k]
            end = node_ends[s, k, d]
            start = end - node_s[v, d]
            c = count[s, d]
            # the slot group_finishes took: after every interval that ends by `start`
            lo, hi = 0, c
            while lo < hi:
                mid = (lo + hi) // 2
                if ends[s, d, mid] <= start:
                    lo = mid + 1
                else:
                    hi = mid
            _insert(starts[s, d], ends[s, d], c, lo, start, end)
            count[s, d] = c + 1
            finish_s[s, v] = end
