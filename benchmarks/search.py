"""Exact Hamming top-k: hashret's Numba scan beside faiss IndexBinaryFlat and numpy, in one run.

    python benchmarks/search.py                  # the grid: 1e6 x {16..256} bits, 1e7 x 64 bits
    python benchmarks/search.py --sizes 10000000:64 --k 100 --queries 1,100 --threads 1,2
    python benchmarks/search.py --quick          # 1e5 codes, a smoke run
    python benchmarks/search.py --open 100000000 # open + first query straight from LMDB's map

Random codes; k = 10 and 1000, and radius search (the radius within which ~100 random codes
lie; 1 and 100 queries); 1, 100 and 1000 queries; medians over --repeats runs, and
the ratio of each peer's median to hashret's (> 1: hashret is faster). Beside each figure, the
machine's limit for that cell, timed alternately with hashret (run for run, so both see the
same moments of a shared host): the read floor (a multi-threaded read of the same codes, which
one query must read once: the faster, on this machine, of a plain read and one that asks for
its lines 4 KiB ahead; a one-query cell also gives its share of a plain read) or the popcount roof (the scan's inner loop over an
L1-resident block, 4 queries per load, for as many word-distances as the cell computes),
whichever takes longer. "of limit" = the limit's median / hashret's median. OMP_WAIT_POLICY
defaults to PASSIVE (see below). Threads: 1 and NUMBA_NUM_THREADS by default (--threads).
Every hashret result is checked against numpy's (ids, ties by row) or faiss' (distances)
before it is timed.
Then LMDB: build throughput (batches of 65,536, one transaction each) and the time to open
the largest index.

--open N builds an index of N random 64-bit codes on disk and, in fresh processes that have
already loaded the kernels (a search on a tiny in-memory index), times opening it and its
first query (warm page cache; with every chunk's checksum checked, and with verify=False)
and reads the process's private (anonymous) memory before and after from /proc: the codes
are scanned in LMDB's memory map, so that growth should be a small share of the index.
"""

import argparse
import json
import os

# OpenMP threads that spin after a parallel region (GNU's default) take the cores from the next
# call: measured here, hashret's one-query scan at 10^7 codes ran 13-15 ms right after faiss
# calls with spinning threads and 5-7 ms without, and faiss itself was no faster spinning. A
# service answering sporadic queries sees the passive case, so both are timed that way.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from hashret.index import HashIndex  # noqa: E402
from hashret.index import probes  # noqa: E402


def median_ms(*fns, repeats):
    """Medians (ms) of ``repeats`` rounds in which each of ``fns`` runs once, in turn.
    Alternating keeps a shared host's slow moments from landing on one side. Rounds that
    take milliseconds are repeated until about 0.3 s is spent (at most 41: a median of 5
    few-ms runs moved by a third between runs here); 3 rounds where one takes over half a
    second (keeps the grid's 1,000-query cells within minutes)."""
    times = [[] for _ in fns]
    r = 0
    while r < repeats:
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        if r == 0:
            first = sum(ts[0] for ts in times)
            repeats = 3 if first > 0.5 else max(repeats, min(41, int(0.3 / max(first, 1e-6))))
        r += 1
    return [float(np.median(ts)) * 1e3 for ts in times]


def limit_probe(floors, roof_rate, words, n_word_distances, threads):
    """(name, probe, plain) of the limit that binds a cell: the read of every code (a lone
    query) or the popcount roof for the cell's word-distances (batches), whichever takes
    longer; for a read, ``plain`` is a plain read of the codes (no lines asked for ahead),
    the floor as it was defined before the scan asked for its lines ahead, else None."""
    if floors[threads] >= n_word_distances / roof_rate[threads]:
        return "read", probes.read_probe(words, threads), probes.read_probe(words, threads, False)
    return "roof", probes.roof_probe(n_word_distances, threads, words.dtype), None


def numpy_topk(db, q, k):
    """Brute force with np.bitwise_count; ties by row."""
    out_d = np.empty((len(q), k), np.int64)
    out_i = np.empty((len(q), k), np.int64)
    for j, qq in enumerate(q):
        d = np.bitwise_count(db ^ qq).sum(axis=1, dtype=np.int64)
        kth = np.partition(d, k - 1)[k - 1]
        less = np.flatnonzero(d < kth)
        eq = np.flatnonzero(d == kth)[: k - len(less)]
        rows = np.concatenate([less, eq])
        rows = rows[np.lexsort((rows, d[rows]))]
        out_d[j], out_i[j] = d[rows], rows
    return out_d, out_i


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000:16,1000000:32,1000000:64,1000000:128,1000000:256,10000000:64",
                    help="comma list of N:bits")
    ap.add_argument("--k", default="10,1000")
    ap.add_argument("--queries", default="1,100,1000")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default=None,
                    help="comma list of thread counts [default: 1 and NUMBA_NUM_THREADS]")
    ap.add_argument("--lmdb-only", action="store_true",
                    help="Only the LMDB figures, at the largest of --sizes.")
    ap.add_argument("--numpy-limit", type=float, default=2e7,
                    help="skip numpy where N x queries exceeds this (it takes minutes)")
    ap.add_argument("--quick", action="store_true", help="1e5 codes, 3 repeats")
    ap.add_argument("--out", default=None, help="write results.json here")
    ap.add_argument("--open", type=float, default=None, metavar="N",
                    help="only the open + first query figures, on N 64-bit codes")
    ap.add_argument("--open-dir", default=None, help="keep (or reuse) the --open index here")
    args = ap.parse_args()
    if args.open:
        out = open_figures(int(args.open), args.open_dir, args.repeats)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps({"open": out}, indent=1))
        return
    if args.quick:
        args.sizes, args.repeats = "100000:64,100000:128", 3
    try:
        import faiss
    except ImportError:
        faiss = None
        print("faiss is not installed (pip install hashret[dev]): peer columns skipped")
    import numba

    sizes = [tuple(int(float(v)) for v in s.split(":")) for s in args.sizes.split(",")]
    thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                     else sorted({1, numba.get_num_threads()}))
    ks = [int(v) for v in args.k.split(",")]
    nqs = [int(v) for v in args.queries.split(",")]
    print(f"threads: numba {numba.get_num_threads()}, faiss "
          f"{faiss.omp_get_max_threads() if faiss else '-'}; cpus {os.cpu_count()}; "
          f"medians of {args.repeats} runs")
    rng = np.random.default_rng(0)
    rows, records = [], []
    largest = None
    if args.lmdb_only:
        n, bits = max(sizes, key=lambda nb: nb[0] * nb[1])
        lm = lmdb_figures(rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8), bits)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "results.json").write_text(json.dumps({"lmdb": lm}, indent=1))
        return
    for n, bits in sizes:
        db = rng.integers(0, 256, size=(n, bits // 8), dtype=np.uint8)
        queries = rng.integers(0, 256, size=(max(nqs), bits // 8), dtype=np.uint8)
        index = HashIndex(bits)
        index.add(db)
        index.search(queries[:1], 10)  # compile / load the cached kernels outside the timings
        if largest is None or n * bits > largest[0].size * 8:
            largest = (db, bits)
        fidx = None
        if faiss is not None:
            fidx = faiss.IndexBinaryFlat(bits)
            fidx.add(db)
        words = index.segments().arrays[0][:n]  # the very memory the scan reads
        # which limit binds a cell: estimates decide, then each cell times its binding limit
        # alternately with hashret
        floors, roof_rate = {}, {}
        for t in thread_counts:
            read_ms, roof_ms = median_ms(probes.read_probe(words, t),
                                         probes.roof_probe(2e8, t, words.dtype), repeats=5)
            floors[t], roof_rate[t] = read_ms / 1e3, 2e8 / (roof_ms / 1e3)
        for nq in nqs:
            q = queries[:nq]
            for k in ks:
                d, ids = index.search(q, k)
                run_np = n * nq <= args.numpy_limit
                if run_np:
                    nd, ni = numpy_topk(db, q, k)
                    assert (nd == d).all() and (ni == ids).all(), "hashret differs from numpy"
                if fidx is not None:
                    fd, _ = fidx.search(q, k)
                    assert (fd == d).all(), "hashret's distances differ from faiss'"
                for t in thread_counts:
                    rec = {"n": n, "bits": bits, "queries": nq, "k": k, "threads": t}
                    rec.update(_timed(lambda: index.search(q, k, threads=t),
                                      limit_probe(floors, roof_rate, words, n * nq * index.n_words, t),
                                      args.repeats))
                    if fidx is not None:
                        faiss.omp_set_num_threads(t)
                        rec["faiss_ms"] = median_ms(lambda: fidx.search(q, k), repeats=args.repeats)[0]
                    if run_np and t == thread_counts[-1]:
                        rec["numpy_ms"] = median_ms(lambda: numpy_topk(db, q, k),
                                                    repeats=max(1, args.repeats // 3))[0]
                    records.append(rec)
                    rows.append(rec)
                    print(_row(rec), flush=True)
        radius = _radius_for(n, bits, 100)
        for nq in [v for v in nqs if v <= 100]:
            q = queries[:nq]
            lims, _, rids = index.range_search(q, radius)
            if fidx is not None:
                flims, _, _ = fidx.range_search(q, radius + 1)  # faiss counts distances < radius
                assert (np.diff(flims) == np.diff(lims)).all(), "radius counts differ from faiss'"
            for t in thread_counts:
                rec = {"n": n, "bits": bits, "queries": nq, "k": f"r<={radius}", "threads": t,
                       "found": int(lims[-1])}
                rec.update(_timed(lambda: index.range_search(q, radius, threads=t),
                                  limit_probe(floors, roof_rate, words, n * nq * index.n_words, t),
                                  args.repeats))
                if fidx is not None:
                    faiss.omp_set_num_threads(t)
                    rec["faiss_ms"] = median_ms(lambda: fidx.range_search(q, radius + 1),
                                                repeats=args.repeats)[0]
                records.append(rec)
                rows.append(rec)
                print(_row(rec), flush=True)
        index = fidx = None  # free the memory before the next size
    print()
    print(_table(rows))

    lm = lmdb_figures(*largest)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"search": records, "lmdb": lm}, indent=1))


def lmdb_figures(db, bits, batch=65536):
    """Side by side in one run: LMDB's raw rate (the same chunks put with no checksums, ids or
    meta), hashret's build with row ids and with explicit ids, the warm open-and-load of each
    (every checksum checked) and a full verify."""
    import lmdb

    tmp = Path(tempfile.mkdtemp(prefix="hashret-bench-"))
    out = {"n": len(db), "bits": bits, "batch": batch}
    try:
        env = lmdb.open(str(tmp / "raw"), map_size=1 << 36, max_dbs=2)
        raw_db = env.open_db(b"codes")
        t = time.perf_counter()
        for c, s in enumerate(range(0, len(db), batch)):
            with env.begin(write=True) as txn:
                txn.put(c.to_bytes(8, "big"), db[s:s + batch].tobytes(), db=raw_db)
        out["raw_lmdb_s"] = time.perf_counter() - t
        env.close()
        ids = np.arange(len(db), dtype=np.int64) * 3 + 11  # explicit, not the rows
        for mode in ("rows", "explicit"):
            t = time.perf_counter()
            with HashIndex.create(tmp / mode, bits) as w:
                for s in range(0, len(db), batch):
                    w.add(db[s:s + batch], ids=ids[s:s + batch] if mode == "explicit" else None)
            out[f"build_{mode}_s"] = time.perf_counter() - t

            def load(m=mode):
                HashIndex.open(tmp / m).close()

            load()  # warm the page cache: the figure is the warm open-and-load
            out[f"open_and_load_{mode}_ms"] = median_ms(load, repeats=5)[0]
            with HashIndex.open(tmp / mode) as r:
                assert len(r) == len(db) and np.array_equal(r.packed_codes(np.arange(1000)), db[:1000])
                t = time.perf_counter()
                assert r.verify()["ok"]
                out[f"verify_{mode}_s"] = time.perf_counter() - t
        out["disk_mb"] = sum(f.stat().st_size for f in (tmp / "explicit").iterdir()) / 2**20
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = len(db)
    print(f"\nLMDB, {n:,} x {bits}-bit codes, batches of {batch:,} (one transaction each), one run:")
    print(f"  raw LMDB (chunks only)   {out['raw_lmdb_s']:6.2f} s  {n / out['raw_lmdb_s'] / 1e6:6.2f} M codes/s")
    for mode in ("rows", "explicit"):
        b = out[f"build_{mode}_s"]
        print(f"  hashret, {mode:8s} ids   {b:6.2f} s  {n / b / 1e6:6.2f} M codes/s "
              f"({out['raw_lmdb_s'] / b:.0%} of raw); open, checksums checked "
              f"{out[f'open_and_load_{mode}_ms']:.0f} ms (warm, median of 5); verify {out[f'verify_{mode}_s']:.2f} s")
    print(f"  {out['disk_mb']:.0f} MB on disk with explicit ids")
    return out


_OPEN_CHILD = r"""
import json, sys, time
import numpy as np
from hashret.index import HashIndex

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

warm = HashIndex(64)
warm.add(np.random.default_rng(1).integers(0, 256, size=(5000, 8), dtype=np.uint8))
warm.search(warm.packed_codes([0]), 10)  # the kernels are loaded before the clock starts
q = np.random.default_rng(2).integers(0, 256, size=(1, 8), dtype=np.uint8)
before = anon_kib()
t0 = time.perf_counter()
index = HashIndex.open(sys.argv[1], verify=sys.argv[2] == "1")
t1 = time.perf_counter()
d, ids = index.search(q, 10)
t2 = time.perf_counter()
after = anon_kib()
t3 = time.perf_counter()
index.search(q, 10)
t4 = time.perf_counter()
print(json.dumps({"open_ms": (t1 - t0) * 1e3, "first_query_ms": (t2 - t1) * 1e3,
                  "second_query_ms": (t4 - t3) * 1e3, "anon_growth_mb": (after - before) / 1024,
                  "ids": ids.tolist()}))
"""


def open_figures(n, keep=None, repeats=5, bits=64, batch=1 << 20):
    """Open + first query of an n-code index in fresh processes (see --open)."""
    import subprocess

    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="hashret-open-"))
    path = tmp / f"open-{n}"
    try:
        if not (path / "data.mdb").exists():
            t = time.perf_counter()
            rng = np.random.default_rng(0)
            with HashIndex.create(path, bits) as w:
                for s in range(0, n, batch):
                    w.add(rng.integers(0, 256, size=(min(batch, n - s), bits // 8), dtype=np.uint8))
            print(f"built {n:,} x {bits}-bit codes in {time.perf_counter() - t:.1f} s")
        size_mb = (path / "data.mdb").stat().st_size / 2**20
        child = tmp / "open_child.py"
        child.write_text(_OPEN_CHILD)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = {"n": n, "bits": bits, "index_mb": size_mb, "runs": repeats}
        with open(path / "data.mdb", "rb") as f:  # warm the page cache
            while f.read(1 << 24):
                pass
        expect = None
        for verify in (1, 0):
            runs = []
            for _ in range(repeats):
                res = subprocess.run([sys.executable, str(child), str(path), str(verify)], env=env,
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(res.stdout))
                expect = expect or runs[-1]["ids"]
                assert runs[-1]["ids"] == expect
            name = "verified" if verify else "verify=False"
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0] if k != "ids"}
            spread = [r["open_ms"] + r["first_query_ms"] for r in runs]
            med["open_plus_first_ms"] = float(np.median(spread))
            med["open_plus_first_range_ms"] = [float(min(spread)), float(max(spread))]
            out[name] = med
            print(f"{n:,} x {bits} bits ({size_mb:.0f} MB), {name}: open {med['open_ms']:.0f} ms + first query "
                  f"{med['first_query_ms']:.0f} ms = {med['open_plus_first_ms']:.0f} ms (median of {repeats}, "
                  f"{min(spread):.0f}..{max(spread):.0f}); second query {med['second_query_ms']:.0f} ms; private "
                  f"memory +{med['anon_growth_mb']:.1f} MB ({med['anon_growth_mb'] / size_mb:.1%} of the index)")
        return out
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _radius_for(n, bits, found):
    """The largest radius within which about ``found`` of ``n`` random codes lie."""
    from math import comb

    cdf, r = 0.0, -1
    while r < bits and n * (cdf + comb(bits, r + 1) / 2**bits) <= found:
        r += 1
        cdf += comb(bits, r) / 2**bits
    return max(r, 0)


def _timed(search, limit, repeats):
    """hashret's median and its limit's (and a plain read's, for a read), timed alternately."""
    name, probe, plain = limit
    if plain is None:
        ours, lim = median_ms(search, probe, repeats=repeats)
        return {"hashret_ms": ours, "limit": name, "limit_ms": lim, "of_limit": lim / ours}
    ours, lim, flat = median_ms(search, probe, plain, repeats=repeats)
    return {"hashret_ms": ours, "limit": name, "limit_ms": lim, "of_limit": lim / ours,
            "plain_read_ms": flat, "of_plain_read": flat / ours}


def _row(r):
    parts = [f"N={r['n']:>10,} bits={r['bits']:>3} Q={r['queries']:>3} k={r['k']!s:>5} t={r['threads']}:",
             f"hashret {r['hashret_ms']:9.2f} ms ({r['of_limit']:4.0%} of the {r['limit']} limit, "
             f"{r['limit_ms']:.2f} ms" + (f"; {r['of_plain_read']:.0%} of a plain read, "
                                          f"{r['plain_read_ms']:.2f} ms" if "of_plain_read" in r else "")
             + ")"]
    for peer in ("faiss", "numpy"):
        if f"{peer}_ms" in r:
            parts.append(f"{peer} {r[f'{peer}_ms']:9.2f} ms ({r[f'{peer}_ms'] / r['hashret_ms']:5.1f}x)")
    return "  ".join(parts)


def _table(rows):
    lines = ["| N | bits | queries | k | threads | limit | limit ms | hashret ms | of limit "
             "| of a plain read | faiss ms | faiss / hashret | numpy ms | numpy / hashret |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = r.get("faiss_ms")
        npm = r.get("numpy_ms")
        lines.append(f"| {r['n']:,} | {r['bits']} | {r['queries']} | {r['k']} | {r['threads']} | "
                     f"{r['limit']} | {r['limit_ms']:.2f} | {r['hashret_ms']:.2f} | {r['of_limit']:.0%} | "
                     + (f"{r['of_plain_read']:.0%} | " if "of_plain_read" in r else "– | ")
                     + (f"{f:.2f} | {f / r['hashret_ms']:.1f}x | " if f else "– | – | ")
                     + (f"{npm:.1f} | {npm / r['hashret_ms']:.0f}x |" if npm else "– | – |"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
