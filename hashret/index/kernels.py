"""The Hamming-scan kernels' entry points: :class:`Segments` (codes as the kernels read
them), :func:`topk` and :func:`range_search` (the scans of :mod:`hashret.index.scans`,
with their seeds, scratch pools and thread counts), :class:`threads_used`.

The codes need not be one array: the kernels take the addresses of *segments* -- every
segment but the last holding exactly ``seg_rows`` rows -- so an index scans LMDB's code
chunks where its memory map has them, without copying them (an in-memory index is one
segment). Tiles never cross a segment's end.
"""

from __future__ import annotations

import hashret.index.cache  # noqa: F401 -- before any cached kernel is defined
import logging
import os
import subprocess
import sys
import threading
import time

import numba
import numpy as np
from numba import njit, prange

from hashret.index.intrinsics import (GROUP, LONE_SEED_K, SAMPLE_EVERY, SEED_MARGIN, SMALL_BLOCK, TILE, load_at,
                                      popcount, prefetch)
from hashret.index.scans import batch_kernel, lone_kernel, range_kernel, topk_kernel


def _parts(n_rows: int, threads: int) -> int:
    """Threads that get rows: no more than there are tiles."""
    return max(1, min(threads, (n_rows + TILE - 1) // TILE))


class threads_used:
    """``with threads_used(n):`` run the scan on n threads (numba's setting is per calling
    thread, so other threads' scans are unaffected); None keeps the current setting
    (NUMBA_NUM_THREADS unless changed). With ``rows``, no more threads than that many rows
    have tiles: an idle thread still has to be woken and joined (~0.07 ms here with passive
    OpenMP threads, more than a scan of a few thousand codes)."""

    def __init__(self, n, rows: int | None = None):
        from hashret.errors import check, is_integer

        top = numba.config.NUMBA_NUM_THREADS
        ok = n is None or (is_integer(n) and 1 <= n <= top)
        check(ok, f"threads must be an integer in [1, {top}] (NUMBA_NUM_THREADS), got {n!r}")
        self.n, self.rows = n, rows

    def __enter__(self) -> int:
        """The thread count in force. (numba's get/set_num_threads take a lock, ~5 us each,
        so neither is called more than needed.)"""
        self.prev = numba.get_num_threads()
        n = self.prev if self.n is None else int(self.n)
        if self.rows is not None:
            n = _parts(self.rows, n)
        if n != self.prev:
            numba.set_num_threads(n)
        self.set = n
        return n

    def __exit__(self, *exc):
        if self.set != self.prev:
            numba.set_num_threads(self.prev)


class Segments:
    """Codes as the kernels read them: ``arrays``, each (rows, n_words) C-contiguous words,
    all but the last holding ``seg_rows`` rows, ``n_rows`` rows in all. The arrays are kept
    here so that their memory outlives every scan given their addresses."""

    def __init__(self, arrays, seg_rows: int, n_rows: int):
        self.arrays = list(arrays)
        self.seg_rows = int(seg_rows)
        self.n_rows = int(n_rows)
        self.n_words = self.arrays[0].shape[1] if self.arrays else 1
        self.dtype = self.arrays[0].dtype if self.arrays else None
        for a in self.arrays:  # once per snapshot, not per scan (10^8 codes are 1,526 chunks)
            if a.dtype != self.dtype or not a.flags.c_contiguous or a.shape[1] != self.n_words:
                raise ValueError("internal: segments must be C-contiguous arrays of one word type")
        self.addrs = np.array([a.ctypes.data for a in self.arrays] or [0], dtype=np.int64)

    @classmethod
    def of(cls, words: np.ndarray, n_rows: int | None = None) -> "Segments":
        """One array (its first ``n_rows`` rows; all by default) as one segment."""
        words = np.ascontiguousarray(words)
        n = len(words) if n_rows is None else int(n_rows)
        return cls([words], max(len(words), 1), n)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The words of ``rows`` (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.arrays) == 1:
            return self.arrays[0][rows]
        out = np.empty((len(rows), self.n_words), dtype=self.arrays[0].dtype)
        seg = rows // self.seg_rows
        for s in np.unique(seg):
            at = seg == s
            out[at] = self.arrays[s][rows[at] - s * self.seg_rows]
        return out


def _scan_args(segs: Segments, queries, deleted):
    if segs.arrays and (queries.dtype != segs.dtype or queries.shape[1] != segs.n_words):
        raise ValueError("internal: queries must be words of the segments' type")
    has_del = deleted is not None
    dmask = deleted if has_del else np.zeros(1, dtype=np.uint8)
    queries = np.ascontiguousarray(queries)
    if queries.shape[1] == 1:  # one word a code: the kernels take the one-word walk (see _first)
        queries = queries.reshape(len(queries))
    return queries, dmask, has_del


log = logging.getLogger(__name__)

# what a first call compiles (when no process has cached it yet), and about how long it took
# on a 2-core VM: said once per process, on stderr, before the wait
_ENTRIES = {"lone_kernel": ("one query at a time", 15), "batch_kernel": ("batches of queries", 10),
            "range_kernel": ("radius search", 10)}
_said: set = set()
_scan = threading.local()  # the code length of the scan being run, for the message


def _notice_compiles():
    from numba.core import event

    class Notice(event.Listener):
        def on_start(self, ev):
            name = getattr(getattr(ev.data.get("dispatcher"), "py_func", None), "__name__", None)
            bits = getattr(_scan, "bits", None)
            if name in _ENTRIES and (name, bits) not in _said:
                _said.add((name, bits))
                what, secs = _ENTRIES[name]
                from hashret.index.cache import cache_dir

                log.warning(f"compiling the Hamming scan for {bits}-bit codes ({what}), once: ~{secs} s "
                            f"on 2 cores; later processes load it from {cache_dir()} ('hashret warmup' "
                            "does this ahead)")

        def on_end(self, ev):
            pass

    event.register("numba:compile", Notice())


_notice_compiles()
_kept = threading.local()
POOLS_KEPT = 32 << 20  # bytes of best-k scratch a thread keeps between scans


def _pools(n_parts: int, n_q: int, k: int):
    """The best-k lists for ``topk_kernel``, (n_parts, n_q, 2k + 16): a view of a buffer
    the calling thread keeps between scans (up to POOLS_KEPT bytes). Fresh ones each scan
    were fresh pages each scan: 100 queries at k=1000 over 10^7 codes took ~750 page faults,
    ~1.3 ms of its 22 ms."""
    shape = (n_parts, n_q, 2 * k + 16)
    n = shape[0] * shape[1] * shape[2]
    pool = getattr(_kept, "pool", None)
    if pool is None or len(pool) < n:
        pool = np.empty(n, dtype=np.int64)
        if n * 8 <= POOLS_KEPT:
            _kept.pool = pool
    return pool[:n].reshape(shape)


# -- before the kernels are compiled ----------------------------------------------------------
# A process that finds no compiled scan for its code width in the kernel cache would wait
# ~20 s on 2 cores for numba before its first answer. Where the search is small enough for
# numpy to answer in well under a second (NUMPY_WORK row-query pairs: ~13 ms a query over 10^6
# 64-bit codes), it answers with numpy -- exact, the same ids, distances and order -- while a
# detached ``hashret warmup`` compiles the kernels into the cache; each later search looks
# there again (at most once a second) and takes the kernel as soon as it is there.
# HASHRET_COMPILE=foreground compiles in the call instead (the tests, and a user who wants it).
NUMPY_WORK = 1 << 25
RECHECK_S = 1.0
_behind: dict = {}  # (kernel, signature) -> when it was last looked for, in this process


def _compile_mode() -> str:
    mode = os.environ.get("HASHRET_COMPILE", "background")
    return mode if mode in ("background", "foreground") else "background"


def _ready(disp, args) -> bool:
    """Whether ``disp`` has code for ``args`` in this process, or in the kernel cache (then
    loaded, as its first call would). True where numba's internals differ from what this
    expects: the call then compiles as it always did."""
    try:
        sig = tuple(disp.typeof_pyval(a) for a in args)
        if sig in disp.overloads:
            return True
        key = (disp.py_func.__name__, sig)
        now = time.monotonic()
        if now - _behind.get(key, -RECHECK_S) < RECHECK_S:
            return False
        _behind[key] = now
        from numba.core.compiler_lock import global_compiler_lock

        with global_compiler_lock:
            cres = disp._cache.load_overload(sig, disp.targetctx)
            if cres is None:
                return False
            disp.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            disp.add_overload(cres)
        return True
    except Exception:  # noqa: BLE001 -- another numba: compile in the call, as before
        return True


_known_ready: set = set()  # the kernels (and word types) this process has code for


def _numpy_first(disp, probe, queries, dmask, work: int, bits: int) -> bool:
    """Whether this search should run on numpy (the kernel it needs is not compiled, and the
    search is small); the first time for a width, starts its compilation behind. ``probe()``
    gives arguments of the kernel's types; once a kernel is known to be ready for the
    queries' and mask's types, it is not asked again (typing every argument for numba took
    ~40 us, a fifth of a search over 10^4 codes)."""
    if _compile_mode() != "background" or work > NUMPY_WORK:
        return False
    known = (disp.py_func.__name__, queries.dtype.str, queries.ndim, queries.flags.writeable,
             dmask.dtype.str, dmask.flags.writeable, dmask.flags.c_contiguous)
    if known in _known_ready:
        return False
    if _ready(disp, probe()):
        _known_ready.add(known)
        return False
    _behind_once(bits)
    return True


_said_behind: set = set()


def _behind_once(bits: int):
    """Say so and start the background compile for a width, once a process."""
    if bits not in _said_behind:
        _said_behind.add(bits)
        from hashret.index.cache import cache_dir

        log.warning(f"the Hamming scan for {bits}-bit codes is not compiled yet: numpy answers (exact, "
                    f"slower) while it compiles in the background, once (~30 s on 2 cores), into "
                    f"{cache_dir()}; 'hashret warmup --bits {bits}' does it ahead")
        _compile_behind(bits)


def _compile_behind(bits: int):
    """``hashret warmup --bits bits`` in a detached process of its own (it outlives a CLI
    search; its output is of no use to the caller)."""
    try:
        subprocess.Popen([sys.executable, "-m", "hashret.cli", "warmup", "--bits", str(bits)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    except OSError as e:  # no process to spare: the next search that needs it compiles it
        log.warning(f"could not start the background compile ({e}); a later search compiles it")


if hasattr(np, "bitwise_count"):
    def _popcount(x):
        return np.bitwise_count(x)
else:  # numpy < 2: a byte table
    _POP8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)

    def _popcount(x):
        return _POP8[x.view(np.uint8)].reshape(*x.shape, x.itemsize)


def numpy_distances(segs: Segments, query: np.ndarray, bits: int, deleted=None) -> np.ndarray:
    """Distances of one query (n_words words) to every row of ``segs``, int32; a removed row
    (``deleted[row] != 0``) gets ``bits + 1``. The obviously-correct scan: numpy, row by row."""
    out = np.empty(segs.n_rows, dtype=np.int32)
    for s, a in enumerate(segs.arrays):
        lo = s * segs.seg_rows
        n = min(len(a), segs.n_rows - lo)
        if n > 0:
            pc = _popcount(a[:n] ^ query)
            out[lo:lo + n] = pc.reshape(n, -1).sum(axis=1, dtype=np.int32)
    if deleted is not None:
        out[np.asarray(deleted[:segs.n_rows]) != 0] = bits + 1
    return out


def numpy_topk(segs: Segments, queries: np.ndarray, k: int, bits: int, deleted=None):
    """:func:`topk` by numpy: every distance, then the k smallest (distance, row) keys."""
    queries = np.asarray(queries).reshape(len(queries), -1)
    dist = np.full((len(queries), k), -1, dtype=np.int32)
    rows = np.full((len(queries), k), -1, dtype=np.int64)
    for i, q in enumerate(queries):
        key = numpy_distances(segs, q, bits, deleted).astype(np.int64) * max(segs.n_rows, 1)
        key += np.arange(segs.n_rows)
        top = np.sort(np.partition(key, k - 1)[:k] if k < len(key) else key)
        top = top[top < (bits + 1) * max(segs.n_rows, 1)]  # removed rows never enter
        dist[i, :len(top)] = top // max(segs.n_rows, 1)
        rows[i, :len(top)] = top % max(segs.n_rows, 1)
    return dist, rows


def numpy_range(segs: Segments, queries: np.ndarray, radius: int, bits: int, deleted=None):
    """:func:`range_search` by numpy: (lims, distances, rows), by (distance, row)."""
    queries = np.asarray(queries).reshape(len(queries), -1)
    lims, dists, rows = [0], [], []
    for q in queries:
        d = numpy_distances(segs, q, bits, deleted)
        r = np.flatnonzero(d <= radius)
        r = r[np.argsort(d[r], kind="stable")]
        dists.append(d[r])
        rows.append(r)
        lims.append(lims[-1] + len(r))
    return (np.array(lims, dtype=np.int64), np.concatenate(dists).astype(np.int32),
            np.concatenate(rows).astype(np.int64))


def topk(segs: Segments, queries: np.ndarray, k: int, bits: int,
         deleted: np.ndarray | None = None, threads: int | None = None):
    """Exact top-k of ``queries`` ((Q, n_words), the segments' word type: uint8/16/32 for
    codes of up to 4 bytes, else uint64) over ``segs``.

    A scan's running k-th distance starts at "anything" and tightens only as rows arrive,
    so with a large k most of the early blocks are re-scanned and most of their rows inserted
    and evicted again. Where k is large (>= 64), a 1/64 sample first gives each query a
    *seed*: the distance below which about k rows lie -- for a batch, from a scan of a copy of
    the sample before the full scan; for a lone query, from each thread's walk of its own
    sampled rows inside the one scan (a second pass and parallel region cost a lone query
    more than they saved). The full scan then takes only rows under the seed. A seed is a
    guess, so the answer is checked: a thread that kept k rows under its seed kept its own k
    nearest, and one that kept fewer lacks only rows at or above its seed, which cannot
    matter when the merged k-th lies below it; a query where that fails is scanned again
    with its seed one higher, and, should that fail too, unseeded."""
    queries, dmask, has_del = _scan_args(segs, queries, deleted)
    _scan.bits = bits
    with threads_used(threads, segs.n_rows) as parts:
        lone = len(queries) == 1
        def probe():
            return ((segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, queries, k, bits, dmask, has_del,
                     parts, np.zeros(len(queries), np.int32)) + ((0,) if lone else ())
                    + (np.zeros((1, 1, 1), np.int64),))

        if _numpy_first(lone_kernel if lone else batch_kernel, probe, queries, dmask, segs.n_rows * len(queries),
                        bits):
            return numpy_topk(segs, queries, k, bits, deleted)
        unseeded = np.full(len(queries), bits + 1, dtype=np.int32)
        seed = _seeds(segs, queries, k, bits, dmask, has_del, parts)
        # a lone query's own sample, walked with span minima, costs ~1/64 of its reads: it pays
        # from k=64 (10^7 codes, alternated A/B vs the unseeded walk: k=100 +2%, k=1000 +4%;
        # a histogram of the sample's distances had cost more than it saved below k=512)
        lone = len(queries) == 1 and k >= LONE_SEED_K and segs.n_rows >= 64 * k
        need = k // (SAMPLE_EVERY * parts) + SEED_MARGIN if lone else 0
        args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words)
        dist, rows, exact = topk_kernel(*args, queries, k, bits, dmask, has_del, parts,
                                        unseeded if seed is None else seed, need,
                                        _pools(parts, len(queries), k))
        again = np.flatnonzero(~exact)
        if len(again) and seed is not None:
            # a seed one too low (the sample over-counted its last distance) is the usual
            # miss: one step up is exact unless that distance is short of rows too
            up = np.minimum(seed[again] + 1, bits + 1).astype(np.int32)
            dist[again], rows[again], ok = topk_kernel(*args, queries[again], k, bits, dmask,
                                                       has_del, parts, up, 0,
                                                       _pools(parts, len(again), k))
            again = again[~ok]
        if len(again):
            dist[again], rows[again], _ = topk_kernel(*args, queries[again], k, bits, dmask,
                                                      has_del, parts, unseeded[again], 0,
                                                      _pools(parts, len(again), k))
        return dist, rows


def _seeds(segs: Segments, queries, k, bits, dmask, has_del, parts):
    """Per query, one more than the distance of the sample's (k / SAMPLE_EVERY +
    SEED_MARGIN)-th nearest row; None where seeding would not pay (small k, or too few rows)."""
    # a lone query's scan is bound by reading the codes, and its re-scans hit cache: the
    # sample's extra pass and parallel region cost it more than they save (measured: k=1000
    # at 10^7 codes, 4.5 ms seeded vs 3.5 ms not)
    if len(queries) < GROUP or k < 64 or segs.n_rows < max(64 * k, 16 * SMALL_BLOCK * SAMPLE_EVERY):
        return None
    span = SMALL_BLOCK * SAMPLE_EVERY
    spans = [min(len(a), segs.n_rows - s * segs.seg_rows) // span for s, a in enumerate(segs.arrays)]
    sample = np.empty((sum(spans) * SMALL_BLOCK, segs.n_words), dtype=segs.dtype)
    pos, rows = 0, []
    for s, (a, ns) in enumerate(zip(segs.arrays, spans)):
        # one strided copy straight into place (np.concatenate of the views took ~1 ms here)
        sample[pos:pos + ns * SMALL_BLOCK].reshape(ns, SMALL_BLOCK, segs.n_words)[:] = \
            a[:ns * span].reshape(ns, SAMPLE_EVERY, SMALL_BLOCK, segs.n_words)[:, 0]
        pos += ns * SMALL_BLOCK
        if has_del:
            local = (np.arange(0, ns * span, span)[:, None] + np.arange(SMALL_BLOCK)).ravel()
            rows.append(s * segs.seg_rows + local)
    k_s = k // SAMPLE_EVERY + SEED_MARGIN
    if len(sample) < 8 * k_s:  # segments shorter than a sample span
        return None
    smask = dmask[np.concatenate(rows)] if has_del else dmask
    sparts = _parts(len(sample), parts)
    d, _, _ = topk_kernel(np.array([sample.ctypes.data], dtype=np.int64), max(len(sample), 1),
                          len(sample), segs.n_words, queries, k_s, bits, smask, has_del, sparts,
                          np.full(len(queries), bits + 1, dtype=np.int32), 0,
                          _pools(sparts, len(queries), k_s))
    seed = d[:, -1] + 1
    seed[d[:, -1] < 0] = bits + 1  # too few sampled rows alive: no seed
    return seed.astype(np.int32)


def range_search(segs: Segments, queries, radius, bits, deleted=None, threads: int | None = None):
    """All rows within ``radius`` of each query: (lims, distances, rows), faiss' layout
    (query i's results are [lims[i], lims[i+1])), each query's results by (distance, row)."""
    queries, dmask, has_del = _scan_args(segs, queries, deleted)
    _scan.bits = bits
    with threads_used(threads, segs.n_rows) as parts:
        def probe():
            z = np.zeros((1, 1), np.int64)
            return (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, queries, radius, bits, dmask,
                    has_del, parts, z, z[0], np.zeros(1, np.int32), True, 0, z)

        if _numpy_first(range_kernel, probe, queries, dmask, segs.n_rows * len(queries), bits):
            return numpy_range(segs, queries, radius, bits, deleted)
        return _range_search(segs, queries, radius, bits, dmask, has_del, parts)


def _range_search(segs, queries, radius, bits, dmask, has_del, parts):
    """One pass into per-(thread, query) buffers of ``cap`` rows; where one overflows (a
    radius that finds many rows), a second, exact pass: count, then fill at known offsets."""
    args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, queries, radius, bits, dmask, has_del)
    nq = len(queries)
    cap = int(max(64, min(4096, (1 << 21) // (parts * nq))))
    offsets = (np.arange(parts * nq, dtype=np.int64) * cap).reshape(parts, nq)
    buf_rows = np.empty(parts * nq * cap, dtype=np.int64)
    buf_dist = np.empty(parts * nq * cap, dtype=np.int32)
    counts = np.zeros((parts, nq), dtype=np.int64)
    range_kernel(*args, parts, offsets, buf_rows, buf_dist, True, cap, counts)
    per_q = counts.sum(axis=0)
    lims = np.zeros(nq + 1, dtype=np.int64)
    lims[1:] = np.cumsum(per_q)
    rows = np.empty(lims[-1], dtype=np.int64)
    dist = np.empty(lims[-1], dtype=np.int32)
    if counts.max(initial=0) <= cap:
        _range_results(counts, offsets, buf_rows, buf_dist, lims, bits, rows, dist)
    else:
        exact = np.empty_like(counts)
        exact[0] = lims[:-1]
        if parts > 1:
            exact[1:] = lims[:-1] + np.cumsum(counts, axis=0)[:-1]
        buf_rows, buf_dist = np.empty_like(rows), np.empty_like(dist)
        range_kernel(*args, parts, exact, buf_rows, buf_dist, True, 0, np.zeros_like(counts))
        _range_results(counts, exact, buf_rows, buf_dist, lims, bits, rows, dist)
    return lims, dist, rows


@njit(nogil=True, cache=True)
def _range_results(counts, offsets, buf_rows, buf_dist, lims, bits, rows, dist):
    """Each query's rows, from its per-thread buffers (thread t's rows at offsets[t, q],
    ascending, threads in row order) into rows/dist[lims[q]:lims[q + 1]] by (distance, row):
    a counting sort on the distance, stable, so rows stay ascending within a distance. (The
    numpy gather and argsort this replaces cost ~50 us a call, 5% of one query's scan of
    10^6 256-bit codes.)"""
    n_parts, n_q = counts.shape
    at = np.zeros(bits + 2, dtype=np.int64)
    for qi in range(n_q):
        at[:] = 0
        for t in range(n_parts):
            for j in range(offsets[t, qi], offsets[t, qi] + counts[t, qi]):
                at[buf_dist[j] + 1] += 1
        at[0] = lims[qi]
        for d in range(1, bits + 2):
            at[d] += at[d - 1]
        for t in range(n_parts):
            for j in range(offsets[t, qi], offsets[t, qi] + counts[t, qi]):
                p = at[buf_dist[j]]
                rows[p] = buf_rows[j]
                dist[p] = buf_dist[j]
                at[buf_dist[j]] = p + 1


# -- rows picked out: a filter's matching rows, wherever they lie ---------------------------------
# A selective filter names its rows (hashret.index.postings); these read just those rows'
# codes through the segments' addresses, in parallel, instead of numpy's fancy indexing (one
# thread, and a mask of the rows per segment: 0.5 ms for 10^5 of 10^7 64-bit codes).
PICK_BLOCK = 4096  # rows a thread takes at a time
PICK_WORK_KEPT = 1 << 21  # distances of scratch a thread keeps (8 MiB)
PICK_ALONE = 1 << 15  # fewer distances than this are one thread's (~50 us; waking another costs as much)
PICK_AHEAD = 16  # rows ahead whose codes are asked for while one is read (every row a cache miss)


_picks_ready: set = set()  # (kernel, argument kinds) this process has code for


def pick_ready(disp, args, bits) -> bool:
    """Whether to run a pick kernel: compiled (or cached) already, or compiling in the call is
    what this process asked for; otherwise numpy answers while ``hashret warmup`` compiles.
    (Asked once per kind of arguments: numba's typing of each call's arguments costs ~40 us.)"""
    kinds = (disp.py_func.__name__,) + tuple((a.dtype.str, a.ndim, a.flags.writeable, a.flags.c_contiguous)
                                             if isinstance(a, np.ndarray) else type(a) for a in args)
    if kinds in _picks_ready:
        return True
    if _compile_mode() == "foreground" or _ready(disp, args):
        _picks_ready.add(kinds)
        return True
    _behind_once(bits)  # (once a width: a process a search was a process storm)
    return False


def positions(n: int) -> np.ndarray:
    """0, 1, ..., n - 1 as int64, from one array the process keeps (a slice's picks name
    every row of it: no arange made per search). Callers must not write to it."""
    global _POSITIONS
    if len(_POSITIONS) < n:
        _POSITIONS = np.arange(max(n, 2 * len(_POSITIONS)), dtype=np.int64)
    return _POSITIONS[:n]


_POSITIONS = np.arange(1 << 16, dtype=np.int64)


def _scratch(n: int) -> np.ndarray:
    """n int32 of scratch the calling thread keeps between calls (fresh pages each call were
    page faults: a fifth of picking 10^5 rows)."""
    got = getattr(_kept, "picks", None)
    if got is None or len(got) < n:
        got = np.empty(n, dtype=np.int32)
        if n <= PICK_WORK_KEPT:
            _kept.picks = got
    return got[:n]


@njit(inline="always", cache=True)
def _segment_of(addrs, seg_rows, n_rows, n_words, r, like):
    """(segment's words, its first row, its end) for row r."""
    s = r // seg_rows
    lo = s * seg_rows
    hi = min(lo + seg_rows, n_rows)
    return numba.carray(load_at(addrs[s]), (hi - lo) * n_words, like.dtype), lo, hi


@njit(parallel=True, nogil=True, cache=True)
def _gather_kernel(addrs, seg_rows, n_rows, n_words, rows, out):
    # out: the copy's words, flat (a 2-D store was half as fast)
    m = len(rows)
    for b in prange((m + PICK_BLOCK - 1) // PICK_BLOCK):
        seg, lo, hi = _segment_of(addrs, seg_rows, n_rows, n_words, rows[b * PICK_BLOCK], out)
        for i in range(b * PICK_BLOCK, min(m, (b + 1) * PICK_BLOCK)):
            r = rows[i]
            if r < lo or r >= hi:  # rows mostly ascending: a segment is looked up where it changes
                seg, lo, hi = _segment_of(addrs, seg_rows, n_rows, n_words, r, out)
            if i + PICK_AHEAD < m and lo <= rows[i + PICK_AHEAD] < hi:
                prefetch(seg, (rows[i + PICK_AHEAD] - lo) * n_words)
            for w in range(n_words):
                out[i * n_words + w] = seg[(r - lo) * n_words + w]


def gather(segs: Segments, rows: np.ndarray, bits: int) -> np.ndarray:
    """The words of ``rows`` (any order), (len(rows), n_words), a copy: :meth:`Segments.rows`
    in parallel."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty((len(rows), segs.n_words), dtype=segs.dtype or np.uint64)
    args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, rows, out.reshape(-1))
    if len(rows) and pick_ready(_gather_kernel, args, bits):
        _gather_kernel(*args)
    elif len(rows):
        out[:] = segs.rows(rows)
    return out


@njit(parallel=True, nogil=True, cache=True)
def _count_kept(keep, parts):
    n = len(keep)
    counts = np.zeros(parts, dtype=np.int64)
    for p in prange(parts):
        c = 0
        for i in range(n * p // parts, n * (p + 1) // parts):
            c += keep[i] != 0
        counts[p] = c
    return counts


@njit(parallel=True, nogil=True, cache=True)
def _kept_rows(keep, parts, starts, out):
    n = len(keep)
    for p in prange(parts):
        j = starts[p]
        end = starts[p + 1] if p + 1 < parts else len(out)
        for i in range(n * p // parts, n * (p + 1) // parts):
            if j < end:  # (written whether kept or not, then kept by moving on: no branch on
                out[j] = i  # keep, which at a share near half costs a misprediction a row)
            j += keep[i] != 0


@njit(parallel=True, nogil=True, cache=True)
def _kept_codes(keep, parts, starts, addrs, seg_rows, n_rows, n_words, out_rows, out):
    # out: flat, as in _gather_kernel
    n = len(keep)
    for p in prange(parts):
        j = starts[p]
        end = starts[p + 1] if p + 1 < parts else len(out_rows)
        i = n * p // parts
        while i < n * (p + 1) // parts:
            seg, lo, hi = _segment_of(addrs, seg_rows, n_rows, n_words, i, out)
            stop = min(hi, n * (p + 1) // parts)
            if n_words == 1:  # (the word loop's own form ran at half this speed)
                for r in range(i, stop):
                    if j < end:  # written whether kept or not, as in _kept_rows
                        out_rows[j] = r
                        out[j] = seg[r - lo]
                    j += keep[r] != 0
            else:
                for r in range(i, stop):
                    if j < end:
                        out_rows[j] = r
                        for w in range(n_words):
                            out[j * n_words + w] = seg[(r - lo) * n_words + w]
                    j += keep[r] != 0
            i = stop


def kept_rows(keep: np.ndarray, bits: int, threads: int | None = None, segs: Segments | None = None):
    """np.flatnonzero(keep) for a bool or uint8 array, in parallel (10^7 rows at half kept:
    ~50 ms in numpy, a mispredicted branch every other row); with ``segs``, (rows, their
    words) in the same pass."""
    keep = np.ascontiguousarray(keep).view(np.uint8)
    if not pick_ready(_count_kept, (keep, 1), bits):
        rows = np.flatnonzero(keep)
        return rows if segs is None else (rows, segs.rows(rows))
    with threads_used(threads, len(keep)) as n:
        parts = 4 * n
        counts = _count_kept(keep, parts)
        starts = np.zeros(parts, dtype=np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        rows = np.empty(int(counts.sum()), dtype=np.int64)
        if segs is None:
            _kept_rows(keep, parts, starts, rows)
            return rows
        out = np.empty((len(rows), segs.n_words), dtype=segs.dtype or np.uint64)
        if len(rows):
            _kept_codes(keep, parts, starts, segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, rows,
                        out.reshape(-1))
    return rows, out


@njit(parallel=True, nogil=True, cache=True)
def _pick_distances(addrs, seg_rows, n_rows, n_words, queries, rows, out):
    m = len(rows)
    blocks = (m + PICK_BLOCK - 1) // PICK_BLOCK
    for t in prange(len(queries) * blocks):
        qi = t // blocks
        b = t % blocks
        seg, lo, hi = _segment_of(addrs, seg_rows, n_rows, n_words, rows[b * PICK_BLOCK], queries)
        for i in range(b * PICK_BLOCK, min(m, (b + 1) * PICK_BLOCK)):
            r = rows[i]
            if r < lo or r >= hi:
                seg, lo, hi = _segment_of(addrs, seg_rows, n_rows, n_words, r, queries)
            if i + PICK_AHEAD < m and lo <= rows[i + PICK_AHEAD] < hi:
                prefetch(seg, (rows[i + PICK_AHEAD] - lo) * n_words)
            d = np.uint64(0)
            for w in range(n_words):
                d += popcount(np.uint64(seg[(r - lo) * n_words + w] ^ queries[qi, w]))
            out[qi, i] = d


@njit(nogil=True, cache=True)
def _pick_best(dist, rows, k, bits, n_rows, out_d, out_r):
    """Each query's k smallest (distance, row) among the picked rows: a histogram of the
    distances gives the k-th's distance t; the rows at or below t are sorted by key. (One
    thread: a few queries, ~60 us each for 10^5 rows, less than waking a second thread.)"""
    n_q, m = dist.shape
    span = np.int64(n_rows) + 1
    for qi in range(n_q):
        hist = np.zeros(bits + 2, dtype=np.int64)
        for i in range(m):
            hist[dist[qi, i]] += 1
        t = 0
        below = hist[0]
        while below < k:
            t += 1
            below += hist[t]
        keys = np.empty(below, dtype=np.int64)
        j = 0
        for i in range(m):
            if dist[qi, i] <= t:
                keys[j] = dist[qi, i] * span + rows[i]
                j += 1
        keys.sort()
        for j in range(k):  # the first k columns of out_d / out_r
            out_d[qi, j] = keys[j] // span
            out_r[qi, j] = keys[j] % span


@njit(nogil=True, cache=True)
def _span_distances(words, queries, out):
    """out[q, i] = the distance of query q to row i of ``words``: rows side by side, one
    thread (a small slice of a list's copy: no row numbers to follow, no launch)."""
    for qi in range(queries.shape[0]):
        for i in range(words.shape[0]):
            d = np.uint64(0)
            for w in range(words.shape[1]):
                d += popcount(np.uint64(words[i, w] ^ queries[qi, w]))
            out[qi, i] = d


def no_results(n_queries: int, k: int):
    """(distances, rows) of shape (n_queries, k), all -1: what is not found stays so."""
    return np.full((n_queries, k), -1, dtype=np.int32), np.full((n_queries, k), -1, dtype=np.int64)


def span_topk(words: np.ndarray, queries: np.ndarray, k: int, bits: int, report: np.ndarray, n_rows: int):
    """:func:`pick_topk` of every row of ``words`` (rows side by side: a slice of a list's
    copy), for a few distances in all (under PICK_ALONE): row i is index row ``report[i]``."""
    queries = np.ascontiguousarray(queries).reshape(len(queries), -1)
    kk = min(k, len(words))
    out_d, out_r = no_results(len(queries), k)
    if kk == 0:
        return out_d, out_r
    dist = _scratch(len(queries) * len(words)).reshape(len(queries), len(words))
    if not pick_ready(_span_distances, (words, queries, dist), bits):
        return pick_topk(Segments.of(words), queries, np.arange(len(words)), k, bits, 1, report, n_rows)
    _span_distances(words, queries, dist)
    _pick_best(dist, report, kk, bits, n_rows, out_d, out_r)
    return out_d, out_r


def pick_topk(segs: Segments, queries: np.ndarray, rows: np.ndarray, k: int, bits: int,
              threads: int | None = None, report: np.ndarray | None = None, n_rows: int | None = None):
    """Exact top-k of ``queries`` among ``rows`` (distinct rows of ``segs``, any order):
    (distances, rows), (Q, k), by (distance, row), -1 past the rows there are. For few rows:
    no copy, no sort of the rows -- what a selective filter's row list needs. Where ``segs``
    is a copy (a row list's codes), ``report`` gives the index row of each of ``rows`` -- what
    ties are ordered by and what is returned -- and ``n_rows`` the index's row count."""
    queries = np.ascontiguousarray(queries).reshape(len(queries), -1)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    report = rows if report is None else np.ascontiguousarray(report, dtype=np.int64)
    n_rows = segs.n_rows if n_rows is None else int(n_rows)
    kk = min(k, len(rows))
    out_d, out_r = no_results(len(queries), k)
    if kk == 0:
        return out_d, out_r
    dist = _scratch(len(queries) * len(rows)).reshape(len(queries), len(rows))
    args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, queries, rows, dist)
    if not pick_ready(_pick_distances, args, bits):
        order = np.argsort(report, kind="stable")  # ties by the reported row
        d, r = numpy_topk(Segments.of(segs.rows(rows[order])), queries, kk, bits)
        out_d[:, :kk], out_r[:, :kk] = d, report[order][r]
        return out_d, out_r
    with threads_used(1 if len(rows) * len(queries) < PICK_ALONE else threads):
        _pick_distances(*args)
    _pick_best(dist, report, kk, bits, n_rows, out_d, out_r)
    return out_d, out_r

