"""Row lists per attribute value, so that a selective filter finds its rows without testing
every row: the rows that hold each label, and each scalar column's rows in the order of its
values (a stable sort, so a range is a slice of it and one value's rows stay ascending).

:class:`Postings` is made for one state of an index's rows and builds a column's list the
first time a filter reads that column, once (a label: one pass over its byte of the label
column; a scalar column: a stable sort of its values -- by radix where they span fewer than
65,536 values). :meth:`Postings.estimate` bounds how many rows
a filter can select from those lists alone -- nothing is materialised -- so the search can
choose its plan before paying for one; :meth:`Postings.rows` then gives the rows (a superset
where part of the filter is not answered by a list, which the caller tests on those rows only),
and where they are one list's slice, which -- so that a selective filter's codes can be read
from a copy of that list's codes, one after another, instead of one cache miss a row
(:meth:`Postings.codes`, made the first time a search asks, within a memory budget).
"""

from __future__ import annotations

import numpy as np

from hashret.index import kernels

# the lists' code copies together take at most this many times the codes' own memory (a
# scalar column's copy is the whole index in value order: one such column and the selective
# labels fit)
COPIES_SHARE = 2.0


class Postings:
    """The row lists of one state of an index's columns (``columns``: its
    :class:`~hashret.index.rows.Columns`), built per column on first use."""

    def __init__(self, columns, n_rows: int, rows_of_ids):
        self.columns, self.n_rows, self.rows_of_ids = columns, n_rows, rows_of_ids
        self._labels: dict = {}  # (column, label) -> rows holding it, ascending
        self._orders: dict = {}  # column -> (values sorted, rows in that order)
        self._copies: dict = {}  # list key -> Segments: the codes of the list's rows, in its order
        self._removed: dict = {}  # list key -> the removed-row mask in the list's order
        self.copied_bytes = 0

    def codes(self, key, segs, bits: int):
        """The codes of list ``key``'s rows in the list's order (a
        :class:`~hashret.index.kernels.Segments`), copied from ``segs`` the first time they
        are asked for; None where the copy would pass the budget (:data:`COPIES_SHARE`)."""
        got = self._copies.get(key)
        if got is None:
            rows = self.list_rows(key)
            size = len(rows) * segs.n_words * (segs.dtype.itemsize if segs.dtype is not None else 8)
            if self.copied_bytes + size > COPIES_SHARE * self.n_rows * bits / 8:
                return None
            got = self._copies[key] = kernels.Segments.of(kernels.gather(segs, rows, bits))
            self.copied_bytes += size
        return got

    def list_rows(self, key) -> np.ndarray:
        """The rows of list ``key`` in its order: a label's ascending, a column's by value."""
        return self._label_rows(key[1], key[2]) if key[0] == "label" else self._order(key[1])[1]

    def removed(self, key, deleted: np.ndarray) -> np.ndarray:
        """The removed-row mask in list ``key``'s order (made once: the lists are of one
        state of the rows, removals included)."""
        got = self._removed.get(key)
        if got is None:
            got = self._removed[key] = np.ascontiguousarray(deleted[self.list_rows(key)])
        return got

    def _label_rows(self, name: str, j: int) -> np.ndarray:
        got = self._labels.get((name, j))
        if got is None:
            _, parts = self.columns.chunks(name)
            bit = np.uint8(0x80 >> (j % 8))  # np.packbits order, as the column is stored
            got = np.concatenate([lo + np.flatnonzero(values[:, j // 8] & bit) for lo, values in parts]
                                 or [np.zeros(0, np.int64)])
            self._labels[(name, j)] = got
        return got

    def _order(self, name: str):
        got = self._orders.get(name)
        if got is None:
            _, parts = self.columns.chunks(name)
            values = np.concatenate([v for _, v in parts])[:self.n_rows] if parts else np.zeros(0)
            keys = values
            if values.dtype.kind == "i" and len(values) and int(values.max()) - int(values.min()) < 1 << 16:
                keys = (values - values.min()).astype(np.uint16)  # numpy sorts these by radix: 5x faster
            order = np.argsort(keys, kind="stable")
            got = self._orders[name] = (values[order], order)
        return got

    def _slices(self, node):
        """A scalar or category condition as (lo, hi) slices of its column's order, or None
        where it is not a union of value ranges (ne, not_in)."""
        kind, name, op, vals = node
        if op in ("ne", "not_in"):
            return None
        values, _ = self._order(name)
        if op in ("eq", "in"):
            vals = sorted(set(vals))
            return [(int(np.searchsorted(values, v, "left")), int(np.searchsorted(values, v, "right")))
                    for v in vals]
        v = vals[0]
        if op in ("lt", "lte"):
            return [(0, int(np.searchsorted(values, v, "left" if op == "lt" else "right")))]
        return [(int(np.searchsorted(values, v, "right" if op == "gt" else "left")), len(values))]

    def estimate(self, tree) -> int | None:
        """At most how many rows ``tree`` (a parsed filter) selects, from the lists alone;
        None where no list bounds it (a negation, a row mask)."""
        op = tree[0]
        if op == "and":
            got = [e for e in map(self.estimate, tree[1]) if e is not None]
            return min(got) if got else None
        if op == "or":
            got = [self.estimate(t) for t in tree[1]]
            return None if None in got else min(self.n_rows, sum(got))
        if op == "id":
            return len(tree[2]) if tree[1] == "in" else None
        if op == "labels":
            _, name, how, labels = tree
            if how == "none":
                return None
            sizes = [len(self._label_rows(name, j)) for j in labels]
            if not sizes:  # "all" of no labels: every row
                return None if how == "all" else 0
            return min(sizes) if how == "all" else min(self.n_rows, sum(sizes))
        if op in ("scalar", "category"):
            slices = self._slices(tree)
            return None if slices is None else sum(max(0, hi - lo) for lo, hi in slices)
        return None  # "not", "mask"

    def one_slice(self, tree) -> bool:
        """Whether :meth:`rows` gives ``tree``'s rows exactly as one slice of one list (asked
        before the rows are made: a union of lists is not one)."""
        while tree[0] == "and" and len(tree[1]) == 1:
            tree = tree[1][0]
        if tree[0] == "labels":
            return tree[2] in ("any", "all") and len(tree[3]) == 1
        if tree[0] in ("scalar", "category"):
            slices = self._slices(tree)
            return slices is not None and sum(hi > lo for lo, hi in slices) == 1
        return False

    def _union(self, parts) -> np.ndarray:
        """The distinct rows of ``parts`` (int64 arrays), ascending. (np.unique's hashing took
        8 s for 6 million of 10^7 rows; marking the rows is one pass, sorting a few is less.)"""
        total = sum(len(p) for p in parts)
        if total * 64 >= self.n_rows:
            mark = np.zeros(self.n_rows, dtype=bool)
            for p in parts:
                mark[p] = True
            return np.flatnonzero(mark)
        rows = np.sort(np.concatenate(parts or [np.zeros(0, np.int64)]))
        return rows[np.r_[True, rows[1:] != rows[:-1]]] if len(rows) else rows

    def rows(self, tree):
        """(rows, exact, ascending, source): the rows the lists give for ``tree`` (no repeats;
        sorted where ``ascending``) -- a superset of its rows where ``exact`` is False -- and
        where they are a slice of one list, ``source`` = (list key, start, stop) (for
        :meth:`codes`), else None. Only for a tree :meth:`estimate` bounds."""
        op = tree[0]
        if op == "and":
            parts = [(e, t) for t, e in ((t, self.estimate(t)) for t in tree[1]) if e is not None]
            rows, exact, ascending, source = self.rows(min(parts, key=lambda p: p[0])[1])
            return rows, exact and len(tree[1]) == 1, ascending, source
        if op == "or":
            got = [self.rows(t) for t in tree[1]]
            return self._union([g[0] for g in got]), all(g[1] for g in got), True, None
        if op == "id":
            found = self.rows_of_ids(tree[2]) if len(tree[2]) else np.zeros(0, np.int64)
            return self._union([found[found >= 0]]), True, True, None
        if op == "labels":
            _, name, how, labels = tree
            lists = [self._label_rows(name, j) for j in labels]
            if how == "all" or len(lists) == 1:
                j = min(range(len(lists)), key=lambda i: len(lists[i]))
                return lists[j], len(lists) == 1, True, (("label", name, labels[j]), 0, len(lists[j]))
            return self._union(lists), True, True, None
        values, order = self._order(tree[1])
        slices = [(lo, hi) for lo, hi in self._slices(tree) if hi > lo]
        if len(slices) == 1:  # one value's rows are ascending (a stable sort); a range's are not,
            lo, hi = slices[0]  # unless it holds one value
            one_value = tree[2] in ("eq", "in") or values[lo] == values[hi - 1]
            return order[lo:hi], True, bool(one_value), (("order", tree[1]), lo, hi)
        return (np.concatenate([order[lo:hi] for lo, hi in slices] or [np.zeros(0, np.int64)]), True, False,
                None)
