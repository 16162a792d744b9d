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
- Milvus Lite, where it can run the search (see ``--milvus-rows``).

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
    if a.milvus_rows:
        cells.append(milvus(a.milvus_rows))
    if a.out:
        Path(a.out).write_text(json.dumps(cells, indent=1))


def milvus(rows):
    """Milvus Lite with a binary vector field, BIN_FLAT and a scalar filter -- or what it says."""
    try:
        from pymilvus import DataType, MilvusClient
    except ImportError:
        return {"milvus": "pymilvus / milvus-lite not installed (pip install milvus-lite pymilvus)"}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        client = MilvusClient(str(Path(tmp) / "m.db"))
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("v", DataType.BINARY_VECTOR, dim=64)
        schema.add_field("year", DataType.INT64)
        params = client.prepare_index_params()
        params.add_index(field_name="v", index_type="BIN_FLAT", metric_type="HAMMING")
        try:
            client.create_collection("codes", schema=schema, index_params=params)
        except Exception as exc:  # noqa: BLE001 -- its own words are the result
            print(f"Milvus Lite: {exc}")
            return {"milvus": str(exc)}
    return {"milvus": "created a BIN_FLAT collection (this version supports binary vectors: time it)"}


if __name__ == "__main__":
    main()
