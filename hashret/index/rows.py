"""Where an index's rows live: :class:`Memory` (one growing array of words) or :class:`Stored`
(an LMDB store, scanned through snapshots of its memory map). Both answer the same verbs --
append, write_tombstones, rewrite, scan, ids_of_rows, items_of_rows, refresh, verify, close --
so :class:`~hashret.index.hash_index.HashIndex` holds one and never asks which."""

from __future__ import annotations

import threading

import numpy as np
from bitarray import bitarray

from hashret.errors import HashretError, check
from hashret.index import kernels
from hashret.index.attributes import row_bytes, view
from hashret.index.store import LMDBStore


class Columns:
    """The attribute columns of one state of an index, as stored: ``schema`` and, per
    column, its chunks (first row, values) -- views, not copies."""

    def __init__(self, schema: list, chunked: list, chunk_rows: int):
        self.schema = schema
        self._by_name = {c["name"]: j for j, c in enumerate(schema)}
        self._chunked, self._rows = chunked, chunk_rows

    def chunks(self, name: str):
        j = self._by_name[name]
        col = self.schema[j]
        return col, [(i * self._rows, view(col, raw)) for i, raw in enumerate(self._chunked[j])]

    def values_at(self, name: str, rows) -> tuple:
        """(column record, the column's values at ``rows``), a copy."""
        j = self._by_name[name]
        return self.schema[j], view(self.schema[j], self._raw_at(j, np.asarray(rows, dtype=np.int64)).reshape(-1))

    def rows(self, rows) -> list:
        """Each column's raw (len(rows), bytes) values of ``rows`` (a copy), schema order."""
        rows = np.asarray(rows, dtype=np.int64)
        return [self._raw_at(j, rows) for j in range(len(self.schema))]

    def _raw_at(self, j: int, rows: np.ndarray) -> np.ndarray:
        w = row_bytes(self.schema[j])
        chunks = self._chunked[j]
        if len(chunks) == 1:
            return chunks[0].reshape(-1, w)[rows]
        got = np.empty((len(rows), w), dtype=np.uint8)
        c = rows // self._rows
        for chunk in np.unique(c).tolist():
            at = c == chunk
            got[at] = chunks[chunk].reshape(-1, w)[rows[at] - chunk * self._rows]
        return got


def word_layout(n_bytes: int):
    """(dtype, words per code) the scan reads a code as: the smallest unsigned word that holds
    a code of up to 4 bytes (so 16- and 32-bit codes take 2 and 4 bytes in memory, not 8),
    else 64-bit words."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if n_bytes <= np.dtype(dtype).itemsize:
            return np.dtype(dtype), 1
    return np.dtype(np.uint64), (n_bytes + 7) // 8


def to_words(packed: np.ndarray, dtype, n_words: int) -> np.ndarray:
    """(n, bytes) uint8 -> (n, n_words) words, zero padding (the same in every code, so it
    never changes a distance)."""
    n, nb = packed.shape
    width = n_words * dtype.itemsize
    if nb == width:
        return np.ascontiguousarray(packed).view(dtype.newbyteorder("<")).reshape(n, n_words)
    buf = np.zeros((n, width), dtype=np.uint8)
    buf[:, :nb] = packed
    return buf.view(dtype.newbyteorder("<")).reshape(n, n_words)


class Memory:
    """The rows of an in-memory index: one growing array of words, ids and payloads in
    memory. The same verbs as :class:`Stored`, so :class:`HashIndex` does not care which."""

    persistent = readonly = False
    generation = build = created = None

    def __init__(self, word_dtype, n_words: int):
        self.word_dtype, self.n_words = word_dtype, n_words
        self.words = np.zeros((1024, n_words), dtype=word_dtype)
        self.n = 0
        self.ids = None  # explicit ids: the id of each row
        self.id_mode = None
        self.tomb = bitarray()
        self.items: dict = {}
        self._segs = None  # the scan's view of ``words``, until rows change
        self._deleted_mask = None
        self.schema: list = []
        self.columns: list = []  # per column, (capacity, bytes) uint8, grown with ``words``
        self.state = 0  # bumped whenever rows, tombstones or attributes change (kept filters key on it)

    def append(self, packed, ids, items, mode, build=None, columns=None, schema=None):
        n = len(packed)
        need = self.n + n
        if schema is not None:
            if not self.schema:
                self.columns = [np.zeros((len(self.words), row_bytes(c)), np.uint8) for c in schema]
            self.schema = schema
        for j, col in enumerate(columns or ()):
            if need > len(self.columns[j]):
                grown = np.zeros((max(need, 2 * len(self.columns[j])), col.shape[1]), np.uint8)
                grown[: self.n] = self.columns[j][: self.n]
                self.columns[j] = grown
            self.columns[j][self.n:need] = col
        self.state += 1
        if need > len(self.words):
            grown = np.zeros((max(need, 2 * len(self.words)), self.n_words), dtype=self.word_dtype)
            grown[: self.n] = self.words[: self.n]
            self.words = grown
        self.words[self.n:need] = to_words(packed, self.word_dtype, self.n_words)
        if mode == "explicit":
            if self.ids is None:
                self.ids = np.zeros(max(need, 1024), dtype=np.int64)
            if need > len(self.ids):
                grown_ids = np.zeros(len(self.words), dtype=np.int64)
                grown_ids[: self.n] = self.ids[: self.n]
                self.ids = grown_ids
            self.ids[self.n:need] = ids
        if items is not None:
            self.items.update({self.n + j: it for j, it in enumerate(items) if it is not None})
        self.id_mode = mode
        self.n = need
        alive = bitarray(n)
        alive.setall(False)
        self.tomb.extend(alive)
        self._deleted_mask = None

    def write_tombstones(self, tomb):
        self.tomb = tomb
        self._deleted_mask = None
        self.state += 1

    def rewrite(self, packed, ids, alive, columns=None):
        items = {j: self.items[int(r)] for j, r in enumerate(alive) if int(r) in self.items}
        schema, state = self.schema, self.state
        self.__init__(self.word_dtype, self.n_words)
        self.state = state + 1
        self.schema = schema
        self.columns = [np.zeros((0, row_bytes(c)), np.uint8) for c in schema]
        if len(packed):
            self.append(packed, ids, None, "explicit", columns=columns)
        self.items = items

    def table(self) -> Columns:
        n = self.n
        return Columns(self.schema, [[c[:n].reshape(-1)] for c in self.columns], max(n, 1))

    def _deleted(self):
        # cached until the rows or tombstones change: tomb.any() walks every bit
        if self._deleted_mask is None:
            self._deleted_mask = (np.frombuffer(self.tomb.unpack(), dtype=np.uint8)[: self.n].copy()
                                  if self.tomb.any() else False)
        return None if self._deleted_mask is False else self._deleted_mask

    def scan(self, fn):
        segs = self._segs
        if segs is None or segs.n_rows != self.n or segs.arrays[0] is not self.words:
            segs = self._segs = kernels.Segments.of(self.words, self.n)
        return fn(segs, self._deleted(), self.ids_of_rows, self.table())

    def ids_of_rows(self, rows):
        rows = np.asarray(rows)
        if self.ids is None:
            return rows.astype(np.int64)
        return np.where(rows >= 0, self.ids[np.maximum(rows, 0)], -1).astype(np.int64)

    def all_ids(self):
        return self.ids[: self.n] if self.ids is not None else np.zeros(0, dtype=np.int64)

    def items_of_rows(self, rows) -> list:
        return [self.items.get(int(r)) for r in rows]

    @property
    def has_items(self) -> bool:
        return bool(self.items)

    def refresh(self):
        raise HashretError("an in-memory index has nothing on disk to refresh from")

    def verify(self):
        raise HashretError("an in-memory index has nothing on disk to verify")

    in_place = False  # scanned where the codes live (LMDB's map), not a copy

    def close(self):
        pass


class Stored:
    """The rows of an index on LMDB: a :class:`~hashret.index.snapshot.Snapshot` scanned where
    LMDB's map has it, replaced by a newer one after each commit (or :meth:`refresh`); the old
    one ends when its last scan does."""

    persistent = True

    def __init__(self, store: LMDBStore, snap):
        self.store = store
        self.snap = None
        self._swap = threading.Lock()
        self.adopt(snap)

    def adopt(self, snap):
        snap.segments = kernels.Segments(snap.codes, snap.chunk_size, snap.count)
        with self._swap:
            old, self.snap = self.snap, snap
        if old is not None:
            old.retire()

    def _next(self):
        self.adopt(self.store.snapshot(word_layout, previous=self.snap))

    @property
    def n(self) -> int:
        return self.snap.count

    @property
    def tomb(self):
        return self.snap.tomb

    @property
    def id_mode(self):
        return self.snap.meta["id_mode"]

    @property
    def readonly(self) -> bool:
        return bool(self.store.readonly)

    @property
    def generation(self):
        return self.snap.generation

    @property
    def build(self):
        return self.store.meta.get("build")

    @property
    def created(self):
        return self.snap.meta["created"]

    def append(self, packed, ids, items, mode, build=None, columns=None, schema=None):
        self.store.append(packed, ids, items, mode, build, columns, schema)  # commit first: memory follows disk
        self._next()

    @property
    def schema(self) -> list:
        return self.snap.schema

    state = generation  # what kept filter selections key on: every commit moves it

    def write_tombstones(self, tomb):
        self.store.write_tombstones(tomb)
        self._next()

    def rewrite(self, packed, ids, alive, columns=None):
        self.store.rewrite(packed, ids, alive, columns)
        self._next()

    def _with_snapshot(self, fn):
        """fn(snapshot), holding it so that no newer snapshot ends it meanwhile."""
        with self._swap:
            check(self.snap is not None, "the index is closed")
            snap = self.snap.acquire()
        try:
            return fn(snap)
        finally:
            snap.release()

    def scan(self, fn):
        return self._with_snapshot(lambda snap: fn(snap.segments, snap.deleted_mask(), snap.ids_of_rows,
                                                   Columns(snap.schema, snap.columns, snap.chunk_size)))

    def ids_of_rows(self, rows):
        return self.snap.ids_of_rows(np.asarray(rows))

    def all_ids(self):
        return self.snap.all_ids()

    def items_of_rows(self, rows) -> list:
        return self._with_snapshot(lambda snap: snap.items_of_rows(self.store, rows))

    @property
    def has_items(self) -> bool:
        return self.snap.has_items

    def refresh(self):
        """None if nothing was committed since this snapshot, else what the id map needs:
        {"same_rows": rows kept their place, "old_count": rows before}."""
        old = self.snap
        if self.store.read_meta()["generation"] == old.generation:
            return None
        self._next()
        new = self.snap
        return {"same_rows": new.meta["epoch"] == old.meta["epoch"] and new.count >= old.count,
                "old_count": old.count}

    def verify(self) -> dict:
        return self.store.verify()

    @property
    def in_place(self) -> bool:
        return self.snap is not None

    def close(self):
        if self.snap is not None:
            self.snap.retire()
            self.snap = None
        self.store.close()
