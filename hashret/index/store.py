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

import fcntl
import json
import os
import socket
import struct
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lmdb
import numpy as np
import xxhash
from bitarray import bitarray

from hashret.errors import CorruptError, HashretError, check, is_integer, os_problem

FORMAT_VERSION = 3
# virtual address space only (the file grows with the data); large, because LMDB cannot grow
# the map while a snapshot's read transaction is open in this process
MAP_SIZE = 1 << 40
# every open HashIndex holds one read transaction (its snapshot), i.e. one of LMDB's reader
# slots, for as long as it is open; LMDB's default of 126 is few for a process serving shards
MAX_READERS = 1024
MAX_BITS = 1 << 16
MAX_CHUNK = 1 << 24
LOCK_NAME = "writer.lock"
# every file the store writes in an index folder (what undoing a fresh build may delete)
FILES = ("data.mdb", "lock.mdb", LOCK_NAME)
_DBS = (b"meta", b"codes", b"ids", b"items", b"present")
_SEAL = struct.Struct("<Q")
_CRC = struct.Struct("<I")  # format 2, recognised only to say it must be rebuilt
_LMDB_MAGIC = 0xBEEFC0DE


def _key(n: int) -> bytes:
    return struct.pack(">Q", n)


def _id_key(i: int) -> bytes:
    return struct.pack(">q", i)


def _digest(space: str, key: bytes, payload) -> int:
    seed = xxhash.xxh3_64_intdigest(space.encode() + b"/" + bytes(key))
    return xxhash.xxh3_64_intdigest(payload, seed=seed)


def _seal(space: str, key: bytes, payload) -> bytes:
    return bytes(payload) + _SEAL.pack(_digest(space, key, payload))


def _fresh_problem(path: Path, what: str) -> CorruptError:
    return CorruptError(f"the index at {path} is corrupt: {what}; run 'hashret verify --index "
                        f"{path}' for the whole damage, then restore the folder from a copy or "
                        "rebuild it with 'hashret build-index'")


# -- the file before LMDB sees it -------------------------------------------------------------
def check_lmdb_file(path: Path):
    """Refuse a data.mdb that is not LMDB's or is shorter than its last commit needs."""
    f = path / "data.mdb"
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(2 * 65536)
    except OSError as exc:
        raise HashretError(f"cannot read {f}: {os_problem(exc)}") from None
    if len(head) < 160:
        raise _fresh_problem(path, f"data.mdb has {size} bytes, too few for an LMDB header "
                                   "(truncated, or not an index)")
    psize = struct.unpack_from("<I", head, 40)[0]
    metas = []
    for p in (0, 1):
        off = p * psize
        if psize < 512 or psize > 65536 or psize & (psize - 1) or off + 160 > len(head):
            raise _fresh_problem(path, "data.mdb does not start with an LMDB header (a foreign "
                                       "or damaged file)")
        magic, version = struct.unpack_from("<II", head, off + 16)
        last_pg, txnid = struct.unpack_from("<QQ", head, off + 136)
        if magic != _LMDB_MAGIC or version != 1:
            raise _fresh_problem(path, f"LMDB header page {p} of data.mdb is damaged or foreign")
        metas.append((txnid, last_pg))
    _, last_pg = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        raise _fresh_problem(path, f"data.mdb is truncated: {size} bytes where its last commit "
                                   f"needs {need}")


# -- LMDB's own pages, before a cursor walks them ----------------------------------------------
_P_BRANCH, _P_LEAF, _P_OVERFLOW = 0x01, 0x02, 0x04
_F_BIGDATA, _F_SUBDATA = 0x01, 0x02
_P_INVALID = (1 << 64) - 1


def walk_tables(path: Path, txn_id: int, names) -> dict:
    """Check the B-tree pages of the named tables in data.mdb as of transaction ``txn_id``
    (hold a read transaction of that id, so none of its pages is reused meanwhile): every
    page names itself, is of the type its place needs, keeps its nodes inside it, and points
    only at pages of the file and overflow runs that say they are. LMDB asserts (abort())
    on some such damage while a cursor steps through a table; gets return errors. Returns
    {table: first problem} for the damaged ones."""
    f = path / "data.mdb"
    fd = os.open(f, os.O_RDONLY)
    try:
        head = os.pread(fd, 2 * 65536, 0)
        psize = struct.unpack_from("<I", head, 40)[0]
        metas = [(struct.unpack_from("<Q", head, p * psize + 144)[0], p * psize) for p in (0, 1)]
        off = next((o for t, o in metas if t == txn_id), max(metas)[1])
        last_pg = struct.unpack_from("<Q", head, off + 136)[0]
        main_root = struct.unpack_from("<Q", head, off + 88 + 40)[0]

        def page(pg):
            if not 2 <= pg <= last_pg:
                raise ValueError(f"a link to page {pg}, outside pages 2..{last_pg}")
            buf = os.pread(fd, psize, pg * psize)
            if len(buf) != psize:
                raise ValueError(f"page {pg} lies past the end of the file")
            if struct.unpack_from("<Q", buf, 0)[0] != pg:
                raise ValueError(f"page {pg} does not name itself (zeroed or overwritten)")
            return buf

        def nodes(buf, pg):
            lower, upper = struct.unpack_from("<HH", buf, 12)
            if not (16 <= lower <= upper <= psize) or (lower - 16) % 2:
                raise ValueError(f"page {pg} has impossible bounds")
            for i in range((lower - 16) // 2):
                at = struct.unpack_from("<H", buf, 16 + 2 * i)[0]
                if not upper <= at <= psize - 8:
                    raise ValueError(f"page {pg} has a node outside it")
                lo, hi, flags, ksize = struct.unpack_from("<HHHH", buf, at)
                if at + 8 + ksize > psize:
                    raise ValueError(f"page {pg} has a key running past it")
                yield at, lo, hi, flags, ksize

        def walk(root, depth, on_leaf):
            stack = [(root, 1)]
            while stack:
                pg, level = stack.pop()
                buf = page(pg)
                flags = struct.unpack_from("<H", buf, 10)[0]
                if level < depth:
                    if not flags & _P_BRANCH:
                        raise ValueError(f"page {pg} should be a branch page")
                    for at, lo, hi, fl, _ in nodes(buf, pg):
                        stack.append((lo | hi << 16 | fl << 32, level + 1))
                else:
                    if not flags & _P_LEAF:
                        raise ValueError(f"page {pg} should be a leaf page")
                    for at, lo, hi, fl, ksize in nodes(buf, pg):
                        on_leaf(buf, pg, at, lo | hi << 16, fl, ksize)

        tables = {}

        def named(buf, pg, at, size, fl, ksize):
            if fl & _F_SUBDATA and size == 48 and at + 8 + ksize + 48 <= psize:
                rec = buf[at + 8 + ksize:at + 8 + ksize + 48]
                tables[bytes(buf[at + 8:at + 8 + ksize])] = (struct.unpack_from("<H", rec, 6)[0],
                                                             struct.unpack_from("<Q", rec, 40)[0])

        problems = {}
        main_depth = struct.unpack_from("<H", head, off + 88 + 6)[0]
        try:
            if main_root != _P_INVALID:
                walk(main_root, main_depth, named)
        except ValueError as exc:
            return {"LMDB's table of tables": str(exc)}

        def overflow(buf, pg, at, size, fl, ksize):
            if fl & _F_BIGDATA:
                start = at + 8 + ksize
                if start + 8 > psize:
                    raise ValueError(f"page {pg} has a node running past it")
                ov = struct.unpack_from("<Q", buf, start)[0]
                obuf = page(ov)
                oflags, npages = struct.unpack_from("<HI", obuf, 10)
                if not oflags & _P_OVERFLOW or npages * psize < size or ov + npages - 1 > last_pg:
                    raise ValueError(f"the value on page {ov} is not a whole overflow run")
            elif at + 8 + ksize + size > psize:
                raise ValueError(f"page {pg} has a value running past it")

        for name in names:
            depth, root = tables.get(name.encode(), (0, _P_INVALID))
            try:
                if root != _P_INVALID:
                    walk(root, depth, overflow)
            except ValueError as exc:
                problems[name] = str(exc)
        return problems
    finally:
        os.close(fd)


# -- ids ----------------------------------------------------------------------------------------
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
class WriterLock:
    """``writer.lock`` in the index folder, held with flock for as long as a writer is open.

    flock locks belong to an open file description, so a second open in this process is
    refused like one in another process; the kernel frees the lock when its holder dies."""

    def __init__(self, path: Path):
        self.file = path / LOCK_NAME
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HashretError(f"cannot open the index at {path} for writing: {os_problem(exc)}; "
                               "open it read-only to search it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise HashretError(f"the index at {path} already has a writer ({_describe_holder(holder)}): "
                               "one writer at a time; wait for it to finish or stop it, or open the "
                               "index read-only to search it meanwhile") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a
                                      for i, a in enumerate(sys.argv))[:200]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:
            pass  # the lock is what counts; the note only names the holder
        self.fd = fd

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe_holder(h: dict) -> str:
    if not h:
        return "holder unknown"
    who = "this process" if h.get("pid") == os.getpid() and h.get("host") == socket.gethostname() \
        else f"pid {h.get('pid')} on {h.get('host')}"
    cmd = f", '{h['command']}'" if h.get("command") else ""
    return f"{who}{cmd}, since {h.get('since')}"


# -- environments: LMDB allows one open of an environment per process ------------------------
_OPEN: dict = {}  # real path -> [env, dbs, refcount, opened_readonly]


def _acquire(path: Path, readonly: bool, create: bool):
    key = str(path.resolve())
    if key in _OPEN:
        entry = _OPEN[key]
        check(readonly or not entry[3], f"the index at {path} is open read-only in this process: "
              "close that HashIndex before opening it for writing")
        entry[2] += 1
        return entry[0], entry[1]
    if (path / "data.mdb").exists():
        check_lmdb_file(path)
    env = None
    try:
        try:
            env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(_DBS), readonly=readonly,
                            create=create, lock=True, readahead=True, max_readers=MAX_READERS)
        except lmdb.Error as exc:
            # a reader on a read-only medium cannot write LMDB's reader table; with no writer
            # possible there, reading without it is safe
            if not readonly or os_problem(exc) not in ("read-only file system", "permission denied"):
                raise
            env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(_DBS), readonly=True,
                            create=False, lock=False, readahead=True)
        if readonly:
            dbs = {n.decode(): env.open_db(n, create=False) for n in _DBS if _has_db(env, n)}
        else:  # every table in one transaction: a kill leaves all of them or none
            with env.begin(write=True) as txn:
                dbs = {n.decode(): env.open_db(n, txn=txn, create=True) for n in _DBS}
    except lmdb.Error as exc:
        if env is not None:
            env.close()
        problem = os_problem(exc)
        if problem.startswith(("no space", "disk quota", "file size", "read-only", "permission")):
            raise HashretError(f"cannot open the index at {path}: {problem}") from None
        raise _fresh_problem(path, f"LMDB cannot open it ({problem})") from None
    if readonly and set(dbs) != {n.decode() for n in _DBS}:
        env.close()
        raise HashretError(f"{path} holds no hashret index (its LMDB file lacks hashret's tables): "
                           "pass the folder written by build-index")
    _OPEN[key] = [env, dbs, 1, readonly]
    return env, dbs


def _has_db(env, name: bytes) -> bool:
    with env.begin() as txn:
        return txn.get(name) is not None


def _release(path: Path):
    key = str(path.resolve())
    entry = _OPEN.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] == 0:
        entry[0].close()
        del _OPEN[key]


def is_initialised(path) -> bool:
    """Whether ``path`` holds a committed hashret index (a ``meta`` record), without opening it
    for writing. False for no data.mdb, or for one holding hashret's tables but no meta (a
    create that died before its first commit); an LMDB file of someone else is refused."""
    path = Path(path)
    if not (path / "data.mdb").is_file():
        return False
    entry = _OPEN.get(str(path.resolve()))
    if entry is not None:  # open in this process: ask that environment
        with entry[0].begin() as txn:
            return txn.get(b"meta", db=entry[1]["meta"]) is not None
    check_lmdb_file(path)
    try:
        env = lmdb.open(str(path), max_dbs=len(_DBS), readonly=True, lock=False, create=False)
    except lmdb.Error as exc:
        raise _fresh_problem(path, f"LMDB cannot open it ({os_problem(exc)})") from None
    try:
        present = [n for n in _DBS if _has_db(env, n)]
        if not present and env.stat()["entries"] == 0:
            return False  # an empty LMDB file: the create died before its tables were made
        if len(present) != len(_DBS):
            raise HashretError(f"{path}/data.mdb is an LMDB file without hashret's tables: it is not "
                               "a hashret index; choose another folder")
        with env.begin() as txn:
            return txn.get(b"meta", db=env.open_db(b"meta", txn=txn, create=False)) is not None
    except lmdb.Error as exc:
        raise _fresh_problem(path, f"LMDB cannot read it ({os_problem(exc)})") from None
    finally:
        env.close()


def _validate_meta(meta, path: Path) -> dict:
    """Type and range of every field; a CorruptError naming the first bad one."""
    def bad(field, why):
        return _fresh_problem(path, f"its meta field '{field}' {why}")

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
    build = meta["build"]
    if build is not None and not (isinstance(build, dict) and build.get("state") in ("partial", "complete")):
        raise bad("build", "is not null or a record with state 'partial' or 'complete'")
    return meta


def _refuse_format_2(raw, path: Path):
    """A meta record sealed the format-2 way (CRC32) gets the rebuild message, not 'corrupt'."""
    raw = bytes(raw)
    if len(raw) > 4 and zlib.crc32(raw[:-4], zlib.crc32(b"meta", zlib.crc32(b"meta"))) == _CRC.unpack(raw[-4:])[0]:
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
            self.env, self.db = _acquire(self.path, readonly, create)
        except BaseException:
            self._unlock()
            raise

    def _unlock(self):
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def close(self):
        if self.env is not None:
            _release(self.path)
            self.env = None
        self._unlock()

    def corrupt(self, what: str) -> CorruptError:
        return _fresh_problem(self.path, what)

    # -- sealed values -------------------------------------------------------------------------
    def _unseal(self, space: str, key: bytes, buf, what: str, expect: int | None = None):
        """The payload of a sealed value (a view valid inside its transaction)."""
        if buf is None:
            raise self.corrupt(f"{what} is missing")
        n = len(buf)
        if expect is not None and n != expect + _SEAL.size:
            raise self.corrupt(f"{what} holds {n - _SEAL.size} bytes where {expect} are expected")
        if n < _SEAL.size:
            raise self.corrupt(f"{what} is truncated")
        view = memoryview(buf)
        payload = view[:n - _SEAL.size]
        if _digest(space, key, payload) != _SEAL.unpack(view[n - _SEAL.size:])[0]:
            raise self.corrupt(f"{what} fails its checksum")
        return payload

    def _read_meta(self, txn) -> dict:
        raw = txn.get(b"meta", db=self.db["meta"])
        if raw is None:
            raise HashretError(f"{self.path} holds no committed index (its creation did not finish): "
                               "delete the folder, or build into it again")
        try:
            payload = self._unseal("meta", b"meta", raw, "its meta record")
        except CorruptError:
            _refuse_format_2(raw, self.path)
            raise
        try:
            meta = json.loads(bytes(payload))
        except ValueError:
            raise self.corrupt("its meta record is not JSON") from None
        return _validate_meta(meta, self.path)

    def _put_meta(self, txn, meta):
        txn.put(b"meta", _seal("meta", b"meta", json.dumps(meta).encode()), db=self.db["meta"])

    def _read_tombstones(self, txn, meta: dict) -> bitarray:
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
            payload = self._unseal("meta", b"tombstones", raw, what)
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
            self.meta = self._read_meta(txn)
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
                    meta = self._read_meta(txn)
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

    def append(self, packed: np.ndarray, ids, items, id_mode: str, build: dict | None = None):
        """Append one batch in one transaction; returns the first new row. ``build``: fields
        merged into the meta's build record in the same transaction."""
        def fn(txn, meta):
            count = meta["count"]
            self._put_rows(txn, count, meta["chunk_size"], packed, ids, items)
            meta["count"] = count + len(packed)
            meta["id_mode"] = id_mode
            if build is not None:
                meta["build"] = {**(meta["build"] or {}), **build}
            return count

        return self._transact("add", fn)

    def _put_rows(self, txn, first_row, cs, packed, ids, items):
        nbytes = packed.shape[1]
        n = len(packed)
        pos = 0
        while pos < n:
            row = first_row + pos
            c, off = divmod(row, cs)
            take = min(cs - off, n - pos)
            lo = c * cs
            head = b""
            if off:  # re-sealing a chunk: check it first, so damage is never sealed anew
                head = bytes(self._unseal("codes", _key(c), txn.get(_key(c), db=self.db["codes"]),
                                          f"code chunk {c} (rows {lo}..{lo + off - 1})", expect=off * nbytes))
            txn.put(_key(c), _seal("codes", _key(c), head + packed[pos:pos + take].tobytes()),
                    db=self.db["codes"])
            if ids is not None:
                ihead = b""
                if off:
                    ihead = bytes(self._unseal("ids", _key(c), txn.get(_key(c), db=self.db["ids"]),
                                               f"id chunk {c} (rows {lo}..{lo + off - 1})", expect=off * 8))
                txn.put(_key(c), _seal("ids", _key(c), ihead + ids[pos:pos + take].astype("<i8").tobytes()),
                        db=self.db["ids"])
            pos += take
        if items is not None:
            with txn.cursor(db=self.db["items"]) as cur:
                cur.putmulti([(_key(first_row + j), _seal("items", _key(first_row + j), json.dumps(it).encode()))
                              for j, it in enumerate(items) if it is not None])
            given = first_row + np.flatnonzero([it is not None for it in items])
            for c in np.unique(given // cs).tolist():
                bm = self._presence(txn, c, cs)
                for r in given[given // cs == c].tolist():
                    bm[r - c * cs] = True
                txn.put(_key(c), _seal("present", _key(c), bm.tobytes()), db=self.db["present"])

    def _presence(self, txn, c: int, cs: int) -> bitarray:
        """Which rows of chunk ``c`` have a payload (verified; all False when none has)."""
        bm = bitarray(cs)
        bm.setall(False)
        raw = txn.get(_key(c), db=self.db["present"])
        if raw is not None:
            bm = bitarray()
            bm.frombytes(bytes(self._unseal("present", _key(c), raw, f"the payload map of chunk {c}",
                                            expect=(cs + 7) // 8)))
            bm = bm[:cs]
        return bm

    def write_tombstones(self, tomb: bitarray):
        def fn(txn, meta):
            check(len(tomb) == meta["count"], "internal: tombstones do not cover every row")
            meta["removed"] = tomb.count()
            txn.put(b"tombstones", _seal("meta", b"tombstones", self._tombstone_payload(tomb)),
                    db=self.db["meta"])

        self._transact("remove", fn)

    def rewrite(self, packed, ids, keep_rows):
        """Compaction: the kept rows, renumbered from 0, in one transaction."""
        def fn(txn, meta):
            broken = walk_tables(self.path, txn.id() - 1, [n.decode() for n in _DBS])
            if broken:
                table, why = next(iter(broken.items()))
                raise self.corrupt(f"LMDB's pages of the '{table}' table are damaged: {why}")
            old_items = {}
            with txn.cursor(db=self.db["items"]) as cur:
                for k, v in cur:
                    row = struct.unpack(">Q", k)[0]
                    old_items[row] = json.loads(bytes(self._unseal("items", bytes(k), v, f"the payload of row {row}")))
            for name in ("codes", "ids", "items", "present"):
                txn.drop(self.db[name], delete=False)
            items = [old_items.get(int(r)) for r in keep_rows] if old_items else None
            if len(packed):
                self._put_rows(txn, 0, meta["chunk_size"], packed, ids, items)
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
            return self._items_in(txn, rows, self._read_meta(txn)["chunk_size"])

    def _items_in(self, txn, rows, cs) -> list:
        out = []
        maps: dict = {}
        for r in rows:
            r = int(r)
            c = r // cs
            if c not in maps:
                maps[c] = self._presence(txn, c, cs)
            k = _key(r)
            raw = txn.get(k, db=self.db["items"])
            if (raw is None) == maps[c][r - c * cs]:
                raise self.corrupt(f"the payload of row {r} is {'missing' if raw is None else 'not listed in its chunk map'}")
            out.append(None if raw is None else
                       json.loads(bytes(self._unseal("items", k, raw, f"the payload of row {r}"))))
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
                broken = walk_tables(self.path, txn.id(), [n.decode() for n in _DBS])
                for table, why in broken.items():
                    problems.append(f"LMDB's pages of the '{table}' table are damaged: {why}")
                if broken:
                    return report  # a cursor over damaged pages may abort the process
                try:
                    meta = self._read_meta(txn)
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
                                payload = self._unseal(space, bytes(k), v, what, expect=rows * size)
                                report["chunks"] += space == "codes"
                                if space == "ids":
                                    ids[lo:lo + rows] = np.frombuffer(payload, "<i8")
                            except CorruptError as exc:
                                problems.append(_strip(exc))
                    for c in sorted(set(range(n_chunks)) - seen):
                        lo = c * cs
                        problems.append(f"{space} chunk {c} (rows {lo}..{min(count, lo + cs) - 1}) is missing")
                try:
                    self._read_tombstones(txn, meta)
                except CorruptError as exc:
                    problems.append(_strip(exc))
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
                            bm.frombytes(bytes(self._unseal("present", bytes(k), v, f"the payload map of chunk {c}",
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
                            json.loads(bytes(self._unseal("items", bytes(k), v, f"the payload of row {row}")))
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


class Snapshot:
    """One consistent state of an index, read in place.

    Holds a read transaction open and views every code and id chunk where LMDB's memory map
    has it: ``codes`` is a list of (rows, n_words) word arrays (``layout(bytes per code)``
    gives the word type and count; a chunk is copied only where a code needs padding to
    whole words), ``ids`` a list of int64 arrays (explicit ids) or None. Every chunk's
    checksum is checked (in parallel; XXH3 runs at memory speed) unless ``verify`` is False,
    except chunks that ``previous`` had checked at the same address and length: LMDB does not
    reuse a page a live reader can see, so such a chunk is the same value.

    Scans ``acquire()`` it and ``release()`` it; ``retire()`` ends the transaction once the
    last user has released it (a newer snapshot takes over)."""

    def __init__(self, store: "LMDBStore", layout, previous: "Snapshot | None", verify: bool):
        import threading

        self.path = store.path
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._deleted = None
        self.txn = store.env.begin(buffers=True)
        try:
            self._read(store, layout, previous, verify)
        except BaseException:
            self.txn.abort()
            raise

    def _read(self, store, layout, previous, verify):
        txn = self.txn
        meta = store._read_meta(txn)
        count, cs, nbytes = meta["count"], meta["chunk_size"], meta["bits"] // 8
        word_dtype, n_words = layout(nbytes)
        word_dtype = np.dtype(word_dtype).newbyteorder("<")
        width = n_words * word_dtype.itemsize
        check(nbytes <= width, "internal: word count too small for the code length")
        n_chunks = (count + cs - 1) // cs
        have = txn.stat(store.db["codes"])["entries"]
        if have != n_chunks:
            raise store.corrupt(f"it holds {have} code chunks where its meta (count {count}, "
                                f"chunk size {cs}) needs {n_chunks}")
        explicit = meta["id_mode"] == "explicit"
        if explicit and txn.stat(store.db["ids"])["entries"] != n_chunks:
            raise store.corrupt(f"it holds {txn.stat(store.db['ids'])['entries']} id chunks where "
                                f"{n_chunks} are needed")
        known = previous.checked if previous is not None else {}
        # Appends only write from the last, partial chunk on, so while no compaction has
        # renumbered rows (same epoch) the previous snapshot's full chunks are still these
        # values; those in overflow pages (which start 16 bytes into a page: LMDB's page
        # header) also stay at their address, so their views are reused without a lookup.
        # Smaller values sit inside B-tree pages, which move when a neighbour changes.
        keep = 0
        if (previous is not None and previous.meta["epoch"] == meta["epoch"]
                and count >= previous.count and previous.chunk_size == cs):
            keep = previous.count // cs
        psize = store.env.stat()["psize"]
        self.checked = {}
        todo = []
        self.codes, self.ids = [], [] if explicit else None
        for c in range(n_chunks):
            lo = c * cs
            rows = min(cs, count - lo)
            if c < keep and all(known.get((sp, c), (1, 0))[0] % psize == 16 for sp in ("codes", "ids")
                                if sp == "codes" or explicit):
                self.codes.append(previous.codes[c])
                self.checked[("codes", c)] = known[("codes", c)]
                if explicit:
                    self.ids.append(previous.ids[c])
                    self.checked[("ids", c)] = known[("ids", c)]
                continue
            for space, size in (("codes", nbytes), ("ids", 8)) if explicit else (("codes", nbytes),):
                what = f"{'code' if space == 'codes' else 'id'} chunk {c} (rows {lo}..{lo + rows - 1})"
                raw = txn.get(_key(c), db=store.db[space])
                if raw is None:
                    raise store.corrupt(f"{what} is missing")
                if len(raw) != rows * size + _SEAL.size:
                    raise store.corrupt(f"{what} holds {len(raw) - _SEAL.size} bytes where "
                                        f"{rows * size} are expected")
                whole = np.frombuffer(raw, np.uint8)
                place = (whole.ctypes.data, len(whole))
                if verify and known.get((space, c)) != place:
                    todo.append((space, c, raw, what))
                self.checked[(space, c)] = place  # checked now, before, or trusted (verify=False)
                payload = whole[:rows * size]
                if space == "ids":
                    self.ids.append(payload.view("<i8"))
                elif width == nbytes:
                    self.codes.append(payload.view(word_dtype).reshape(rows, n_words))
                else:  # padding to whole words: this chunk is copied
                    buf = np.zeros((rows, width), dtype=np.uint8)
                    buf[:, :nbytes] = payload.reshape(rows, nbytes)
                    self.codes.append(buf.view(word_dtype).reshape(rows, n_words))
        self._check(store, todo)
        self.has_items = txn.stat(store.db["present"])["entries"] > 0
        self.tomb = store._read_tombstones(txn, meta)
        self._any_removed = self.tomb.any()  # once: any() walks the bits (~75 us per 10^7 rows)
        self.meta, self.count, self.chunk_size = meta, count, cs
        self.word_dtype, self.n_words = word_dtype, n_words
        self.generation = meta["generation"]

    @staticmethod
    def _check(store, todo):
        def one(job):
            space, c, raw, what = job
            try:
                store._unseal(space, _key(c), raw, what)
            except CorruptError as exc:
                return exc
            return None

        big = sum(len(j[2]) for j in todo) > (8 << 20)
        if big and len(todo) > 1:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, 8)) as pool:
                problems = list(pool.map(one, todo))
        else:
            problems = [one(j) for j in todo]
        first = next((p for p in problems if p is not None), None)
        if first is not None:
            raise first

    # -- rows -------------------------------------------------------------------------------
    def deleted_mask(self):
        """uint8 per row (1 = removed), or None when nothing is removed."""
        if not self._any_removed:
            return None
        if self._deleted is None:
            self._deleted = np.frombuffer(self.tomb.unpack(), dtype=np.uint8)[: self.count].copy()
        return self._deleted

    def ids_of_rows(self, rows) -> np.ndarray:
        """External ids of rows (-1 stays -1)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.ids is None:
            return rows.copy()
        out = np.full(rows.shape, -1, dtype=np.int64)
        ok = rows >= 0
        c = rows // self.chunk_size
        for chunk in np.unique(c[ok]).tolist():
            at = ok & (c == chunk)
            out[at] = self.ids[chunk][rows[at] - chunk * self.chunk_size]
        return out

    def items_of_rows(self, store: "LMDBStore", rows) -> list:
        """Payloads of rows as of this snapshot (a transaction serves one thread at a time)."""
        if not self.has_items:
            return [None] * len(rows)
        with self._lock:
            return store.items_of_rows(rows, txn=self.txn)

    def all_ids(self) -> np.ndarray:
        """Every row's id (a copy; explicit ids only)."""
        return np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)

    # -- lifetime -----------------------------------------------------------------------------
    def acquire(self) -> "Snapshot":
        with self._lock:
            check(not self._retired, "internal: a retired snapshot was used")
            self._users += 1
        return self

    def release(self):
        with self._lock:
            self._users -= 1
            end = self._retired and self._users == 0
        if end:
            self._end()

    def retire(self):
        with self._lock:
            self._retired = True
            end = self._users == 0
        if end:
            self._end()

    def _end(self):
        if self.txn is not None:
            self.codes, self.ids = [], None
            self.txn.abort()
            self.txn = None


def _strip(exc: HashretError) -> str:
    """The damage part of a corrupt-index message, without the recovery advice."""
    text = str(exc)
    text = text.split(" is corrupt: ", 1)[-1]
    return text.split("; run 'hashret verify", 1)[0]
