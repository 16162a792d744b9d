"""Sharded search over 10^7 64-bit codes: 1, 2 and 4 shards in this process and on a local
Ray, beside one HashIndex of the same codes, and a capacity model for 10^9 and 10^10 codes.

    python benchmarks/shards.py                      # 10^7 codes, shards 1,2,4, local Ray
    python benchmarks/shards.py --n 1000000 --shards 1,2 --no-ray

For each shard count: the build (batches of 2^20 codes; in this process, then through the
Ray actors, which receive the codes and commit them to their shards), the latency of 1 and
100 queries (k = 10; median of --repeats), checked equal to the one index's answers, and the
overhead of sharding: sharded latency minus the one index's, and on Ray the round trip of
an empty call to every actor. Then the capacity model, from figures measured in the same run:
the scan rate per core (100 queries on one thread), the merge cost per query and shard, and
Ray's round trip -- see the README for how it is read.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _timing import median_ms  # noqa: E402

from hashret.index import HashIndex  # noqa: E402
from hashret.index.sharded import ShardedIndex  # noqa: E402


def codes(n, seed=0, batch=1 << 20):
    rng = np.random.default_rng(seed)
    for s in range(0, n, batch):
        yield rng.integers(0, 256, size=(min(batch, n - s), 8), dtype=np.uint8)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=float, default=1e7)
    ap.add_argument("--shards", default="1,2,4")
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--cores-per-node", type=int, default=16, help="for the capacity model")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n = int(args.n)
    tmp = Path(tempfile.mkdtemp(prefix="hashret-shards-"))
    rng = np.random.default_rng(7)
    q1, q100 = rng.integers(0, 256, (1, 8), dtype=np.uint8), rng.integers(0, 256, (100, 8), dtype=np.uint8)
    report = {"n": n, "cpus": os.cpu_count(), "runs": []}
    try:
        one = HashIndex.create(tmp / "one", 64)
        t = time.perf_counter()
        for c in codes(n):
            one.add(c)
        report["one_build_s"] = time.perf_counter() - t
        ref1, ref100 = one.search(q1, 10), one.search(q100, 10)
        report["one_1q_ms"] = median_ms(lambda: one.search(q1, 10), args.repeats)
        report["one_100q_ms"] = median_ms(lambda: one.search(q100, 10), max(3, args.repeats // 3))
        t1 = median_ms(lambda: one.search(q100, 10, threads=1), 3) / 1e3
        report["scan_rate_per_core"] = n * 100 / t1  # 64-bit distances per second, one core
        print(f"{n:,} x 64-bit codes; one index: build {report['one_build_s']:.1f} s, 1 query "
              f"{report['one_1q_ms']:.2f} ms, 100 queries {report['one_100q_ms']:.1f} ms; one core scans "
              f"{report['scan_rate_per_core'] / 1e9:.2f} G distances/s")
        one.close()
        modes = ["in-process"] + ([] if args.no_ray else ["ray"])
        if not args.no_ray:
            import ray

            t = time.perf_counter()
            ray.init(include_dashboard=False, log_to_driver=False)
            report["ray_init_s"] = time.perf_counter() - t
        for mode in modes:
            for s in [int(v) for v in args.shards.split(",")]:
                path = tmp / f"{mode}-{s}"
                t = time.perf_counter()
                sh = ShardedIndex.create(path, 64, s, ray=mode == "ray")
                opened = time.perf_counter() - t
                for c in codes(n):
                    sh.add(c)
                build = time.perf_counter() - t
                for got, want in ((sh.search(q1, 10), ref1), (sh.search(q100, 10), ref100)):
                    assert all(np.array_equal(a, b) for a, b in zip(got, want)), "sharded != one index"
                rec = {"mode": mode, "shards": s, "build_s": build, "create_s": opened,
                       "q1_ms": median_ms(lambda: sh.search(q1, 10), args.repeats),
                       "q100_ms": median_ms(lambda: sh.search(q100, 10), max(3, args.repeats // 3))}
                rec["overhead_1q_ms"] = rec["q1_ms"] - report["one_1q_ms"]
                if mode == "ray":
                    rec["round_trip_ms"] = median_ms(lambda: sh._all("state"), args.repeats)
                d = np.random.default_rng(1).integers(0, 64, (100, 10 * s)).astype(np.int64)
                seq = np.random.default_rng(2).integers(0, n, (100, 10 * s))
                rec["merge_100q_ms"] = median_ms(lambda: np.argsort(d * (1 << 40) + seq, axis=1, kind="stable"), 11)
                report["runs"].append(rec)
                rt = f", round trip to all actors {rec['round_trip_ms']:.2f} ms" if "round_trip_ms" in rec else ""
                print(f"  {mode:10s} {s} shard(s): build {build:5.1f} s (actors/open {opened:.1f} s); 1 query "
                      f"{rec['q1_ms']:6.2f} ms (+{rec['overhead_1q_ms']:.2f} vs one index), 100 queries "
                      f"{rec['q100_ms']:7.1f} ms; merge of 100 queries {rec['merge_100q_ms']:.2f} ms{rt}", flush=True)
                sh.close()
                shutil.rmtree(path, ignore_errors=True)
        capacity(report, args.cores_per_node)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(report, indent=1))


def capacity(report, cores):
    """Memory per node and time of a 100-query batch (k = 10) for N codes over M nodes of
    ``cores`` cores: scan = 100 * (N / M) / (rate per core * cores); merge = what M shards'
    candidates cost to merge, scaled from the measured merge; network = the measured Ray round
    trip (on one machine: a floor for a LAN) plus M * 100 * 10 results * 12 bytes at 1 GB/s."""
    rate = report["scan_rate_per_core"]
    ray_rt = max((r.get("round_trip_ms", 0) for r in report["runs"]), default=0.0)
    merge_per_shard = np.median([r["merge_100q_ms"] / r["shards"] for r in report["runs"]])
    rows = []
    print(f"\ncapacity model: 64-bit codes, {cores} cores per node, a batch of 100 queries, k = 10 "
          f"(scan rate {rate / 1e9:.2f} G/s per core measured here)")
    print("| codes | nodes | codes per node | memory per node (codes + ids) | scan per batch | merge | network | batch latency |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1e9, 1e10):
        for m in (1, 4, 16, 64):
            per = n / m
            mem = per * 16 / 2**30
            scan = 100 * per / (rate * cores) * 1e3
            merge = merge_per_shard * m
            net = ray_rt + m * 100 * 10 * 12 / 1e9 * 1e3
            rows.append({"codes": n, "nodes": m, "gib_per_node": mem, "scan_ms": scan, "merge_ms": merge,
                         "network_ms": net, "batch_ms": scan + merge + net})
            print(f"| {n:.0e} | {m} | {per:.2e} | {mem:,.1f} GiB | {scan:,.0f} ms | {merge:.2f} ms | "
                  f"{net:.2f} ms | {scan + merge + net:,.0f} ms |")
    report["capacity"] = rows


if __name__ == "__main__":
    main()
