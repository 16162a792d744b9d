"""``HashIndex``: binary codes in memory (optionally persisted in LMDB), exact Hamming search.

Verbs after faiss: ``add``, ``search``, ``range_search``, ``remove``, ``write`` / ``open``.
Codes are packed bytes (``np.packbits`` order, +1 -> bit 1); bits (0/1 or bool), +-1 signs
and real-valued outputs are packed on the way in (:func:`hashret.index.bits.as_packed`).
Ids are int64 in [0, 2**63): row numbers unless ``add`` is given explicit ids. Search
results: nearest first, ties by row (insertion order), ``min(k, rows)`` columns, id -1 /
distance -1 where fewer alive items exist.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
from bitarray import bitarray

from hashret.errors import HashretError, NotFoundError, check, is_integer, os_problem
from hashret.index import filtered, kernels
from hashret.index.attributes import Labels, encode, evaluate, key, new_schema, parse_filter, value_of
from hashret.index.postings import Postings
from hashret.index.bits import as_packed
from hashret.index.rows import Memory, Stored, to_words, word_layout
from hashret.index.store import FILES, LMDBStore, all_unique, ascending, is_initialised

DEFAULT_CHUNK = 65536
_MAX_ID = np.iinfo(np.int64).max


def positive_int(value, name: str) -> int:
    """``value`` as an int if it is a true positive integer (not a bool, float or string)."""
    check(is_integer(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_ids(ids, n: int) -> np.ndarray:
    """Explicit ids -> int64, refusing floats, values outside [0, 2**63) and repeats."""
    arr = np.asarray(ids)
    if arr.dtype == object:  # Python ints too large for int64/uint64
        check(all(is_integer(i) for i in arr.ravel()), "ids must be integers")
        check(all(0 <= int(i) <= _MAX_ID for i in arr.ravel()),
              f"ids must lie in [0, {_MAX_ID}] (int64; -1 marks 'no result')")
        arr = arr.astype(np.int64)
    check(arr.dtype.kind in "iu", f"ids must be integers, got {arr.dtype}")
    check(arr.ndim == 1 and len(arr) == n, f"{arr.size} ids for {n} codes: give one id per code")
    if len(arr):
        check(arr.min() >= 0 and (arr.dtype.kind == "i" or arr.max() <= _MAX_ID),
              f"ids must lie in [0, {_MAX_ID}] (int64; -1 marks 'no result'), got {arr.min()}..{arr.max()}")
    arr = arr.astype(np.int64)
    check(all_unique(arr), "the ids of this batch repeat: ids must be unique")
    return arr


class _IdMap:
    """id -> row, in memory: sorted runs merged log-structured, so adding a batch costs
    O(batch log n) amortised and a lookup O(log^2 n), never a sort of every id. A batch that
    is ascending and above every known id (a build from dataset rows) is appended to one
    growing sorted tail instead -- amortised O(batch), no search, no merge."""

    def __init__(self):
        self.runs: list = []
        self.max = None
        self._tail_ids = np.zeros(0, dtype=np.int64)
        self._tail_rows = np.zeros(0, dtype=np.int64)
        self._tail_n = 0

    @classmethod
    def of(cls, ids: np.ndarray) -> "_IdMap":
        m = cls()
        if len(ids):
            m.add(ids, 0)
        return m

    def add(self, ids: np.ndarray, first_row: int):
        if len(ids) == 0:
            return
        rows = np.arange(first_row, first_row + len(ids), dtype=np.int64)
        if ascending(ids) and (self.max is None or ids[0] > self.max):
            need = self._tail_n + len(ids)
            if need > len(self._tail_ids):
                cap = max(need, 2 * len(self._tail_ids), 1024)
                for name in ("_tail_ids", "_tail_rows"):
                    grown = np.empty(cap, dtype=np.int64)
                    grown[:self._tail_n] = getattr(self, name)[:self._tail_n]
                    setattr(self, name, grown)
            self._tail_ids[self._tail_n:need] = ids
            self._tail_rows[self._tail_n:need] = rows
            self._tail_n = need
            self.max = int(ids[-1])
            return
        order = np.argsort(ids, kind="stable")
        run = (ids[order], rows[order])
        self.runs.append(run)
        top = int(run[0][-1])
        self.max = top if self.max is None else max(self.max, top)
        while len(self.runs) > 1 and len(self.runs[-2][0]) < 2 * len(self.runs[-1][0]):
            (a, ra), (b, rb) = self.runs.pop(-2), self.runs.pop()
            ids_, rows_ = np.concatenate([a, b]), np.concatenate([ra, rb])
            o = np.argsort(ids_, kind="stable")  # two sorted runs: timsort merges them in O(n)
            self.runs.append((ids_[o], rows_[o]))

    def known(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` are already mapped."""
        if self.max is None or ids.min() > self.max:
            return np.zeros(len(ids), dtype=bool)
        return self.lookup(ids) >= 0

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        rows = np.full(len(ids), -1, dtype=np.int64)
        tail = (self._tail_ids[:self._tail_n], self._tail_rows[:self._tail_n])
        for sid, srow in self.runs + ([tail] if self._tail_n else []):
            pos = np.clip(np.searchsorted(sid, ids), 0, len(sid) - 1)
            hit = sid[pos] == ids
            rows[hit] = srow[pos[hit]]
        return rows


class HashIndex:
    """An exact Hamming-distance index over ``bits``-bit codes.

    ``HashIndex(bits)`` lives in memory (one growing array of words). ``HashIndex.create(path,
    bits)`` and ``HashIndex.open(path, readonly=True)`` keep it in an LMDB folder and scan the
    codes where LMDB's memory map has them (a :class:`~hashret.index.snapshot.Snapshot`): opening
    costs one lookup and one checksum per chunk, not a copy, and processes that open the same
    index share one page cache. A writer moves to a new snapshot after each commit; a reader
    calls :meth:`refresh` to pick up what another writer committed. One writer per folder:
    opening for writing takes ``writer.lock`` and a second writer, in this process or another,
    is refused until the first is closed.

    Parameters
    ----------
    bits : int
        Code length, a positive multiple of 8. Codes are packed uint8 rows of ``bits/8``
        bytes (``np.packbits`` order; see :func:`hashret.index.pack_codes`).
    info : dict, optional
        JSON metadata kept with the index (modality, model fingerprint, ...).

    Raises
    ------
    HashretError
        A code length that is not a positive multiple of 8.

    Examples
    --------
    >>> import hashret, numpy as np
    >>> codes = np.random.default_rng(0).integers(0, 256, (1000, 8), dtype=np.uint8)
    >>> index = hashret.HashIndex(64)
    >>> ids = index.add(codes)
    >>> dist, found = index.search(codes[:2], k=3)
    >>> dist.shape, found[:, 0].tolist()
    ((2, 3), [0, 1])

    Attributes, given with the first add, let a search keep to the items that match:

    >>> tagged = hashret.HashIndex(64)
    >>> ids = tagged.add(codes, attributes={"year": np.arange(1000) % 50 + 1980,
    ...                                     "labels": [["sky"] if i % 3 else ["sea"] for i in range(1000)]})
    >>> dist, found = tagged.search(codes[:1], k=3, filter={"labels": {"any": ["sea"]}, "year": {"gte": 2000}})
    >>> [(int(i) % 3, int(i) % 50 + 1980 >= 2000) for i in found[0]]
    [(0, True), (0, True), (0, True)]
    """

    def __init__(self, bits: int, info: dict | None = None):
        check(is_integer(bits) and bits > 0 and bits % 8 == 0,
              f"code length {bits!r} is not a positive multiple of 8: use 16, 32, 64, 128, ...")
        self.bits = int(bits)
        self.n_bytes = self.bits // 8
        self.word_dtype, self.n_words = word_layout(self.n_bytes)
        self.info_meta = dict(info or {})
        self._rows: Memory | Stored = Memory(self.word_dtype, self.n_words)
        self._idmap = _IdMap()  # explicit id -> row; after open, built on first use
        self.path = None
        self._filters = OrderedDict()  # (state, rows, filter text) -> Selection, the last few
        self._postings = None  # ((state, rows), Postings): the row lists of the current state
        self._kept_max = FILTERS_KEPT

    # the backend's state, read where it is kept (memory, or the current snapshot)
    @property
    def _n(self) -> int:
        return self._rows.n

    @property
    def _tomb(self):
        return self._rows.tomb

    @property
    def _id_mode(self):
        return self._rows.id_mode

    @property
    def created(self):
        return self._rows.created

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def create(cls, path, bits: int, info: dict | None = None, chunk_size: int = DEFAULT_CHUNK,
               exist_ok: bool = False, build: dict | None = None) -> "HashIndex":
        """A new, empty index in the folder ``path`` (created), open for writing. ``info``:
        JSON metadata kept with the index (modality, model fingerprint, ...); ``build``: the
        progress record of a long build (see :func:`hashret.engine.build_index`)."""
        path = Path(path)
        index = cls(bits, info)
        chunk_size = positive_int(chunk_size, "chunk_size")
        if is_initialised(path):
            check(exist_ok, f"{path} already holds an index: open it, or choose a new folder")
            return cls.open(path, readonly=False)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HashretError(f"cannot create the index folder {path}: {os_problem(exc)}") from None
        store = LMDBStore(path, readonly=False, create=True)
        try:
            store.initialise(index.bits, chunk_size, index.info_meta, build)
            index._rows, index.path = Stored(store, store.snapshot(word_layout)), path
        except BaseException:
            store.close()
            raise
        return index

    @classmethod
    def open(cls, path, readonly: bool = True, verify: bool = True) -> "HashIndex":
        """Open the index in ``path``; ``readonly=False`` to add or remove (one writer at a
        time). ``verify``: check every chunk's checksum now (at memory speed; False trusts a
        recent ``hashret verify`` and opens in one lookup per chunk -- batches committed later
        are checked when :meth:`refresh` picks them up)."""
        store = LMDBStore(path, readonly=readonly)
        try:
            snap = store.snapshot(word_layout, verify=verify)
            index = cls(snap.meta["bits"], snap.meta["info"])
            index._rows, index.path = Stored(store, snap), Path(path)
        except BaseException:
            store.close()
            raise
        index._idmap = None  # built from the verified id chunks when first needed
        return index

    read = open  # faiss' read_index

    @staticmethod
    def warmup(bits: int) -> float:
        """Compile -- or load, where an earlier process compiled them -- the scan kernels for
        ``bits``-bit codes (a lone query, a batch, a radius search, a filter's rows), so that
        the first real search answers at once. The kernels are kept per user
        (:mod:`hashret.index.cache`).
        Returns the seconds it took (a fraction of one where they were cached)."""
        import os
        import time

        from hashret.index.cache import compiling

        t0 = time.perf_counter()
        index = HashIndex(bits)
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 256, size=(4096, index.n_bytes), dtype=np.uint8)
        index.add(codes, attributes={"labels": Labels(np.ones((4096, 1), bool), ["a"]), "n": np.arange(4096),
                                     "x": rng.random(4096), "c": ["a", "b"] * 2048})
        mode = os.environ.get("HASHRET_COMPILE")
        os.environ["HASHRET_COMPILE"] = "foreground"  # the kernels, not numpy's stand-in
        try:
            with compiling(bits):  # another process on it: wait, then load its work
                index.search(codes[:1], 10)
                index.search(codes[:8], 10)
                index.range_search(codes[:2], 1)
                listed = {"id": {"in": list(range(0, len(codes), 64))}}
                index.search(codes[:1], 10, filter=listed)  # a filter's few rows, read where they lie
                index.search(codes[:8], 10, filter=listed)  # ... copied for a batch
                index.search(codes[:8], 10, filter=np.arange(len(codes)) % 64 == 0)  # a mask's rows copied
                index.search(codes[:1], 10, filter={"n": {"lt": 64}})  # a small slice of a list's copy
                for broad in ({"labels": {"any": ["a"]}}, {"n": {"gte": 1}}, {"x": {"lt": 2.0}}, {"c": {"ne": "b"}}):
                    index.search(codes[:8], 10, filter=broad)  # a column's rows out, in one pass
        finally:
            if mode is None:
                os.environ.pop("HASHRET_COMPILE")
            else:
                os.environ["HASHRET_COMPILE"] = mode
        return time.perf_counter() - t0

    # -- a folder, without opening it ------------------------------------------------------
    @staticmethod
    def exists(path) -> bool:
        """Whether ``path`` holds a committed index (False for a create that died first)."""
        return is_initialised(path)

    @staticmethod
    def peek(path) -> dict:
        """The stored record of the index in ``path`` (bits, info, build, count, ...), read
        without opening it for writing or checking its chunks."""
        store = LMDBStore(path, readonly=True)
        try:
            return store.read_meta()
        finally:
            store.close()

    @staticmethod
    def verify_folder(path) -> dict:
        """Check every checksum and link of the index in ``path`` without loading it: the
        report of :meth:`verify`, with its ``path``."""
        store = LMDBStore(path, readonly=True)
        try:
            report = store.verify()
        finally:
            store.close()
        report["path"] = str(path)
        return report

    @staticmethod
    def discard(path, also=(), rmdir: bool = True):
        """Delete the files an index writes in ``path`` (and the names in ``also``), then the
        folder if it is empty: how a build that committed nothing is undone."""
        path = Path(path)
        for name in (*FILES, *also):
            try:
                (path / name).unlink(missing_ok=True)
            except OSError:
                pass
        if rmdir:
            try:
                path.rmdir()
            except OSError:
                pass

    def refresh(self) -> bool:
        """Pick up what another writer committed since this index's snapshot (new batches,
        removals, a compaction); chunks already checked are not read again. True if the index
        changed. A writer's own changes need no refresh."""
        change = self._rows.refresh()
        if change is None:
            return False
        if self._idmap is not None:
            if change["same_rows"] and self._id_mode == "explicit" and self._n > change["old_count"]:
                self._idmap.add(self._rows.all_ids()[change["old_count"]:], change["old_count"])
            elif not change["same_rows"]:
                self._idmap = None
        return True

    @property
    def generation(self) -> int | None:
        """The committed state this index reads (bumped by every write); None in memory."""
        return self._rows.generation

    @property
    def build_state(self) -> dict | None:
        """The build record of an index written by ``build_index`` (state 'partial' until its
        last batch commits, then 'complete'); None for indexes written through the API."""
        return self._rows.build

    def write(self, path, chunk_size: int = DEFAULT_CHUNK) -> "HashIndex":
        """Persist an index to a new LMDB folder (removed rows dropped); returns it open."""
        out = HashIndex.create(path, self.bits, self.info_meta, chunk_size=chunk_size)
        alive = self._alive_rows()
        if len(alive):
            items = self._rows.items_of_rows(alive)
            out.add(self.packed_codes(alive), ids=self._ids_of_rows(alive),
                    items=items if any(it is not None for it in items) else None)
        return out

    def close(self):
        """Close the index; scans must have finished (as for any file)."""
        self._rows.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- adding --------------------------------------------------------------------------
    def _as_packed(self, codes, what="codes") -> np.ndarray:
        return as_packed(codes, self.bits, what)

    def add(self, codes, ids=None, items=None, build: dict | None = None, attributes=None) -> np.ndarray:
        """Append codes (packed uint8 (N, bits/8); or (N, bits) 0/1 bits, +-1 signs or real
        outputs). ``ids``: external ids, unique integers in [0, 2**63) (default: row numbers);
        ``items``: one JSON-able payload per code; ``build``: fields for the build record,
        committed with the batch; ``attributes``: {column: one value per code} -- the first
        add sets the index's columns (label lists or :class:`~hashret.index.attributes.Labels`,
        integers, floats, datetime64, strings; see :mod:`hashret.index.attributes`), every
        later add gives the same columns. On LMDB the batch is one transaction: all of it or
        nothing. Returns the ids given to the new items."""
        packed = self._as_packed(codes)
        n = len(packed)
        check(n > 0, "nothing to add: the code array is empty")
        mode = "explicit" if ids is not None else "rows"
        if self._id_mode not in (None, mode):
            raise HashretError("this index uses explicit ids: pass ids to add" if self._id_mode == "explicit"
                               else "this index uses row numbers as ids: add without ids")
        if ids is not None:
            ids = check_ids(ids, n)
            known = self._id_map().known(ids)
            if known.any():
                raise HashretError(f"id {int(ids[known][0])} is already in the index: ids must be unique")
        if items is not None:
            items = json_items(items, n)
        schema = self._rows.schema
        if attributes is not None and not schema:
            check(self._n == 0, f"this index has {self._n} rows without attributes: attribute columns are "
                  "set by an index's first add")
            schema = new_schema(attributes)
        columns, schema = encode(schema, attributes, n)
        first = self._n
        self._rows.append(packed, ids, items, mode, build, columns, schema if columns is not None else None)
        if ids is not None and self._idmap is not None:
            self._idmap.add(ids, first)
        return ids if ids is not None else np.arange(first, first + n, dtype=np.int64)

    # -- searching -----------------------------------------------------------------------
    def _query_words(self, queries):
        packed = self._as_packed(queries, "queries")
        check(len(packed) > 0, "the query is empty: give at least one query code")
        return to_words(packed, self.word_dtype, self.n_words)

    def _scan(self, fn):
        """fn(segments, deleted mask, ids_of_rows, columns) over one consistent state."""
        return self._rows.scan(fn)

    def search(self, queries, k: int, threads: int | None = None, filter=None):
        """(distances, ids), int arrays of shape (Q, min(k, rows)), nearest first, ties by
        row; -1 where fewer alive items exist (or match ``filter``). Memory is O(Q x min(k,
        rows)) for any k. ``threads``: scan threads (default: NUMBA_NUM_THREADS); ``filter``:
        only rows it selects -- a boolean array over the rows, or an expression over the
        stored attributes (see :mod:`hashret.index.attributes`)."""
        dist, _, ids = self.search_rows(queries, k, threads, filter)
        return dist, ids

    def search_rows(self, queries, k: int, threads: int | None = None, filter=None):
        """``search`` with the rows too: (distances, rows, ids) from one snapshot (a sharded
        index merges shards by row)."""
        k = positive_int(k, "k")
        q = self._query_words(queries)

        def scan(segs, deleted, ids_of_rows, columns):
            kk = min(k, segs.n_rows)
            tree = None if filter is None else parse_filter(filter, columns.schema, segs.n_rows)
            if kk == 0:
                none = np.zeros((len(q), 0), dtype=np.int64)
                return none.astype(np.int32), none, none
            if tree is None:
                dist, rows = kernels.topk(segs, q, kk, self.bits, deleted, threads)
                return dist, rows, ids_of_rows(rows)
            f = self._filter(filter, tree, segs.n_rows, columns)
            dist, rows = filtered.topk(segs, q, kk, self.bits, deleted, f, threads)
            return dist, rows, ids_of_rows(rows)

        return self._scan(scan)

    def range_search(self, queries, radius: int, threads: int | None = None, filter=None):
        """All items within Hamming distance ``radius``: (lims, distances, ids) as in faiss;
        query i's results are ``[lims[i], lims[i+1])``, by distance then row. ``filter`` as
        in :meth:`search`."""
        lims, dist, _, ids = self.range_search_rows(queries, radius, threads, filter)
        return lims, dist, ids

    def range_search_rows(self, queries, radius: int, threads: int | None = None, filter=None):
        """``range_search`` with the rows too: (lims, distances, rows, ids)."""
        check(is_integer(radius) and radius >= 0, f"radius must be a non-negative integer, got {radius!r}")
        q = self._query_words(queries)

        def scan(segs, deleted, ids_of_rows, columns):
            f = None
            if filter is not None:
                f = self._filter(filter, parse_filter(filter, columns.schema, segs.n_rows), segs.n_rows, columns)
            if segs.n_rows == 0:
                return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
            r = int(min(radius, self.bits))
            if f is None:
                lims, dist, rows = kernels.range_search(segs, q, r, self.bits, deleted, threads)
            else:
                lims, dist, rows = filtered.range_search(segs, q, r, self.bits, deleted, f, threads)
            return lims, dist, rows, ids_of_rows(rows)

        return self._scan(scan)

    @property
    def filters_kept(self) -> int:
        """How many filter expressions' selected rows (with their mask and gathered codes) are
        kept for the next search with the same filter (default 8; each costs a byte a row and
        at most half the codes' memory); 0 keeps none."""
        return self._kept_max

    @filters_kept.setter
    def filters_kept(self, n: int):
        check(is_integer(n) and n >= 0, f"filters_kept must be a non-negative integer, got {n!r}")
        self._kept_max = int(n)
        while len(self._filters) > self._kept_max:
            self._filters.popitem(last=False)

    def _kept_selection(self, text: str | None, n_rows: int):
        """The :class:`~hashret.index.filtered.Selection` a recent search made of the filter
        whose :func:`~hashret.index.attributes.key` is ``text`` in this state of the rows, if
        there is one."""
        token = (self._rows.state, n_rows, text)
        kept = self._filters.get(token) if text is not None else None
        if kept is not None:
            self._filters.move_to_end(token)
        return kept

    def _filter(self, filter, tree, n_rows: int, columns) -> filtered.Filter:
        """``filter`` as this state of the rows meets it: its tests, the row lists of this
        state (built per column on first use, kept until the rows change), the selection a
        recent search kept of it, and where to keep one (the last FILTERS_KEPT expressions)."""
        token = (self._rows.state, n_rows)
        if self._postings is None or self._postings[0] != token:
            self._postings = token, Postings(columns, n_rows, self.lookup_rows)
        text = key(filter)

        def test(rows):
            return evaluate(tree, columns, n_rows, self.lookup_rows, rows)

        def keep(selection):
            if text is not None and self._kept_max:
                self._filters[(*token, text)] = selection
                while len(self._filters) > self._kept_max:
                    self._filters.popitem(last=False)

        return filtered.Filter(tree, test, lambda: evaluate(tree, columns, n_rows, self.lookup_rows),
                               self._postings[1], self._kept_selection(text, n_rows), keep,
                               lambda deleted: filtered.exclusion(tree, columns, n_rows, deleted, self.bits))

    def check_filter(self, filter):
        """Raise HashretError (one line) where ``filter`` cannot be applied to this index."""
        if filter is not None:
            parse_filter(filter, self._rows.schema, self._n)

    def attribute_columns(self) -> list:
        """The index's attribute columns: [{"name", "kind", ...}] (labels' names, categories)."""
        return [dict(c) for c in self._rows.schema]

    def attributes(self, ids) -> list:
        """Each item's attributes as JSON values ({} where the index stores none)."""
        rows = self.rows_of(ids)
        cols = self._scan(lambda _s, _d, _i, columns: [columns.values_at(c["name"], rows) for c in columns.schema])
        return [{c["name"]: value_of(c, values[i]) for c, values in cols} for i in range(len(rows))]

    # -- ids, items, removal -------------------------------------------------------------
    def _ids_of_rows(self, rows):
        return self._rows.ids_of_rows(rows)

    def rows_of(self, ids) -> np.ndarray:
        """Rows of external ids (alive or removed); HashretError naming an unknown id."""
        ids = np.atleast_1d(np.asarray(ids))
        if ids.dtype == object or ids.dtype.kind not in "iu":
            raise HashretError(f"ids must be integers, got {ids.dtype}")
        if ids.dtype.kind == "u":
            ids = np.where(ids > _MAX_ID, -1, ids.astype(np.int64, casting="unsafe"))
        rows = self.lookup_rows(ids.astype(np.int64))
        bad = rows < 0
        if bad.any():
            raise NotFoundError(f"unknown id {int(ids[bad][0])}: it is not in the index")
        return rows

    def lookup_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of int64 ids, -1 for an id the index does not know (no error)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._id_mode != "explicit":
            return np.where((ids >= 0) & (ids < self._n), ids, -1)
        return self._id_map().lookup(ids)

    def _id_map(self) -> _IdMap:
        if self._idmap is None:
            self._idmap = _IdMap.of(self._rows.all_ids()) if self._id_mode == "explicit" else _IdMap()
        return self._idmap

    def contains(self, ext_id) -> bool:
        try:
            row = int(self.rows_of([ext_id])[0])
        except HashretError:
            return False
        return not self._tomb[row]

    def _alive_rows(self):
        if not self._tomb.any():
            return np.arange(self._n)
        return np.flatnonzero(np.frombuffer(self._tomb.unpack(), np.uint8)[: self._n] == 0)

    def remove(self, ids) -> int:
        """Mark items removed (a tombstone bit; the scan skips them). All ids must be known;
        nothing changes otherwise. Returns how many were alive and are now removed."""
        rows = self.rows_of(ids)
        new = bitarray(self._tomb)
        before = new.count()
        for r in rows:
            new[int(r)] = True
        removed = new.count() - before
        if removed:
            self._rows.write_tombstones(new)
        return removed

    def compact(self):
        """Drop removed items for good (rewrites the store in one transaction). Ids stay."""
        alive = self._alive_rows()
        packed = self.packed_codes(alive)
        ids = self._ids_of_rows(alive)
        columns = self._scan(lambda _s, _d, _i, cols: cols.rows(alive)) if self._rows.schema else None
        self._rows.rewrite(packed, ids, alive, columns)
        self._filters.clear()
        self._postings = None
        self._idmap = None

    def segments(self):
        """The codes as the scan reads them (:class:`~hashret.index.kernels.Segments`): for
        probes that time the machine on the very memory a search reads. On disk, valid while
        the index is open and unchanged."""
        return self._scan(lambda segs, _d, _i, _c: segs)

    def packed_codes(self, rows=None) -> np.ndarray:
        """Packed codes (N, bits/8) of ``rows`` (all rows when None), a copy."""
        rows = np.arange(self._n) if rows is None else np.asarray(rows)
        if len(rows) == 0:  # an index with no rows has no segments to take a word type from
            return np.zeros((0, self.n_bytes), dtype=np.uint8)
        words = self._scan(lambda segs, _d, _i, _c: segs.rows(rows))
        raw = words.view(np.uint8).reshape(len(rows), self.n_words * self.word_dtype.itemsize)
        return np.ascontiguousarray(raw[:, : self.n_bytes])

    def items(self, ids) -> list:
        """The payloads stored with ``ids`` (None where none was given)."""
        return self._rows.items_of_rows(self.rows_of(ids))

    @property
    def has_payloads(self) -> bool:
        """Whether any item was given a payload (if not, ``items`` is all None)."""
        return self._rows.has_items

    def verify(self) -> dict:
        """Check every checksum and link of the index on disk (see ``hashret verify``)."""
        return self._rows.verify()

    # -- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n - self._tomb.count()

    @property
    def n_rows(self) -> int:
        return self._n

    def info(self) -> dict:
        build = self.build_state
        code_bytes = int(self._n * self.n_words * self.word_dtype.itemsize)
        mapped = self._rows.in_place and self.n_words * self.word_dtype.itemsize == self.n_bytes
        return {"bits": self.bits, "items": len(self), "rows": self._n,
                "removed": self._tomb.count(), "id_mode": self._id_mode or "rows",
                "path": str(self.path) if self.path else None,
                "persistent": self._rows.persistent,
                "readonly": self._rows.readonly,
                "complete": build is None or build.get("state") == "complete",
                "build": build, "created": self.created, "generation": self.generation,
                "code_bytes": code_bytes, "mapped": mapped,
                "memory_bytes": 0 if mapped else code_bytes, "meta": self.info_meta,
                "attributes": [{"name": c["name"], "kind": c["kind"],
                                **({"labels": len(c["names"])} if c["kind"] == "labels" else {}),
                                **({"categories": len(c["categories"])} if c["kind"] == "category" else {})}
                               for c in self._rows.schema]}


FILTERS_KEPT = 8  # filter expressions whose selected rows a HashIndex keeps (a server's repeated filters)


def json_items(items, n: int) -> list:
    """Payloads as a list, each JSON-serialisable (checked before anything is written)."""
    import json

    try:
        items = list(items)
    except TypeError:
        raise HashretError("items must be a list with one JSON payload (or None) per code") from None
    check(len(items) == n, f"{len(items)} items for {n} codes: give one payload (or None) per code")
    for j, it in enumerate(items):
        try:
            json.dumps(it, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise HashretError(f"item {j} cannot be stored as JSON ({exc}): pass dicts, lists, "
                               "strings and finite numbers") from None
    return items
