import json
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
