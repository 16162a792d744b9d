"""LMDB layout of a hashret index (one environment per index folder).

Named databases:
- ``meta``: JSON values -- format_version, bits, count (rows written, removed ones included),
  chunk_size, id_mode ("rows": an item's id is its row; "explicit"), info (modality, model
  fingerprint, config, ...), created; ``tombstones`` (bitarray bytes) once anything is removed.
- ``codes``: chunk number (8-byte big-endian) -> chunk_size packed codes, so loading 10^7
  codes is ~150 reads instead of 10^7.
- ``ids``: chunk number -> int64 external ids of those rows (explicit ids only);
  ``idrev``: external id -> row (ids both ways).
- ``items``: row -> JSON payload (optional).

Each appended batch is one write transaction that also moves ``count``: a crash leaves the
index as of the last committed batch, never half a chunk. Readers open read-only and read
one consistent snapshot while a writer appends.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import lmdb
import numpy as np
from bitarray import bitarray

from hashret.errors import HashretError, check

FORMAT_VERSION = 1
MAP_SIZE = 1 << 36  # virtual reservation only; the file grows with the data
_DBS = (b"meta", b"codes", b"ids", b"idrev", b"items")


# LMDB allows one open of an environment per process: stores on the same folder share it
_OPEN: dict = {}  # real path -> [env, dbs, refcount, opened_readonly]


def _acquire(path: Path, readonly: bool, create: bool):
    key = str(path.resolve())
    if key in _OPEN:
        entry = _OPEN[key]
        check(readonly or not entry[3], f"the index at {path} is open read-only in this process: "
              "close that HashIndex before opening it for writing")
        entry[2] += 1
        return entry[0], entry[1]
    try:
        env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(_DBS), readonly=readonly,
                        create=create, lock=True, readahead=True)
        dbs = {name.decode(): env.open_db(name, create=not readonly) for name in _DBS}
    except lmdb.Error as exc:
        raise HashretError(f"cannot open the index at {path} ({type(exc).__name__}: {exc}): the "
                           "folder is corrupt or not a hashret index") from None
    _OPEN[key] = [env, dbs, 1, readonly]
    return env, dbs


def _release(path: Path):
    key = str(path.resolve())
    entry = _OPEN.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] == 0:
        entry[0].close()
        del _OPEN[key]


def _key(n: int) -> bytes:
    return struct.pack(">Q", n)


def _id_key(i: int) -> bytes:
    return struct.pack(">q", i)


class LMDBStore:
    """Persistent side of :class:`hashret.index.HashIndex`; holds no codes in memory itself."""

    def __init__(self, path, readonly: bool, create: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if not create:
            check(self.path.is_dir(), f"index folder {self.path} does not exist: build it with "
                  "'hashret build-index' or HashIndex.create")
            check((self.path / "data.mdb").is_file(), f"{self.path} holds no index (no data.mdb): "
                  "pass the folder written by build-index")
        self.env, self.db = _acquire(self.path, readonly, create)

    def close(self):
        if self.env is not None:
            _release(self.path)
            self.env = None

    # -- meta ------------------------------------------------------------------------------
    def initialise(self, bits: int, chunk_size: int, info: dict):
        with self.env.begin(write=True) as txn:
            check(txn.get(b"format_version", db=self.db["meta"]) is None,
                  f"{self.path} already holds an index: open it, or choose a new folder")
            for key, value in (("format_version", FORMAT_VERSION), ("bits", bits), ("count", 0),
                               ("chunk_size", chunk_size), ("id_mode", None), ("info", info),
                               ("created", time.strftime("%Y-%m-%dT%H:%M:%S"))):
                txn.put(key.encode(), json.dumps(value).encode(), db=self.db["meta"])

    @staticmethod
    def _meta(txn, db, key, path):
        raw = txn.get(key.encode(), db=db)
        if raw is None:
            raise HashretError(f"the index at {path} lacks '{key}' in its meta: it is corrupt or "
                               "was not finished; rebuild it")
        return json.loads(bytes(raw))

    def read_all(self):
        """One snapshot: (meta dict, packed codes (count, bytes), ids or None, tombstones)."""
        try:
            with self.env.begin() as txn:
                meta_db = self.db["meta"]
                meta = {k: self._meta(txn, meta_db, k, self.path)
                        for k in ("format_version", "bits", "count", "chunk_size", "id_mode",
                                  "info", "created")}
                check(meta["format_version"] == FORMAT_VERSION,
                      f"the index at {self.path} has format {meta['format_version']}; this hashret "
                      f"reads {FORMAT_VERSION}: rebuild the index")
                count, cs, nbytes = meta["count"], meta["chunk_size"], meta["bits"] // 8
                codes = np.empty((count, nbytes), dtype=np.uint8)
                ids = np.empty(count, dtype=np.int64) if meta["id_mode"] == "explicit" else None
                for c in range((count + cs - 1) // cs):
                    rows = min(cs, count - c * cs)
                    buf = txn.get(_key(c), db=self.db["codes"])
                    check(buf is not None and len(buf) >= rows * nbytes,
                          f"the index at {self.path} is missing code chunk {c}: it is corrupt; rebuild it")
                    codes[c * cs:c * cs + rows] = np.frombuffer(buf, dtype=np.uint8,
                                                                count=rows * nbytes).reshape(rows, nbytes)
                    if ids is not None:
                        ibuf = txn.get(_key(c), db=self.db["ids"])
                        check(ibuf is not None and len(ibuf) >= rows * 8,
                              f"the index at {self.path} is missing id chunk {c}: it is corrupt")
                        ids[c * cs:c * cs + rows] = np.frombuffer(ibuf, dtype="<i8", count=rows)
                tomb = bitarray()
                raw = txn.get(b"tombstones", db=meta_db)
                if raw is not None:
                    tomb.frombytes(bytes(raw))
                tomb = tomb[:count]
                tomb.extend([False] * (count - len(tomb)))
        except lmdb.Error as exc:
            raise HashretError(f"cannot read the index at {self.path} ({exc}): it is corrupt") from None
        return meta, codes, ids, tomb

    # -- writes ----------------------------------------------------------------------------
    def append(self, packed: np.ndarray, ids, items, id_mode: str):
        """Append one batch in one transaction; returns the first new row."""
        self._writable()
        try:
            with self.env.begin(write=True) as txn:
                meta_db = self.db["meta"]
                count = self._meta(txn, meta_db, "count", self.path)
                cs = self._meta(txn, meta_db, "chunk_size", self.path)
                self._put_rows(txn, count, cs, packed, ids, items)
                txn.put(b"count", json.dumps(count + len(packed)).encode(), db=meta_db)
                txn.put(b"id_mode", json.dumps(id_mode).encode(), db=meta_db)
                return count
        except lmdb.MapFullError:
            self.env.set_mapsize(self.env.info()["map_size"] * 2)
            return self.append(packed, ids, items, id_mode)

    def _put_rows(self, txn, first_row, cs, packed, ids, items):
        nbytes = packed.shape[1]
        n = len(packed)
        pos = 0
        while pos < n:
            row = first_row + pos
            c, off = divmod(row, cs)
            take = min(cs - off, n - pos)
            head = b""
            if off:
                old = txn.get(_key(c), db=self.db["codes"])
                head = bytes(old)[:off * nbytes]
            txn.put(_key(c), head + packed[pos:pos + take].tobytes(), db=self.db["codes"])
            if ids is not None:
                ihead = bytes(txn.get(_key(c), db=self.db["ids"]) or b"")[:off * 8] if off else b""
                txn.put(_key(c), ihead + ids[pos:pos + take].astype("<i8").tobytes(), db=self.db["ids"])
            pos += take
        if ids is not None:
            with txn.cursor(db=self.db["idrev"]) as cur:
                added = cur.putmulti([(_id_key(int(i)), _key(first_row + j)) for j, i in enumerate(ids)],
                                     overwrite=False)[1]
            check(added == n, "an id of this batch is already in the index: ids must be unique")
        if items is not None:
            with txn.cursor(db=self.db["items"]) as cur:
                cur.putmulti([(_key(first_row + j), json.dumps(it).encode())
                              for j, it in enumerate(items) if it is not None])

    def write_tombstones(self, tomb: bitarray):
        self._writable()
        with self.env.begin(write=True) as txn:
            txn.put(b"tombstones", tomb.tobytes(), db=self.db["meta"])

    def rewrite(self, packed, ids, keep_rows):
        """Compaction: the kept rows, renumbered from 0, in one transaction."""
        self._writable()
        with self.env.begin(write=True) as txn:
            cs = self._meta(txn, self.db["meta"], "chunk_size", self.path)
            old_items = {}
            with txn.cursor(db=self.db["items"]) as cur:
                for k, v in cur:
                    old_items[struct.unpack(">Q", k)[0]] = json.loads(bytes(v))
            for name in ("codes", "ids", "idrev", "items"):
                txn.drop(self.db[name], delete=False)
            items = [old_items.get(int(r)) for r in keep_rows] if old_items else None
            if len(packed):
                self._put_rows(txn, 0, cs, packed, ids, items)
            txn.put(b"count", json.dumps(len(packed)).encode(), db=self.db["meta"])
            txn.put(b"id_mode", json.dumps("explicit").encode(), db=self.db["meta"])
            txn.delete(b"tombstones", db=self.db["meta"])

    def item(self, row: int):
        with self.env.begin() as txn:
            raw = txn.get(_key(row), db=self.db["items"])
        return None if raw is None else json.loads(bytes(raw))

    def row_of_id(self, ext_id: int):
        with self.env.begin() as txn:
            raw = txn.get(_id_key(int(ext_id)), db=self.db["idrev"])
        return None if raw is None else struct.unpack(">Q", raw)[0]

    def _writable(self):
        check(not self.readonly, f"the index at {self.path} is open read-only: open it with "
              "readonly=False to change it")
