"""A sharded index answers exactly as one HashIndex holding the same codes in the same order:
in this process and on a local Ray (2 CPUs), with ties, removals, k past a shard's size and
radius search; an actor that dies is survived, a shard that stays down is one clear line."""

import json
import time

import numpy as np
import pytest

from hashret.errors import HashretError, NotFoundError
from hashret.index import HashIndex
from hashret.index.manifest import shard_paths
from hashret.index.sharded import ShardedIndex


def tied_codes(n, bits=32, seed=0, distinct=40):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(distinct, bits // 8), dtype=np.uint8)
    return pool[rng.integers(0, distinct, size=n)]


def same(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def build_pair(tmp_path, n_shards, explicit, ray=None, n=1000):
    db = tied_codes(n)
    ids = np.random.default_rng(1).permutation(10**6)[:n] if explicit else None
    one = HashIndex(32)
    sharded = ShardedIndex.create(tmp_path / f"sh{n_shards}{explicit}", 32, n_shards, chunk_size=128, ray=ray)
    for lo, hi in ((0, 7), (7, 400), (400, n)):  # batches that do not divide by the shard count
        part = None if ids is None else ids[lo:hi]
        attrs = {"year": np.arange(lo, hi) % 7 + 2000, "tag": [f"t{i % 4}" for i in range(lo, hi)]}
        one.add(db[lo:hi], ids=part, items=[{"i": int(i)} for i in range(lo, hi)], attributes=attrs)
        sharded.add(db[lo:hi], ids=part, items=[{"i": int(i)} for i in range(lo, hi)], attributes=attrs)
    return db, ids, one, sharded


def check_equal(db, ids, one, sharded):
    q = np.vstack([db[:5], tied_codes(4, seed=9)])
    for k in (1, 10, 333, 5000):  # 5000: more than a shard, more than the index
        same(sharded.search(q, k), one.search(q, k))
    for radius in (0, 3, 32):
        same(sharded.range_search(q, radius), one.range_search(q, radius))
    n = len(db)
    some = (ids if ids is not None else np.arange(n))[[1, 2, n // 3]].tolist()
    for f in ({"year": {"lt": 2002}}, {"tag": {"in": ["t1", "t3"]}, "year": {"eq": 2005}},
              {"or": [{"id": {"in": some}}, {"year": {"eq": 2006}}]}):  # pushed to every shard
        for k in (1, 10, 5000):
            same(sharded.search(q, k, filter=f), one.search(q, k, filter=f))
        same(sharded.range_search(q, 8, filter=f), one.range_search(q, 8, filter=f))
    gone = (ids if ids is not None else np.arange(n))[[0, 3, n // 2, n - 1]]
    assert sharded.remove(gone) == one.remove(gone) == 4
    for k in (10, 999, 5000):
        same(sharded.search(q, k), one.search(q, k))
    same(sharded.range_search(q, 4), one.range_search(q, 4))
    some = (ids if ids is not None else np.arange(n))[[1, 2, n - 2]]
    assert sharded.items(some) == one.items(some)
    assert len(sharded) == len(one) and sharded.n_rows == one.n_rows
    with pytest.raises(NotFoundError, match="unknown id"):
        sharded.remove([10**9])


@pytest.mark.parametrize("n_shards", [1, 3, 4])
@pytest.mark.parametrize("explicit", [False, True])
def test_in_process_shards_answer_as_one_index(tmp_path, n_shards, explicit):
    db, ids, one, sharded = build_pair(tmp_path, n_shards, explicit)
    with sharded:
        check_equal(db, ids, one, sharded)
    with ShardedIndex.open(tmp_path / f"sh{n_shards}{explicit}") as back:  # from disk, read-only
        q = db[:6]
        same(back.search(q, 50), one.search(q, 50))
        assert back.info()["shards"] == n_shards and back.info()["items"] == len(one)


def test_bad_input_and_interrupted_adds(tmp_path):
    with ShardedIndex.create(tmp_path / "s", 32, 3) as sh:
        sh.add(tied_codes(10), ids=np.arange(10))
        with pytest.raises(HashretError, match="id 4 is already"):
            sh.add(tied_codes(2), ids=[100, 4])
        with pytest.raises(HashretError, match="explicit ids"):
            sh.add(tied_codes(2))
        assert sh.n_rows == 10
    # a batch that reached shard 0 but not the others: refused, not served mixed
    with HashIndex.open(shard_paths(tmp_path / "s", 3)[0], readonly=False) as s0:
        s0.add(tied_codes(2), ids=[500, 501])
    with pytest.raises(HashretError, match="do not split round-robin"):
        ShardedIndex.open(tmp_path / "s")
    with pytest.raises(HashretError, match="no sharded index"):
        ShardedIndex.open(tmp_path / "nothing")


def test_verify_names_the_damaged_shard(tmp_path):
    from hashret.engine import verify_index

    db = tied_codes(3000, distinct=3000)
    with ShardedIndex.create(tmp_path / "s", 32, 2, chunk_size=512) as sh:
        sh.add(db)
    assert verify_index(tmp_path / "s")["ok"]
    data = bytearray((shard_paths(tmp_path / "s", 2)[1] / "data.mdb").read_bytes())
    at = data.find(db[1:2001:2].tobytes()[:64])  # shard 1 holds rows 1, 3, 5, ...
    assert at > 0
    data[at + 8] ^= 0xFF
    (shard_paths(tmp_path / "s", 2)[1] / "data.mdb").write_bytes(bytes(data))
    report = verify_index(tmp_path / "s")
    assert not report["ok"] and report["problems"][0].startswith("shard-001: code chunk 0")


# -- on Ray ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_ray_shards_answer_as_one_index_and_survive_a_killed_actor(tmp_path, ray_local):
    db, ids, one, sharded = build_pair(tmp_path, 3, True, ray=True, n=600)
    with sharded:
        check_equal(db, ids, one, sharded)
        # an actor killed mid-run: Ray restarts it from its LMDB shard, the call is retried
        ray_local.kill(sharded.shards[1].actor, no_restart=False)
        q = db[:4]
        same(sharded.search(q, 20), one.search(q, 20))
        # a shard that stays down: one clear line, or an explicit partial answer
        ray_local.kill(sharded.shards[2].actor, no_restart=True)
        deadline = time.time() + 30  # ray.kill returns before the actor is gone
        while time.time() < deadline:
            try:
                ray_local.get(sharded.shards[2].actor.pid.remote(), timeout=5)
                time.sleep(0.1)
            except ray_local.exceptions.RayActorError:
                break
        with pytest.raises(HashretError, match=r"shard 2 .* cannot answer"):
            sharded.search(q, 20)
        d, got = sharded.search(q, 20, allow_partial=True)
        assert sharded.last_partial == [2]
        owners = {int(i) % 3 for i in got[got >= 0]}
        assert got.shape == (4, 20) and len(set(got[got >= 0].tolist()) & set(ids[2::3].tolist())) == 0
        assert owners  # answered from the shards that are up


def test_query_json_over_three_shards_equals_the_unsharded_index(tmp_path, ray_local):
    from click.testing import CliRunner

    from hashret.cli import main
    from hashret.engine import build_index
    from hashret.training import train

    spec = "synthetic:n_items=400,n_labels=5,image_dim=12,text_dim=30,n_query=40,n_train=200"
    quiet = dict()
    train("label-ridge", spec, 16, seed=0, out=tmp_path / "m", progress=False, evaluate=False, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "one", progress=False, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "three", progress=False, shards=3, **quiet)
    build_index(tmp_path / "m", "text", tmp_path / "three_ray", progress=False, shards=3, ray=True, **quiet)
    runner = CliRunner()

    def query(index, *extra):
        r = runner.invoke(main, ["query", "--index", str(index), "--checkpoint", str(tmp_path / "m"),
                                 "--item", "5", "-k", "25", "--json", *extra])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    expect = query(tmp_path / "one")
    assert query(tmp_path / "three") == expect
    assert query(tmp_path / "three", "--ray") == expect
    assert query(tmp_path / "three_ray") == expect  # its shards built as Ray tasks
    only = ("--filter", json.dumps({"labels": {"any": ["concept1", "concept3"]}, "id": {"not_in": [0, 1, 2]}}))
    expect = query(tmp_path / "one", *only)
    assert expect and all({"concept1", "concept3"} & set(r["attributes"]["labels"]) for r in expect)
    assert query(tmp_path / "three", *only) == expect == query(tmp_path / "three", "--ray", *only)
    info = json.loads(runner.invoke(main, ["info", "--index", str(tmp_path / "three")]).stdout)
    assert info["shards"] == 3 and info["complete"] and sum(info["shard_items"]) == info["items"]


def test_an_interrupted_sharded_build_resumes_to_the_same_index(tmp_path, monkeypatch):
    from hashret.engine import build as engine
    from hashret.engine import build_index, query_index
    from hashret.training import train

    spec = "synthetic:n_items=300,n_labels=4,image_dim=10,text_dim=20,n_query=30,n_train=150"
    quiet = dict()
    train("label-ridge", spec, 16, seed=0, out=tmp_path / "m", progress=False, evaluate=False, **quiet)
    build_index(tmp_path / "m", "image", tmp_path / "whole", progress=False, shards=3, **quiet)
    real = engine._build_one_shard

    def dies_on_shard_1(*args, **kw):
        if args[8]["position"] == 1:
            raise HashretError("disk on fire")
        return real(*args, **kw)

    monkeypatch.setattr(engine, "_build_one_shard", dies_on_shard_1)
    with pytest.raises(HashretError, match="disk on fire"):
        build_index(tmp_path / "m", "image", tmp_path / "cut", progress=False, shards=3, **quiet)
    monkeypatch.setattr(engine, "_build_one_shard", real)
    with pytest.raises(HashretError, match="`resume=True`"):
        build_index(tmp_path / "m", "image", tmp_path / "cut", progress=False, shards=3, **quiet)
    build_index(tmp_path / "m", "image", tmp_path / "cut", progress=False, shards=3, resume=True, **quiet)
    a = query_index(tmp_path / "whole", tmp_path / "m", text="w1 w2", k=50)["results"]
    b = query_index(tmp_path / "cut", tmp_path / "m", text="w1 w2", k=50)["results"]
    assert a == b
