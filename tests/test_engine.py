import json
import shutil

import numpy as np
import pytest

from hashret.errors import HashretError
from click.testing import CliRunner

from hashret.cli import main
from hashret.data import load_dataset
from hashret.index import HashIndex
from hashret.engine import build_index, query_index
from hashret.training import train

SPEC = "synthetic:n_items=600,n_labels=6,image_dim=20,text_dim=50,n_query=60,n_train=300"
QUIET = dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = train("label-ridge", SPEC, 32, seed=0, out=root / "a", progress=False, evaluate=False, **QUIET)
    train("label-ridge", SPEC, 64, seed=0, out=root / "b64", progress=False, evaluate=False, **QUIET)
    train("cca-itq", SPEC, 32, seed=0, out=root / "c", progress=False, evaluate=False, **QUIET)
    build_index(root / "a", "text", root / "ix_text", progress=False, **QUIET)
    build_index(root / "a", "image", root / "ix_image", progress=False, **QUIET)
    return root, a


def test_index_holds_the_database_codes_of_the_model(runs):
    root, model = runs
    ds = load_dataset(SPEC)
    db = ds.part("database")
    with HashIndex.open(root / "ix_text") as ix:
        assert len(ix) == len(db) and ix.bits == 32 and ix.info_meta["modality"] == "text"
        from hashret.index import pack_codes
        np.testing.assert_array_equal(ix.packed_codes(ix.rows_of(db)), pack_codes(model.encode(ds.features("text", db), "text")))
        assert ix.items([int(db[0])])[0]["key"] == ds.ids[db[0]]
    saved = json.loads((root / "ix_text" / "index.json").read_text())
    assert saved["modality"] == "text" and saved["synthetic"] and saved["items"] == len(db)


def test_item_query_equals_a_direct_search(runs):
    root, model = runs
    ds = load_dataset(SPEC)
    q = int(ds.part("query")[0])
    res = query_index(root / "ix_text", root / "a", item=q, k=7)
    assert res["query_modality"] == "image"
    with HashIndex.open(root / "ix_text") as ix:
        d, i = ix.search(model.encode(ds.features("image", [q]), "image"), 7)
    assert [r["id"] for r in res["results"][0]] == i[0].tolist()
    assert [r["distance"] for r in res["results"][0]] == d[0].tolist()


def test_free_text_reports_unknown_words(runs):
    root, _ = runs
    res = query_index(root / "ix_image", root / "a", text="w1 w7 w30 zebra", k=3)
    assert res["known_words"] == ["w1", "w7", "w30"] and res["unknown_words"] == ["zebra"]
    assert len(res["results"][0]) == 3


def test_image_feature_file_query(runs, tmp_path):
    root, _ = runs
    np.save(tmp_path / "q.npy", np.ones((2, 20), dtype=np.float32))
    res = query_index(root / "ix_text", root / "a", image_features=str(tmp_path / "q.npy"), k=4)
    assert len(res["results"]) == 2 and all(len(g) == 4 for g in res["results"])


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_end_to_end_json(runs):
    root, _ = runs
    res = _cli("query", "--index", root / "ix_text", "--checkpoint", root / "a", "--item", "3",
               "-k", "5", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("["):res.output.rindex("]") + 1])
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"rank", "id", "distance"} <= set(rows[0])
    assert _cli("info", "--index", root / "ix_text").exit_code == 0


@pytest.mark.parametrize("args,match", [
    (["--item", "3", "-k", "0"], "positive"),
    (["--item", "99999"], "unknown item 99999"),
    (["--item", "nokey"], "unknown item 'nokey'"),
    (["--text", "w1"], "queries are images"),
    (["--image-features", "MISSING.npy"], "does not exist"),
    (["--image-features", "BADDIM"], "takes 20 dimensions"),
    ([], "exactly one query"),
])
def test_cli_query_errors(runs, tmp_path, args, match):
    root, _ = runs
    np.save(tmp_path / "bad.npy", np.ones((1, 7)))
    args = [str(tmp_path / "bad.npy") if a == "BADDIM" else a for a in args]
    res = _cli("query", "--index", root / "ix_text", "--checkpoint", root / "a", *args)
    assert res.exit_code == 2 and match in res.output, res.output


def test_cli_refuses_other_models_and_bad_indexes(runs, tmp_path):
    root, _ = runs
    res = _cli("query", "--index", root / "ix_text", "--checkpoint", root / "c", "--item", "1")
    assert res.exit_code == 2 and "query with the checkpoint the index was built from" in res.output
    before = (root / "ix_text" / "data.mdb").read_bytes()
    for ckpt in ("b64", "c"):  # another code length, another model
        res = _cli("build-index", "--checkpoint", root / ckpt, "--modality", "text",
                   "--out", root / "ix_text", "--append")
        assert res.exit_code == 2 and "refusing to mix" in res.output
    res = _cli("build-index", "--checkpoint", root / "a", "--modality", "text", "--out", root / "ix_text")
    assert res.exit_code == 2 and "--append" in res.output
    assert (root / "ix_text" / "data.mdb").read_bytes() == before
    res = _cli("query", "--index", tmp_path / "none", "--checkpoint", root / "a", "--item", "1")
    assert res.exit_code == 2 and "does not exist" in res.output
    bad = tmp_path / "bad"
    shutil.copytree(root / "ix_text", bad)
    (bad / "data.mdb").write_bytes(b"\0" * 4096)
    res = _cli("info", "--index", bad)
    assert res.exit_code == 2 and "corrupt" in res.output


def test_append_with_the_same_model(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "ix"
    build_index(root / "a", "text", out, part="query", progress=False, **QUIET)
    build_index(root / "a", "text", out, part="database", append=True, progress=False, **QUIET)
    with HashIndex.open(out) as ix:
        assert len(ix) == 600


# -- builds that finish or say so ----------------------------------------------------------------
def _failing_after(monkeypatch, n_calls):
    """Make the model's encoder fail on its (n_calls + 1)-th batch."""
    from hashret.engine import build as engine

    real = engine._source
    calls = {"n": 0}

    def source(*a, **kw):
        rows, encode, payloads = real(*a, **kw)

        def flaky(batch):
            calls["n"] += 1
            if calls["n"] > n_calls:
                raise HashretError("feature file unreadable (simulated)")
            return encode(batch)

        return rows, flaky, payloads

    monkeypatch.setattr(engine, "_source", source)


def _same_index(a, b):
    with HashIndex.open(a) as x, HashIndex.open(b) as y:
        rows = np.arange(x.n_rows)
        assert x.n_rows == y.n_rows
        np.testing.assert_array_equal(x.packed_codes(), y.packed_codes())
        np.testing.assert_array_equal(x._ids_of_rows(rows), y._ids_of_rows(rows))
        assert x.items(x._ids_of_rows(rows)) == y.items(y._ids_of_rows(rows))
        assert x.info()["complete"] and y.info()["complete"]


def test_failed_build_is_partial_and_resumes_to_the_uninterrupted_index(runs, tmp_path, monkeypatch):
    root, _ = runs
    _failing_after(monkeypatch, 3)
    with pytest.raises(HashretError, match="holds 150 rows, marked partial.*`resume=True`"):
        build_index(root / "a", "text", tmp_path / "ix", batch_size=50, progress=False, **QUIET)
    monkeypatch.undo()
    info = CliRunner().invoke(main, ["info", "--index", str(tmp_path / "ix")])
    assert json.loads(info.stdout)["complete"] is False
    q = CliRunner().invoke(main, ["query", "--index", str(tmp_path / "ix"), "--checkpoint", str(root / "a"),
                                  "--item", "3"])
    assert q.exit_code == 0 and "warning: the index at" in q.stderr and "partial" in q.stderr
    again = CliRunner().invoke(main, ["build-index", "--checkpoint", str(root / "a"), "--modality", "text",
                                      "--out", str(tmp_path / "ix")])
    assert again.exit_code == 2 and "interrupted build (150 of 540 items committed)" in again.stderr
    build_index(root / "a", "text", tmp_path / "ix", batch_size=64, resume=True, progress=False, **QUIET)
    _same_index(tmp_path / "ix", root / "ix_text")


def test_fresh_build_failing_before_its_first_commit_leaves_nothing(runs, tmp_path, monkeypatch):
    root, _ = runs
    _failing_after(monkeypatch, 0)
    with pytest.raises(HashretError, match="simulated"):
        build_index(root / "a", "text", tmp_path / "ix", batch_size=50, progress=False, **QUIET)
    assert not (tmp_path / "ix").exists()
    _failing_after(monkeypatch, 1)  # fails after the folder was created, before any commit
    with pytest.raises(HashretError):
        build_index(root / "a", "text", tmp_path / "ix2", batch_size=50, progress=False, **QUIET)
    monkeypatch.undo()
    build_index(root / "a", "text", tmp_path / "ix2", batch_size=50, progress=False, **QUIET)  # no flags
    _same_index(tmp_path / "ix2", root / "ix_text")


def test_damaged_checkpoints_name_the_file_and_field(runs, tmp_path):
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "a", run)
    cfg = json.loads((run / "config.json").read_text())
    del cfg["config"]["bits"]
    (run / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["query", "--index", str(root / "ix_text"), "--checkpoint", str(run), "--item", "3"])
    assert res.exit_code == 2 and "config.json: config field 'bits' is missing" in res.stderr
    shutil.copytree(root / "a", run, dirs_exist_ok=True)
    shutil.copy(root / "b64" / "weights.pt", run / "weights.pt")
    res = CliRunner().invoke(main, ["encode", "--checkpoint", str(run), "--modality", "text", "--out",
                                    str(tmp_path / "c.npy")])
    assert res.exit_code == 2 and "weights.pt does not fit" in res.stderr and res.stderr.count("\n") == 1


def test_a_build_reads_the_checkpoint_once(tmp_path, monkeypatch):
    """config.json and weights.pt are read once per build, a sharded one included (each
    shard built in this process shares the one Checkpoint)."""
    from collections import Counter

    from hashret.models import checkpoint

    train("label-ridge", SPEC, 32, seed=0, out=tmp_path / "run", progress=False, evaluate=False)
    reads = Counter()
    real = checkpoint._read
    monkeypatch.setattr(checkpoint, "_read", lambda path: reads.update([path.name]) or real(path))
    build_index(tmp_path / "run", "image", tmp_path / "one", progress=False)
    assert reads == {"config.json": 1, "weights.pt": 1}
    reads.clear()
    build_index(tmp_path / "run", "image", tmp_path / "sharded", progress=False, shards=3)
    assert reads == {"config.json": 1, "weights.pt": 1}


def test_the_cli_prints_the_librarys_messages_and_leaves_logging_as_it_was(tmp_path):
    import logging

    logger = logging.getLogger("hashret")
    before = (list(logger.handlers), logger.level, logger.propagate)
    res = CliRunner().invoke(main, ["train", "--model", "label-ridge", "--bits", "32", "--dataset", SPEC,
                                    "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "wrote " + str(tmp_path / "run") in res.stdout  # logged by hashret.training, printed by the CLI
    assert (list(logger.handlers), logger.level, logger.propagate) == before


def test_library_errors_name_parameters_and_the_cli_names_flags(tmp_path):
    from hashret.errors import as_flags

    assert as_flags("pass `append=True`, a new `out`, `rerank=RUN_DIR`, the same `part` and "
                    "`batch_size`") == "pass --append, a new --out, --rerank RUN_DIR, the same --split and --batch-size"
    train("label-ridge", SPEC, 32, seed=0, out=tmp_path / "run", progress=False, evaluate=False)
    build_index(tmp_path / "run", "image", tmp_path / "idx", progress=False)
    with pytest.raises(HashretError, match="pass `append=True` to add to it, or choose a new `out`"):
        build_index(tmp_path / "run", "image", tmp_path / "idx", progress=False)
    res = CliRunner().invoke(main, ["build-index", "--checkpoint", str(tmp_path / "run"), "--modality", "image",
                                    "--out", str(tmp_path / "idx")])
    assert res.exit_code == 2 and "pass --append to add to it, or choose a new --out" in res.stderr


def test_commands_that_need_no_model_import_no_model(tmp_path):
    """info, verify and code queries load neither torch nor the datasets' modules."""
    import subprocess
    import sys

    from hashret.index import HashIndex

    with HashIndex.create(tmp_path / "idx", 32) as ix:
        ix.add(np.random.default_rng(0).integers(0, 256, (100, 4), dtype=np.uint8))
    for args in (["info"], ["verify"], ["query", "--codes", "0a0b0c0d"]):
        code = (f"import sys\nsys.argv = ['hashret', {args[0]!r}, '--index', {str(tmp_path / 'idx')!r}, *{args[1:]!r}]\n"
                "from hashret.cli import main\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
                "print('torch' in sys.modules, 'hashret.models' in sys.modules, file=sys.stderr)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        assert out.stderr.strip().splitlines()[-1] == "False False", (args, out.stderr[-500:])


def test_warmup_readies_the_scan_for_a_code_length(tmp_path):
    res = CliRunner().invoke(main, ["warmup", "--bits", "32"])
    assert res.exit_code == 0 and res.stdout.startswith("32-bit codes: ready in")
    assert CliRunner().invoke(main, ["warmup", "--bits", "x"]).exit_code == 2


def test_newcomer_errors_and_conveniences(runs, tmp_path, monkeypatch):
    """A missing extra names it; click's own errors start 'error:' like every other; describe
    takes a NAME; --text-file is one query a line; a codes query says so; long payloads are
    marked where the table cuts them."""
    root, _ = runs
    runner = CliRunner()
    import builtins

    real_import = builtins.__import__

    def no_uvicorn(name, *a, **k):
        if name.split(".")[0] in ("uvicorn", "fastapi"):
            raise ModuleNotFoundError(f"No module named '{name}'", name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_uvicorn)
    res = runner.invoke(main, ["serve", "--index", str(root / "ix_text")])
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert res.exit_code == 2 and "'serve' extra" in res.output and 'pip install -e ".[serve]"' in res.output
    res = runner.invoke(main, ["query", "--index", str(root / "ix_text")])  # no query at all
    assert res.exit_code != 0 and res.output.splitlines()[-1].startswith("error: ")
    res = runner.invoke(main, ["query", "--bogus"])  # click's usage error, in our words
    assert res.exit_code == 2 and "error: No such option '--bogus'" in res.output and "Error:" not in res.output
    res = runner.invoke(main, ["describe", SPEC, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["items"] == 600
    assert runner.invoke(main, ["describe", "--dataset", SPEC]).exit_code == 0
    assert "give the dataset once" in runner.invoke(main, ["describe"]).output
    queries = tmp_path / "q.txt"
    queries.write_text("w1 w7\n\nw30 w2\n")
    res = runner.invoke(main, ["query", "--index", str(root / "ix_image"), "--checkpoint", str(root / "a"),
                               "--text-file", str(queries), "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert sorted({r["query"] for r in got}) == [0, 1]  # two lines, two queries
    one = query_index(root / "ix_image", root / "a", text="w30 w2", k=3)["results"][0]
    assert [r["id"] for r in got if r["query"] == 1] == [r["id"] for r in one]
    with HashIndex.open(root / "ix_text") as ix:
        code = ix.packed_codes([0])[0].tobytes().hex()
    assert query_index(root / "ix_text", codes=[code], k=2)["query_modality"] == "codes"
    with HashIndex.create(tmp_path / "long", 32) as w:
        w.add(np.zeros((1, 4), np.uint8), items=[{"caption": "x" * 300}])
    res = runner.invoke(main, ["query", "--index", str(tmp_path / "long"), "--codes", "00000000"])
    line = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("1 ")][0]
    assert line.endswith("…") and len(line) < 140
