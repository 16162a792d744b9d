"""The jitted Hamming scans (top-k and range) over code segments.

Exact top-k, ties broken by row number: the database is split into one contiguous row
range per thread; each thread walks its range in cache-sized tiles (a lone query: straight
through) and, for every query, first computes the minimum distance over each span of rows (a
vectorisable XOR + popcount + min loop), and only when that minimum beats the query's
running k-th distance goes back: a minimum per 64 rows of the span, then rows.

One-word codes (up to 64 bits, one uint8/16/32/64 word a row) have both levels written as
LLVM vector IR (``pass1``/``pass4``, ``below64``): the first level keeps its minima in
vector lanes and ends a span with one vector compare, not a horizontal reduction, so its
spans can be half as long; the second level takes a 64-bit mask of the rows below the k-th
per 64 rows and visits only its set bits. The first level's compare also says which lanes
(row offsets mod 16) hold a row below the k-th; where only one does -- the usual case once
the k-th is tight -- the second level tests that lane's rows alone. Codes of 2-4 uint64 words
take the same two levels (``_multiword``: 8 rows a load, split into their words by shuffles);
codes of 5 or more words keep the loops numba compiles. (What each of these gained, measured
alternately against the loops, is in docs/performance.md.) Each (thread, query) keeps its
running best k in a list of :mod:`hashret.index.bestk`, merged at the end.

Distances are integers in [0, bits]; a removed row gets a distance above ``bits`` and never
enters. ``cache=True`` keeps compilation out of every process after the first.
"""

from __future__ import annotations

import hashret.index.cache  # noqa: F401 -- before any cached kernel is defined
import warnings

import numba
import numpy as np
from numba import njit, prange
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import overload

from hashret.index.bestk import finish_topk, offer
from hashret.index.intrinsics import (ALL_LANES, GROUP, LANES, SAMPLE_EVERY, SMALL_BLOCK, SPAN, TILE,
                                      VECTOR_SPAN, below64, below64_w2, below64_w3, below64_w4, first1_w2,
                                      first1_w3, first1_w4, first4_w2, first4_w3, first4_w4, load_at, lowest,
                                      pass1, pass4, popcount, prefetch, set64, wide)

# numba's SSA pass runs a check it calls pedantic on the variables of an ``@overload`` inlined
# into a prange body (ours: ``_first``, ``_second``, ``_gather``) and asks for a bug report
# where they are missing from its scope bookkeeping; the compiled scans equal brute force for
# every word type (tests/index/test_kernels.py), so the notice is hidden for these names only
INLINED_NOTICE = r".*variable '_(first|second|gather)_"
warnings.filterwarnings("ignore", message=INLINED_NOTICE, category=NumbaIRAssumptionWarning)


VECTOR_WORDS = 4  # codes of up to this many words take the vector IR path


@njit(inline="always", cache=True)
def _tile(addrs, seg_rows, n_rows, n_words, start, hi, like, rows):
    """(tile, end): rows start..end-1 (at most ``rows``, never past a segment's end) as a 1-D
    array of words, ``like``'s type."""
    s = start // seg_rows
    seg_lo = s * seg_rows
    end = min(start + rows, hi, seg_lo + seg_rows)
    seg = numba.carray(load_at(addrs[s]), (min(seg_rows, n_rows - seg_lo)) * n_words, like.dtype)
    return seg[(start - seg_lo) * n_words:(end - seg_lo) * n_words], end


@njit(inline="always", cache=True)
def _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, like, tile):
    """The tile after the one that ends at ``end``, for ``_prefetch_share``; empty past
    ``hi``, and for codes of several words, whose tiles (32-64 KiB) leave no room in L1 for
    the next one (10^6 256-bit codes, 100 queries, k=1000: 3% slower with it)."""
    if like.ndim == 1 and end < hi:
        ahead, _ = _tile(addrs, seg_rows, n_rows, n_words, end, hi, like, TILE)
        return ahead
    return tile[:0]


@njit(inline="always", cache=True)
def _prefetch_share(ahead, gi, n_groups):
    """Query group gi's share of the next tile's cache lines, asked for while this tile is
    scanned: a batch reads each tile from memory in its first group's first level only, and
    the hardware's prefetchers, seeing 25 passes over one tile and then a jump, did not have
    the next one ready -- every tile the same L1-resident 16 KiB ran 1.4 ms (8%) faster than
    10^7 codes from memory (100 queries, k=1000, first level alone)."""
    step = 64 // ahead.itemsize  # words a cache line
    per = ((len(ahead) + step - 1) // step + n_groups - 1) // n_groups
    for w in range(gi * per * step, min(len(ahead), (gi + 1) * per * step), step):
        prefetch(ahead, w)


@njit(inline="always", cache=True)
def _block_distances(blk, n_words, q, out):
    """out[i] = distance of row i of the 1-D slice ``blk`` of codes of several words
    (vectorised for 2 and 4 words)."""
    wide()
    n = blk.shape[0] // n_words
    if n_words == 2:
        q0, q1 = q[0], q[1]
        for i in range(n):
            out[i] = np.int32(popcount(blk[2 * i] ^ q0) + popcount(blk[2 * i + 1] ^ q1))
    elif n_words == 4:
        q0, q1, q2, q3 = q[0], q[1], q[2], q[3]
        for i in range(n):
            out[i] = np.int32(popcount(blk[4 * i] ^ q0) + popcount(blk[4 * i + 1] ^ q1)
                              + popcount(blk[4 * i + 2] ^ q2) + popcount(blk[4 * i + 3] ^ q3))
    else:
        for i in range(n):
            acc = np.uint64(0)
            for w in range(n_words):
                acc += popcount(blk[i * n_words + w] ^ q[w])
            out[i] = np.int32(acc)
    return n


@njit(inline="always", cache=True)
def _span_min(blk, n_words, q, dblk, has_deleted, penalty):
    """Minimum distance of ``q`` over the rows of the 1-D slice ``blk`` of codes of several
    words (removed rows count as ``penalty``): one vectorised pass, one horizontal reduction."""
    wide()
    n = blk.shape[0] // n_words
    pen = np.uint64(penalty)  # minima stay in uint64 lanes: no narrowing in the hot loop
    m = pen
    if n_words == 2:
        a, b = q[0], q[1]
        if has_deleted:
            for i in range(n):
                m = min(m, popcount(blk[2 * i] ^ a) + popcount(blk[2 * i + 1] ^ b)
                        + np.uint64(dblk[i]) * pen)
        else:
            for i in range(n):
                m = min(m, popcount(blk[2 * i] ^ a) + popcount(blk[2 * i + 1] ^ b))
    elif n_words == 4:
        a, b, c, d = q[0], q[1], q[2], q[3]
        for i in range(n):
            x = (popcount(blk[4 * i] ^ a) + popcount(blk[4 * i + 1] ^ b)
                 + popcount(blk[4 * i + 2] ^ c) + popcount(blk[4 * i + 3] ^ d))
            if has_deleted:
                x += np.uint64(dblk[i]) * pen
            m = min(m, x)
    else:
        for i in range(n):
            x = np.uint64(0)
            for w in range(n_words):
                x += popcount(blk[i * n_words + w] ^ q[w])
            if has_deleted:
                x += np.uint64(dblk[i]) * pen
            m = min(m, x)
    return np.int32(m)


# -- one walk, two kinds of codes --------------------------------------------------------------
# The walks below are written once; what differs between codes of one word (the queries come
# as a 1-D array of words) and codes of several (a 2-D array, a row per query) is chosen when
# numba types the call, by the ``@overload``s of ``_first``, ``_second`` and ``_gather``. So a
# kernel compiled for 8-, 16- or 32-bit words holds no multi-word loops, and one for 128-bit
# codes no vector IR: with both compiled into every kernel (a branch on ``n_words`` at run
# time), compiling the kernels once per word type took 710 s instead of ~400.

def _first(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted, penalty):
    """The first level, for queries g..g+ng-1 (ng <= GROUP) over rows s0..s1-1 of ``tile``:
    bits LANES*j..LANES*j+15 are query g + j's *lanes*, bit l set where a row s0 + l + 16i
    may be below thr[g + j] (zero: none is). The vector IR keeps its minima in lanes, so it
    says which rows (one-word codes); the loops set all 16 bits or none. Compiled code runs
    one of the two implementations below, chosen by the queries' type."""
    raise NotImplementedError("only compiled code calls _first")


def _first_one_word(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                    penalty):
    # removed rows count here: the second level skips them, the first only decides where to look
    ch = 128 // tile.itemsize
    nch = (s1 - s0) // ch
    if ng == 1:
        hits = pass1(tile, s0, nch, queries[g], thr[g])
    else:
        ib, ic, id_ = g + 1, g + min(2, ng - 1), g + min(3, ng - 1)
        hits = pass4(tile, s0, nch, queries[g], queries[ib], queries[ic], queries[id_],
                      thr[g], thr[ib], thr[ic], thr[id_])
    for r in range(s0 + nch * ch, s1):
        for j in range(ng):
            if np.int32(popcount(np.uint64(tile[r] ^ queries[g + j]))) < thr[g + j]:
                hits |= np.uint64(1) << np.uint64(LANES * j + (r - s0) % LANES)
    return hits


def _first_words(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                 penalty):
    if 2 <= n_words <= VECTOR_WORDS:  # 8 rows a chunk, their w words split by shuffles
        nch = (s1 - s0) // 8
        ib, ic, id_ = g + min(1, ng - 1), g + min(2, ng - 1), g + min(3, ng - 1)
        if n_words == 2:
            if ng == 1:
                hits = first1_w2(tile, s0, nch, queries, g, thr)
            else:
                hits = first4_w2(tile, s0, nch, queries, g, ib, ic, id_, thr)
        elif n_words == 3:
            if ng == 1:
                hits = first1_w3(tile, s0, nch, queries, g, thr)
            else:
                hits = first4_w3(tile, s0, nch, queries, g, ib, ic, id_, thr)
        else:
            if ng == 1:
                hits = first1_w4(tile, s0, nch, queries, g, thr)
            else:
                hits = first4_w4(tile, s0, nch, queries, g, ib, ic, id_, thr)
        for r in range(s0 + nch * 8, s1):
            for j in range(ng):
                if _row_distance(tile, n_words, r, queries[g + j]) < thr[g + j]:
                    hits |= np.uint64(ALL_LANES) << np.uint64(LANES * j)
        return hits
    blk = tile[s0 * n_words:s1 * n_words]
    hits = np.uint64(0)
    for j in range(ng):
        if has_deleted:
            m = _span_min(blk, n_words, queries[g + j], deleted[start + s0:start + s1], True,
                          penalty)
        else:  # slicing the mask only where there is one: a slice is a new array either way
            m = _span_min(blk, n_words, queries[g + j], deleted, False, penalty)
        if m < thr[g + j]:
            hits |= np.uint64(ALL_LANES) << np.uint64(LANES * j)
    return hits


@overload(_first, inline="always")
def _first_typed(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                 penalty):
    return _first_one_word if queries.ndim == 1 else _first_words


@njit(inline="always", cache=True)
def _lanes(hits, j):
    """Query g + j's lanes in a first-level answer of queries g.. (see ``_first``)."""
    return (hits >> np.uint64(LANES * j)) & np.uint64(ALL_LANES)


@njit(inline="always", cache=True)
def _span_rows(queries, n_words, few_passes):
    """Rows per first-level test: a vector IR span ends in one vector compare, a loop's in a
    horizontal reduction that costs about the popcounts of 64 rows. Walks where few spans
    pass (a lone query, a radius) test one-word codes in spans twice as long: fewer span
    ends, longer lanes to re-read where one passes (10^7 codes, alternated A/B: one query
    k=1000 and radius 4-8% faster, 100 queries in a radius 3%; 100 queries at k=1000,
    where ~1,100 spans a query pass, 2% slower, so batched top-k keeps VECTOR_SPAN)."""
    if queries.ndim == 1:
        return 2 * VECTOR_SPAN if few_passes else VECTOR_SPAN
    return VECTOR_SPAN if n_words <= VECTOR_WORDS else SPAN


@njit(inline="always", cache=True)
def _row_distance(tile, n_words, r, q):
    """The distance of row r of ``tile`` (codes of several words) to ``q``."""
    acc = np.uint64(0)
    for w in range(n_words):
        acc += popcount(np.uint64(tile[r * n_words + w] ^ q[w]))
    return np.int32(acc)


@njit(inline="always", cache=True)
def _below_mask(tile, s0, s_hi, q0, t, start, deleted, has_deleted):
    """Bit i set where row s0 + i (i < 64, below s_hi) of ``tile`` (one-word codes) is alive
    and at distance < t: ``below64`` for a full block, a loop for the short one at a span's
    end."""
    if s0 + 64 <= s_hi:
        m = below64(tile, s0, q0, t)
        if m != 0 and has_deleted:
            m &= ~set64(deleted, start + s0)
        return m
    m = np.uint64(0)
    for i in range(s_hi - s0):
        if (np.int32(popcount(np.uint64(tile[s0 + i] ^ q0))) < t
                and not (has_deleted and deleted[start + s0 + i] != 0)):
            m |= np.uint64(1) << np.uint64(i)
    return m


@njit(inline="always", cache=True)
def _one_lane(tile, s_lo, s_hi, lane, q0, t):
    """Bit i set where row s_lo + lane + 16i (below s_hi; i < 64) is at distance < t: the
    second level where the first named one lane of a span -- the usual case once the k-th
    is tight, one row in the span below it. Its 32 rows one by one cost less than the 8
    vector masks of the whole span (100 queries, k=1000, 10^7 codes: 24.4 -> 22.1 ms)."""
    m = np.uint64(0)
    i = 0
    for r in range(s_lo + lane, s_hi, LANES):
        below = np.int32(popcount(np.uint64(tile[r] ^ q0))) < t
        m |= np.uint64(below) << np.uint64(i)
        i += 1
    return m


@njit(inline="always", cache=True)
def _below_mask_words(tile, n_words, s0, s_hi, queries, qi, t, start, deleted, has_deleted):
    """``_below_mask`` for codes of 2..VECTOR_WORDS words, query qi."""
    if s0 + 64 <= s_hi:
        if n_words == 2:
            m = below64_w2(tile, s0, queries, qi, t)
        elif n_words == 3:
            m = below64_w3(tile, s0, queries, qi, t)
        else:
            m = below64_w4(tile, s0, queries, qi, t)
        if m != 0 and has_deleted:
            m &= ~set64(deleted, start + s0)
        return m
    m = np.uint64(0)
    for i in range(s_hi - s0):
        if (_row_distance(tile, n_words, s0 + i, queries[qi]) < t
                and not (has_deleted and deleted[start + s0 + i] != 0)):
            m |= np.uint64(1) << np.uint64(i)
    return m


def _second(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted, penalty,
            t, k, thr, size, below, cnt, pool, fill, dbuf):
    """The second level: rows s_lo..s_hi-1 of ``tile`` (row ``start`` first), whose span
    passed query qi's first level with ``lanes`` (see ``_first``), offered to its best-k set
    where below its k-th."""
    raise NotImplementedError("only compiled code calls _second")


def _second_one_word(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                     penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    # every 64 rows give a mask of the rows below the k-th (``_below_mask``), and only its set
    # bits are looked at: no minima, no distances written out; with one lane, only its rows
    q0 = queries[qi]
    if lanes & (lanes - np.uint64(1)) == 0:  # one lane's rows are in row order on their own
        lane = lowest(lanes)
        m = _one_lane(tile, s_lo, s_hi, lane, q0, thr[qi])
        while m != 0:
            j = s_lo + lane + LANES * lowest(m)
            m &= m - np.uint64(1)
            if has_deleted and deleted[start + j] != 0:
                continue
            d = np.int32(popcount(np.uint64(tile[j] ^ q0)))
            if d < thr[qi]:
                offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)
        return
    for s0 in range(s_lo, s_hi, 64):
        m = _below_mask(tile, s0, s_hi, q0, thr[qi], start, deleted, has_deleted)
        while m != 0:
            j = s0 + lowest(m)
            m &= m - np.uint64(1)
            d = np.int32(popcount(np.uint64(tile[j] ^ q0)))
            if d < thr[qi]:  # the k-th may have tightened since the mask was taken
                offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)


def _second_words(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    if 2 <= n_words <= VECTOR_WORDS:  # as for one word: 64-row masks, their set bits
        for s0 in range(s_lo, s_hi, 64):
            m = _below_mask_words(tile, n_words, s0, s_hi, queries, qi, thr[qi], start, deleted,
                                  has_deleted)
            while m != 0:
                j = s0 + lowest(m)
                m &= m - np.uint64(1)
                d = _row_distance(tile, n_words, j, queries[qi])
                if d < thr[qi]:
                    offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)
        return
    # each SMALL_BLOCK rows get their own minimum, and only blocks that beat the k-th too are
    # walked row by row
    q = queries[qi]
    for s0 in range(s_lo, s_hi, SMALL_BLOCK):
        s1 = min(s_hi, s0 + SMALL_BLOCK)
        blk = tile[s0 * n_words:s1 * n_words]
        if has_deleted:
            m = _span_min(blk, n_words, q, deleted[start + s0:start + s1], True, penalty)
        else:
            m = _span_min(blk, n_words, q, deleted, False, penalty)
        if m >= thr[qi]:
            continue
        nr = _block_distances(blk, n_words, q, dbuf)
        for jj in range(nr):
            d = dbuf[jj]
            if d < thr[qi] and not (has_deleted and deleted[start + s0 + jj] != 0):
                offer(start + s0 + jj, d, t, qi, k, thr, size, below, cnt, pool, fill)


@overload(_second, inline="always")
def _second_typed(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    return _second_one_word if queries.ndim == 1 else _second_words


@njit(inline="always", cache=True)
def _lone_seed(addrs, seg_rows, n_rows, n_words, queries, lo, hi, need, bits, deleted,
               has_deleted, penalty, dbuf):
    """A lone query's seed for rows lo..hi-1: one more than the distance of the ``need``-th
    nearest row among one span of SPAN rows per SAMPLE_EVERY (``topk`` asks for about this
    thread's share of k rows in all); bits + 1 where the sample is short. The sample is
    walked like the rows proper (both levels, a best-``need`` set), so it costs about its
    1/64 of the reads: a histogram of its distances cost 0.1-0.2 ms at 10^7 codes."""
    cnt = np.zeros((1, bits + 2), dtype=np.int32)
    thr = np.full(1, bits + 1, dtype=np.int32)
    size = np.zeros((1, 1), dtype=np.int64)
    fill = np.zeros((1, 1), dtype=np.int64)
    below = np.zeros(1, dtype=np.int64)
    pool = np.empty((1, 1, 2 * need + 16), dtype=np.int64)
    span = _span_rows(queries, n_words, True)
    j = lo
    while j + SPAN <= hi:
        tile, end = _tile(addrs, seg_rows, n_rows, n_words, j, hi, queries, SPAN)
        for s0 in range(0, end - j, span):
            s1 = min(end - j, s0 + span)
            lanes = _first(tile, s0, s1, n_words, queries, 0, 1, thr, j, deleted, has_deleted,
                           penalty)
            if lanes != 0:
                _second(tile, n_words, queries, 0, s0, s1, lanes, j, deleted, has_deleted, penalty,
                        0, need, thr, size, below, cnt, pool, fill, dbuf)
        j += SPAN * SAMPLE_EVERY
    if size[0, 0] < need:
        return np.int32(bits + 1)
    return np.int32(thr[0] + 1)


@njit(parallel=True, nogil=True, cache=True)  # nogil: a server's event loop runs on during a scan
def _topk_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, used, pool, fill, size):
    """Each of ``n_parts`` threads fills its best-k sets over its contiguous rows, a tile at
    a time, GROUP queries at a time. One parallel region and nothing allocated outside it:
    with passive OpenMP threads (how a service sees them) every region costs a wake-up,
    ~0.1 ms here.

    A lone query has a kernel of its own (``_lone_parts``): with both walks in one function,
    100 queries at k=1000 over 10^7 codes took ~10% longer (113 vs 103 ms, alternated A/B);
    how LLVM optimises this loop nest depends on what else shares the function.

    ``used[t, q]``: the threshold thread t started from (its seed), for the exactness check."""
    n_q = queries.shape[0]
    nb = bits + 2  # distances 0..bits, plus the "removed" distance
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, False)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        cnt = np.zeros((n_q, nb), dtype=np.int32)
        below = np.zeros(n_q, dtype=np.int64)
        thr = seed.copy()  # accept d < thr
        used[t] = thr
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        found = np.empty(TILE // span + 1, dtype=np.uint64)  # the tile's spans' first levels
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, TILE)
            n = end - start
            n_spans = (n + span - 1) // span
            ahead = _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, queries, tile)
            for g in range(0, n_q, GROUP):
                ng = min(GROUP, n_q - g)
                _prefetch_share(ahead, g // GROUP, (n_q + GROUP - 1) // GROUP)
                # the first level over the whole tile before any second level: a branch on each
                # span's answer as it came, mispredicted, threw away the next span's work already
                # in flight (100 queries, k=1000, 10^7 codes: 25.0 -> 24.4 ms)
                passed = np.uint64(0)
                for si in range(n_spans):
                    hits = _first(tile, si * span, min(n, si * span + span), n_words,
                                  queries, g, ng, thr, start, deleted, has_deleted, penalty)
                    found[si] = hits
                    passed |= np.uint64(hits != 0) << np.uint64(si)
                while passed != 0:
                    si = lowest(passed)
                    passed &= passed - np.uint64(1)
                    hits = found[si]
                    s0, s1 = si * span, min(n, si * span + span)
                    who = np.uint64(0)
                    for j in range(ng):
                        who |= np.uint64(_lanes(hits, j) != 0) << np.uint64(j)
                    while who != 0:
                        j = lowest(who)
                        who &= who - np.uint64(1)
                        _second(tile, n_words, queries, g + j, s0, s1, _lanes(hits, j), start,
                                deleted, has_deleted, penalty, t, k, thr, size, below,
                                cnt, pool, fill, dbuf)
            start = end


@njit(parallel=True, nogil=True, cache=True)
def _lone_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, lone_need, used, pool, fill, size):
    """``_topk_parts`` for one query, which reads every code once: no tiles, each thread
    walks its share of each segment straight through; ``lone_need`` > 0: each thread
    first seeds itself from its own sample (``_lone_seed``)."""
    nb = bits + 2
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, True)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        cnt = np.zeros((1, nb), dtype=np.int32)
        below = np.zeros(1, dtype=np.int64)
        thr = seed.copy()
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        if lone_need > 0:
            thr[0] = min(thr[0], _lone_seed(addrs, seg_rows, n_rows, n_words, queries, lo, hi,
                                            lone_need, bits, deleted, has_deleted, penalty, dbuf))
        used[t, 0] = thr[0]
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, hi - start)
            n = end - start
            for s0 in range(0, n, span):
                s1 = min(n, s0 + span)
                lanes = _first(tile, s0, s1, n_words, queries, 0, 1, thr, start, deleted,
                               has_deleted, penalty)
                if lanes != 0:  # all lanes: the one-lane path measured 2-3% slower here
                    _second(tile, n_words, queries, 0, s0, s1, ALL_LANES, start, deleted,
                            has_deleted, penalty, t, k, thr, size, below, cnt, pool, fill,
                            dbuf)
            start = end


@njit(nogil=True, cache=True)
def lone_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, lone_need, pool):
    """:func:`topk_kernel` for one query: the lone walk."""
    size = np.zeros((n_parts, 1), dtype=np.int64)
    used = np.empty((n_parts, 1), dtype=np.int32)
    fill = np.zeros((n_parts, 1), dtype=np.int64)
    _lone_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                n_parts, seed, lone_need, used, pool, fill, size)
    return finish_topk(pool, fill, size, used, k, bits, n_parts)


@njit(nogil=True, cache=True)
def batch_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                 seed, pool):
    """:func:`topk_kernel` for a batch: tiles that every query of the batch scans."""
    n_q = queries.shape[0]
    size = np.zeros((n_parts, n_q), dtype=np.int64)
    used = np.empty((n_parts, n_q), dtype=np.int32)
    fill = np.zeros((n_parts, n_q), dtype=np.int64)
    _topk_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                n_parts, seed, used, pool, fill, size)
    return finish_topk(pool, fill, size, used, k, bits, n_parts)


def topk_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, lone_need, pool):
    """Top-k for each query. addrs: the segments' addresses (``seg_rows`` rows of n_words
    words each); queries: of the segments' word type, (Q,) for codes of one word, else
    (Q, n_words); seed: per query, only rows at distance < seed are taken (bits + 1: all);
    lone_need > 0: a lone query seeds each thread from its own sample (see ``_lone_seed``;
    0: no); pool: (n_parts, Q, 2k + 16) scratch for the best-k lists (``_pools``).
    Returns (distances, rows,
    exact): (Q, k) nearest first, ties by row, -1 where fewer than k rows qualify; exact[q]
    is False where a seed may have cut off one of query q's k nearest (see ``topk``).

    The lone walk and the batch walk are two compiled functions chosen here, in Python, so a
    process compiles (or loads) only the one its queries take."""
    if queries.shape[0] == 1:
        return lone_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                           n_parts, seed, lone_need, pool)
    return batch_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                        n_parts, seed, pool)


def _gather(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted, penalty,
            t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    """``_second`` for a radius: rows s_lo..s_hi-1 within ``radius`` of query qi, counted and
    (``fill``) written at offsets[t, qi], at most ``cap`` of them (0: no cap)."""
    raise NotImplementedError("only compiled code calls _gather")


def _gather_one_word(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                     penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    q0 = queries[qi]
    if lanes & (lanes - np.uint64(1)) == 0:
        lane = lowest(lanes)
        m = _one_lane(tile, s_lo, s_hi, lane, q0, radius + 1)
        while m != 0:
            j = s_lo + lane + LANES * lowest(m)
            m &= m - np.uint64(1)
            if not (has_deleted and deleted[start + j] != 0):
                _record(start + j, np.int32(popcount(np.uint64(tile[j] ^ q0))), t, qi, offsets,
                        out_rows, out_dist, fill, cap, counts)
        return
    for s0 in range(s_lo, s_hi, 64):
        m = _below_mask(tile, s0, s_hi, q0, radius + 1, start, deleted, has_deleted)
        while m != 0:
            j = s0 + lowest(m)
            m &= m - np.uint64(1)
            _record(start + j, np.int32(popcount(np.uint64(tile[j] ^ q0))), t, qi, offsets,
                    out_rows, out_dist, fill, cap, counts)


def _gather_words(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    if 2 <= n_words <= VECTOR_WORDS:
        for s0 in range(s_lo, s_hi, 64):
            m = _below_mask_words(tile, n_words, s0, s_hi, queries, qi, radius + 1, start,
                                  deleted, has_deleted)
            while m != 0:
                j = s0 + lowest(m)
                m &= m - np.uint64(1)
                _record(start + j, _row_distance(tile, n_words, j, queries[qi]), t, qi, offsets,
                        out_rows, out_dist, fill, cap, counts)
        return
    q = queries[qi]
    for s0 in range(s_lo, s_hi, SMALL_BLOCK):
        s1 = min(s_hi, s0 + SMALL_BLOCK)
        blk = tile[s0 * n_words:s1 * n_words]
        dblk = deleted[start + s0:start + s1] if has_deleted else deleted
        if _span_min(blk, n_words, q, dblk, has_deleted, penalty) > radius:
            continue
        nr = _block_distances(blk, n_words, q, dbuf)
        for jj in range(nr):
            d = dbuf[jj]
            if d <= radius and not (has_deleted and dblk[jj] != 0):
                _record(start + s0 + jj, d, t, qi, offsets, out_rows, out_dist, fill, cap, counts)


@overload(_gather, inline="always")
def _gather_typed(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    return _gather_one_word if queries.ndim == 1 else _gather_words


@njit(inline="always", cache=True)
def _record(i, d, t, qi, offsets, out_rows, out_dist, fill, cap, counts):
    if fill and (cap == 0 or counts[t, qi] < cap):
        p = offsets[t, qi] + counts[t, qi]
        out_rows[p] = i
        out_dist[p] = d
    counts[t, qi] += 1


@njit(parallel=True, nogil=True, cache=True)
def range_kernel(addrs, seg_rows, n_rows, n_words, queries, radius, bits, deleted, has_deleted,
                 n_parts, offsets, out_rows, out_dist, fill, cap, counts):
    """Counts (into ``counts``, zeros on entry; fill=False) or writes (fill=True, at
    ``offsets``) the rows within ``radius``; with ``cap`` > 0, at most ``cap`` rows per
    (thread, query) are written (counts go on). The walk is ``_topk_parts``' with a fixed
    threshold; a lone query walks its rows straight through, as in ``_lone_parts``."""
    n_q = queries.shape[0]
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, True)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        lim = np.full(n_q, radius + 1, dtype=np.int32)  # what the first level tests
        rows = hi - lo if n_q == 1 else TILE
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, rows)
            n = end - start
            ahead = tile[:0]  # a lone query's walk is one stream, which the hardware follows
            if n_q > 1:
                ahead = _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, queries, tile)
            for g in range(0, n_q, GROUP):
                ng = min(GROUP, n_q - g)
                _prefetch_share(ahead, g // GROUP, (n_q + GROUP - 1) // GROUP)
                for s0 in range(0, n, span):
                    s1 = min(n, s0 + span)
                    hits = _first(tile, s0, s1, n_words, queries, g, ng, lim, start, deleted,
                                  has_deleted, penalty)
                    for j in range(ng):
                        lanes = _lanes(hits, j)
                        if lanes != 0:
                            _gather(tile, n_words, queries, g + j, s0, s1, lanes, start,
                                    deleted, has_deleted, penalty, t, radius, offsets, out_rows,
                                    out_dist, fill, cap, counts, dbuf)
            start = end
