"""Filtered scans: the plans that turn a filter into exact top-k and radius searches.

Three plans, each exact (the same ids, distances and order as ranking every matching item):

- **rank first** (a new filter, a few queries): the unfiltered top-k' -- k' from the filter's
  share in a sample of rows -- then the filter tested on those candidates only; k' grows
  until k match. No pass over the attributes, so a filter seen for the first time costs
  about what the search costs unfiltered.
- **masked** (many rows match): the full scan with the others masked out, as removed rows
  are: no distance is computed for them past the first level's span test.
- **gathered** (few rows match, or a batch where a share of them does): the matching rows'
  codes copied together and scanned, rows ascending so that ties keep their order.

A :class:`Selection` (the rows a filter selects, evaluated over every row) is kept by the
index for repeated filters, with its mask and gathered copy made once.
"""

from __future__ import annotations

import numpy as np

from hashret.index import kernels

RANK_FIRST_QUERIES = 4  # a new filter with at most this many queries ranks first, then tests
RANK_FIRST_MAX = 1 << 15  # candidates a rank-first search takes at most before it gives up
SAMPLE_ROWS = 4096  # rows a filter is tested on to guess its share of the index
# gathered where share x GATHER_PER_QUERY <= min(queries, GATHER_QUERIES): one query scans a
# copy of up to 1/32 of the rows, a batch of 16 or more up to half (10^7 codes, 100 queries,
# k=1000, side by side, the copy made in the call: a third 47 vs 70 ms masked, half 61 vs 55;
# once made, a kept selection's copy is scanned whatever the batch: half the rows, half the time)
GATHER_PER_QUERY = 32
GATHER_QUERIES = 16


class Selection:
    """The rows a filter selects among the alive ones (``allowed``), with what the scans
    derive from it, each made once: the exclusion mask, the count, the gathered copy."""

    def __init__(self, allowed: np.ndarray):
        self.allowed = allowed
        self.n = int(np.count_nonzero(allowed))
        self._excluded = self._gathered = None

    def excluded(self) -> np.ndarray:
        """uint8 per row, 1 where the row is out (the scans' removed-row mask)."""
        if self._excluded is None:
            self._excluded = (~self.allowed).view(np.uint8)
        return self._excluded

    def gathered(self, segs):
        """(rows, Segments of their codes): the selected rows' codes copied together."""
        if self._gathered is None:
            rows = np.flatnonzero(self.allowed)
            self._gathered = rows, kernels.Segments.of(segs.rows(rows))
        return self._gathered

    def gather_pays(self, n_rows: int, n_queries: int) -> bool:
        """Whether to scan the gathered copy: made already, or worth making for this search."""
        return self._gathered is not None or self.n * GATHER_PER_QUERY <= n_rows * min(n_queries, GATHER_QUERIES)


def rank_first(segs, q, k, bits, deleted, test, threads):
    """Top-k among the rows ``test(rows)`` accepts, testing only candidates: the unfiltered
    top-k' (k' = 1.5 k over the filter's share in a sample, + 64), its matches kept in order;
    k' grows (x4) until every query has k matches or k' covers the index. Exact: a matching
    row outside the top-k' ranks after every row in it. None where the filter looks too
    selective for this to pay (the caller evaluates it over every row instead)."""
    n = segs.n_rows
    sample = np.arange(0, n, max(1, n // SAMPLE_ROWS), dtype=np.int64)  # (np.linspace + unique: 0.3 ms)
    if deleted is not None:
        sample = sample[deleted[sample] == 0]
    share = float(test(sample).mean()) if len(sample) else 0.0
    if share * RANK_FIRST_MAX < 2 * k:
        return None
    kk = min(n, int(1.5 * k / share) + 64)
    while True:
        dist, rows = kernels.topk(segs, q, kk, bits, deleted, threads)
        ok = rows >= 0
        ok[ok] = test(rows[ok])
        if (ok.sum(axis=1) >= k).all() or kk >= n:
            out_d = np.full((len(q), k), -1, dtype=np.int32)
            out_r = np.full((len(q), k), -1, dtype=np.int64)
            for i in range(len(q)):
                keep = np.flatnonzero(ok[i])[:k]
                out_d[i, :len(keep)], out_r[i, :len(keep)] = dist[i, keep], rows[i, keep]
            return out_d, out_r
        if kk >= RANK_FIRST_MAX:
            return None
        kk = min(n, 4 * kk)


def topk(segs, q, k, bits, selection: Selection, threads):
    """Top-k over the selected rows only: masked or gathered (see the module's notes)."""
    if not selection.gather_pays(segs.n_rows, len(q)):
        return kernels.topk(segs, q, k, bits, selection.excluded(), threads)
    dist = np.full((len(q), k), -1, dtype=np.int32)
    rows = np.full((len(q), k), -1, dtype=np.int64)
    if selection.n:
        chosen, sub = selection.gathered(segs)
        d, r = kernels.topk(sub, q, min(k, selection.n), bits, None, threads)
        dist[:, :d.shape[1]] = d
        rows[:, :r.shape[1]] = np.where(r >= 0, chosen[np.maximum(r, 0)], -1)
    return dist, rows


def range_search(segs, q, radius, bits, selection: Selection, threads):
    """``range_search`` over the selected rows only (masked or gathered, as :func:`topk`)."""
    if not selection.gather_pays(segs.n_rows, len(q)):
        return kernels.range_search(segs, q, radius, bits, selection.excluded(), threads)
    if selection.n == 0:
        return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
    chosen, sub = selection.gathered(segs)
    lims, dist, r = kernels.range_search(sub, q, radius, bits, None, threads)
    return lims, dist, chosen[r]
