"""Kill trials of the sharded index: SIGKILL at a random moment of (a) a process writing a
ShardedIndex from Python and (b) ``hashret serve`` on a sharded index while 8 clients add and
remove items over HTTP. After each kill, what the restart must show:

- every acknowledged batch (an ``add`` / ``remove`` that returned, a 200 reply) is there;
- an unacknowledged batch is there whole or not at all -- never in some shards only;
- readers before the restart see a whole prefix too (a pending batch hidden or whole);
- the restart opens without manual repair (the served family restarts the server itself),
  ``verify`` is ok, and the sharded index answers exactly as one ``HashIndex`` holding the
  same items in the same order (searches with ties, radius searches, payloads).

Outcomes: ``kept`` (all of the above held) or ``lost`` (any failed, with why). Used by
``benchmarks/faults.py`` (the long run) and the test suite (a few trials).
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

BITS = 32
N_SHARDS = 3

# the Python family: a seeded op sequence, each acknowledged op printed on its own line
OPS_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[3])
from shard_faults import op_sequence
from hashret.index.sharded import ShardedIndex
ix = ShardedIndex.open(sys.argv[1], readonly=False)
print("ready", flush=True)
for i, (op, arg) in enumerate(op_sequence(int(sys.argv[2]))):
    if op == "add":
        ix.add(arg[0], ids=arg[1], items=[{"id": int(j)} for j in arg[1]])
    else:
        ix.remove(arg)
    sys.stdout.write(f"acknowledged {i}\n")
    sys.stdout.flush()
"""


def op_sequence(seed: int, n_ops: int = 300):
    """Adds of 1..60 items (explicit ids) and removals of 1..20 alive ones."""
    rng = np.random.default_rng(seed)
    alive, ops, next_id = [], [], 0
    for _ in range(n_ops):
        if rng.random() < 0.7 or len(alive) < 30:
            n = int(rng.integers(1, 61))
            ids = np.arange(next_id, next_id + n, dtype=np.int64) * 3 + 1
            next_id += n
            pool = rng.integers(0, 256, (16, BITS // 8), dtype=np.uint8)  # ties on purpose
            ops.append(("add", (pool[rng.integers(0, 16, n)], ids)))
            alive.extend(ids.tolist())
        else:
            gone = rng.choice(alive, size=min(len(alive), int(rng.integers(1, 21))), replace=False)
            drop = set(gone.tolist())
            alive = [a for a in alive if a not in drop]
            ops.append(("remove", np.sort(gone)))
    return ops


def new_index(path: Path):
    from hashret.index.sharded import ShardedIndex

    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    ShardedIndex.create(path, BITS, N_SHARDS, chunk_size=64).close()


def queries(seed=7):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (6, BITS // 8), dtype=np.uint8)


def answers(ix, ids):
    q = queries()
    out = [ix.search(q, k) for k in (1, 10, 100000)] + [ix.range_search(q, r) for r in (0, 9)]
    return out, len(ix), ix.items(ids) if len(ids) else []


def same(a, b) -> bool:
    (ra, la, ia), (rb, lb, ib) = a, b
    return la == lb and ia == ib and all(np.array_equal(u, v) for x, y in zip(ra, rb) for u, v in zip(x, y))


def as_one(path: Path):
    """One in-memory HashIndex holding the sharded index's rows in global order (row r of the
    whole is row r // N of shard r mod N), removed rows removed: what the merge must equal."""
    from hashret.index import HashIndex
    from hashret.index.manifest import read_manifest, shard_paths

    m = read_manifest(path)
    shards = [HashIndex.open(p) for p in shard_paths(path, m["shards"])]
    try:
        total = sum(s.n_rows for s in shards)
        one = HashIndex(m["bits"])
        if total == 0:
            return one, np.zeros(0, np.int64)
        rows = np.arange(total)
        codes = np.vstack([shards[r % m["shards"]].packed_codes([r // m["shards"]]) for r in rows])
        ids = np.array([shards[r % m["shards"]]._ids_of_rows(np.array([r // m["shards"]]))[0] for r in rows])
        items = [shards[r % m["shards"]].items([ids[r]])[0] for r in rows]
        one.add(codes, ids=ids, items=items)
        dead = [int(ids[r]) for r in rows if shards[r % m["shards"]]._tomb[r // m["shards"]]]
        if dead:
            one.remove(dead)
        return one, ids
    finally:
        for s in shards:
            s.close()


def reference(ops, upto):
    """The alive ids after the first ``upto`` ops."""
    alive = set()
    for op, arg in ops[:upto]:
        if op == "add":
            alive.update(arg[1].tolist())
        else:
            alive.difference_update(arg.tolist())
    return alive


def alive_ids(ix, ids) -> set:
    return {int(i) for i in ids if ix.contains(int(i))}


def kill_midway(script: str, args: list, after_s: float) -> list:
    """Run ``script`` (its argv: ``args`` and this folder), wait for its 'ready' line, SIGKILL
    it ``after_s`` later; the whole lines it printed meanwhile (a kill can land between a
    line's bytes)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args, str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("ready")
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    rest = proc.stdout.read()
    proc.wait()
    return rest.split("\n")[:-1]


def python_trial(root, seed: int, rng: random.Random) -> dict:
    """SIGKILL a process writing a ShardedIndex from Python at a random moment."""
    from hashret.engine import verify_index
    from hashret.index.sharded import ShardedIndex

    path = Path(root) / "shard-kill" / f"py{seed}"
    new_index(path)
    whole = kill_midway(OPS_SCRIPT, [str(path), str(seed)], rng.uniform(0.0, 0.6))
    acked = max([int(ln.split()[1]) for ln in whole if ln.startswith("acknowledged ")], default=-1)
    ops = op_sequence(seed)
    every = np.concatenate([a[1] for op, a in ops if op == "add"])

    def prefix(ix):  # the op count whose alive set the index shows, if any
        got = alive_ids(ix, every)
        return [j for j in range(acked + 1, min(acked + 2, len(ops)) + 1) if reference(ops, j) == got]

    why = None
    try:
        with ShardedIndex.open(path) as r:  # a reader, before any recovery
            pending = r.info()["journal"]["pending"]
            seen = prefix(r)
            if not seen:
                why = f"reader saw no whole prefix at or after op {acked + 1}"
        with ShardedIndex.open(path, readonly=False) as w:
            recovered = w.recovered
        with ShardedIndex.open(path) as r:
            after = prefix(r)
            one, ids = as_one(path)
            if not after:
                why = why or f"after recovery no whole prefix at or after op {acked + 1} (acknowledged {acked})"
            elif not same(answers(r, ids), answers(one, ids)):
                why = why or "the recovered index does not answer as one index"
        if not verify_index(path)["ok"]:
            why = why or "verify failed after recovery"
    except Exception as exc:  # noqa: BLE001 -- any escape is a failed trial, recorded
        why = f"{type(exc).__name__}: {exc}"
    return {"family": "shard-kill-python", "seed": seed, "acknowledged": acked + 1,
            "pending": pending if why is None else None, "recovered": bool(why is None and recovered),
            "outcome": "kept" if why is None else "lost", "why": why}


# -- the served family ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int, timeout: float = 120.0):
    proc = subprocess.Popen([sys.executable, "-m", "hashret.cli", "serve", "--index", str(path), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-400:]}")
        try:
            status, _ = request(port, "GET", "/health", None, timeout=2)
            if status == 200:
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the server did not come up")


def request(port, method, route, body, timeout=10):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, route, body=None if body is None else json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def client(port, c: int, stop: threading.Event, log: list, seed: int):
    """Adds batches of its own ids and removes some it added; logs (op, ids, acknowledged)."""
    rng = np.random.default_rng(seed * 100 + c)
    mine, nxt = [], 0
    while not stop.is_set():
        if rng.random() < 0.75 or len(mine) < 5:
            n = int(rng.integers(1, 9))
            ids = [c * 10**7 + nxt + j for j in range(n)]
            nxt += n
            hexes = [bytes(rng.integers(0, 4, BITS // 8, dtype=np.uint8)).hex() for _ in range(n)]
            entry = ["add", ids, None]
            log.append(entry)
            body = {"codes": hexes, "ids": ids, "items": [{"c": c, "j": i} for i in ids]}
            route, method = "/items", "POST"
        else:
            ids = sorted(rng.choice(mine, size=min(len(mine), int(rng.integers(1, 4))), replace=False).tolist())
            entry = ["remove", ids, None]
            log.append(entry)
            body, route, method = {"ids": ids}, "/items", "DELETE"
        try:
            status, _ = request(port, method, route, body)
        except (OSError, http.client.HTTPException):
            return  # the server is gone: this batch is unacknowledged
        entry[2] = status == 200
        if status == 200:
            if entry[0] == "add":
                mine.extend(ids)
            else:
                mine = [i for i in mine if i not in set(ids)]


def served_trial(root, seed: int, rng: random.Random, clients: int = 8) -> dict:
    """SIGKILL ``hashret serve`` on a 3-shard index while ``clients`` write to it; restart it."""
    from hashret.engine import verify_index
    from hashret.index.sharded import ShardedIndex

    path = Path(root) / "shard-kill" / f"served{seed}"
    new_index(path)
    why, counts = None, {}
    port = free_port()
    proc = start_server(path, port)
    stop, logs = threading.Event(), [[] for _ in range(clients)]
    threads = [threading.Thread(target=client, args=(port, c, stop, logs[c], seed), daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.3, 1.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    proc.stderr.close()
    try:
        entries = [e for log in logs for e in log]
        counts = {"acked": sum(1 for e in entries if e[2]), "unacked": sum(1 for e in entries if not e[2])}
        with ShardedIndex.open(path) as r:  # what a reader sees before the restart
            counts["pending"] = r.info()["journal"]["pending"]
        # the restart: the server itself, without repair
        port2 = free_port()
        again = start_server(path, port2)
        status, health = request(port2, "GET", "/health", None)
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=60)
        again.stderr.close()
        if status != 200:
            why = f"the restarted server is not healthy: {health}"
        with ShardedIndex.open(path) as r:
            # removals are of the client's own acknowledged adds; an id is alive iff its last
            # acknowledged op (or a whole unacknowledged one after it) says so
            for op, ids, ok in entries:
                present = [r.contains(i) for i in ids]
                if op == "add" and ok and not all(present):
                    removed_later = any(e[0] == "remove" and set(e[1]) & set(ids) for e in entries)
                    if not removed_later:
                        why = why or f"acknowledged add of {ids} lost"
                if op == "add" and not ok and any(present) and not all(present):
                    why = why or f"unacknowledged add of {ids} half there: {present}"
                if op == "remove" and ok and any(present):
                    why = why or f"acknowledged removal of {ids} undone"
                if op == "remove" and not ok and any(present) and not all(present):
                    why = why or f"unacknowledged removal of {ids} half applied: {present}"
            one, ids = as_one(path)
            if not same(answers(r, ids), answers(one, ids)):
                why = why or "the recovered index does not answer as one index"
        if not verify_index(path)["ok"]:
            why = why or "verify failed after the restart"
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {exc}"
    return {"family": "shard-kill-served", "seed": seed, **counts,
            "outcome": "kept" if why is None else "lost", "why": why}


def run_shard_kills(root, seed: int = 0, python: int = 30, served: int = 30, log=print) -> list:
    rng = random.Random(seed)
    out = []
    t0 = time.perf_counter()
    for i in range(python):
        out.append(python_trial(root, seed * 1000 + i, rng))
    log(f"sharded kills from Python: {python} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for i in range(served):
        out.append(served_trial(root, seed * 1000 + i, rng))
    log(f"sharded kills of the server: {served} in {time.perf_counter() - t0:.1f} s")
    return out
