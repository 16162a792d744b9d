"""Filtered scans: the plans that turn a filter into exact top-k and radius searches.

Five plans, each exact (the same ids, distances and order as ranking every matching item):

- **listed** (a filter the row lists bound to few rows, :mod:`hashret.index.postings`): its
  rows taken from the lists -- the rest of the filter tested on them only -- and their
  distances computed from the list's copy of their codes (made once per list and state of
  the rows), or where they lie past the copies' budget; no pass over the index
  (:func:`~hashret.index.kernels.pick_topk`).
- **rank first** (a new filter, a few queries, many rows match): the unfiltered top-k' -- k'
  from the filter's share, counted by the lists or guessed from a sample -- then the filter
  tested on those candidates only; k' grows until k match. No pass over the attributes.
- **masked** (many rows match): the full scan with the others masked out, as removed rows
  are: no distance is computed for them past the first level's span test. The mask of a
  filter's usual forms is made in one parallel pass over its column (:func:`exclusion`).
- **gathered** (a batch where a share of the rows match): the matching rows' codes copied
  together, rows ascending so that ties keep their order, and scanned.
- **a list's slice** (a filter whose rows are one slice of a row list -- one label, one
  value, one range of values -- for any number of queries): that slice of the list's copy
  of the codes, its share of the reads: a few queries' distances
  each computed and the k best kept by (distance, row); a batch's walked as the index is (a
  range's rows are in value order: ties at the k-th are ordered by row from a wider top
  list, or the slice sorted first, see :func:`slice_topk`). Preferred wherever it applies.

A :class:`Selection` (the rows a filter selects) is kept by the index for repeated filters,
with its mask and gathered copy made once.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from hashret.index import kernels
from hashret.index.attributes import interval, label_bytes

RANK_FIRST_QUERIES = 4  # a new filter with at most this many queries ranks first, then tests
RANK_FIRST_MAX = 1 << 15  # candidates a rank-first search takes at most before it gives up
SAMPLE_ROWS = 4096  # rows a filter is tested on to guess its share of the index
# gathered where share x GATHER_PER_QUERY <= min(queries, GATHER_QUERIES): one query scans a
# copy of up to 1/32 of the rows, a batch of 16 or more up to half (10^7 codes, 100 queries,
# k=1000, side by side, the copy made in the call by numpy: a third 47 vs 70 ms masked, half
# 61 vs 55; once made, a kept selection's copy is scanned whatever the batch: half the rows,
# half the time)
GATHER_PER_QUERY = 32
GATHER_QUERIES = 16
# ... for k of 100 or more; below, up to a quarter: the mask costs a small k little (after
# the parallel copy: 10^7 codes, 100 queries, half the rows, k=10: masked 36 ms, copied in the
# call and scanned 43; k=1000: 52 vs 46)
GATHER_HALF_K = 100
# listed: up to this many (row, query) distances computed where the rows lie (10^7 64-bit
# codes, one query, 10^5 listed rows: ~0.3 ms, a sixth of the scan); more, and the rows are
# sorted, copied and scanned (gathered)
PICK_WORK = 1 << 21
LIST_SHARE = 8  # the lists answer a batch's filter they bound to 1/8 of the rows or fewer,
PICK_SHARE = 32  # and a few queries' filter bound to 1/32: a picked row costs ~15 scanned ones
# a range's slice of up to this many rows is sorted into row order for a batch with k >= 100,
# where the wider top list of a slice in value order costs more than the sort (10^7 codes,
# 100 queries, k = 1,000: see docs/filters.md)
SORT_SLICE_ROWS = 1 << 18


class Selection:
    """The rows a filter selects among the alive ones -- ``allowed`` (a boolean per row) or
    ``rows`` (their numbers; ``ascending`` where sorted) -- with what the scans derive from
    it, each made once: the exclusion mask, the sorted rows, the gathered copy."""

    def __init__(self, allowed: np.ndarray | None = None, rows: np.ndarray | None = None,
                 ascending: bool = True, n_rows: int = 0, source=None, excluded: np.ndarray | None = None,
                 exclude=None):
        self._allowed, self._rows, self._ascending, self._excluded = allowed, rows, ascending, excluded
        self.n_rows = len(allowed) if allowed is not None else len(excluded) if excluded is not None else n_rows
        if allowed is not None:
            self.n = int(np.count_nonzero(allowed))
        else:
            self.n = len(rows) if rows is not None else self.n_rows - int(np.count_nonzero(excluded))
        self._gathered = None
        # (row list key, positions): where ``rows`` lie in that list (its codes' copy)
        self.source = source
        self._exclude = exclude  # () -> the excluded mask in one pass over a column, or None

    @property
    def allowed(self) -> np.ndarray:
        """A boolean per row, True where the row is in."""
        if self._allowed is None:
            self._allowed = self.excluded() == 0
        return self._allowed

    def excluded(self) -> np.ndarray:
        """uint8 per row, 1 where the row is out (the scans' removed-row mask)."""
        if self._excluded is None:
            if self._allowed is not None:
                self._excluded = (~self._allowed).view(np.uint8)
            elif self._exclude is not None and (got := self._exclude()) is not None:
                self._excluded = got  # one pass over the column, not a write per listed row
            else:
                self._excluded = np.ones(self.n_rows, dtype=np.uint8)
                self._excluded[self._rows] = 0
        return self._excluded

    def rows(self, bits: int, ascending: bool = True) -> np.ndarray:
        """The selected rows (sorted where ``ascending``, or where sorting cost nothing)."""
        if self._rows is None:
            self._rows = kernels.kept_rows(self.allowed, bits)
        elif ascending and not self._ascending:
            order = np.argsort(self._rows, kind="stable")
            self._rows, self._ascending = self._rows[order], True
            if self.source is not None:
                self.source = self.source[0], self.source[1][order]
        return self._rows

    def gathered(self, segs, bits: int):
        """(rows ascending, Segments of their codes): the selected rows' codes copied together."""
        if self._gathered is None:
            if self._rows is None:  # rows and codes in one pass over the mask
                self._rows, words = kernels.kept_rows(self.allowed, bits, segs=segs)
            else:
                words = kernels.gather(segs, self.rows(bits), bits)
            self._gathered = self._rows, kernels.Segments.of(words)
        return self._gathered

    def picks(self, n_queries: int) -> bool:
        """Whether to compute the distances where the rows lie: few rows, known, and few
        queries (a batch scans a copy of the rows faster: the copy is read once per tile of
        rows for all its queries, where picking reads each row once per query)."""
        return (self._rows is not None and self._gathered is None and n_queries <= RANK_FIRST_QUERIES
                and self.n * n_queries <= PICK_WORK)

    def gather_pays(self, n_rows: int, n_queries: int, k: int = GATHER_HALF_K) -> bool:
        """Whether to scan the gathered copy: made already, or worth making for this search."""
        per_query = GATHER_PER_QUERY if k >= GATHER_HALF_K else 2 * GATHER_PER_QUERY
        return self._gathered is not None or self.n * per_query <= n_rows * min(n_queries, GATHER_QUERIES)


class Filter:
    """A parsed filter as a search meets it: ``tree``; ``test(rows)``, the filter on those
    rows; ``evaluate()``, over every row; the index's row lists (``postings``); the selection
    a recent search kept of the same filter (``kept``), and ``keep(selection)`` to keep one."""

    def __init__(self, tree, test, evaluate, postings, kept, keep, exclude=None):
        self.tree, self.test, self.evaluate, self.postings = tree, test, evaluate, postings
        self.kept, self.keep = kept, keep
        # exclude(deleted): the rows out, uint8, in one pass over a column -- None for a form
        # it does not take (then evaluate)
        self.exclude = exclude or (lambda deleted: None)
        self._estimate = self._listed = self._lists = ()  # () = not asked yet (a search asks each once)

    def estimate(self) -> int | None:
        """At most how many rows the lists say the filter selects (None: they cannot say)."""
        if self._estimate == ():
            self._estimate = self.postings.estimate(self.tree)
        return self._estimate

    def list_rows(self):
        """``postings.rows(tree)``, asked once: (rows, exact, ascending, source)."""
        if self._lists == ():
            self._lists = self.postings.rows(self.tree)
        return self._lists

    def list_slice(self, segs, bits: int, deleted):
        """(codes, rows, removed, ascending, n_rows) where the filter's rows are exactly one slice of
        a row list whose codes are copied (or can be, within the budget): that slice of the
        copy as :class:`~hashret.index.kernels.Segments`, the index rows of its rows, and
        the removed-row mask in its order (None without removals); None otherwise."""
        if not self.postings.one_slice(self.tree):
            return None
        rows, exact, ascending, source = self.list_rows()
        if not exact or source is None:
            return None
        key, lo, hi = source
        copy = self.postings.codes(key, segs, bits)
        if copy is None:
            return None
        removed = None if deleted is None else self.postings.removed(key, deleted)[lo:hi]
        return kernels.Segments.of(copy.arrays[0][lo:hi]), rows, removed, ascending, segs.n_rows

    def listed(self, n_rows: int, deleted, n_queries: int) -> Selection | None:
        """The filter's rows from the lists, where they bound it to few rows (or to rows
        already sorted, for a batch); None otherwise."""
        if self._listed == ():
            self._listed = self._from_lists(n_rows, deleted, n_queries)
        return self._listed

    def _from_lists(self, n_rows: int, deleted, n_queries: int) -> Selection | None:
        est = self.estimate()
        few = est is not None and est * (LIST_SHARE if n_queries > RANK_FIRST_QUERIES else PICK_SHARE) <= n_rows
        if est is None or not (few or n_queries > RANK_FIRST_QUERIES):
            return None
        rows, exact, ascending, source = self.list_rows()
        if not (few or (exact and ascending)):
            return None  # many rows, to be sorted: a scan with a mask costs less
        # where the rows lie in their list: only for a search that may pick them (a few queries)
        at = None if source is None or n_queries > RANK_FIRST_QUERIES else np.arange(source[1], source[2])
        for test in ([] if exact else [self.test]) + ([] if deleted is None else [lambda r: deleted[r] == 0]):
            keep = test(rows)
            rows = rows[keep]
            at = None if at is None else at[keep]
        return Selection(rows=rows, ascending=ascending, n_rows=n_rows,
                         source=None if at is None else (source[0], at), exclude=lambda: self.exclude(deleted))

    def selection(self, n_rows: int, deleted, n_queries: int) -> Selection:
        """The rows alive that the filter selects: kept, listed, or evaluated over every row."""
        if self.kept is None:
            sel = self.listed(n_rows, deleted, n_queries)
            if sel is None:
                out = self.exclude(deleted)
                if out is not None:
                    sel = Selection(excluded=out)
                else:
                    match = self.evaluate()
                    sel = Selection(match if deleted is None else match & (deleted == 0))
            self.keep(sel)
            self.kept = sel
        return self.kept

    def share(self, n_rows: int):
        """The share of the rows the lists bound the filter to, or None."""
        est = self.estimate()
        return None if est is None else est / max(n_rows, 1)


def rank_first(segs, q, k, bits, deleted, test, threads, share=None):
    """Top-k among the rows ``test(rows)`` accepts, testing only candidates: the unfiltered
    top-k' (k' from the filter's ``share`` where the lists counted it, so that k' holds k
    matches four standard deviations over; else 1.5 k over the share of a sample, + 64), its
    matches kept in order; k' grows (x4) until every query has k matches or k' covers the
    index. Exact: a matching row outside the top-k' ranks after every row in it. None where
    the filter looks too selective for this to pay (the caller evaluates it over every row)."""
    n = segs.n_rows
    if share is None:
        sample = np.arange(0, n, max(1, n // SAMPLE_ROWS), dtype=np.int64)  # (np.linspace + unique: 0.3 ms)
        if deleted is not None:
            sample = sample[deleted[sample] == 0]
        share = float(test(sample).mean()) if len(sample) else 0.0
        if share * RANK_FIRST_MAX < 2 * k:
            return None
        kk = min(n, int(1.5 * k / share) + 64)
    else:
        if share * RANK_FIRST_MAX < 2 * k:
            return None
        kk = min(n, int((k + 4 * math.sqrt(k) + 16) / share))
    while True:
        dist, rows = kernels.topk(segs, q, kk, bits, deleted, threads)
        ok = rows >= 0
        ok[ok] = test(rows[ok])
        if (ok.sum(axis=1) >= k).all() or kk >= n:
            out_d, out_r = kernels.no_results(len(q), k)
            for i in range(len(q)):
                keep = np.flatnonzero(ok[i])[:k]
                out_d[i, :len(keep)], out_r[i, :len(keep)] = dist[i, keep], rows[i, keep]
            return out_d, out_r
        if kk >= RANK_FIRST_MAX:
            return None
        kk = min(n, 4 * kk)


def slice_topk(part, q, k, bits, threads):
    """Top-k over a list's slice (``part``, :meth:`Filter.list_slice`), as index rows by
    (distance, row). A slice of at most 1/PICK_SHARE of the rows, for a few queries (or any,
    where the distances are fewer than PICK_ALONE): each distance computed and the k best kept
    by (distance, index row), whatever the slice's order. Else a slice in row order is walked as the index is: ties keep their order. One in value
    order is put in row order for a batch with a large k where it is small (a stable sort of
    its runs, one per value, each ascending); otherwise scanned for its 2k + 64 nearest:
    where they reach past a query's k-th distance, they hold every row at that distance,
    ordered by row here; the queries whose k-th distance fills them take a radius search of
    the slice for the rows within it."""
    codes, report, removed, ascending, n_rows = part
    m = codes.n_rows
    few = m * PICK_SHARE <= n_rows and len(q) * m <= PICK_WORK  # more: the walk's pruning wins (docs/filters.md)
    if few and removed is None and len(q) * m < kernels.PICK_ALONE:  # the rows side by side, one thread
        return kernels.span_topk(codes.arrays[0][:m], q, k, bits, report, n_rows)
    if few and len(q) <= RANK_FIRST_QUERIES:
        at = kernels.positions(m) if removed is None else np.flatnonzero(removed == 0)
        return kernels.pick_topk(codes, q, at, k, bits, threads, report=report if removed is None else report[at],
                                 n_rows=n_rows)
    if not ascending and len(q) > RANK_FIRST_QUERIES and k >= GATHER_HALF_K and m <= SORT_SLICE_ROWS:
        codes, report, removed, ascending, n_rows = in_row_order(part)
    kk = min(k, codes.n_rows)
    out_d, out_r = kernels.no_results(len(q), k)
    if kk == 0:
        return out_d, out_r
    wide = kk if ascending else min(codes.n_rows, 2 * kk + 64)
    dist, rows = kernels.topk(codes, q, wide, bits, removed, threads)
    if ascending:
        out_d[:, :kk] = dist
        out_r[:, :kk] = np.where(rows >= 0, report[np.maximum(rows, 0)], -1)
        return out_d, out_r
    span = np.int64(n_rows) + 1  # (not report.max(): a pass over the slice's rows)

    def first_k(i, d, r):  # the rows within query i's k-th distance, by (distance, row)
        keys = np.sort(d.astype(np.int64) * span + report[r])[:kk]
        out_d[i, :len(keys)], out_r[i, :len(keys)] = keys // span, keys % span

    again, last = [], {}
    for i in range(len(q)):
        n_found = int(np.count_nonzero(rows[i] >= 0))
        if n_found == 0:
            continue
        t = dist[i, min(kk, n_found) - 1]
        if n_found < wide or dist[i, wide - 1] > t:  # every row within t is in the wide list
            near = (rows[i] >= 0) & (dist[i] <= t)
            first_k(i, dist[i][near], rows[i][near])
        else:
            again.append(i)
            last[i] = t
    if again:
        lims, d, r = kernels.range_search(codes, q[again], int(max(last.values())), bits, removed, threads)
        for j, i in enumerate(again):
            sel = slice(lims[j], lims[j + 1])
            near = d[sel] <= last[i]
            first_k(i, d[sel][near], r[sel][near])
    return out_d, out_r


def in_row_order(part):
    """A list's slice (``part``) in row order: its codes copied in the order of their rows."""
    codes, report, removed, _, n_rows = part
    order = np.argsort(report, kind="stable")  # merges the runs of values: ~1/6 of a random sort's time
    return (kernels.Segments.of(codes.arrays[0][order]), report[order],
            None if removed is None else removed[order], True, n_rows)


def topk(segs, q, k, bits, deleted, f: Filter, threads):
    """Top-k over the rows ``f`` selects: a list's slice, listed, ranked first, masked or
    gathered (see the module's notes)."""
    n = segs.n_rows
    part = f.list_slice(segs, bits, deleted)
    if part is not None:
        return slice_topk(part, q, k, bits, threads)
    if f.kept is None and len(q) <= RANK_FIRST_QUERIES and f.listed(n, deleted, len(q)) is None:
        found = rank_first(segs, q, k, bits, deleted, f.test, threads, f.share(n))
        if found is not None:
            return found
    selection = f.selection(n, deleted, len(q))
    if selection.picks(len(q)):
        rows = selection.rows(bits, ascending=False)
        copy = None if selection.source is None or not len(rows) else f.postings.codes(selection.source[0], segs, bits)
        if copy is not None:  # the list's codes side by side: read in order, not a miss a row
            return kernels.pick_topk(copy, q, selection.source[1], k, bits, threads, report=rows, n_rows=n)
        return kernels.pick_topk(segs, q, rows, k, bits, threads)
    if not selection.gather_pays(n, len(q), k):
        return kernels.topk(segs, q, k, bits, selection.excluded(), threads)
    dist, rows = kernels.no_results(len(q), k)
    if selection.n:
        chosen, sub = selection.gathered(segs, bits)
        d, r = kernels.topk(sub, q, min(k, selection.n), bits, None, threads)
        dist[:, :d.shape[1]] = d
        rows[:, :r.shape[1]] = np.where(r >= 0, chosen[np.maximum(r, 0)], -1)
    return dist, rows


def range_search(segs, q, radius, bits, deleted, f: Filter, threads):
    """``range_search`` over the rows ``f`` selects (a list's slice, masked or gathered, as
    :func:`topk`)."""
    part = f.list_slice(segs, bits, deleted)
    if part is not None:
        codes, report, removed, ascending, _ = part
        lims, dist, r = kernels.range_search(codes, q, radius, bits, removed, threads)
        rows = report[r]
        if not ascending:  # in value order: each query's results by (distance, row) again
            for i in range(len(q)):
                sel = slice(lims[i], lims[i + 1])
                order = np.lexsort((rows[sel], dist[sel]))
                dist[sel], rows[sel] = dist[sel][order], rows[sel][order]
        return lims, dist, rows
    selection = f.selection(segs.n_rows, deleted, len(q))
    if not selection.gather_pays(segs.n_rows, len(q)):
        return kernels.range_search(segs, q, radius, bits, selection.excluded(), threads)
    if selection.n == 0:
        return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    chosen, sub = selection.gathered(segs, bits)
    lims, dist, r = kernels.range_search(sub, q, radius, bits, None, threads)
    return lims, dist, chosen[r]

# -- a filter's excluded rows in one pass over its column --------------------------------
def exclusion(tree, columns, n_rows: int, deleted, bits: int) -> np.ndarray | None:
    """The rows a parsed filter leaves out -- or ``deleted`` has removed -- as a uint8 mask
    (1 = out, what the scans take), made in one parallel pass over the column, for the forms
    most filters take: one labels condition, or one scalar / category column's comparison,
    equality or range. None for any other filter (numpy's evaluation answers those)."""
    if tree[0] == "labels":
        col, at, want = label_bytes(tree, columns)
        if not len(at):
            return None
        parts, how = columns.chunks(tree[1])[1], ("any", "all", "none").index(tree[2])
        out = np.empty(n_rows, dtype=np.uint8)
        for lo, values in parts:
            n = min(len(values), n_rows - lo)
            _labels_out(values[:n], at, want, how, None if deleted is None else deleted[lo:lo + n],
                        out[lo:lo + n], bits)
        return out
    found = interval(tree, columns) if tree[0] in ("scalar", "category", "and") else None
    if found is None:
        return None
    col, lo_v, hi_v, lo_open, hi_open, inside = found
    out = np.empty(n_rows, dtype=np.uint8)
    for lo, values in columns.chunks(col["name"])[1]:
        n = min(len(values), n_rows - lo)
        _between_out(values[:n], lo_v, hi_v, lo_open, hi_open, inside,
                     None if deleted is None else deleted[lo:lo + n], out[lo:lo + n], bits)
    return out


@njit(parallel=True, nogil=True, cache=True)
def _exclude_labels(values, at, want, how, deleted, has_deleted, out):
    """out[r] = 1 where row r is out: its label bytes ``values[r, at[i]] & want[i]`` fail
    ``how`` (0 any, 1 all, 2 none) or the row is removed."""
    n = values.shape[0]
    if len(at) == 1:  # the labels asked for in one byte: a loop without branches, vectorised
        b, w = at[0], want[0]
        if how == 0:
            for r in prange(n):
                out[r] = (values[r, b] & w) == 0
        elif how == 1:
            for r in prange(n):
                out[r] = (values[r, b] & w) != w
        else:
            for r in prange(n):
                out[r] = (values[r, b] & w) != 0
    else:
        for r in prange(n):
            hit = how == 1
            for i in range(len(at)):
                got = values[r, at[i]] & want[i]
                hit = (hit and got == want[i]) if how == 1 else (hit or got != 0)
            out[r] = hit == (how == 2)
    if has_deleted:
        for r in prange(n):
            out[r] |= deleted[r] != 0


@njit(parallel=True, nogil=True, cache=True)
def _exclude_between(values, lo, hi, lo_open, hi_open, inside, deleted, has_deleted, out):
    """out[r] = 1 where row r is out: ``values[r]`` in the interval (lo, hi) -- each end open
    or closed -- is not ``inside``, or the row is removed."""
    n = len(values)
    flip = np.uint8(1 if inside else 0)
    # the ends' kinds chosen once, so that each loop is branch-free (vectorised)
    if lo_open and hi_open:
        for r in prange(n):
            out[r] = np.uint8((values[r] > lo) & (values[r] < hi)) ^ flip
    elif lo_open:
        for r in prange(n):
            out[r] = np.uint8((values[r] > lo) & (values[r] <= hi)) ^ flip
    elif hi_open:
        for r in prange(n):
            out[r] = np.uint8((values[r] >= lo) & (values[r] < hi)) ^ flip
    else:
        for r in prange(n):
            out[r] = np.uint8((values[r] >= lo) & (values[r] <= hi)) ^ flip
    if has_deleted:
        for r in prange(n):
            out[r] |= deleted[r] != 0


def _labels_out(values, at, want, how: int, deleted, out, bits: int) -> None:
    """:func:`_exclude_labels` over one chunk (numpy where the kernel is not compiled yet)."""
    has = deleted is not None
    args = (values, at, want, np.int64(how), deleted if has else np.zeros(1, np.uint8), has, out)
    if len(values) and kernels.pick_ready(_exclude_labels, args, bits):
        _exclude_labels(*args)
        return
    hit = np.full(len(values), how == 1)
    for b, w in zip(at.tolist(), want.tolist()):
        hit = hit & ((values[:, b] & w) == w) if how == 1 else hit | ((values[:, b] & w) != 0)
    out[:] = (hit == (how == 2)) | (deleted != 0 if has else False)


def _between_out(values, lo, hi, lo_open: bool, hi_open: bool, inside: bool, deleted, out, bits: int) -> None:
    """:func:`_exclude_between` over one chunk (numpy where the kernel is not compiled yet)."""
    has = deleted is not None
    args = (values, lo, hi, lo_open, hi_open, inside, deleted if has else np.zeros(1, np.uint8), has, out)
    if len(values) and kernels.pick_ready(_exclude_between, args, bits):
        _exclude_between(*args)
        return
    within = ((values > lo) if lo_open else (values >= lo)) & ((values < hi) if hi_open else (values <= hi))
    out[:] = (within != inside) | (deleted != 0 if has else False)
