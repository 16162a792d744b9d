"""Filtered search: exact Hamming top-k among the items that match a condition.

    python benchmarks/filter.py                          # 10^7 x 64-bit codes (~3 GB peak)
    python benchmarks/filter.py --rows 1000000 --milvus-rows 200000

One in-memory index of random 64-bit codes with two attributes: a label set (labels
``p50``, ``p10``, ``p1``, ``p01``, held by about 50%, 10%, 1% and 0.1% of the items) and an
integer ``year`` uniform in 0..999. For each selectivity (50%, 10%, 1%, 0.1%), each filter
kind (a label, an integer range), 1 and 100 queries, k = 10 and 1,000, the median time of:

- hashret unfiltered, and filtered: a new filter each call (a second index over the same
  rows with ``filters_kept = 0``: whatever the filter costs is paid in the call, but for the
  row lists of its column and their copies of the codes, made once per column or list after
  the rows change and timed apart),
  and a repeated one (the index keeps what it made of its last filters, as for a server's
  repeated filters);
- faiss ``IndexBinaryFlat`` with post-filtering: search k' = k / selectivity, keep the
  matches, grow k' (x4) until k match (the way faiss users filter binary codes: its binary
  indexes take no search-time selector);
- Milvus Lite, where it can run the search (``--milvus-rows N``: on the first N rows, after
  the rest, each filter as a scalar expression over BOOL / INT64 fields; its 3.x releases
  take no binary vectors, 2.5.1 does: ``pip install milvus-lite==2.5.1 pymilvus==2.5.18
  "setuptools<70"``).

Each hashret answer is checked against faiss' post-filtered one (same distances; same ids
where distances are unique). Timings alternate between the methods, rounds apart; medians.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

# OpenMP threads that spin after a parallel region take the cores from the next call (see
# benchmarks/search.py): faiss' and hashret's calls alternate here, so both run passive
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from hashret.index import HashIndex  # noqa: E402
from hashret.index.attributes import Labels  # noqa: E402

SHARES = {"50%": ("p50", 500), "10%": ("p10", 100), "1%": ("p1", 10), "0.1%": ("p01", 1)}


def median_ms(fn, rounds):
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def faiss_post_filtered(index, q, k, ok, share):
    """faiss' way: search k' results, keep the matching ones, grow k' until k match."""
    kk = min(index.ntotal, max(k, int(np.ceil(k / share * 1.2))))
    while True:
        d, i = index.search(q, kk)
        keep = ok[np.maximum(i, 0)] & (i >= 0)
        if (keep.sum(axis=1) >= k).all() or kk >= index.ntotal:
            out_d = np.full((len(q), k), -1)
            out_i = np.full((len(q), k), -1)
            for r in range(len(q)):
                got_d, got_i = d[r][keep[r]][:k], i[r][keep[r]][:k]
                out_d[r, :len(got_d)], out_i[r, :len(got_i)] = got_d, got_i
            return out_d, out_i
        kk = min(index.ntotal, kk * 4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10**7)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--queries", default="1,100")
    ap.add_argument("--k", default="10,1000")
    ap.add_argument("--milvus-rows", type=int, default=0, help="rows for Milvus Lite (0: skip it)")
    ap.add_argument("--out", default=None, help="write the cells as JSON here")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n = a.rows
    codes = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    hot = np.stack([rng.random(n) < p for p in (0.5, 0.1, 0.01, 0.001)], axis=1)
    year = rng.integers(0, 1000, n)
    index, forgetful = HashIndex(64), HashIndex(64)
    for ix in (index, forgetful):
        ix.add(codes, attributes={"labels": Labels(hot, ["p50", "p10", "p1", "p01"]), "year": year})
    forgetful.filters_kept = 0
    import faiss

    fx = faiss.IndexBinaryFlat(64)
    fx.add(codes)
    faiss.omp_set_num_threads(2)
    qs = rng.integers(0, 256, (100, 8), dtype=np.uint8)
    index.search(qs[:2], 10, filter={"year": {"lt": 1}})  # compiled before timing
    # the row lists are built per column the first time a filter reads it after the rows
    # change -- once, not per filter -- and a list's copy of its codes the first time a
    # filter reads the codes from it: timed here, apart from the searches
    lists = {}
    for what, expr in (("labels (4)", {"or": [{"labels": {"any": [name]}} for name in ["p50", "p10", "p1", "p01"]]}),
                       ("year", {"year": {"lt": 0}}), ("copy p50", {"labels": {"any": ["p50"]}}),
                       ("copy p10", {"labels": {"any": ["p10"]}}), ("copy p1", {"labels": {"any": ["p1"]}}),
                       ("copy p01", {"labels": {"any": ["p01"]}}), ("copy year", {"year": {"lt": 1}})):
        t0 = time.perf_counter()
        forgetful.search(qs[:1], 1, filter=expr)  # (index's lists are built by its first searches)
        lists[what] = 1e3 * (time.perf_counter() - t0)
    print("row lists and their code copies built (first filter on a column after the rows change), ms: "
          + ", ".join(f"{what} {v:.0f}" for what, v in lists.items()))
    cells = [{"row_lists_ms": {what: round(v, 1) for what, v in lists.items()}}]
    print(f"{n:,} x 64-bit codes; medians of {a.rounds} rounds, ms")
    print(f"{'share':>6} {'filter':>6} {'Q':>4} {'k':>5} | {'unfilt':>7} {'new':>7} {'x':>5} {'repeat':>7} {'x':>5} "
          f"| {'faiss':>8} {'x ours':>6}")
    for share, (label, below) in SHARES.items():
        frac = float(share.rstrip("%")) / 100
        for kind in ("label", "int"):
            col = hot[:, ["p50", "p10", "p1", "p01"].index(label)] if kind == "label" else year < below
            for nq in map(int, a.queries.split(",")):
                q = qs[:nq]
                for k in map(int, a.k.split(",")):
                    fixed = {"labels": {"any": [label]}} if kind == "label" else {"year": {"lt": below}}

                    def fresh():  # an index that keeps nothing: each call meets the filter afresh
                        return forgetful.search(q, k, filter=fixed)

                    d, ids = index.search(q, k, filter=fixed)
                    fd, fi = faiss_post_filtered(fx, q, k, col, frac)
                    assert (d == fd).all(), "hashret and faiss disagree on distances"
                    assert col[ids[ids >= 0]].all()
                    t = {"unfiltered": [], "new": [], "repeat": [], "faiss": []}
                    for _ in range(a.rounds):  # alternated, so drift hits every method alike
                        t["unfiltered"].append(median_ms(lambda: index.search(q, k), 1))
                        t["new"].append(median_ms(fresh, 1))
                        t["repeat"].append(median_ms(lambda: index.search(q, k, filter=fixed), 1))
                        t["faiss"].append(median_ms(lambda: faiss_post_filtered(fx, q, k, col, frac), 1))
                    m = {key: float(np.median(v)) for key, v in t.items()}
                    cell = {"share": share, "filter": kind, "queries": nq, "k": k, **{f"{key}_ms": round(v, 3)
                            for key, v in m.items()}, "noise": {key: round(float(np.std(v) / np.median(v)), 3)
                                                                for key, v in t.items()}}
                    cells.append(cell)
                    print(f"{share:>6} {kind:>6} {nq:>4} {k:>5} | {m['unfiltered']:7.2f} {m['new']:7.2f} "
                          f"{m['new'] / m['unfiltered']:5.2f} {m['repeat']:7.2f} {m['repeat'] / m['unfiltered']:5.2f} "
                          f"| {m['faiss']:8.2f} {m['faiss'] / m['new']:6.1f}", flush=True)
    if a.milvus_rows:  # after hashret's and faiss' rounds: its server process runs beside nothing
        cells.append(milvus(a.milvus_rows, codes, hot, year, qs, a,
                            {(c["share"], c["filter"], c["queries"], c["k"]): c for c in cells[1:]}))
    if a.out:
        Path(a.out).write_text(json.dumps(cells, indent=1))


def milvus(rows, codes, hot, year, qs, a, ours):
    """Milvus Lite: a BINARY_VECTOR field with BIN_FLAT (HAMMING) and the same filters as
    scalar expressions, on the first ``rows`` rows -- or what it says where it cannot."""
    try:
        import pymilvus
        from pymilvus import DataType, MilvusClient
    except ImportError:
        return {"milvus": "pymilvus / milvus-lite not installed (pip install milvus-lite pymilvus)"}
    import tempfile
    from importlib.metadata import version

    made = {"milvus_lite": version("milvus-lite"), "pymilvus": pymilvus.__version__, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "m.db"))
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.BINARY_VECTOR, dim=64)
        for name in ("p50", "p10", "p1", "p01"):
            schema.add_field(name, DataType.BOOL)
        schema.add_field("year", DataType.INT64)
        params = client.prepare_index_params()
        params.add_index(field_name="v", index_type="BIN_FLAT", metric_type="HAMMING")
        try:
            client.create_collection("codes", schema=schema, index_params=params)
        except Exception as exc:  # noqa: BLE001 -- its own words are the result
            print(f"Milvus Lite {made['milvus_lite']}: {exc}")
            return {**made, "milvus": str(exc)}
        t0 = time.perf_counter()
        for lo in range(0, rows, 10000):
            hi = min(rows, lo + 10000)
            client.insert("codes", [{"id": i, "v": codes[i].tobytes(), "year": int(year[i]),
                                     **{name: bool(hot[i, j]) for j, name in enumerate(("p50", "p10", "p1", "p01"))}}
                                    for i in range(lo, hi)])
        client.flush("codes")
        client.load_collection("codes")
        made["insert_s"] = round(time.perf_counter() - t0, 1)
        print(f"Milvus Lite {made['milvus_lite']} (pymilvus {made['pymilvus']}): {rows:,} rows inserted and loaded "
              f"in {made['insert_s']} s; BIN_FLAT, HAMMING; medians of {a.rounds} rounds, ms; 'hashret new' is the "
              f"table's new-filter time at {len(codes):,} rows")
        d_all = None
        made["cells"] = []
        for share, (label, below) in SHARES.items():
            for kind in ("label", "int"):
                expr = f"{label} == true" if kind == "label" else f"year < {below}"
                ok = hot[:rows, ["p50", "p10", "p1", "p01"].index(label)] if kind == "label" else year[:rows] < below
                for nq in map(int, a.queries.split(",")):
                    q = qs[:nq]
                    data = [x.tobytes() for x in q]
                    for k in map(int, a.k.split(",")):
                        def run():
                            return client.search("codes", data=data, limit=k, filter=expr, anns_field="v",
                                                 search_params={"metric_type": "HAMMING"})
                        got = run()
                        if d_all is None:  # the answers checked: the same distances as brute force
                            words = codes[:rows].view(np.uint64).ravel()
                            d_all = [np.bitwise_count(words ^ x) for x in qs.view(np.uint64).ravel()]
                        for i in range(nq):
                            want = np.sort(d_all[i][ok])[:k]
                            assert [h["distance"] for h in got[i]] == want.tolist(), "Milvus Lite and brute force disagree"
                        ms = median_ms(run, a.rounds)
                        mine = ours.get((share, kind, nq, k), {}).get("new_ms")
                        made["cells"].append({"share": share, "filter": kind, "queries": nq, "k": k, "milvus_ms": round(ms, 3)})
                        print(f"{share:>6} {kind:>6} {nq:>4} {k:>5} | Milvus Lite {ms:9.2f} | hashret new "
                              f"{mine if mine is not None else float('nan'):7.2f} | x {ms / mine if mine else float('nan'):7.1f}",
                              flush=True)
        client.close()
    return made


if __name__ == "__main__":
    main()
