"""The running best-k set of a (thread, query) and the merge of the threads' sets.

A set is a list its rows are appended to -- rows arrive in increasing order, so it stays in
row order -- with a count per distance: a row enters only below the query's threshold, which
drops to the k-th's distance once k rows lie below it (a later row at that distance loses its
tie). The per-thread lists are merged at the end by a counting sort on the distance."""

from __future__ import annotations

import hashret.index.cache  # noqa: F401 -- before any cached kernel is defined
import numpy as np
from numba import njit, prange

DIST_BITS = 16  # a list entry: row << DIST_BITS | distance
DIST_MASK = (1 << DIST_BITS) - 1


@njit(cache=True)
def compact(pool, t, qi, f, thr, keep):
    """(t, qi)'s full list without the rows that can no longer be among its k nearest: those
    above thr, and at thr all but the first ``keep`` (k less the rows below thr: the later
    ones lose their ties). Order is kept; the new length is at most k."""
    n = 0
    for j in range(f):
        e = pool[t, qi, j]
        d = np.int32(e & DIST_MASK)
        if d < thr or (d == thr and keep > 0):
            keep -= d == thr
            pool[t, qi, n] = e
            n += 1
    return n


@njit(inline="always", cache=True)
def offer(i, d, t, qi, k, thr, size, below, cnt, pool, fill):
    """Row i at distance d (< thr[qi]) onto the best-k list of (thread t, query qi): appended
    (rows arrive in increasing order, so a list is in row order), counted per distance, and
    once k rows lie below thr, thr drops to the k-th's distance -- a later row there loses
    its tie. ``below[qi]``: the list's rows below thr; ``size``: rows ever appended. A full
    list (2k + 16 places) sheds the rows that lost (``compact``), leaving at most k.
    (It replaced per-distance chains with eviction, where every append read and wrote a
    chain head: 100 queries, k=1000, 10^7 codes, 0-0.9 ms of ~22 faster.)"""
    f = fill[t, qi]
    if f == pool.shape[2]:
        f = compact(pool, t, qi, f, thr[qi], k - below[qi])
    pool[t, qi, f] = (i << DIST_BITS) | d
    fill[t, qi] = f + 1
    size[t, qi] += 1
    cnt[qi, d] += 1
    b = below[qi] + 1
    if b >= k:  # the k-th is at w: the largest w with fewer than k rows below it
        w = thr[qi] - 1
        while b - cnt[qi, w] >= k:
            b -= cnt[qi, w]
            w -= 1
        b -= cnt[qi, w]
        thr[qi] = w
    below[qi] = b


@njit(inline="always", cache=True)
def merge_one(qi, bits, pool, fill, at, out_d, out_r):
    """Query qi's per-thread lists into out_d/out_r[qi], its k nearest by (distance, row):
    a counting sort on the distance, stable, and thread t's rows all precede thread
    t + 1's, so each distance's rows come out in row order. (Sorting the keys took ~140 us
    a query at k=1000.) ``at``: scratch of bits + 2. Places past the rows found get -1."""
    k = out_d.shape[1]
    n_parts = pool.shape[0]
    at[:] = 0
    for t in range(n_parts):
        for j in range(fill[t, qi]):
            at[(pool[t, qi, j] & DIST_MASK) + 1] += 1
    for d in range(1, bits + 2):
        at[d] += at[d - 1]
    for t in range(n_parts):
        for j in range(fill[t, qi]):
            e = pool[t, qi, j]
            d = e & DIST_MASK
            p = at[d]
            if p < k:
                out_d[qi, p] = d
                out_r[qi, p] = e >> DIST_BITS
            at[d] = p + 1
    for j in range(min(at[bits], k), k):
        out_d[qi, j] = -1
        out_r[qi, j] = -1


@njit(parallel=True, nogil=True, cache=True)
def merge_parallel(bits, pool, fill, out_d, out_r):
    for qi in prange(out_d.shape[0]):
        merge_one(qi, bits, pool, fill, np.empty(bits + 2, dtype=np.int64), out_d, out_r)


@njit(nogil=True, cache=True)
def finish_topk(pool, fill, size, used, k, bits, n_parts):
    """The per-thread lists merged into (distances, rows, exact) -- see :func:`topk_kernel`."""
    n_q = fill.shape[1]
    out_d = np.empty((n_q, k), dtype=np.int32)  # the merge writes every entry
    out_r = np.empty((n_q, k), dtype=np.int64)
    if n_q * k * n_parts < 65536:  # a second parallel region costs more than this merge
        at = np.empty(bits + 2, dtype=np.int64)
        for qi in range(n_q):
            merge_one(qi, bits, pool, fill, at, out_d, out_r)
    else:
        merge_parallel(bits, pool, fill, out_d, out_r)
    # a thread whose set is not full lacks only rows at or above its seed: harmless exactly
    # when the answer's k-th lies below that seed (an unseeded thread lacks nothing)
    exact = np.ones(n_q, dtype=np.bool_)
    for qi in range(n_q):
        for t in range(n_parts):
            if size[t, qi] < k and used[t, qi] <= bits and not (
                    out_r[qi, k - 1] >= 0 and out_d[qi, k - 1] < used[t, qi]):
                exact[qi] = False
    return out_d, out_r, exact
