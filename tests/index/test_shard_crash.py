"""A sharded index keeps every acknowledged write and never serves part of a batch: a process
killed between two shards' commits leaves a batch that readers do not see and that the next
writer completes; and a manifest or shard that disagrees with the rest is one line naming the
shard and the field, from query, info and verify alike, with nothing served or changed."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import xxhash
from click.testing import CliRunner

from hashret.cli import main
from hashret.errors import HashretError
from hashret.index import HashIndex
from hashret.index.manifest import MANIFEST, read_manifest, shard_paths
from hashret.index.sharded import ShardedIndex

BITS = 32

# SIGKILL this process when the batch reaches one shard: the shards before it have committed
CRASH = r"""
import json, os, signal, sys
import numpy as np
from hashret.index import HashIndex
from hashret.index.sharded import ShardedIndex
path, op, die_at, arg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
real = getattr(HashIndex, op)
def dying(self, *a, **k):
    if self.path is not None and self.path.name == die_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **k)
setattr(HashIndex, op, dying)
ix = ShardedIndex.open(path, readonly=False)
if op == "add":
    ix.add(np.array(arg["codes"], np.uint8), ids=arg["ids"], items=arg["items"],
           attributes={"year": np.array(arg["year"]), "tag": arg["tag"]})
else:
    ix.remove(arg)
print("acknowledged", flush=True)
"""


def codes(n, seed):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(25, BITS // 8), dtype=np.uint8)  # ties, to test their order
    return pool[rng.integers(0, 25, size=n)]


def attrs(lo, hi):
    """Attributes of items lo..hi-1: a batch carries them through the journal like its codes."""
    return {"year": np.arange(lo, hi) % 5 + 2000, "tag": [f"t{i % 3}" for i in range(lo, hi)]}


def make(tmp_path, explicit, n=40):
    one = HashIndex(BITS)
    path = tmp_path / "sharded"
    with ShardedIndex.create(path, BITS, 3, chunk_size=16) as sh:
        for lo, hi in ((0, 11), (11, n)):
            ids = np.arange(lo, hi) * 7 + 1 if explicit else None
            items = [{"i": i} for i in range(lo, hi)]
            sh.add(codes(n, 0)[lo:hi], ids=ids, items=items, attributes=attrs(lo, hi))
            one.add(codes(n, 0)[lo:hi], ids=ids, items=items, attributes=attrs(lo, hi))
    return path, one


def crash(path, op, die_at, arg):
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path), op, die_at, json.dumps(arg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "acknowledged" not in proc.stdout


def answers(ix, ids):
    q = np.vstack([codes(40, 0)[:4], codes(3, 9)])
    out = [ix.search(q, k) for k in (1, 7, 200)] + [ix.range_search(q, r) for r in (0, 5)]
    out += [ix.search(q, 7, filter={"year": {"gte": 2002}, "tag": {"ne": "t1"}})]
    return out, len(ix), ix.items(ids) + ix.attributes(ids)


def assert_same(a, b):
    (ra, la, ia), (rb, lb, ib) = a, b
    for x, y in zip(ra, rb):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert la == lb and ia == ib


@pytest.mark.parametrize("explicit", [False, True])
@pytest.mark.parametrize("die_at", ["shard-001", "shard-002"])
def test_an_add_killed_between_shards_is_hidden_then_completed(tmp_path, explicit, die_at):
    path, one = make(tmp_path, explicit)
    new_ids = (np.arange(40, 47) * 7 + 1).tolist() if explicit else None
    batch = {"codes": codes(7, 3).tolist(), "ids": new_ids, "items": [{"new": j} for j in range(7)],
             "year": attrs(40, 47)["year"].tolist(), "tag": attrs(40, 47)["tag"]}
    crash(path, "add", die_at, batch)
    kept = (np.arange(40) * 7 + 1) if explicit else np.arange(40)
    with ShardedIndex.open(path) as r:  # a reader writes nothing: the batch is simply not there
        assert_same(answers(r, kept), answers(one, kept))
        assert r.info()["journal"]["pending"] == "add"
        gone = new_ids[0] if explicit else 40
        assert not r.contains(gone)
        with pytest.raises(HashretError, match="unknown id"):
            r.items([gone])
    res = CliRunner().invoke(main, ["verify", "--index", str(path)])
    assert res.exit_code == 0, res.output  # a pending batch is not damage
    with ShardedIndex.open(path, readonly=False) as w:  # the next writer completes it
        assert w.recovered == {"batch": 3, "op": "add", "items": 7}
    one.add(np.array(batch["codes"], np.uint8), ids=new_ids, items=batch["items"], attributes=attrs(40, 47))
    all_ids = np.concatenate([kept, new_ids if explicit else np.arange(40, 47)])
    with ShardedIndex.open(path) as r:
        assert_same(answers(r, all_ids), answers(one, all_ids))
        assert r.info()["journal"] == {"batch": 3, "pending": None, "hidden_rows": 0, "hidden_removals": 0}
    with ShardedIndex.open(path, readonly=False) as w:  # and writes on from there
        w.add(codes(5, 4), ids=(np.arange(47, 52) * 7 + 1) if explicit else None, attributes=attrs(47, 52))
        one.add(codes(5, 4), ids=(np.arange(47, 52) * 7 + 1) if explicit else None, attributes=attrs(47, 52))
        assert_same(answers(w, all_ids), answers(one, all_ids))


@pytest.mark.parametrize("explicit", [False, True])
def test_a_removal_killed_between_shards_is_whole_for_readers_then_completed(tmp_path, explicit):
    path, one = make(tmp_path, explicit)
    all_ids = (np.arange(40) * 7 + 1) if explicit else np.arange(40)
    gone = all_ids[[0, 1, 2, 5, 30]]
    crash(path, "remove", "shard-001", gone.tolist())
    one.remove(gone)
    with ShardedIndex.open(path) as r:  # shard 0 removed its part; readers see the whole removal
        assert_same(answers(r, all_ids), answers(one, all_ids))
        assert r.info()["removed"] == 5 and not r.contains(int(gone[1]))
    with ShardedIndex.open(path, readonly=False) as w:
        assert w.recovered["op"] == "remove"
        assert_same(answers(w, all_ids), answers(one, all_ids))


def test_a_failed_shard_write_is_not_acknowledged_and_completed_by_the_next_write(tmp_path, monkeypatch):
    path, one = make(tmp_path, False)
    real = HashIndex.add
    fail = {"on": True}

    def full_disk(self, *a, **k):
        if fail["on"] and self.path.name == "shard-002":
            raise HashretError("no space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(HashIndex, "add", full_disk)
    with ShardedIndex.open(path, readonly=False) as w:
        with pytest.raises(HashretError, match="not acknowledged"):
            w.add(codes(6, 3), attributes=attrs(40, 46))
        assert len(w) == 40 and w.search(codes(1, 3), 100)[1].max() < 40  # hidden here too
        fail["on"] = False
        w.add(codes(2, 4), attributes=attrs(46, 48))  # completes the stopped batch first, then adds this one
    one.add(codes(6, 3), attributes=attrs(40, 46))
    one.add(codes(2, 4), attributes=attrs(46, 48))
    with ShardedIndex.open(path) as r:
        assert_same(answers(r, np.arange(48)), answers(one, np.arange(48)))


# -- a manifest that cannot lie ------------------------------------------------------------------
def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in ("lock.mdb", "writer.lock"):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def rewrite_manifest(path, **fields):
    """An edit made with care: the checksum recomputed, so only the shards' records can tell."""
    m = read_manifest(path)
    m.update(fields)
    body = json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True)
    m["checksum"] = xxhash.xxh3_64_hexdigest(body.encode(), seed=0x53484152)
    (path / MANIFEST).write_text(json.dumps(m))


def other_index(tmp_path, bits=BITS):
    with ShardedIndex.create(tmp_path / f"other{bits}", bits, 3) as o:
        o.add(np.zeros((40, bits // 8), np.uint8))
    return tmp_path / f"other{bits}"


def damage(kind, path, tmp_path):
    shards = shard_paths(path, 3)
    if kind == "manifest shards edited":
        m = json.loads((path / MANIFEST).read_text())
        m["shards"] = 2
        (path / MANIFEST).write_text(json.dumps(m))
        return "fails its checksum"
    if kind == "manifest bits edited":
        m = json.loads((path / MANIFEST).read_text())
        m["bits"] = 64
        (path / MANIFEST).write_text(json.dumps(m))
        return "fails its checksum"
    if kind == "manifest shards rewritten":
        rewrite_manifest(path, shards=2)
        return "shard-002"
    if kind == "manifest bits rewritten":
        rewrite_manifest(path, bits=64)
        return "shard 0 .* 32-bit codes, the manifest says 64"
    if kind == "manifest model rewritten":
        rewrite_manifest(path, info={"model_fingerprint": "feedbeef"})
        return "shard 0 .*model_fingerprint"
    if kind == "shards swapped":
        shards[0].rename(tmp_path / "x")
        shards[1].rename(shards[0])
        (tmp_path / "x").rename(shards[1])
        return "shard 0 .*position 1.*swapped"
    if kind == "shard replaced by a 64-bit index":
        shutil.rmtree(shards[2])
        with HashIndex.create(shards[2], 64) as h:
            h.add(np.zeros((13, 8), np.uint8))
        return "shard 2 .*no shard record"
    if kind == "shard from another sharded index":
        shutil.rmtree(shards[1])
        shutil.copytree(shard_paths(other_index(tmp_path), 3)[1], shards[1])
        return "shard 1 .*another sharded index"
    if kind == "shard missing":
        shutil.rmtree(shards[1])
        return "shard 1 .*missing"
    if kind == "journal damaged":
        j = path / "journal"
        raw = bytearray(j.read_bytes())
        raw[12] ^= 0x40
        j.write_bytes(bytes(raw))
        return "journal .*(checksum|JSON)"
    raise AssertionError(kind)


KINDS = ["manifest shards edited", "manifest bits edited", "manifest shards rewritten",
         "manifest bits rewritten", "manifest model rewritten", "shards swapped",
         "shard replaced by a 64-bit index", "shard from another sharded index", "shard missing",
         "journal damaged"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_disagreement_is_one_line_naming_the_shard_from_query_info_and_verify(tmp_path, kind):
    path, _ = make(tmp_path, False)
    expect = damage(kind, path, tmp_path)
    before = digest(path)
    runner = CliRunner()
    for args in (["query", "--index", str(path), "--codes", "0a0b0c0d"], ["info", "--index", str(path)],
                 ["verify", "--index", str(path)]):
        res = runner.invoke(main, args)
        assert res.exit_code != 0, (args[0], res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        if lines[0].startswith("corrupt:"):  # verify's report: header, the problems, the fix
            assert any(__import__("re").search(expect, ln) for ln in lines[1:-1]), (args[0], lines)
        else:
            assert len(lines) == 1 and lines[0].startswith("error:"), (args[0], lines)
            assert __import__("re").search(expect, lines[0]), (args[0], lines[0])
        assert res.stdout == "", (args[0], res.stdout)
    with pytest.raises(HashretError):
        ShardedIndex.open(path, readonly=False).close()
    assert digest(path) == before


def test_shards_built_from_the_same_model_still_need_the_same_set(tmp_path):
    """Two builds of the same model and data: a shard of one in the other is still foreign."""
    from hashret.engine import build_index
    from hashret.training import train

    spec = "synthetic:n_items=200,n_labels=4,image_dim=10,text_dim=20,n_query=20,n_train=100"
    quiet = dict(progress=False)
    train("label-ridge", spec, 16, seed=0, out=tmp_path / "m", evaluate=False, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "a", shards=2, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "b", shards=2, **quiet)
    shutil.rmtree(tmp_path / "a" / "shard-001")
    shutil.copytree(tmp_path / "b" / "shard-001", tmp_path / "a" / "shard-001")
    with pytest.raises(HashretError, match="shard 1 .*another sharded index"):
        ShardedIndex.open(tmp_path / "a")
    train("label-ridge", spec, 16, seed=1, out=tmp_path / "m2", evaluate=False, **quiet)
    build_index(tmp_path / "m2", "image", tmp_path / "c", shards=2, **quiet)
    m = read_manifest(tmp_path / "c")  # a shard of another model under this manifest's set
    rewrite_manifest(tmp_path / "a", set=m["set"])
    shutil.rmtree(tmp_path / "a" / "shard-000")
    shutil.copytree(tmp_path / "c" / "shard-000", tmp_path / "a" / "shard-000")
    with pytest.raises(HashretError, match="shard 0 .*(model_fingerprint|modality)"):
        ShardedIndex.open(tmp_path / "a")


# -- builds that finish or say so -----------------------------------------------------------------
def test_resume_refuses_another_build_and_a_shard_killed_while_created_resumes(tmp_path):
    from hashret.engine import build_index, index_info, query_index
    from hashret.training import train

    spec = "synthetic:n_items=200,n_labels=4,image_dim=10,text_dim=20,n_query=20,n_train=100"
    quiet = dict(progress=False)
    train("label-ridge", spec, 16, seed=0, out=tmp_path / "m", evaluate=False, **quiet)
    train("label-ridge", spec, 16, seed=1, out=tmp_path / "m2", evaluate=False, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "whole", shards=3, **quiet)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    # as a kill leaves it: shard 1 created but never committed, shard 2 never started
    shutil.rmtree(cut / "shard-002")
    (cut / "index.json").unlink()
    shutil.rmtree(cut / "shard-001")
    from hashret.index.store import LMDBStore

    (cut / "shard-001").mkdir()
    LMDBStore(cut / "shard-001", readonly=False, create=True).close()  # tables, no meta record
    info = index_info(cut)
    assert info["complete"] is False and info["build"]["state"] == "partial"
    assert "--resume" in info["build"]["resume"] and info["build"]["shards_complete"] == [0]
    res = CliRunner().invoke(main, ["query", "--index", str(cut), "--codes", "0a0b"])
    assert res.exit_code != 0 and "interrupted sharded build" in res.stderr and "--resume" in res.stderr
    for kw, field in ((dict(checkpoint=tmp_path / "m", modality="image"), "modality"),
                      (dict(checkpoint=tmp_path / "m2", modality="text"), "model_fingerprint"),
                      (dict(checkpoint=tmp_path / "m", modality="text", part="query"), "part")):
        with pytest.raises(HashretError, match=f"build of {field}.*resume with the same"):
            build_index(kw.pop("checkpoint"), kw.pop("modality"), cut, shards=3, resume=True, **kw, **quiet)
    build_index(tmp_path / "m", "text", cut, shards=3, resume=True, **quiet)
    assert index_info(cut)["complete"]
    a = query_index(tmp_path / "whole", tmp_path / "m", item="3", k=50)["results"]
    assert query_index(cut, tmp_path / "m", item="3", k=50)["results"] == a
    with pytest.raises(HashretError, match="complete: nothing to resume"):
        build_index(tmp_path / "m", "text", cut, shards=3, resume=True, **quiet)


def test_a_build_killed_before_its_manifest_starts_over(tmp_path):
    from hashret.engine import build_index
    from hashret.training import train

    spec = "synthetic:n_items=200,n_labels=4,image_dim=10,text_dim=20,n_query=20,n_train=100"
    quiet = dict(progress=False)
    train("label-ridge", spec, 16, seed=0, out=tmp_path / "m", evaluate=False, **quiet)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / (MANIFEST + ".tmp")).write_text("{")
    assert build_index(tmp_path / "m", "text", tmp_path / "out", shards=2, **quiet)["complete"]
    assert not os.path.exists(tmp_path / "out" / (MANIFEST + ".tmp"))

