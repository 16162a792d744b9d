import json
import struct
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from hashret.errors import HashretError
from hashret.index import HashIndex


def codes(n, bits=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, bits // 8), dtype=np.uint8)


def test_lmdb_round_trip_with_ids_items_and_chunks(tmp_path):
    db = codes(1000)
    with HashIndex.create(tmp_path / "ix", 64, info={"modality": "text"}, chunk_size=128) as w:
        w.add(db[:300], ids=np.arange(300) + 10_000, items=[{"caption": f"c{i}"} for i in range(300)])
        w.add(db[300:], ids=np.arange(700) + 50_000)
    mem = HashIndex(64)
    mem.add(db, ids=np.concatenate([np.arange(300) + 10_000, np.arange(700) + 50_000]))
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == 1000 and r.info()["meta"] == {"modality": "text"}
        np.testing.assert_array_equal(r.packed_codes(), db)
        for a, b in zip(r.search(db[:20], 15), mem.search(db[:20], 15)):
            np.testing.assert_array_equal(a, b)
        assert r.items([10_005, 50_000]) == [{"caption": "c5"}, None]
        with pytest.raises(HashretError, match="read-only"):
            r.add(db[:1], ids=[1])


def test_remove_and_compact_persist(tmp_path):
    db = codes(500)
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=64) as w:
        w.add(db, items=[str(i) for i in range(500)])
        assert w.remove([3, 4, 400]) == 3
        assert w.remove([3]) == 0  # already removed
    with HashIndex.open(tmp_path / "ix", readonly=False) as w:
        assert len(w) == 497 and w.n_rows == 500
        before = w.search(db[:10], 20)
        w.compact()
        assert w.n_rows == 497
        for a, b in zip(before, w.search(db[:10], 20)):
            np.testing.assert_array_equal(a, b)  # ids survive compaction
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == 497 and r.items([5, 499]) == ["5", "499"]
        assert not r.contains(3) and r.contains(5)


def test_in_memory_write_then_read(tmp_path):
    mem = HashIndex(32)
    mem.add(codes(100, 32), items=[{"i": i} for i in range(100)])
    mem.remove([0])
    mem.write(tmp_path / "ix").close()
    r = HashIndex.read(tmp_path / "ix")
    assert len(r) == 99 and r.items([1]) == [{"i": 1}]
    np.testing.assert_array_equal(r.search(codes(3, 32, 1), 5)[1], mem.search(codes(3, 32, 1), 5)[1])
    r.close()


@pytest.mark.parametrize("call,match", [
    (lambda ix: ix.add(codes(5, 32)), "32 bits"),
    (lambda ix: ix.add(np.ones((5, 16))), "16 bits"),
    (lambda ix: ix.search(codes(1, 32), 3), "32 bits"),
    (lambda ix: ix.search(codes(0), 3), "empty"),
    (lambda ix: ix.search(codes(1), 0), "k must be a positive"),
    (lambda ix: ix.search(codes(1), -2), "k must be a positive"),
    (lambda ix: ix.remove([10, 99999]), "unknown id 99999"),
    (lambda ix: ix.add(codes(2), ids=[1, 2]), "row numbers as ids"),
    (lambda ix: ix.range_search(codes(1), -1), "radius"),
])
def test_bad_input_leaves_the_index_as_it_was(tmp_path, call, match):
    with HashIndex.create(tmp_path / "ix", 64) as ix:
        ix.add(codes(50))
        before = ix.packed_codes().copy()
        with pytest.raises(HashretError, match=match):
            call(ix)
        assert len(ix) == 50 and ix.n_rows == 50
    with HashIndex.open(tmp_path / "ix") as r:  # nor on disk
        assert len(r) == 50
        np.testing.assert_array_equal(r.packed_codes(), before)


def test_duplicate_ids_are_refused_whole(tmp_path):
    with HashIndex.create(tmp_path / "ix", 64) as ix:
        ix.add(codes(3), ids=[1, 2, 3])
        with pytest.raises(HashretError, match="id 3 is already"):
            ix.add(codes(2), ids=[4, 3])
        with pytest.raises(HashretError, match="repeat"):
            ix.add(codes(2), ids=[7, 7])
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == 3 and not r.contains(4)


def test_missing_and_corrupt_folders(tmp_path):
    with pytest.raises(HashretError, match="does not exist"):
        HashIndex.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HashretError, match="no data.mdb"):
        HashIndex.open(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(os.urandom(8192))
    with pytest.raises(HashretError, match="corrupt"):
        HashIndex.open(bad)
    with HashIndex.create(tmp_path / "ix", 64):
        pass
    with pytest.raises(HashretError, match="already holds an index"):
        HashIndex.create(tmp_path / "ix", 64)


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from hashret.index import HashIndex
    from hashret.index import store
    path, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, size=(1000, 8), dtype=np.uint8) for _ in range(50)]
    ix = HashIndex.create(path, 64, chunk_size=768)  # batches straddle chunks
    for b, batch in enumerate(batches):
        if mode == "self" and b == 3:
            original = store.LMDBStore._put_rows
            def put_then_die(self, *a, **kw):
                original(self, *a, **kw)          # rows written inside the open transaction...
                os.kill(os.getpid(), signal.SIGKILL)  # ...killed before it commits
            store.LMDBStore._put_rows = put_then_die
        ix.add(batch, items=[{"b": b}] * len(batch))
        print("committed", b, flush=True)
""")


@pytest.mark.parametrize("mode", ["self", "external"])
def test_sigkill_midway_keeps_exactly_the_committed_batches(tmp_path, mode):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ix"), mode],
                            stdout=subprocess.PIPE, text=True)
    committed = -1
    for line in proc.stdout:
        committed = int(line.split()[1])
        if mode == "external" and committed == 5:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, size=(1000, 8), dtype=np.uint8) for _ in range(50)]
    with HashIndex.open(tmp_path / "ix") as r:
        n_batches, rest = divmod(len(r), 1000)
        assert rest == 0
        if mode == "self":
            assert n_batches == 3 == committed + 1
        else:  # killed from outside: at least what was reported, whole batches only
            assert n_batches >= committed + 1
        np.testing.assert_array_equal(r.packed_codes(), np.vstack(batches[:n_batches]))
        assert r.items([len(r) - 1]) == [{"b": n_batches - 1}]


def test_reader_in_another_process_sees_committed_batches(tmp_path):
    reader = textwrap.dedent("""
        import sys, json
        from hashret.index import HashIndex
        with HashIndex.open(sys.argv[1]) as r:
            print(json.dumps({"n": len(r), "first": r.packed_codes()[:1].tolist()}))
    """)
    (tmp_path / "reader.py").write_text(reader)

    def read():
        out = subprocess.run([sys.executable, str(tmp_path / "reader.py"), str(tmp_path / "ix")],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    db = codes(300)
    with HashIndex.create(tmp_path / "ix", 64) as w:
        w.add(db[:100])
        assert read()["n"] == 100  # while the writer holds the index open
        w.add(db[100:])
        got = read()
        assert got["n"] == 300 and got["first"] == db[:1].tolist()


def test_a_long_lived_reader_refreshes_without_rereading_old_chunks(tmp_path, monkeypatch):
    from hashret.index import store

    checked = []
    digest = store.digest
    monkeypatch.setattr(store, "digest", lambda space, key, payload: checked.append((space, len(payload)))
                        or digest(space, key, payload))
    db = codes(1400)
    ids = np.random.default_rng(1).permutation(10**6)[:1400]
    mem = HashIndex(64)
    # chunks of 300 codes (2,400 bytes) live in overflow pages, which stay where they are while
    # other values change; smaller values sit inside B-tree pages and move with them
    w = HashIndex.create(tmp_path / "ix", 64, chunk_size=300)
    w.add(db[:1000], ids=ids[:1000])
    r = HashIndex.open(tmp_path / "ix")
    assert r.refresh() is False  # nothing new
    assert r.rows_of(ids[999:1000]).tolist() == [999]  # builds the id map
    w.add(db[1000:1050], ids=ids[1000:1050])
    checked.clear()
    assert r.refresh() is True
    # the meta and chunk 3 (rows 900..1049, grown by the batch), codes and ids: nothing older
    assert sum(n for space, n in checked if space in ("codes", "ids")) == 150 * 8 * 2
    mem.add(db[:1050], ids=ids[:1050])
    for a, b in zip(r.search(db[:30], 20), mem.search(db[:30], 20)):
        np.testing.assert_array_equal(a, b)
    assert r.rows_of(ids[1049:1050]).tolist() == [1049]  # the id map grew, it was not rebuilt
    w.remove(ids[:500:3])
    mem.remove(ids[:500:3])
    assert r.refresh() and len(r) == len(mem)
    w.compact()
    w.add(db[1050:], ids=ids[1050:])
    mem.add(db[1050:], ids=ids[1050:])
    assert r.refresh() and r.n_rows == len(mem) and r.info()["removed"] == 0
    for a, b in zip(r.search(db[::50], 40), mem.search(db[::50], 40)):
        np.testing.assert_array_equal(a, b)
    assert r.rows_of(ids[1:2]).tolist() == [0]  # compaction renumbered rows: the map was rebuilt
    # a scan that holds the old snapshot keeps it until it is done
    held = r._rows.snap.acquire()
    w.add(codes(3, seed=9), ids=[10**7, 10**7 + 1, 10**7 + 2])
    assert r.refresh() and held.txn is not None
    held.release()
    assert held.txn is None
    r.close()
    w.close()


def test_codes_are_scanned_in_place_not_copied(tmp_path):
    db = codes(5000)
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=1024) as w:
        w.add(db)
    with HashIndex.open(tmp_path / "ix") as r:
        assert r.info()["mapped"] and r.info()["memory_bytes"] == 0
        for chunk in r._rows.snap.codes:  # views of LMDB's map, not arrays of their own
            assert not chunk.flags.owndata and not chunk.base.flags.owndata
        np.testing.assert_array_equal(r.packed_codes(), db)


def test_a_format_2_index_is_told_to_rebuild(tmp_path):
    import zlib

    import lmdb

    with HashIndex.create(tmp_path / "ix", 64) as w:
        w.add(codes(10))
    env = lmdb.open(str(tmp_path / "ix"), max_dbs=8)
    db = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        meta = json.loads(bytes(txn.get(b"meta", db=db))[:-8])
        meta["format_version"] = 2
        body = json.dumps(meta).encode()
        crc = zlib.crc32(body, zlib.crc32(b"meta", zlib.crc32(b"meta")))
        txn.put(b"meta", body + struct.pack("<I", crc), db=db)
    env.close()
    with pytest.raises(HashretError, match="has format 2; .*rebuild it"):
        HashIndex.open(tmp_path / "ix")


# -- integrity (format 3) --------------------------------------------------------------------
from hashret.errors import CorruptError  # noqa: E402


def _flip_inside(path, needle: bytes):
    """Flip one byte in the middle of the first place ``needle`` sits in data.mdb."""
    data = bytearray((path / "data.mdb").read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) // 2] ^= 0x5A
    (path / "data.mdb").write_bytes(bytes(data))


def test_a_flipped_byte_in_a_chunk_is_reported_by_open_and_verify(tmp_path):
    db = codes(1000)
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=256) as w:
        w.add(db, ids=np.arange(1000) * 3)
    _flip_inside(tmp_path / "ix", db[300:400].tobytes())  # rows 300..399 lie in chunk 1
    with pytest.raises(CorruptError, match=r"code chunk 1 \(rows 256..511\) fails its checksum"):
        HashIndex.open(tmp_path / "ix")
    from hashret.engine import verify_index

    report = verify_index(tmp_path / "ix")
    assert not report["ok"] and report["problems"] == ["code chunk 1 (rows 256..511) fails its checksum"]


def test_truncated_and_foreign_files_are_errors_not_signals(tmp_path):
    with HashIndex.create(tmp_path / "ix", 64) as w:
        w.add(codes(20000))
    size = (tmp_path / "ix" / "data.mdb").stat().st_size
    os.truncate(tmp_path / "ix" / "data.mdb", size // 2)
    with pytest.raises(CorruptError, match="data.mdb is truncated"):
        HashIndex.open(tmp_path / "ix")
    (tmp_path / "ix" / "data.mdb").write_bytes(b"\x00" * 10000)
    with pytest.raises(CorruptError, match="LMDB header"):
        HashIndex.open(tmp_path / "ix")


def test_one_writer_in_this_process_readers_never_blocked(tmp_path):
    w = HashIndex.create(tmp_path / "ix", 64)
    w.add(codes(10))
    with pytest.raises(HashretError, match="already has a writer .*this process"):
        HashIndex.open(tmp_path / "ix", readonly=False)
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == 10
    w.close()
    with HashIndex.open(tmp_path / "ix", readonly=False) as w2:  # free once the first closed
        w2.add(codes(5, seed=1))
        assert len(w2) == 15


def test_removed_rows_survive_later_appends_and_a_lost_tombstone_is_damage(tmp_path):
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=64) as w:
        w.add(codes(100))
        w.remove([5, 70])
        w.add(codes(300, seed=2))  # rows appended after the tombstones were written
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == 398 and not r.contains(5) and not r.contains(70) and r.contains(399)
        assert r.verify()["ok"]
    import lmdb

    env = lmdb.open(str(tmp_path / "ix"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.delete(b"tombstones", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(CorruptError, match="tombstones of its 2 removed rows are missing"):
        HashIndex.open(tmp_path / "ix")


def test_a_lost_payload_is_damage_not_none(tmp_path):
    with HashIndex.create(tmp_path / "ix", 64) as w:
        w.add(codes(10), items=[{"i": i} if i % 2 else None for i in range(10)])
    import lmdb

    env = lmdb.open(str(tmp_path / "ix"), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.delete(struct.pack(">Q", 3), db=env.open_db(b"items", txn=txn))
    env.close()
    with HashIndex.open(tmp_path / "ix") as r:
        assert r.items([1, 2]) == [{"i": 1}, None]  # never given: None
        with pytest.raises(CorruptError, match="payload of row 3 is missing"):
            r.items([3])
        assert "the payloads of 1 rows are missing (rows 3)" in r.verify()["problems"]


def test_no_silent_conversions(tmp_path):
    ix = HashIndex(64)
    bits = np.zeros((2, 64), dtype=np.int64)
    bits[0, 0] = bits[1, 63] = 1
    ix.add(bits)  # 0/1 integers are bits, not signs (which would store every bit as 1)
    np.testing.assert_array_equal(ix.packed_codes(), np.packbits(bits.astype(bool), axis=1))
    with pytest.raises(HashretError, match=r"ids must lie in \[0,"):
        ix2 = HashIndex(64)
        ix2.add(codes(1), ids=np.array([2**64 - 1], dtype=np.uint64))
    with pytest.raises(HashretError, match="0/1 bits or \\+-1 signs"):
        HashIndex(64).add(np.array([[-1, 0, 1, 1] * 16]))
    with pytest.raises(HashretError, match="k must be a positive integer"):
        ix.search(codes(1), True)


def test_explicit_id_map_equals_a_dict_and_stays_logarithmic():
    from hashret.index.hash_index import _IdMap

    rng = np.random.default_rng(0)
    m, truth, row = _IdMap(), {}, 0
    for size in rng.integers(1, 300, size=200):
        ids = rng.choice(10**9, size=size, replace=False)
        ids = np.array([i for i in ids if i not in truth], dtype=np.int64)
        m.add(ids, row)
        truth.update({int(i): row + j for j, i in enumerate(ids)})
        row += len(ids)
    probe = np.concatenate([np.array(list(truth)[::7], dtype=np.int64), [-5, 10**12]])
    want = [truth.get(int(i), -1) for i in probe]
    assert m.lookup(probe).tolist() == want
    assert len(m.runs) <= 2 * int(np.log2(row)) + 2


def test_a_full_disk_is_one_line_and_keeps_what_was_committed(tmp_path):
    # RLIMIT_FSIZE makes writes past 2 MiB fail as a full disk does, without root or a mount
    script = textwrap.dedent("""
        import resource, signal, sys
        import numpy as np
        from hashret.errors import HashretError
        from hashret.index import HashIndex
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))
        ix = HashIndex.create(sys.argv[1], 512)
        rng = np.random.default_rng(0)
        try:
            for b in range(100):
                ix.add(rng.integers(0, 256, (1000, 64), dtype=np.uint8))
        except HashretError as exc:
            print(len(ix), exc)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    held, message = out.stdout.split(" ", 1)
    assert "file size limit reached" in message and f"the index holds what it held ({held} rows)" in message
    with HashIndex.open(tmp_path / "ix") as r:
        assert len(r) == int(held) > 0 and r.verify()["ok"]


def test_a_zeroed_btree_page_is_reported_not_an_abort(tmp_path):
    # LMDB asserts (SIGABRT) when a cursor steps onto a page of the wrong type; verify and
    # compact walk the pages first. Run in a child so an abort fails the test, not pytest.
    with HashIndex.create(tmp_path / "ix", 64) as w:
        w.add(codes(3000), items=[{"i": i, "pad": "x" * 40} for i in range(3000)])
    data = bytearray((tmp_path / "ix" / "data.mdb").read_bytes())
    at = data.find(b'{"i": 1500,') // 4096 * 4096  # a leaf page of the payload table
    data[at:at + 4096] = bytes(4096)
    (tmp_path / "ix" / "data.mdb").write_bytes(bytes(data))
    script = textwrap.dedent("""
        import sys
        from hashret.errors import CorruptError
        from hashret.index import HashIndex
        from hashret.engine import verify_index
        print(verify_index(sys.argv[1])["problems"])
        try:
            with HashIndex.open(sys.argv[1], readonly=False) as w:
                w.remove([1]); w.compact()
        except CorruptError as exc:
            print("compact:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ix")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pages of the 'items' table are damaged" in out.stdout
    assert "compact: the index at" in out.stdout and "does not name itself" in out.stdout


def test_an_empty_index_on_disk_gives_an_empty_code_array(tmp_path):
    # a writer killed between create and its first add leaves such an index (benchmarks/faults.py)
    HashIndex.create(tmp_path / "ix", 64).close()
    with HashIndex.open(tmp_path / "ix") as r:
        assert r.packed_codes().shape == (0, 8) and r.packed_codes([]).shape == (0, 8)
