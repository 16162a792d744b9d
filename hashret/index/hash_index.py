"""``HashIndex``: binary codes in memory (optionally persisted in LMDB), exact Hamming search.

Verbs after faiss: ``add``, ``search``, ``range_search``, ``remove``, ``write`` / ``open``.
Codes are packed bytes (``np.packbits`` order, +1 -> bit 1); real-valued or +-1 codes are
packed on the way in. Ids are int64: row numbers unless ``add`` is given explicit ids.
Search results: nearest first, ties by row (insertion order), id -1 / distance -1 where
fewer than k items exist.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from bitarray import bitarray

from hashret.errors import HashretError, check
from hashret.index import kernels
from hashret.index.bits import pack_codes
from hashret.index.store import LMDBStore

DEFAULT_CHUNK = 65536


def _to_words(packed: np.ndarray, n_words: int) -> np.ndarray:
    """(n, bytes) uint8 -> (n, n_words) uint64, zero padding (the same in every code, so it
    never changes a distance)."""
    n, nb = packed.shape
    if nb == n_words * 8:
        return np.ascontiguousarray(packed).view("<u8").reshape(n, n_words)
    buf = np.zeros((n, n_words * 8), dtype=np.uint8)
    buf[:, :nb] = packed
    return buf.view("<u8").reshape(n, n_words)


class HashIndex:
    """An exact Hamming-distance index over ``bits``-bit codes.

    ``HashIndex(bits)`` lives in memory; ``HashIndex.create(path, bits)`` and
    ``HashIndex.open(path, readonly=True)`` keep it in an LMDB folder, loaded into memory
    on open (one contiguous uint64 array) and appended to batch by batch.
    """

    def __init__(self, bits: int, info: dict | None = None):
        check(isinstance(bits, (int, np.integer)) and bits > 0 and bits % 8 == 0,
              f"code length {bits} is not a positive multiple of 8: use 16, 32, 64, 128, ...")
        self.bits = int(bits)
        self.n_bytes = self.bits // 8
        self.n_words = (self.n_bytes + 7) // 8
        self.info_meta = dict(info or {})
        self._words = np.zeros((1024, self.n_words), dtype=np.uint64)
        self._n = 0
        self._ids = None  # None: an item's id is its row
        self._id_mode = None
        self._sorted = None  # (sorted ids, their rows), built when needed
        self._tomb = bitarray()
        self._deleted_mask = None
        self._items: dict = {}
        self._store: LMDBStore | None = None
        self.path = None

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def create(cls, path, bits: int, info: dict | None = None, chunk_size: int = DEFAULT_CHUNK,
               exist_ok: bool = False) -> "HashIndex":
        """A new, empty index in the folder ``path`` (created). ``info``: JSON metadata kept
        with the index (modality, model fingerprint, ...)."""
        path = Path(path)
        if (path / "data.mdb").exists():
            check(exist_ok, f"{path} already holds an index: open it, or choose a new folder")
            return cls.open(path, readonly=False)
        index = cls(bits, info)
        path.mkdir(parents=True, exist_ok=True)
        index._store = LMDBStore(path, readonly=False, create=True)
        index._store.initialise(index.bits, int(chunk_size), index.info_meta)
        index.path = path
        return index

    @classmethod
    def open(cls, path, readonly: bool = True) -> "HashIndex":
        """Load the index in ``path``; ``readonly=False`` to add or remove."""
        store = LMDBStore(path, readonly=readonly)
        try:
            meta, packed, ids, tomb = store.read_all()
        except Exception:
            store.close()
            raise
        index = cls(meta["bits"], meta["info"])
        index._store = store
        index.path = Path(path)
        index._load_arrays(packed, ids, meta["id_mode"])
        index._tomb = tomb
        index.created = meta["created"]
        return index

    read = open  # faiss' read_index

    def write(self, path, chunk_size: int = DEFAULT_CHUNK) -> "HashIndex":
        """Persist an in-memory index to a new LMDB folder (removed rows dropped); returns it open."""
        out = HashIndex.create(path, self.bits, self.info_meta, chunk_size=chunk_size)
        alive = self._alive_rows()
        if len(alive):
            items = [self._item_row(int(r)) for r in alive]
            out.add(self.packed_codes(alive), ids=self._ids_of_rows(alive),
                    items=items if any(it is not None for it in items) else None)
        return out

    def close(self):
        if self._store is not None:
            self._store.close()
            self._store = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- adding --------------------------------------------------------------------------
    def _as_packed(self, codes, what="codes") -> np.ndarray:
        arr = np.asarray(codes)
        if arr.ndim == 1:
            arr = arr[None, :]
        check(arr.ndim == 2, f"{what} must be 2-D (items x bytes), got shape {arr.shape}")
        if arr.dtype == np.uint8:
            check(arr.shape[1] == self.n_bytes,
                  f"{what} have {arr.shape[1] * 8} bits ({arr.shape[1]} bytes) but the index holds "
                  f"{self.bits}-bit codes: encode with the model the index was built with")
            return np.ascontiguousarray(arr)
        check(arr.shape[1] == self.bits,
              f"{what} have {arr.shape[1]} bits but the index holds {self.bits}-bit codes: encode "
              "with the model the index was built with")
        return pack_codes(arr)

    def add(self, codes, ids=None, items=None) -> np.ndarray:
        """Append codes (packed uint8 (N, bits/8), or +-1 / real (N, bits)). ``ids``: int64
        external ids (unique; default: row numbers); ``items``: one JSON-able payload per code.
        On LMDB the batch is one transaction. Returns the ids given to the new items."""
        packed = self._as_packed(codes)
        n = len(packed)
        check(n > 0, "nothing to add: the code array is empty")
        mode = "explicit" if ids is not None else "rows"
        if self._id_mode not in (None, mode):
            raise HashretError("this index uses explicit ids: pass ids to add" if self._id_mode == "explicit"
                               else "this index uses row numbers as ids: add without ids")
        if ids is not None:
            ids = np.asarray(ids)
            check(ids.ndim == 1 and len(ids) == n, f"{len(ids)} ids for {n} codes")
            check(ids.dtype.kind in "iu", "ids must be integers")
            ids = ids.astype(np.int64)
            check(len(np.unique(ids)) == n, "the ids of this batch repeat: ids must be unique")
            if self._n:
                dup = np.isin(ids, self._ids[: self._n])
                if dup.any():
                    raise HashretError(f"id {int(ids[dup][0])} is already in the index: ids must be unique")
        if items is not None:
            items = list(items)
            check(len(items) == n, f"{len(items)} items for {n} codes")
        if self._store is not None:
            self._store.append(packed, ids, items, mode)  # commit first: memory follows disk
        first = self._n
        self._append_arrays(packed, ids, mode)
        if items is not None:
            if self._store is None:
                self._items.update({first + j: it for j, it in enumerate(items) if it is not None})
        return ids if ids is not None else np.arange(first, first + n, dtype=np.int64)

    def _append_arrays(self, packed, ids, mode):
        n = len(packed)
        need = self._n + n
        if need > len(self._words):
            grown = np.zeros((max(need, 2 * len(self._words)), self.n_words), dtype=np.uint64)
            grown[: self._n] = self._words[: self._n]
            self._words = grown
        self._words[self._n:need] = _to_words(packed, self.n_words)
        if mode == "explicit":
            if self._ids is None:
                self._ids = np.zeros(max(need, 1024), dtype=np.int64)
            if need > len(self._ids):
                grown_ids = np.zeros(len(self._words), dtype=np.int64)
                grown_ids[: self._n] = self._ids[: self._n]
                self._ids = grown_ids
            self._ids[self._n:need] = ids
        self._id_mode = mode
        self._n = need
        self._tomb.extend([False] * n)
        self._deleted_mask = None
        self._sorted = None

    def _load_arrays(self, packed, ids, mode):
        self._words = np.zeros((max(len(packed), 1024), self.n_words), dtype=np.uint64)
        self._n = 0
        self._ids, self._id_mode = None, None
        if len(packed):
            self._append_arrays(packed, ids, mode)
        self._id_mode = mode
        self._tomb = bitarray(self._n)
        self._tomb.setall(False)

    # -- searching -----------------------------------------------------------------------
    def _query_words(self, queries):
        packed = self._as_packed(queries, "queries")
        check(len(packed) > 0, "the query is empty: give at least one query code")
        return _to_words(packed, self.n_words)

    def _deleted(self):
        if not self._tomb.any():
            return None
        if self._deleted_mask is None:
            self._deleted_mask = np.frombuffer(self._tomb.unpack(), dtype=np.uint8)[: self._n].copy()
        return self._deleted_mask

    def search(self, queries, k: int):
        """(distances, ids), int arrays of shape (Q, k), nearest first, ties by row."""
        check(isinstance(k, (int, np.integer)) and k > 0, f"k must be a positive integer, got {k}")
        q = self._query_words(queries)
        if self._n == 0:
            return (np.full((len(q), k), -1, dtype=np.int32), np.full((len(q), k), -1, dtype=np.int64))
        dist, rows = kernels.topk(self._words, self._n, q, int(k), self.bits, self._deleted())
        return dist, self._ids_of_rows(rows)

    def range_search(self, queries, radius: int):
        """All items within Hamming distance ``radius``: (lims, distances, ids) as in faiss;
        query i's results are ``[lims[i], lims[i+1])``, by distance then row."""
        check(isinstance(radius, (int, np.integer)) and radius >= 0,
              f"radius must be a non-negative integer, got {radius}")
        q = self._query_words(queries)
        if self._n == 0:
            return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        lims, dist, rows = kernels.range_search(self._words, self._n, q, int(radius), self.bits,
                                                self._deleted())
        return lims, dist, self._ids_of_rows(rows)

    # -- ids, items, removal -------------------------------------------------------------
    def _ids_of_rows(self, rows):
        rows = np.asarray(rows)
        if self._ids is None:
            return rows.astype(np.int64)
        out = np.where(rows >= 0, self._ids[np.maximum(rows, 0)], -1)
        return out.astype(np.int64)

    def rows_of(self, ids) -> np.ndarray:
        """Rows of external ids (alive or removed); HashretError naming an unknown id."""
        ids = np.atleast_1d(np.asarray(ids))
        check(ids.dtype.kind in "iu", "ids must be integers")
        ids = ids.astype(np.int64)
        if self._ids is None:
            rows = ids
            ok = (rows >= 0) & (rows < self._n)
        else:
            if self._sorted is None:
                order = np.argsort(self._ids[: self._n], kind="stable")
                self._sorted = (self._ids[: self._n][order], order)
            sid, srow = self._sorted
            if len(sid) == 0:
                ok, rows = np.zeros(len(ids), dtype=bool), np.full(len(ids), -1)
            else:
                pos = np.clip(np.searchsorted(sid, ids), 0, len(sid) - 1)
                ok = sid[pos] == ids
                rows = np.where(ok, srow[pos], -1)
        if not ok.all():
            raise HashretError(f"unknown id {int(ids[~ok][0])}: it is not in the index")
        return rows

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
        if removed and self._store is not None:
            self._store.write_tombstones(new)
        self._tomb = new
        self._deleted_mask = None
        return removed

    def compact(self):
        """Drop removed items for good (rewrites the store in one transaction). Ids stay."""
        alive = self._alive_rows()
        packed = self.packed_codes(alive)
        ids = self._ids_of_rows(alive)
        if self._store is not None:
            self._store.rewrite(packed, ids, alive)
        else:
            self._items = {j: self._items[int(r)] for j, r in enumerate(alive) if int(r) in self._items}
        self._load_arrays(np.zeros((0, self.n_bytes), np.uint8), None, None)
        if len(packed):
            self._append_arrays(packed, ids, "explicit")

    def packed_codes(self, rows=None) -> np.ndarray:
        """Packed codes (N, bits/8) of ``rows`` (all rows when None)."""
        rows = np.arange(self._n) if rows is None else np.asarray(rows)
        raw = self._words[rows].view(np.uint8).reshape(len(rows), self.n_words * 8)
        return np.ascontiguousarray(raw[:, : self.n_bytes])

    def _item_row(self, row: int):
        if self._store is not None:
            return self._store.item(row)
        return self._items.get(row)

    def items(self, ids) -> list:
        """The payloads stored with ``ids`` (None where none was given)."""
        return [self._item_row(int(r)) for r in self.rows_of(ids)]

    # -- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._n - self._tomb.count()

    @property
    def n_rows(self) -> int:
        return self._n

    def info(self) -> dict:
        return {"bits": self.bits, "items": len(self), "rows": self._n,
                "removed": self._tomb.count(), "id_mode": self._id_mode or "rows",
                "path": str(self.path) if self.path else None,
                "persistent": self._store is not None,
                "readonly": bool(self._store and self._store.readonly),
                "memory_bytes": int(self._n * self.n_words * 8), "meta": self.info_meta}
