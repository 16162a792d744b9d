"""Fault injection, the long run: damaged checkpoints and indexes, bad input through the CLI
and the API, second writers, and SIGKILL during add / remove / compact / build-index with
--resume. Prints the outcome counts per family; exits 1 if any trial ended badly
(traceback, signal, silent wrong answer, a failing command that changed the index, an
unclear error, or lost data).

    python benchmarks/faults.py                      # ~300 trials, 120 kills, 60 sharded kills
    python benchmarks/faults.py --scale 1 --kills 20 --shard-kills 0  # the test suite's size

The sharded index's kill families (benchmarks/shard_faults.py): SIGKILL of a process writing a
ShardedIndex from Python, and of `hashret serve` on a 3-shard index under 8 writing clients;
each restart must keep every acknowledged batch, show no batch in part, and answer as one index.

Fault injection for the index, the checkpoints and the CLI: what a careless user, a full
disk or a kill -9 does to hashret, and what hashret does back.

Families (each trial is data, so a worker process can run it and a signal is counted, not
fatal to the runner):
- ``checkpoint``: a damaged RUN_DIR (missing, truncated, foreign or mismatched files,
  missing or ill-typed config fields) through ``query`` and ``build-index``;
- ``index``: a damaged index folder (truncated, bit-flipped, zeroed, foreign or edited
  files) through ``query``, ``info``, ``verify`` and ``build-index --append``;
- ``input``: bad arguments through the CLI; ``api``: bad arguments through ``HashIndex``;
- ``kill``: SIGKILL at a random moment of add / remove / compact (the adds carry attributes,
  which must come back aligned with their codes, a filtered search equal), and of build-index followed
  by ``--resume``; ``writers``: second writers in this process and in another.

Outcomes: ``detected`` (failed with one clear line, nothing changed), ``harmless`` (damage
that does not change the answer, e.g. in LMDB's free pages, answered correctly), ``ok``
(valid input answered), and the bad ones: ``traceback``, ``signal``, ``silent`` (exit 0 with
a wrong answer), ``changed`` (a failing command changed the index), ``unclear`` (failed
without a one-line error), ``lost`` (a kill lost committed data or a resume differed).
"""


from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # a checkout
from shard_faults import kill_midway, run_shard_kills  # noqa: E402

BAD = ("traceback", "signal", "silent", "changed", "unclear", "lost")
SPEC = "synthetic:n_items=600,n_labels=6,image_dim=20,text_dim=50,n_query=60,n_train=300"
QUERY_ITEM = 7


def _quiet(*_a, **_k):
    pass


# -- fixture ---------------------------------------------------------------------------------
def make_fixture(root) -> Path:
    """Two small trained models and an index of the first (a few seconds)."""
    from hashret.engine import build_index
    from hashret.training import train

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "idx" / "index.json").exists():
        train("label-ridge", SPEC, 32, seed=0, out=root / "run", progress=False, evaluate=False)
        train("label-ridge", SPEC, 64, seed=0, out=root / "run64", progress=False, evaluate=False)
        build_index(root / "run", "text", root / "idx", batch_size=100, progress=False)
        np.save(root / "feats_ok.npy", np.random.default_rng(0).standard_normal((2, 20)).astype(np.float32))
        np.save(root / "feats_dim.npy", np.zeros((2, 7), np.float32))
        np.save(root / "feats_nan.npy", np.full((1, 20), np.nan, np.float32))
        (root / "garbage.npy").write_bytes(os.urandom(100))
        (root / "a_file").write_text("not a folder")
    return root


# -- trials ------------------------------------------------------------------------------------
QUERY = ["query", "--index", "{idx}", "--checkpoint", "{run}", "--item", str(QUERY_ITEM), "-k", "10", "--json"]
CHECKPOINT_DAMAGE = [
    ("rm", "weights.pt"), ("empty", "weights.pt"), ("truncate", "weights.pt"), ("random", "weights.pt"),
    ("swap_weights", "run64"), ("rm", "config.json"), ("empty", "config.json"),
    ("truncate", "config.json"), ("random", "config.json"), ("text", "config.json"),
    ("rm", "split.npz"), ("empty", "split.npz"), ("truncate", "split.npz"), ("random", "split.npz"),
] + [("drop_field", f) for f in ("model", "bits", "image_dim", "text_dim", "n_labels", "seed")] \
  + [("set_field", f, v) for f in ("bits", "image_dim", "n_labels") for v in ("64", -3, True, None, 1.5)] \
  + [("set_field", "model", v) for v in ("no-such-model", 3)] + [("set_field", "format_version", 9)]
INDEX_DAMAGE = ["truncate", "truncate_tiny", "flip", "flip", "flip", "zero_page", "rm_data", "empty_data",
                "random_data", "meta_text", "meta_json", "meta_count", "lock_garbage", "rm_index_json"]
INDEX_COMMANDS = [QUERY, ["info", "--index", "{idx}"], ["verify", "--index", "{idx}"],
                  ["build-index", "--checkpoint", "{run}", "--modality", "text", "--split", "query",
                   "--append", "--out", "{idx}"]]
def _q(*extra):
    return ["query", "--index", "{idx}", "--checkpoint", "{run}", *extra]


INPUTS = [  # (args, "fail" | "ok")
    (_q("--text", "   "), "fail"),
    (_q("--item", "99999"), "fail"),
    (_q("--item", "no-such-key"), "fail"),
    (_q("--item", "-1"), "fail"),
    (_q("--item", "3", "-k", "0"), "fail"),
    (_q("--item", "3", "-k", "-4"), "fail"),
    (_q("--item", "3", "-k", "abc"), "fail"),
    (_q("--item", "3", "-k", "2147483648"), "ok"),
    (_q("--item", "3", "-k", str(2**70)), "ok"),
    (_q(), "fail"),
    (_q("--item", "3", "--text", "w1"), "fail"),
    (_q("--image-features", "{root}/feats_ok.npy"), "ok"),
    (_q("--image-features", "{root}/feats_dim.npy"), "fail"),
    (_q("--image-features", "{root}/feats_nan.npy"), "fail"),
    (_q("--image-features", "{root}/garbage.npy"), "fail"),
    (_q("--text-file", "{root}/nope.txt"), "fail"),
    (_q("--item", "3", "--candidates", "5"), "fail"),
    (_q("--item", "3", "--rerank", "{run}"), "fail"),
    (["query", "--index", "{idx}", "--checkpoint", "{run64}", "--item", "3"], "fail"),
    (["query", "--index", "{root}/nope", "--checkpoint", "{run}", "--item", "3"], "fail"),
    (["query", "--index", "{root}/a_file", "--checkpoint", "{run}", "--item", "3"], "fail"),
    (["query", "--index", "{run}", "--checkpoint", "{run}", "--item", "3"], "fail"),
    (["query", "--index", "{idx}", "--checkpoint", "{idx}", "--item", "3"], "fail"),
    (_q("--item", "3", "--dataset", "no-such-set"), "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "image", "--out", "{root}/feats_ok.npy"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{idx}"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{idx}", "--resume"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "image", "--out", "{idx}", "--append"], "fail"),
    (["build-index", "--checkpoint", "{run64}", "--modality", "text", "--out", "{idx}", "--append"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{idx}", "--append", "--resume"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{tmp}/new", "--batch-size", "0"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{tmp}/new", "--resume"], "fail"),
    (["build-index", "--checkpoint", "{root}/nope", "--modality", "text", "--out", "{tmp}/new"], "fail"),
    (["build-index", "--checkpoint", "{run}", "--modality", "text", "--out", "{tmp}/new", "--dataset", "{root}/garbage.npy"], "fail"),
    (["info", "--index", "{root}/nope"], "fail"),
    (["verify", "--index", "{root}/a_file"], "fail"),
    (["encode", "--checkpoint", "{run}", "--modality", "image", "--features", "{root}/feats_dim.npy", "--out", "{tmp}/c.npy"], "fail"),
    (["encode", "--checkpoint", "{run}", "--modality", "image", "--features", "{root}/feats_nan.npy", "--out", "{tmp}/c.npy"], "fail"),
    (["encode", "--checkpoint", "{run}", "--modality", "image", "--features", "{root}/garbage.npy", "--out", "{tmp}/c.npy"], "fail"),
    (["info", "--index", "{idx}"], "ok"),
    (["verify", "--index", "{idx}"], "ok"),
]


def trials(seed: int = 0, scale: int = 1) -> list:
    """The CLI trials of every damage and input family; ``scale`` repeats the randomised ones."""
    rng = random.Random(seed)
    out = []
    for rep in range(scale):
        for damage in CHECKPOINT_DAMAGE:
            if rep and damage[0] not in ("truncate", "random"):
                continue
            harmless = damage == ("rm", "split.npz")  # the default split is the one it was trained on
            for cmd in (QUERY,) if harmless else (QUERY, ["build-index", "--checkpoint", "{run}",
                                                          "--modality", "text", "--out", "{tmp}/new"]):
                out.append({"family": "checkpoint", "damage": list(damage), "args": cmd,
                            "expect": "same" if harmless else "fail", "seed": rng.randrange(1 << 30)})
        for damage in INDEX_DAMAGE:
            for cmd in INDEX_COMMANDS:
                out.append({"family": "index", "damage": [damage], "args": cmd, "expect": "same",
                            "seed": rng.randrange(1 << 30)})
    for args, expect in INPUTS:
        out.append({"family": "input", "damage": [], "args": args, "expect": expect, "seed": 0})
    return out


# -- damage ------------------------------------------------------------------------------------
def _damage_file(path: Path, how: str, rng: random.Random):
    if how == "rm":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[:rng.randrange(max(1, len(data)))])
    elif how == "random":
        path.write_bytes(rng.randbytes(max(64, path.stat().st_size)))
    elif how == "text":
        path.write_text("this is not json {")


def damage_checkpoint(run: Path, damage: list, root: Path, rng: random.Random):
    kind = damage[0]
    if kind == "swap_weights":
        shutil.copy(root / damage[1] / "weights.pt", run / "weights.pt")
    elif kind in ("drop_field", "set_field"):
        info = json.loads((run / "config.json").read_text())
        target = info if damage[1] == "format_version" else info["config"]
        if kind == "drop_field":
            target.pop(damage[1], None)
        else:
            target[damage[1]] = damage[2]
        (run / "config.json").write_text(json.dumps(info))
    else:
        _damage_file(run / damage[1], kind, rng)


def damage_index(idx: Path, damage: str, rng: random.Random):
    data = idx / "data.mdb"
    size = data.stat().st_size
    if damage == "truncate":
        os.truncate(data, rng.randrange(4096 * 2, size))
    elif damage == "truncate_tiny":
        os.truncate(data, rng.randrange(0, 200))
    elif damage in ("flip", "zero_page"):
        with open(data, "r+b") as fh:
            if damage == "flip":
                at = rng.randrange(0, size - 64)
                fh.seek(at)
                block = bytearray(fh.read(64))
                for i in range(len(block)):
                    block[i] ^= rng.randrange(1, 256)
            else:
                at = rng.randrange(2, size // 4096) * 4096
                block = bytearray(4096)
            fh.seek(at)
            fh.write(block)
    elif damage == "rm_data":
        data.unlink()
    elif damage == "empty_data":
        data.write_bytes(b"")
    elif damage == "random_data":
        data.write_bytes(rng.randbytes(size))
    elif damage.startswith("meta_"):
        import lmdb

        env = lmdb.open(str(idx), max_dbs=8)
        db = env.open_db(b"meta")
        with env.begin(write=True) as txn:
            raw = bytes(txn.get(b"meta", db=db))
            meta = json.loads(raw[:-8])
            if damage == "meta_text":
                value = b"{not json"
            elif damage == "meta_json":
                value = json.dumps(meta).encode()  # edited by hand: no checksum
            else:
                meta["count"] = 10**12
                value = json.dumps(meta).encode() + raw[-8:]
            txn.put(b"meta", value, db=db)
        env.close()
    elif damage == "lock_garbage":
        (idx / "lock.mdb").write_bytes(rng.randbytes(8192))
    elif damage == "rm_index_json":
        (idx / "index.json").unlink()


# -- running one CLI trial ----------------------------------------------------------------------
def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("data.mdb", "index.json"):
        f = folder / name
        h.update(name.encode() + (f.read_bytes() if f.is_file() else b"<none>"))
    return h.hexdigest()


def run_cli(args: list) -> dict:
    """Run the hashret CLI in this process: exit code, stdout, stderr and any escaped exception."""
    from click.testing import CliRunner

    from hashret.cli import main

    res = CliRunner().invoke(main, args, catch_exceptions=True)
    escaped = res.exception if res.exception is not None and not isinstance(res.exception, SystemExit) else None
    return {"rc": res.exit_code, "stdout": res.stdout, "stderr": res.stderr,
            "escaped": None if escaped is None else f"{type(escaped).__name__}: {escaped}"}


def _one_line_error(stderr: str) -> bool:
    """Whether a terminal would show one 'error: ...' line (a progress bar's carriage returns
    overwrite its own text, so only what follows the last one on a line stays visible)."""
    visible = [ln.rsplit("\r", 1)[-1] for ln in stderr.split("\n")]
    lines = [ln for ln in visible if ln.strip() and not ln.startswith("warning:")]
    if not lines:
        return False
    if lines[0].startswith("corrupt:"):  # verify's report: a header, the problems, the fix
        return lines[-1].startswith("restore the folder")
    if (len(lines) == 3 and lines[0].startswith("Usage:") and lines[1].startswith("Try '")
            and lines[2].startswith("error:")):  # a usage error: the usage, where help is, one error line
        return True
    return len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in stderr


def run_trial(trial: dict, root: Path, reference: dict) -> dict:
    rng = random.Random(trial["seed"])
    work = root / "trial"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    run, idx = work / "run", work / "idx"
    shutil.copytree(root / "run", run)
    shutil.copytree(root / "idx", idx)
    if trial["family"] == "checkpoint":
        damage_checkpoint(run, trial["damage"], root, rng)
    elif trial["family"] == "index":
        damage_index(idx, trial["damage"][0], rng)
    subst = {"idx": str(idx), "run": str(run), "run64": str(root / "run64"), "root": str(root),
             "tmp": str(work)}
    args = [a.format(**subst) for a in trial["args"]]
    before = _digest(idx)
    res = run_cli(args)
    changed = _digest(idx) != before
    cmd = trial["args"][0]
    if res["escaped"]:
        outcome = "traceback"
    elif res["rc"] != 0:
        outcome = "changed" if changed else ("detected" if _one_line_error(res["stderr"]) else "unclear")
        if trial["expect"] == "ok":
            outcome = "unclear" if outcome == "detected" else outcome
    elif trial["expect"] == "fail":
        outcome = "silent"
    elif trial["expect"] == "ok":
        outcome = "ok"
    else:  # damage that left the answer as it was is harmless; another answer is silent
        same = {"query": lambda: res["stdout"] == reference["query"],
                "verify": lambda: True,
                "info": lambda: _info_key(res["stdout"]) == reference["info"],
                "build-index": lambda: _index_rows(idx) == reference["rows_after_append"]}[cmd]()
        if cmd == "verify" and trial["damage"][0] in ("flip", "zero_page"):
            same = reference["query"] == run_cli([a.format(**subst) for a in QUERY])["stdout"]
        outcome = "harmless" if same else "silent"
    return {"family": trial["family"], "damage": trial["damage"], "args": trial["args"],
            "outcome": outcome, "rc": res["rc"], "stderr": res["stderr"][-400:],
            "escaped": res["escaped"]}


def _info_key(stdout: str):
    try:
        info = json.loads(stdout)
    except ValueError:
        return None
    return (info.get("items"), info.get("bits"), info.get("complete"))


def _index_rows(idx: Path):
    from hashret.index import HashIndex

    try:
        with HashIndex.open(idx) as ix:
            return ix.n_rows
    except Exception:  # noqa: BLE001 -- any failure here means the append did not land cleanly
        return None


def reference_answers(root: Path) -> dict:
    q = run_cli([a.format(idx=root / "idx", run=root / "run") for a in QUERY])
    assert q["rc"] == 0, q
    info = run_cli(["info", "--index", str(root / "idx")])
    from hashret.data import load_dataset

    n_query = len(load_dataset(SPEC).part("query"))
    with __import__("hashret.index", fromlist=["HashIndex"]).HashIndex.open(root / "idx") as ix:
        rows = ix.n_rows
    return {"query": q["stdout"], "info": _info_key(info["stdout"]), "rows_after_append": rows + n_query}


def _worker(conn, trials_, root):
    root = Path(root)
    reference = reference_answers(root)
    for i, t in enumerate(trials_):
        conn.send((i, run_trial(t, root, reference)))
    conn.send(None)


def run_cli_trials(trials_: list, root) -> list:
    """Run CLI trials in a spawned worker; a worker killed by a signal counts that trial as
    ``signal`` and a new worker carries on with the next."""
    ctx = mp.get_context("spawn")
    results: list = []
    pending = list(trials_)
    while pending:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(child, pending, str(root)))
        proc.start()
        child.close()
        done = 0
        while True:
            try:
                msg = parent.recv()
            except EOFError:
                msg = "died"
            if msg is None:
                break
            if msg == "died":
                proc.join()
                t = pending[done]
                results.append({"family": t["family"], "damage": t["damage"], "args": t["args"],
                                "outcome": "signal", "rc": proc.exitcode, "stderr": "", "escaped": None})
                done += 1
                break
            results.append(msg[1])
            done += 1
        proc.join()
        pending = pending[done:]
    return results


# -- API trials ----------------------------------------------------------------------------------
def _api_cases():
    big = np.iinfo(np.int64).max
    c8 = np.zeros((2, 8), np.uint8)
    return [  # (name, call(ix), expect "fail" | "ok")
        ("add object array", lambda ix: ix.add(np.array([[object()] * 8] * 2)), "fail"),
        ("add strings", lambda ix: ix.add(np.array([["a"] * 64])), "fail"),
        ("add 3-D", lambda ix: ix.add(np.zeros((2, 2, 8), np.uint8)), "fail"),
        ("add 0 columns", lambda ix: ix.add(np.zeros((2, 0), np.uint8)), "fail"),
        ("add wrong width", lambda ix: ix.add(np.zeros((2, 4), np.uint8)), "fail"),
        ("add NaN", lambda ix: ix.add(np.full((2, 64), np.nan)), "fail"),
        ("add inf", lambda ix: ix.add(np.full((2, 64), np.inf)), "fail"),
        ("add ints 0..2", lambda ix: ix.add(np.full((2, 64), 2)), "fail"),
        ("add -1/0/1 mix", lambda ix: ix.add(np.array([[-1, 0, 1, 1] * 16])), "fail"),
        ("add empty", lambda ix: ix.add(np.zeros((0, 8), np.uint8)), "fail"),
        ("add float ids", lambda ix: ix.add(c8, ids=[1.5, 2.5]), "fail"),
        ("add negative id", lambda ix: ix.add(c8, ids=[-1, 5]), "fail"),
        ("add id 2**63", lambda ix: ix.add(c8, ids=[2**63, 5]), "fail"),
        ("add uint64 max id", lambda ix: ix.add(c8, ids=np.array([2**64 - 1, 5], np.uint64)), "fail"),
        ("add id 2**70", lambda ix: ix.add(c8, ids=[2**70, 5]), "fail"),
        ("add string ids", lambda ix: ix.add(c8, ids=["a", "b"]), "fail"),
        ("add repeated ids", lambda ix: ix.add(c8, ids=[9, 9]), "fail"),
        ("add known id", lambda ix: ix.add(c8, ids=[1, 10**6]), "fail"),
        ("add ids wrong length", lambda ix: ix.add(c8, ids=[7]), "fail"),
        ("add 2-D ids", lambda ix: ix.add(c8, ids=[[7, 8]]), "fail"),
        ("add items wrong length", lambda ix: ix.add(c8, ids=[7, 8], items=[1]), "fail"),
        ("add unserialisable item", lambda ix: ix.add(c8, ids=[7, 8], items=[{1, 2}, None]), "fail"),
        ("add NaN item", lambda ix: ix.add(c8, ids=[7, 8], items=[float("nan"), None]), "fail"),
        ("add items not a list", lambda ix: ix.add(c8, ids=[7, 8], items=5), "fail"),
        ("add without ids", lambda ix: ix.add(c8), "fail"),
        ("add int max id", lambda ix: ix.add(c8[:1], ids=[big]), "ok"),
        ("add 0/1 bits", lambda ix: ix.add(np.eye(2, 64, dtype=np.int64), ids=[1000, 1001]), "ok"),
        ("search k=0", lambda ix: ix.search(c8, 0), "fail"),
        ("search k=-1", lambda ix: ix.search(c8, -1), "fail"),
        ("search k=True", lambda ix: ix.search(c8, True), "fail"),
        ("search k=2.0", lambda ix: ix.search(c8, 2.0), "fail"),
        ("search k='3'", lambda ix: ix.search(c8, "3"), "fail"),
        ("search k=None", lambda ix: ix.search(c8, None), "fail"),
        ("search k=2**31", lambda ix: ix.search(c8, 2**31), "ok"),
        ("search k=2**62", lambda ix: ix.search(c8, 2**62), "ok"),
        ("search wrong width", lambda ix: ix.search(np.zeros((1, 3), np.uint8), 5), "fail"),
        ("search empty", lambda ix: ix.search(np.zeros((0, 8), np.uint8), 5), "fail"),
        ("search NaN", lambda ix: ix.search(np.full((1, 64), np.nan), 5), "fail"),
        ("search strings", lambda ix: ix.search(["x"], 5), "fail"),
        ("range radius -1", lambda ix: ix.range_search(c8, -1), "fail"),
        ("range radius 1.5", lambda ix: ix.range_search(c8, 1.5), "fail"),
        ("range radius True", lambda ix: ix.range_search(c8, True), "fail"),
        ("range radius 2**40", lambda ix: ix.range_search(c8, 2**40), "ok"),
        ("remove unknown", lambda ix: ix.remove([1, 99999]), "fail"),
        ("remove float", lambda ix: ix.remove([1.0]), "fail"),
        ("remove string", lambda ix: ix.remove(["1"]), "fail"),
        ("remove uint64 max", lambda ix: ix.remove(np.array([2**64 - 1], np.uint64)), "fail"),
        ("items unknown", lambda ix: ix.items([123456]), "fail"),
        ("HashIndex bits 0", lambda ix: type(ix)(0), "fail"),
        ("HashIndex bits 7", lambda ix: type(ix)(7), "fail"),
        ("HashIndex bits True", lambda ix: type(ix)(True), "fail"),
        ("HashIndex bits '64'", lambda ix: type(ix)("64"), "fail"),
        ("create chunk 0", lambda ix: type(ix).create(Path(str(ix.path) + "_c0"), 64, chunk_size=0), "fail"),
        ("create on a file", lambda ix: type(ix).create(Path(ix.path) / "data.mdb" / "x", 64), "fail"),
        ("create existing", lambda ix: type(ix).create(ix.path, 64), "fail"),
        ("open missing", lambda ix: type(ix).open(Path(str(ix.path) + "_none")), "fail"),
    ]


def api_trials(root) -> list:
    """Every API case on a fresh LMDB index; checks the error type and that nothing changed."""
    from hashret.errors import HashretError
    from hashret.index import HashIndex

    out = []
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (300, 8), dtype=np.uint8)
    for name, call, expect in _api_cases():
        path = Path(root) / "api" / name.replace(" ", "_").replace("'", "").replace("*", "")
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(Path(str(path) + "_c0"), ignore_errors=True)
        ix = HashIndex.create(path, 64, chunk_size=128)
        ix.add(base, ids=np.arange(300), items=[{"i": i} for i in range(300)])
        before = (ix.packed_codes().copy(), len(ix))
        try:
            result = call(ix)
            outcome = "ok" if expect == "ok" else "silent"
            if name.startswith("search") and expect == "ok":
                outcome = "ok" if result[1].shape == (2, 300) else "silent"
            if name == "add 0/1 bits":
                got = ix.packed_codes()[-2:]
                outcome = "ok" if np.array_equal(got, np.packbits(np.eye(2, 64, dtype=bool), axis=1)) else "silent"
        except HashretError:
            outcome = "detected" if expect == "fail" else "unclear"
        except Exception as exc:  # noqa: BLE001 -- exactly what the trial counts
            outcome = "traceback"
            name = f"{name}: {type(exc).__name__}: {exc}"
        if expect == "fail" and outcome == "detected":
            after = (ix.packed_codes(), len(ix))
            if not (np.array_equal(before[0], after[0]) and before[1] == after[1]):
                outcome = "changed"
            ix.close()
            with HashIndex.open(path) as r:
                if not np.array_equal(r.packed_codes(), before[0]):
                    outcome = "changed"
        ix.close()
        out.append({"family": "api", "damage": [], "args": [name], "outcome": outcome})
    return out


# -- kills ---------------------------------------------------------------------------------------
OPS_SCRIPT = r"""
import sys
import numpy as np
from hashret.index import HashIndex
sys.path.insert(0, sys.argv[3])
from faults import op_attributes, op_sequence
path, seed = sys.argv[1], int(sys.argv[2])
ix = HashIndex.create(path, 64, chunk_size=96)
print("ready", flush=True)
for i, (op, arg) in enumerate(op_sequence(seed)):
    if op == "add":
        codes, ids = arg
        ix.add(codes, ids=ids, items=[{"id": int(j)} for j in ids], attributes=op_attributes(ids))
    elif op == "remove":
        ix.remove(arg)
    else:
        ix.compact()
    sys.stdout.write(f"committed {i}\n")  # one write: unbuffered, print() writes its parts apart
    sys.stdout.flush()
"""


def op_attributes(ids):
    """The attributes an add of ``ids`` gives (a label set and an integer, from the ids), so a
    killed writer's index can be checked for them too."""
    return {"year": np.asarray(ids) % 37 + 2000,
            "labels": [["odd", "x"] if j % 2 else ["even"] for j in np.asarray(ids).tolist()]}


FILTER = {"year": {"lt": 2020}, "labels": {"any": ["odd"]}}


def op_sequence(seed: int, n_ops: int = 40):
    """A seeded mix of adds (batches that straddle chunks), removes and compactions."""
    rng = np.random.default_rng(seed)
    alive: list = []
    next_id = 0
    ops = []
    for i in range(n_ops):
        r = rng.random()
        if r < 0.6 or len(alive) < 50:
            n = int(rng.integers(20, 400))
            ids = np.arange(next_id, next_id + n) * 7 + 3
            next_id += n
            ops.append(("add", (rng.integers(0, 256, (n, 8), dtype=np.uint8), ids)))
            alive.extend(ids.tolist())
        elif r < 0.9:
            gone = rng.choice(alive, size=min(len(alive), int(rng.integers(1, 40))), replace=False)
            alive = [a for a in alive if a not in set(gone.tolist())]
            ops.append(("remove", gone))
        else:
            ops.append(("compact", None))
    return ops


def _states(seed: int) -> list:
    """The index's (alive ids, codes, payloads) after each prefix of the op sequence."""
    from hashret.index import HashIndex

    ix = HashIndex(64)
    states = [_state(ix)]
    for op, arg in op_sequence(seed):
        if op == "add":
            ix.add(arg[0], ids=arg[1], items=[{"id": int(j)} for j in arg[1]], attributes=op_attributes(arg[1]))
        elif op == "remove":
            ix.remove(arg)
        else:
            ix.compact()
        states.append(_state(ix))
    return states


def _state(ix):
    """Alive ids, codes, payloads, attributes, and a filtered search's answer."""
    alive = ix._alive_rows()
    ids = ix._ids_of_rows(alive)
    probe = np.arange(16, dtype=np.uint8).reshape(2, 8)
    found = ix.search(probe, 5, filter=FILTER)[1].tobytes() if ix.n_rows else b""
    return (ids.tobytes(), ix.packed_codes(alive).tobytes(), json.dumps(ix.items(ids) if len(ids) else []),
            json.dumps(ix.attributes(ids) if len(ids) else []), found)


def kill_ops_trial(root, seed: int, rng: random.Random) -> dict:
    """SIGKILL a process adding, removing and compacting at a random moment; what is on disk
    must be exactly the state after a prefix of the operations, no shorter than what the
    process reported as committed."""
    from hashret.index import HashIndex

    path = Path(root) / "kill" / f"ops{seed}"
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    whole = kill_midway(OPS_SCRIPT, [str(path), str(seed)], rng.uniform(0, 0.5))  # only whole lines count
    reported = max([int(ln.split()[1]) for ln in whole if ln.startswith("committed ")], default=-1)
    states = _states(seed)
    try:
        with HashIndex.open(path) as r:
            got = _state(r)
            ok_verify = r.verify()["ok"]
    except Exception as exc:  # noqa: BLE001
        return {"family": "kill", "damage": ["ops", seed], "args": [], "outcome": "lost",
                "stderr": f"{type(exc).__name__}: {exc}"}
    # the reader may have missed the last line; the disk may hold one op more than reported
    matches = [i for i, s in enumerate(states) if s == got]
    fine = ok_verify and any(i >= reported + 1 for i in matches)
    return {"family": "kill", "damage": ["ops", seed], "args": [f"reported {reported}", f"matches {matches[-3:]}"],
            "outcome": "detected" if fine else "lost"}


BUILD_SCRIPT = r"""
import sys
from hashret.engine import build_index
print("ready", flush=True)
build_index(sys.argv[1], "text", sys.argv[2], batch_size=int(sys.argv[3]), progress=False)
print("done", flush=True)
"""


def kill_build_trial(root, k: int, rng: random.Random) -> dict:
    """SIGKILL build-index at a random moment, then rerun it (--resume when it left a partial
    build); the result must equal an uninterrupted build: codes, ids, payloads and state."""
    from hashret.index import HashIndex
    from hashret.engine import build_index

    root = Path(root)
    out = root / "kill" / f"build{k}"
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(root / "run"), str(out), "25"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    time.sleep(rng.uniform(0, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    try:
        from hashret.index.store import is_initialised

        partial = False
        if is_initialised(out):
            with HashIndex.open(out) as r:
                partial = r.build_state["state"] == "partial"
                state_seen = r.info()["complete"]
                assert state_seen != partial
        if not (is_initialised(out) and not partial):
            build_index(root / "run", "text", out, batch_size=25, resume=partial, progress=False)
        with HashIndex.open(out) as a, HashIndex.open(root / "idx") as b:
            same = (np.array_equal(a.packed_codes(), b.packed_codes())
                    and np.array_equal(a._ids_of_rows(np.arange(a.n_rows)), b._ids_of_rows(np.arange(b.n_rows)))
                    and a.items(a._ids_of_rows(np.arange(a.n_rows))) == b.items(b._ids_of_rows(np.arange(b.n_rows)))
                    and a.info()["complete"] and a.verify()["ok"])
    except Exception as exc:  # noqa: BLE001
        return {"family": "kill", "damage": ["build", k], "args": [], "outcome": "lost",
                "stderr": f"{type(exc).__name__}: {exc}"}
    return {"family": "kill", "damage": ["build", k, "resumed" if partial else "rerun"], "args": [],
            "outcome": "detected" if same else "lost"}


# -- writers ---------------------------------------------------------------------------------------
WRITER_SCRIPT = r"""
import sys, time
from hashret.index import HashIndex
ix = HashIndex.open(sys.argv[1], readonly=False)
print("holding", flush=True)
time.sleep(30)
"""


def writer_trials(root) -> list:
    """Second writers: in this process (open twice, create then open), in another process
    (the API and build-index --append), and a writer whose lock was bypassed (its next write
    must see the other's generation). Each must be refused with one clear line."""
    from hashret.errors import HashretError
    from hashret.index import HashIndex

    root = Path(root)
    out = []

    def record(name, ok, detail=""):
        out.append({"family": "writers", "damage": [name], "args": [detail],
                    "outcome": "detected" if ok else "silent"})

    path = root / "writers" / "ix"
    shutil.rmtree(path.parent, ignore_errors=True)
    codes = np.random.default_rng(1).integers(0, 256, (50, 8), dtype=np.uint8)
    with HashIndex.create(path, 64) as w:
        w.add(codes)
        for name, call in (("open twice in one process", lambda: HashIndex.open(path, readonly=False)),
                           ("create over an open writer", lambda: HashIndex.create(path, 64, exist_ok=True))):
            try:
                call().close()
                record(name, False)
            except HashretError as exc:
                record(name, "already has a writer" in str(exc) and "this process" in str(exc), str(exc)[:200])
        with HashIndex.open(path) as r:  # readers are never blocked
            record("reader beside a writer", len(r) == 50)
    proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().startswith("holding")
        try:
            HashIndex.open(path, readonly=False).close()
            record("writer in another process", False)
        except HashretError as exc:
            record("writer in another process", f"pid {proc.pid}" in str(exc), str(exc)[:200])
        shutil.copytree(root / "idx", root / "idx_w2", dirs_exist_ok=True)
        holder = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(root / "idx_w2")],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().startswith("holding")
        before = _digest(root / "idx_w2")
        res = run_cli(["build-index", "--checkpoint", str(root / "run"), "--modality", "text",
                       "--split", "query", "--append", "--out", str(root / "idx_w2")])
        holder.kill()
        holder.wait()
        record("build-index --append beside a writer", res["rc"] != 0 and "already has a writer" in res["stderr"]
               and _digest(root / "idx_w2") == before, res["stderr"][:200])
    finally:
        proc.kill()
        proc.wait()
    # defence in depth: a lock file removed under a live writer lets a second one in; the
    # first writer's next transaction must see that the disk moved and refuse
    with HashIndex.open(path, readonly=False) as a:
        (path / "writer.lock").unlink()
        with HashIndex.open(path, readonly=False) as b:
            b.add(codes[:5])
        try:
            a.add(codes[:3])
            record("writer whose lock was bypassed", False)
        except HashretError as exc:
            record("writer whose lock was bypassed", "changed by another writer" in str(exc), str(exc)[:200])
    with HashIndex.open(path) as r:
        record("bypassed writer wrote nothing", len(r) == 55)
    return out


# -- the whole run -----------------------------------------------------------------------------------
def run_faults(root, seed: int = 0, scale: int = 1, kills: int = 20, log=print) -> dict:
    """Every family; returns {"counts": {family: {outcome: n}}, "bad": [trials with a bad outcome],
    "seconds"}."""
    t0 = time.perf_counter()
    root = make_fixture(root)
    rng = random.Random(seed)
    results = run_cli_trials(trials(seed, scale), root)
    log(f"CLI trials: {len(results)} in {time.perf_counter() - t0:.1f} s")
    results += api_trials(root)
    results += writer_trials(root)
    n_ops = kills - kills // 3
    for i in range(n_ops):
        results.append(kill_ops_trial(root, seed * 1000 + i, rng))
    for i in range(kills - n_ops):
        results.append(kill_build_trial(root, i, rng))
    log(f"all trials: {len(results)} in {time.perf_counter() - t0:.1f} s")
    counts: dict = {}
    for r in results:
        counts.setdefault(r["family"], Counter())[r["outcome"]] += 1
    return {"counts": {f: dict(c) for f, c in counts.items()},
            "bad": [r for r in results if r["outcome"] in BAD],
            "total": len(results), "seconds": round(time.perf_counter() - t0, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=3, help="Repeats of the randomised damage trials.")
    ap.add_argument("--kills", type=int, default=120, help="SIGKILL trials (2/3 index ops, 1/3 builds).")
    ap.add_argument("--shard-kills", type=int, default=30,
                    help="SIGKILL trials of the sharded index, from Python and of the server (each).")
    ap.add_argument("--out", default=None, help="Write every bad trial as JSON here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hashret-faults-") as tmp:
        res = run_faults(tmp, seed=args.seed, scale=args.scale, kills=args.kills)
        sharded = run_shard_kills(tmp, seed=args.seed, python=args.shard_kills, served=args.shard_kills)
    for r in sharded:
        outcome = "lost" if r["outcome"] == "lost" else "ok"
        fam = res["counts"].setdefault(r["family"], {})
        fam[outcome] = fam.get(outcome, 0) + 1
    res["bad"] += [r for r in sharded if r["outcome"] == "lost"]
    res["total"] += len(sharded)
    for fam in ("shard-kill-python", "shard-kill-served"):
        runs = [r for r in sharded if r["family"] == fam]
        if runs:
            mid = sum(1 for r in runs if r.get("pending"))
            print(f"{fam}: {len(runs)} kills, {mid} landed inside a batch (a pending journal record "
                  f"the restart completed), {sum(1 for r in runs if r['outcome'] == 'lost')} lost")
    outcomes = ["detected", "harmless", "ok", *BAD]
    print(f"\n{res['total']} trials in {res['seconds']} s (seed {args.seed})\n")
    print("| family | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for fam, c in res["counts"].items():
        print(f"| {fam} | " + " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
    for r in res["bad"][:20]:
        print("BAD:", json.dumps(r)[:400])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(1 if res["bad"] else 0)


if __name__ == "__main__":
    main()
