"""LMDB layout of a hashret index (format 3; one environment per index folder).

Named databases:
- ``meta``: ``meta`` -> one JSON record: format_version, bits, count (rows written, removed
  ones included), chunk_size, id_mode ("rows": an item's id is its row; "explicit"), info
  (modality, model fingerprint, config, ...), created, generation (bumped by every write
  transaction), build (None, or the progress of ``build_index``: state "partial" or
  "complete", what it encodes, how many rows it has committed), epoch (bumped by every
  compaction, which renumbers rows: a reader that sees it unchanged knows old rows kept their
  place); ``tombstones`` -> bitarray
  bytes, once anything is removed.
- ``codes``: chunk number (8-byte big-endian) -> chunk_size packed codes, so loading 10^7
  codes is ~150 reads instead of 10^7.
- ``ids``: chunk number -> int64 external ids of those rows (explicit ids only). The way
  back (id -> row, and refusing a known id) is kept in memory by ``HashIndex``, built from
  these verified chunks: a second, unsealed copy on disk would be one more thing to damage.
- ``items``: row -> JSON payload (optional); ``present``: chunk number -> a bitmap of the
  chunk's rows that have one, so a payload lost to damage is told from one never given.
- ``attrs`` (optional; added after format 3's first release): (column number, chunk number)
  -> that attribute column's values for the chunk's rows, fixed-width (see
  :mod:`hashret.index.attributes`); the columns are the meta's ``attributes`` list.

Every value ends in an 8-byte XXH3-64 of the payload, seeded by the database name and the key,
checked on every read: a flipped, truncated, moved or edited value is reported as corrupt,
never served, and never re-sealed by a later write. (Format 2 sealed with CRC32, which zlib
computes at ~3 GB/s; XXH3 runs at memory speed, so checking every code chunk no longer costs
more than a scan -- see ``Snapshot``.) Before LMDB maps ``data.mdb`` its header is read to make
sure the file is LMDB's and as long as its last commit says (a truncated file would
otherwise kill the process with SIGBUS).

Each write is one transaction that also moves ``count`` and ``generation``: a crash leaves
the index as of the last commit. One writer at a time holds ``writer.lock`` (flock, so a
second writer is refused in this process as in another, and a dead writer's lock is free);
each write transaction also checks that ``generation`` is where this writer left it.
Readers take no lock and read one consistent snapshot while a writer appends.

Codes are never copied out of LMDB: a ``Snapshot`` holds one read transaction open and
views each code chunk (one contiguous value) where LMDB's memory map has it, so opening
costs one lookup per chunk plus the checksums, private memory stays small, and every
process that opens the index shares one page cache. LMDB never reuses a page that a live
read transaction can see, which is what keeps the views valid; a newer snapshot is taken
before the old one ends, so a chunk found at the same address with the same length is the
same, unchanged value and is not checked again.
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from pathlib import Path

import lmdb
import numpy as np
from bitarray import bitarray

from hashret.errors import CorruptError, HashretError, check, is_integer, os_problem

from hashret.index.locking import LOCK_NAME, OPEN_ENVS, WriterLock, close_env, has_db, open_env
from hashret.index.attributes import check_schema, row_bytes
from hashret.index.pages import (CRC, DBS, SEAL, check_lmdb_file, chunk_key, column_key, digest, fresh_problem, seal,
                                 walk_tables)
from hashret.index.snapshot import Snapshot

FORMAT_VERSION = 3
MAX_BITS = 1 << 16
MAX_CHUNK = 1 << 24
# every file the store writes in an index folder (what undoing a fresh build may delete)
FILES = ("data.mdb", "lock.mdb", LOCK_NAME)


def ascending(ids: np.ndarray) -> bool:
    """Strictly ascending: unique and already sorted (a build from dataset rows)."""
    return len(ids) < 2 or bool((ids[1:] > ids[:-1]).all())


def all_unique(ids: np.ndarray) -> bool:
    """No id twice; ascending ids need no sort. (np.unique hashes and is ~4x slower than a
    sort here.)"""
    if ascending(ids):
        return True
    s = np.sort(ids)
    return not (s[1:] == s[:-1]).any()


# -- the writer lock ---------------------------------------------------------------------------


def is_initialised(path) -> bool:
    """Whether ``path`` holds a committed hashret index (a ``meta`` record), without opening it
    for writing. False for no data.mdb, or for one holding hashret's tables but no meta (a
    create that died before its first commit); an LMDB file of someone else is refused."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return False
    entry = OPEN_ENVS.get(str(path.resolve()))
    if entry is not None:  # open in this process: ask that environment
        with entry[0].begin() as txn:
            return txn.get(b"meta", db=entry[1]["meta"]) is not None
    check_lmdb_file(path)
    try:
        env = lmdb.open(str(path), max_dbs=len(DBS) + 1, readonly=True, lock=False, create=False)
    except lmdb.Error as exc:
        raise fresh_problem(path, f"LMDB cannot open it ({os_problem(exc)})") from None
    try:
        present = [n for n in DBS if has_db(env, n)]
        if not present and env.stat()["entries"] == 0:
            return False  # an empty LMDB file: the create died before its tables were made
        if len(present) != len(DBS):
            raise HashretError(f"{path}/data.mdb is an LMDB file without hashret's tables: it is not "
                               "a hashret index; choose another folder")
        with env.begin() as txn:
            return txn.get(b"meta", db=env.open_db(b"meta", txn=txn, create=False)) is not None
    except lmdb.Error as exc:
        raise fresh_problem(path, f"LMDB cannot read it ({os_problem(exc)})") from None
    finally:
        env.close()


def _validate_meta(meta, path: Path) -> dict:
    """Type and range of every field; a CorruptError naming the first bad one."""
    def bad(field, why):
        return fresh_problem(path, f"its meta field '{field}' {why}")

    if not isinstance(meta, dict):
        raise bad("meta", "is not a JSON object")
    for f in ("format_version", "bits", "count", "chunk_size", "id_mode", "info", "created",
              "generation", "build", "removed", "epoch"):
        if f not in meta:
            raise bad(f, "is missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise HashretError(f"the index at {path} has format {meta['format_version']}; this hashret "
                           f"reads format {FORMAT_VERSION}: rebuild it with 'hashret build-index'")

    def integer(f, lo, hi):
        v = meta[f]
        if not is_integer(v) or not lo <= v <= hi:
            raise bad(f, f"is {v!r}, not an integer in [{lo}, {hi}]")

    integer("bits", 8, MAX_BITS)
    if meta["bits"] % 8:
        raise bad("bits", f"is {meta['bits']}, not a multiple of 8")
    integer("chunk_size", 1, MAX_CHUNK)
    integer("count", 0, 1 << 48)
    integer("generation", 0, 1 << 62)
    integer("removed", 0, meta["count"])
    integer("epoch", 0, 1 << 62)
    if meta["id_mode"] not in (None, "rows", "explicit"):
        raise bad("id_mode", f"is {meta['id_mode']!r}, not null, 'rows' or 'explicit'")
    if not isinstance(meta["info"], dict):
        raise bad("info", "is not a JSON object")
    if not isinstance(meta["created"], str):
        raise bad("created", "is not a string")
    schema_problem = check_schema(meta.get("attributes", []))
    if schema_problem:
        raise bad("attributes", schema_problem)
    build = meta["build"]
    if build is not None and not (isinstance(build, dict) and build.get("state") in ("partial", "complete")):
        raise bad("build", "is not null or a record with state 'partial' or 'complete'")
    return meta


def _refuse_format_2(raw, path: Path):
    """A meta record sealed the format-2 way (CRC32) gets the rebuild message, not 'corrupt'."""
    raw = bytes(raw)
    if len(raw) > 4 and zlib.crc32(raw[:-4], zlib.crc32(b"meta", zlib.crc32(b"meta"))) == CRC.unpack(raw[-4:])[0]:
        raise HashretError(f"the index at {path} has format 2; this hashret reads format "
                           f"{FORMAT_VERSION}: rebuild it with 'hashret build-index'")


class LMDBStore:
    """Persistent side of :class:`hashret.index.HashIndex`; holds no codes in memory itself."""

    def __init__(self, path, readonly: bool, create: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.env = None
        self.lock = None
        self.meta = None
        self.generation = None
        if not create:
            check(self.path.is_dir(), f"index folder {self.path} does not exist: build it with "
                  "'hashret build-index' or HashIndex.create")
            check((self.path / "data.mdb").is_file(), f"{self.path} holds no index (no data.mdb): "
                  "pass the folder written by build-index")
        if not readonly:
            self.lock = WriterLock(self.path)
        try:
            self.env, self.db = open_env(self.path, readonly, create)
        except BaseException:
            self._unlock()
            raise

    def _unlock(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self):
        if self.env is not None:
            close_env(self.path)
            self.env = None
        self._unlock()

    def corrupt(self, what: str) -> CorruptError:
        return fresh_problem(self.path, what)

    # -- sealed values -------------------------------------------------------------------------
    def unseal(self, space: str, key: bytes, buf, what: str, expect: int | None = None):
        """The payload of a sealed value (a view valid inside its transaction)."""
        if buf is None:
            raise self.corrupt(f"{what} is missing")
        n = len(buf)
        if expect is not None and n != expect + SEAL.size:
            raise self.corrupt(f"{what} holds {n - SEAL.size} bytes where {expect} are expected")
        if n < SEAL.size:
            raise self.corrupt(f"{what} is truncated")
        view = memoryview(buf)
        payload = view[:n - SEAL.size]
        if digest(space, key, payload) != SEAL.unpack(view[n - SEAL.size:])[0]:
            raise self.corrupt(f"{what} fails its checksum")
        return payload

    def meta_in(self, txn) -> dict:
        raw = txn.get(b"meta", db=self.db["meta"])
        if raw is None:
            raise HashretError(f"{self.path} holds no committed index (its creation did not finish): "
                               "delete the folder, or build into it again")
        try:
            payload = self.unseal("meta", b"meta", raw, "its meta record")
        except CorruptError:
            _refuse_format_2(raw, self.path)
            raise
        try:
            meta = json.loads(bytes(payload))
        except ValueError:
            raise self.corrupt("its meta record is not JSON") from None
        return _validate_meta(meta, self.path)

    def _put_meta(self, txn, meta):
        txn.put(b"meta", seal("meta", b"meta", json.dumps(meta).encode()), db=self.db["meta"])

    def tombstones_in(self, txn, meta: dict) -> bitarray:
        """Removed rows. The record covers the rows that existed when it was written (an
        8-byte row count, then the bits); rows appended since are alive."""
        count, removed = meta["count"], meta["removed"]
        tomb = bitarray(count)
        tomb.setall(False)
        raw = txn.get(b"tombstones", db=self.db["meta"])
        if raw is None and removed:
            raise self.corrupt(f"the tombstones of its {removed} removed rows are missing")
        if raw is not None:
            what = "the tombstones (removed rows)"
            payload = self.unseal("meta", b"tombstones", raw, what)
            if len(payload) < 8:
                raise self.corrupt(f"{what} are truncated")
            covered = struct.unpack("<Q", payload[:8])[0]
            if covered > count or len(payload) != 8 + (covered + 7) // 8:
                raise self.corrupt(f"{what} cover {covered} rows in {len(payload) - 8} bytes, the "
                                   f"index has {count} rows")
            bits = bitarray()
            bits.frombytes(bytes(payload[8:]))
            tomb[:covered] = bits[:covered]
            if tomb.count() != removed:
                raise self.corrupt(f"the tombstones mark {tomb.count()} rows removed, its meta {removed}")
        return tomb

    @staticmethod
    def _tombstone_payload(tomb: bitarray) -> bytes:
        return struct.pack("<Q", len(tomb)) + tomb.tobytes()

    # -- meta --------------------------------------------------------------------------------
    def initialise(self, bits: int, chunk_size: int, info: dict, build: dict | None = None):
        self._writable()
        meta = {"format_version": FORMAT_VERSION, "bits": int(bits), "count": 0,
                "chunk_size": int(chunk_size), "id_mode": None, "info": info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "generation": 1, "build": build,
                "removed": 0, "epoch": 0}
        _validate_meta(json.loads(json.dumps(meta)), self.path)
        try:
            with self.env.begin(write=True) as txn:
                check(txn.get(b"meta", db=self.db["meta"]) is None,
                      f"{self.path} already holds an index: open it, or choose a new folder")
                self._put_meta(txn, meta)
        except lmdb.Error as exc:
            raise HashretError(f"cannot create the index at {self.path}: {os_problem(exc)}") from None
        self.meta, self.generation = meta, 1

    def read_meta(self) -> dict:
        with self._reading() as txn:
            self.meta = self.meta_in(txn)
        return self.meta

    def _reading(self):
        store = self

        class _Txn:
            def __enter__(self):
                self.txn = store.env.begin(buffers=True)
                return self.txn

            def __exit__(self, kind, exc, tb):
                self.txn.abort()
                if isinstance(exc, lmdb.Error):
                    raise store.corrupt(f"LMDB cannot read it ({os_problem(exc)})") from None
                return False

        return _Txn()

    def snapshot(self, layout, previous: "Snapshot | None" = None, verify: bool = True) -> "Snapshot":
        """The index as of now, read in place (see :class:`Snapshot`)."""
        try:
            snap = Snapshot(self, layout, previous, verify)
        except lmdb.Error as exc:
            raise self.corrupt(f"LMDB cannot read it ({os_problem(exc)})") from None
        if self.generation is None or self.readonly:
            # a writer keeps the generation its own commits left: the next one checks it
            self.meta, self.generation = snap.meta, snap.generation
        return snap

    # -- writes ------------------------------------------------------------------------------
    def _transact(self, what: str, fn):
        """Run ``fn(txn, meta)`` in one write transaction that first checks the disk is where
        this writer left it, then bumps ``generation``; LMDB failures become one line."""
        self._writable()
        for _ in range(12):
            try:
                with self.env.begin(write=True, buffers=True) as txn:
                    meta = self.meta_in(txn)
                    if meta["generation"] != self.generation:
                        raise HashretError(
                            f"the index at {self.path} was changed by another writer since this one "
                            f"read it (generation {self.generation} -> {meta['generation']}): "
                            f"nothing of this {what} was written; reopen the index and retry")
                    result = fn(txn, meta)
                    meta["generation"] += 1
                    self._put_meta(txn, meta)
                self.meta, self.generation = meta, meta["generation"]
                return result
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
            except (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.InvalidError, lmdb.BadValsizeError) as exc:
                raise self.corrupt(f"LMDB found its own structure damaged while writing ({exc}); "
                                   f"nothing of this {what} was written") from None
            except lmdb.Error as exc:
                raise HashretError(f"cannot {what} in the index at {self.path}: {self._write_problem(exc)}; "
                                   f"nothing of it was written, the index holds what it held "
                                   f"({self.meta['count'] if self.meta else '?'} rows)") from None
        raise HashretError(f"cannot {what} in the index at {self.path}: its map cannot grow further")

    def _write_problem(self, exc) -> str:
        """LMDB reports a short write on a full disk as EIO; the file system says what it was."""
        problem = os_problem(exc)
        try:
            st = os.statvfs(self.path)
            free = st.f_bavail * st.f_frsize
        except OSError:
            return problem
        if problem in ("input/output error", "no space left on device") and free < (64 << 20):
            return f"no space left on device ({free // 1024} KiB free); free some space"
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if problem == "input/output error" and limit != resource.RLIM_INFINITY:
            return f"file size limit reached (ulimit -f: {limit} bytes); raise it"
        return problem

    def append(self, packed: np.ndarray, ids, items, id_mode: str, build: dict | None = None,
               columns=None, schema=None):
        """Append one batch in one transaction; returns the first new row. ``build``: fields
        merged into the meta's build record in the same transaction; ``columns``: the rows'
        attribute values, (n, bytes) uint8 per column of ``schema`` (stored as the meta's)."""
        def fn(txn, meta):
            count = meta["count"]
            if schema is not None:
                shape = [(c["name"], c["kind"]) for c in schema]
                check(count == 0 or shape == [(c["name"], c["kind"]) for c in meta.get("attributes", [])],
                      "internal: new attribute columns for an index that has rows")
                meta["attributes"] = schema
            self._put_rows(txn, count, meta["chunk_size"], packed, ids, items, columns)
            meta["count"] = count + len(packed)
            meta["id_mode"] = id_mode
            if build is not None:
                meta["build"] = {**(meta["build"] or {}), **build}
            return count

        return self._transact("add", fn)

    def _put_rows(self, txn, first_row, cs, packed, ids, items, columns=None):
        nbytes = packed.shape[1]
        n = len(packed)
        for j, col in enumerate(columns or ()):
            self._put_column(txn, j, first_row, cs, col)
        pos = 0
        while pos < n:
            row = first_row + pos
            c, off = divmod(row, cs)
            take = min(cs - off, n - pos)
            lo = c * cs
            head = b""
            if off:  # re-sealing a chunk: check it first, so damage is never sealed anew
                head = bytes(self.unseal("codes", chunk_key(c), txn.get(chunk_key(c), db=self.db["codes"]),
                                          f"code chunk {c} (rows {lo}..{lo + off - 1})", expect=off * nbytes))
            txn.put(chunk_key(c), seal("codes", chunk_key(c), head + packed[pos:pos + take].tobytes()),
                    db=self.db["codes"])
            if ids is not None:
                ihead = b""
                if off:
                    ihead = bytes(self.unseal("ids", chunk_key(c), txn.get(chunk_key(c), db=self.db["ids"]),
                                               f"id chunk {c} (rows {lo}..{lo + off - 1})", expect=off * 8))
                txn.put(chunk_key(c), seal("ids", chunk_key(c), ihead + ids[pos:pos + take].astype("<i8").tobytes()),
                        db=self.db["ids"])
            pos += take
        if items is not None:
            with txn.cursor(db=self.db["items"]) as cur:
                cur.putmulti([(chunk_key(first_row + j), seal("items", chunk_key(first_row + j), json.dumps(it).encode()))
                              for j, it in enumerate(items) if it is not None])
            given = first_row + np.flatnonzero([it is not None for it in items])
            for c in np.unique(given // cs).tolist():
                bm = self._presence(txn, c, cs)
                for r in given[given // cs == c].tolist():
                    bm[r - c * cs] = True
                txn.put(chunk_key(c), seal("present", chunk_key(c), bm.tobytes()), db=self.db["present"])

    def _put_column(self, txn, j: int, first_row: int, cs: int, values: np.ndarray):
        """Attribute column j's values (n, bytes) for rows first_row.., chunk by chunk, each
        chunk re-sealed whole (its earlier rows checked first, as for codes)."""
        width = values.shape[1]
        pos, n = 0, len(values)
        while pos < n:
            c, off = divmod(first_row + pos, cs)
            take = min(cs - off, n - pos)
            k = column_key(j, c)
            head = b""
            if off:
                head = bytes(self.unseal("attrs", k, txn.get(k, db=self.db["attrs"]),
                                         f"attribute column {j} chunk {c} (rows {c * cs}..{c * cs + off - 1})",
                                         expect=off * width))
            txn.put(k, seal("attrs", k, head + values[pos:pos + take].tobytes()), db=self.db["attrs"])
            pos += take

    def _presence(self, txn, c: int, cs: int) -> bitarray:
        """Which rows of chunk ``c`` have a payload (verified; all False when none has)."""
        bm = bitarray(cs)
        bm.setall(False)
        raw = txn.get(chunk_key(c), db=self.db["present"])
        if raw is not None:
            bm = bitarray()
            bm.frombytes(bytes(self.unseal("present", chunk_key(c), raw, f"the payload map of chunk {c}",
                                            expect=(cs + 7) // 8)))
            bm = bm[:cs]
        return bm

    def write_tombstones(self, tomb: bitarray):
        def fn(txn, meta):
            check(len(tomb) == meta["count"], "internal: tombstones do not cover every row")
            meta["removed"] = tomb.count()
            txn.put(b"tombstones", seal("meta", b"tombstones", self._tombstone_payload(tomb)),
                    db=self.db["meta"])

        self._transact("remove", fn)

    def rewrite(self, packed, ids, keep_rows, columns=None):
        """Compaction: the kept rows (with their attribute ``columns``), renumbered from 0,
        in one transaction."""
        def fn(txn, meta):
            broken = walk_tables(self.path, txn.id() - 1, list(self.db))
            if broken:
                table, why = next(iter(broken.items()))
                raise self.corrupt(f"LMDB's pages of the '{table}' table are damaged: {why}")
            old_items = {}
            with txn.cursor(db=self.db["items"]) as cur:
                for k, v in cur:
                    row = struct.unpack(">Q", k)[0]
                    old_items[row] = json.loads(bytes(self.unseal("items", bytes(k), v, f"the payload of row {row}")))
            for name in ("codes", "ids", "items", "present", "attrs"):
                txn.drop(self.db[name], delete=False)
            items = [old_items.get(int(r)) for r in keep_rows] if old_items else None
            if len(packed):
                self._put_rows(txn, 0, meta["chunk_size"], packed, ids, items, columns)
            meta["count"] = len(packed)
            meta["id_mode"] = "explicit"
            meta["removed"] = 0
            meta["epoch"] += 1
            txn.delete(b"tombstones", db=self.db["meta"])

        self._transact("compact", fn)

    # -- point reads ---------------------------------------------------------------------------
    def items_of_rows(self, rows, txn=None) -> list:
        """Payloads of rows (None where none was given); a payload the chunk's map lists but
        the table lacks, or the reverse, is damage. ``txn``: read in this (a snapshot's)
        transaction rather than a new one."""
        if txn is not None:
            return self._items_in(txn, rows, self.meta["chunk_size"])
        with self._reading() as txn:
            return self._items_in(txn, rows, self.meta_in(txn)["chunk_size"])

    def _items_in(self, txn, rows, cs) -> list:
        out = []
        maps: dict = {}
        for r in rows:
            r = int(r)
            c = r // cs
            if c not in maps:
                maps[c] = self._presence(txn, c, cs)
            k = chunk_key(r)
            raw = txn.get(k, db=self.db["items"])
            if (raw is None) == maps[c][r - c * cs]:
                raise self.corrupt(f"the payload of row {r} is {'missing' if raw is None else 'not listed in its chunk map'}")
            out.append(None if raw is None else
                       json.loads(bytes(self.unseal("items", k, raw, f"the payload of row {r}"))))
        return out

    def _writable(self):
        check(not self.readonly, f"the index at {self.path} is open read-only: open it with "
              "readonly=False to change it")

    # -- the whole check -----------------------------------------------------------------------
    def verify(self) -> dict:
        """Check every sealed value and the links between them; never raises on damage.
        Returns {"ok", "problems": [one line each], "rows", "chunks", "items", "ids"}."""
        problems: list[str] = []
        report = {"ok": False, "problems": problems, "rows": None, "chunks": 0, "items": 0, "ids": 0}
        try:
            with self.env.begin(buffers=True) as txn:
                broken = walk_tables(self.path, txn.id(), list(self.db))
                for table, why in broken.items():
                    problems.append(f"LMDB's pages of the '{table}' table are damaged: {why}")
                if broken:
                    return report  # a cursor over damaged pages may abort the process
                try:
                    meta = self.meta_in(txn)
                except HashretError as exc:
                    problems.append(_strip(exc))
                    return report
                count, cs, nbytes = meta["count"], meta["chunk_size"], meta["bits"] // 8
                report["rows"] = count
                n_chunks = (count + cs - 1) // cs
                explicit = meta["id_mode"] == "explicit"
                ids = np.full(count, -1, dtype=np.int64)
                for space in ("codes", "ids") if explicit else ("codes",):
                    size = nbytes if space == "codes" else 8
                    seen = set()
                    with txn.cursor(db=self.db[space]) as cur:
                        for k, v in cur:
                            c = struct.unpack(">Q", k)[0] if len(k) == 8 else -1
                            if not 0 <= c < n_chunks:
                                problems.append(f"{space} holds an unexpected chunk key {bytes(k).hex()}")
                                continue
                            seen.add(c)
                            lo = c * cs
                            rows = min(cs, count - lo)
                            what = f"{'code' if space == 'codes' else 'id'} chunk {c} (rows {lo}..{lo + rows - 1})"
                            try:
                                payload = self.unseal(space, bytes(k), v, what, expect=rows * size)
                                report["chunks"] += space == "codes"
                                if space == "ids":
                                    ids[lo:lo + rows] = np.frombuffer(payload, "<i8")
                            except CorruptError as exc:
                                problems.append(_strip(exc))
                    for c in sorted(set(range(n_chunks)) - seen):
                        lo = c * cs
                        problems.append(f"{space} chunk {c} (rows {lo}..{min(count, lo + cs) - 1}) is missing")
                try:
                    self.tombstones_in(txn, meta)
                except CorruptError as exc:
                    problems.append(_strip(exc))
                self._verify_columns(txn, meta, n_chunks, problems)
                report["ids"] = count if explicit else 0
                if explicit and not problems and not all_unique(ids):
                    problems.append("the id chunks list an id twice")
                listed = bitarray(n_chunks * cs)
                listed.setall(False)
                with txn.cursor(db=self.db["present"]) as cur:
                    for k, v in cur:
                        c = struct.unpack(">Q", k)[0] if len(k) == 8 else -1
                        if not 0 <= c < n_chunks:
                            problems.append(f"the payload maps hold an unexpected key {bytes(k).hex()}")
                            continue
                        try:
                            bm = bitarray()
                            bm.frombytes(bytes(self.unseal("present", bytes(k), v, f"the payload map of chunk {c}",
                                                            expect=(cs + 7) // 8)))
                            listed[c * cs:(c + 1) * cs] = bm[:cs]
                        except CorruptError as exc:
                            problems.append(_strip(exc))
                found = bitarray(n_chunks * cs)
                found.setall(False)
                with txn.cursor(db=self.db["items"]) as cur:
                    for k, v in cur:
                        row = struct.unpack(">Q", k)[0] if len(k) == 8 else None
                        if row is not None and row < count:
                            found[row] = True
                        if row is None or row >= count:
                            problems.append(f"items holds a payload for row {row}, beyond the {count} rows")
                            continue
                        try:
                            json.loads(bytes(self.unseal("items", bytes(k), v, f"the payload of row {row}")))
                            report["items"] += 1
                        except CorruptError as exc:
                            problems.append(_strip(exc))
                        except ValueError:
                            problems.append(f"the payload of row {row} is not JSON")
                missing = listed & ~found
                extra = found & ~listed
                for what, bits_ in (("missing", missing), ("not listed in its chunk map", extra)):
                    rows_ = list(bits_.search(1))
                    if rows_:
                        problems.append(f"the payloads of {len(rows_)} rows are {what} (rows "
                                        f"{', '.join(map(str, rows_[:5]))}{', ...' if len(rows_) > 5 else ''})")
        except lmdb.Error as exc:
            problems.append(f"LMDB's own structure is damaged ({os_problem(exc)})")
        report["ok"] = not problems
        return report


    def _verify_columns(self, txn, meta, n_chunks, problems):
        """Every attribute column's chunks: present, sealed, the right size; nothing else."""
        schema, count, cs = meta.get("attributes", []), meta["count"], meta["chunk_size"]
        if "attrs" not in self.db:
            if schema and count:
                problems.append("its attribute table is missing")
            return
        seen = set()
        with txn.cursor(db=self.db["attrs"]) as cur:
            for k, v in cur:
                j, c = struct.unpack(">HQ", k) if len(k) == 10 else (-1, -1)
                if not (0 <= j < len(schema) and 0 <= c < n_chunks):
                    problems.append(f"attrs holds an unexpected key {bytes(k).hex()}")
                    continue
                seen.add((j, c))
                rows = min(cs, count - c * cs)
                try:
                    self.unseal("attrs", bytes(k), v, f"attribute {schema[j]['name']!r} chunk {c} (rows "
                                f"{c * cs}..{c * cs + rows - 1})", expect=rows * row_bytes(schema[j]))
                except CorruptError as exc:
                    problems.append(_strip(exc))
        for j, col in enumerate(schema):
            for c in range(n_chunks):
                if (j, c) not in seen:
                    problems.append(f"attribute {col['name']!r} chunk {c} (rows {c * cs}.."
                                    f"{min(count, (c + 1) * cs) - 1}) is missing")


def _strip(exc: HashretError) -> str:
    """The damage part of a corrupt-index message, without the recovery advice."""
    text = str(exc)
    text = text.split(" is corrupt: ", 1)[-1]
    return text.split("; run 'hashret verify", 1)[0]
