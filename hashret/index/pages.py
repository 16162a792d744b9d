"""The bytes of an index below LMDB's API: the keys and checksummed seals of hashret's
values, and LMDB's own file header and page tree, read directly so that a truncated or
foreign ``data.mdb`` is found before LMDB maps it (a short file would kill the process
with SIGBUS)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import xxhash

from hashret.errors import CorruptError, HashretError, os_problem

DBS = (b"meta", b"codes", b"ids", b"items", b"present")
# tables added since format 3 was first written: an index may lack them (it then holds none of
# what they keep), a writer adds them
LATER_DBS = (b"attrs",)
ALL_DBS = DBS + LATER_DBS
SEAL = struct.Struct("<Q")
CRC = struct.Struct("<I")  # format 2, recognised only to say it must be rebuilt
LMDB_MAGIC = 0xBEEFC0DE


def chunk_key(n: int) -> bytes:
    return struct.pack(">Q", n)


def column_key(column: int, n: int) -> bytes:
    """Key of attribute column ``column``'s chunk ``n`` in the ``attrs`` table."""
    return struct.pack(">HQ", column, n)


def id_key(i: int) -> bytes:
    return struct.pack(">q", i)


def digest(space: str, key: bytes, payload) -> int:
    seed = xxhash.xxh3_64_intdigest(space.encode() + b"/" + bytes(key))
    return xxhash.xxh3_64_intdigest(payload, seed=seed)


def seal(space: str, key: bytes, payload) -> bytes:
    return bytes(payload) + SEAL.pack(digest(space, key, payload))


def fresh_problem(path: Path, what: str) -> CorruptError:
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
        raise fresh_problem(path, f"data.mdb has {size} bytes, too few for an LMDB header "
                                   "(truncated, or not an index)")
    psize = struct.unpack_from("<I", head, 40)[0]
    metas = []
    for p in (0, 1):
        off = p * psize
        if psize < 512 or psize > 65536 or psize & (psize - 1) or off + 160 > len(head):
            raise fresh_problem(path, "data.mdb does not start with an LMDB header (a foreign "
                                       "or damaged file)")
        magic, version = struct.unpack_from("<II", head, off + 16)
        last_pg, txnid = struct.unpack_from("<QQ", head, off + 136)
        if magic != LMDB_MAGIC or version != 1:
            raise fresh_problem(path, f"LMDB header page {p} of data.mdb is damaged or foreign")
        metas.append((txnid, last_pg))
    _, last_pg = max(metas)
    need = (last_pg + 1) * psize
    if size < need:
        raise fresh_problem(path, f"data.mdb is truncated: {size} bytes where its last commit "
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
