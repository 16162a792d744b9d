"""Retrieval metrics of the cross-modal hashing protocol (``shared/design/evaluation.md``).

Everything is computed from one pass over query chunks: Hamming distances through a
matrix product of +-1 codes, relevance = at least one shared label, and the database
ranked by distance with ties broken by database position (a stable radix sort on
uint16 distances). A query with no relevant item counts 0 in every mean.

Metrics (all means over queries unless said otherwise):
- ``map_all``: AP_q = (1/R_q) sum_k k / p_k over the relevant items' 1-based ranks p_k.
- ``map_expected``: tie-aware AP (McSherry & Najork 2008): the expectation of AP over all
  orders within each group of equal distance, so it does not depend on tie-breaking.
- ``map_at_k[K]["found"]``: AP over the top K divided by the relevant items found there
  (DCMH's MATLAB code, DeepHash-pytorch); ``["truncated"]``: divided by min(R_q, K).
- ``precision_radius`` / ``recall_radius``: items within Hamming distance <= r pooled over
  all queries (DCMH ``calcPreRecRadiusLabel``); a query with nothing inside the radius
  adds no retrieved pair.
- ``p_at_n``: precision of the top N for N = 1..n_max.
- ``pr_curve``: pooled precision and recall within radius r for r = 0..bits.
"""

from __future__ import annotations

import time

import numpy as np

from hashret.errors import check
from hashret.index.bits import sign_codes

MAP_AT_K_MODES = ("found", "truncated")


def hamming_distances(query_codes, db_codes) -> np.ndarray:
    """(Q, N) uint16 Hamming distances between +-1 / real-valued code matrices."""
    q = sign_codes(query_codes).astype(np.float32)
    d = sign_codes(db_codes).astype(np.float32)
    check(q.ndim == 2 and d.ndim == 2, "codes must be 2-D (items x bits)")
    check(q.shape[1] == d.shape[1], f"query codes have {q.shape[1]} bits but database codes "
          f"{d.shape[1]}: encode both with the same model")
    return _distances_pm1(q, d)


def _distances_pm1(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    # exact: integer-valued float32 products stay below 2^24
    return np.rint((q.shape[1] - q @ d.T) * 0.5).astype(np.uint16)


def relevance(query_labels, db_labels) -> np.ndarray:
    """(Q, N) bool: the query and the item share at least one label."""
    return (np.asarray(query_labels, np.float32) @ np.asarray(db_labels, np.float32).T) > 0


def _harmonic(n: int) -> np.ndarray:
    h = np.zeros(n + 1, dtype=np.float64)
    h[1:] = np.cumsum(1.0 / np.arange(1, n + 1))
    return h


class _Accumulator:
    """Sums of per-query figures over chunks; turned into means at the end."""

    def __init__(self, n_query, n_db, bits, topk, n_max):
        self.n_query, self.n_db, self.bits = n_query, n_db, bits
        self.topk = [k for k in topk]
        self.n_max = min(n_max, n_db)
        self.ap = np.zeros(n_query)
        self.eap = np.zeros(n_query)
        self.ap_k = {k: {m: np.zeros(n_query) for m in MAP_AT_K_MODES} for k in self.topk}
        self.p_at_n = np.zeros(self.n_max)
        self.ret_r = np.zeros(bits + 1)  # retrieved pairs within radius r (cumulative)
        self.relret_r = np.zeros(bits + 1)
        self.n_relevant = 0.0
        self.harm = _harmonic(n_db)

    def add(self, rows, dist, rel):
        cq, nd = dist.shape
        bits = self.bits
        r_q = rel.sum(axis=1).astype(np.float64)
        self.n_relevant += r_q.sum()

        order = np.argsort(dist, axis=1, kind="stable")  # ties by database position
        rel_sorted = np.take_along_axis(rel, order, axis=1)
        del order
        cum = np.cumsum(rel_sorted, axis=1, dtype=np.int32)
        pos = np.arange(1, nd + 1, dtype=np.float64)
        has = r_q > 0
        prec_at_rel = np.where(rel_sorted, cum / pos, 0.0)
        self.ap[rows] = np.divide(prec_at_rel.sum(axis=1), r_q, out=np.zeros(cq), where=has)
        for k in self.topk:
            kk = min(k, nd)
            s = prec_at_rel[:, :kk].sum(axis=1)
            found = cum[:, kk - 1].astype(np.float64)
            self.ap_k[k]["found"][rows] = np.divide(s, found, out=np.zeros(cq), where=found > 0)
            denom = np.minimum(r_q, kk)
            self.ap_k[k]["truncated"][rows] = np.divide(s, denom, out=np.zeros(cq), where=denom > 0)
        self.p_at_n += (cum[:, : self.n_max] / pos[: self.n_max]).sum(axis=0)
        del prec_at_rel, rel_sorted, cum

        # per-distance histograms: items and relevant items at each distance 0..bits
        flat = (np.arange(cq)[:, None] * (bits + 1) + dist).ravel()
        n_d = np.bincount(flat, minlength=cq * (bits + 1)).reshape(cq, bits + 1).astype(np.float64)
        r_d = np.bincount(flat, weights=rel.ravel().astype(np.float64),
                          minlength=cq * (bits + 1)).reshape(cq, bits + 1)
        self.ret_r += np.cumsum(n_d, axis=1).sum(axis=0)
        self.relret_r += np.cumsum(r_d, axis=1).sum(axis=0)

        # tie-aware AP: within a group of n items (r relevant) after c items (R_b relevant),
        # E[sum of precisions at its relevant ranks]
        #   = (r/n) * sum_{t=1..n} (R_b + 1 + (t-1)(r-1)/(n-1)) / (c+t)
        c = np.cumsum(n_d, axis=1) - n_d
        rb = np.cumsum(r_d, axis=1) - r_d
        ci, ni = c.astype(np.int64), n_d.astype(np.int64)
        s1 = self.harm[ci + ni] - self.harm[ci]
        s2 = n_d - (c + 1.0) * s1  # sum_t (t-1)/(c+t)
        slope = np.divide(r_d - 1.0, n_d - 1.0, out=np.zeros_like(r_d), where=n_d > 1)
        group = np.divide(r_d, n_d, out=np.zeros_like(r_d), where=n_d > 0) * ((rb + 1.0) * s1 + slope * s2)
        self.eap[rows] = np.divide(group.sum(axis=1), r_q, out=np.zeros(cq), where=has)

    def result(self, radius):
        nq = self.n_query
        prec_r = np.divide(self.relret_r, self.ret_r, out=np.zeros_like(self.ret_r),
                           where=self.ret_r > 0)
        rec_r = self.relret_r / self.n_relevant if self.n_relevant > 0 else np.zeros_like(self.relret_r)
        r = min(radius, self.bits)
        return {
            "map_all": float(self.ap.mean()),
            "map_expected": float(self.eap.mean()),
            "map_at_k": {k: {m: float(v.mean()) for m, v in d.items()} for k, d in self.ap_k.items()},
            "precision_radius": float(prec_r[r]),
            "recall_radius": float(rec_r[r]),
            "radius": int(radius),
            "p_at_n": self.p_at_n / nq,
            "pr_curve": {"radius": np.arange(self.bits + 1), "precision": prec_r, "recall": rec_r},
            "ap_per_query": self.ap.copy(),
            "n_query": nq,
            "n_database": self.n_db,
            "bits": self.bits,
        }


def evaluate_codes(query_codes, db_codes, query_labels, db_labels, topk=(100, 1000),
                   radius: int = 2, n_max: int = 1000, chunk: int | None = None) -> dict:
    """All metrics of the protocol for one direction (see the module docstring).

    Codes: +-1 or real-valued (sign, 0 -> +1) or bool bits, shape (items, bits).
    Labels: multi-hot (items, classes). Returns a dict of floats and curve arrays.
    """
    q = sign_codes(query_codes)
    d = sign_codes(db_codes)
    check(q.ndim == 2 and d.ndim == 2, "codes must be 2-D (items x bits)")
    check(len(q) > 0, "no query codes: the query set is empty")
    check(len(d) > 0, "no database codes: the database is empty")
    check(q.shape[1] == d.shape[1], f"query codes have {q.shape[1]} bits, database codes "
          f"{d.shape[1]}: encode both with the same model")
    lq, ld = np.asarray(query_labels), np.asarray(db_labels)
    check(lq.ndim == 2 and ld.ndim == 2 and lq.shape[1] == ld.shape[1],
          f"query labels {lq.shape} and database labels {ld.shape} must be (items x classes) "
          "with the same classes")
    check(len(lq) == len(q), f"{len(q)} query codes but {len(lq)} query label rows")
    check(len(ld) == len(d), f"{len(d)} database codes but {len(ld)} database label rows")
    topk = tuple(int(k) for k in topk)
    check(all(k > 0 for k in topk), "every K of mAP@K must be positive")
    check(radius >= 0, "the Hamming radius must be >= 0")
    nq, nd, bits = len(q), len(d), q.shape[1]
    if chunk is None:  # ~200 MB of temporaries per chunk
        chunk = max(1, int(2e8 // (40 * nd)))
    acc = _Accumulator(nq, nd, bits, topk, n_max)
    qf, df = q.astype(np.float32), d.astype(np.float32)
    lqf, ldf = lq.astype(np.float32), ld.astype(np.float32)
    for s in range(0, nq, chunk):
        rows = np.arange(s, min(s + chunk, nq))
        dist = _distances_pm1(qf[rows], df)
        rel = (lqf[rows] @ ldf.T) > 0
        acc.add(rows, dist, rel)
    return acc.result(radius)


def map_all(query_codes, db_codes, query_labels, db_labels) -> float:
    """mAP over the whole ranked database (stable tie-break by database position)."""
    return evaluate_codes(query_codes, db_codes, query_labels, db_labels, topk=(1,), n_max=1)["map_all"]


def map_at_k(query_codes, db_codes, query_labels, db_labels, k: int, mode: str = "truncated") -> float:
    """mAP@K under the named definition: ``"found"`` or ``"truncated"`` (module docstring)."""
    check(mode in MAP_AT_K_MODES, f"unknown mAP@K definition {mode!r}: use 'found' or 'truncated'")
    res = evaluate_codes(query_codes, db_codes, query_labels, db_labels, topk=(k,), n_max=1)
    return res["map_at_k"][k][mode]


def recall_at_k(ranked, relevant, ks=(1, 5, 10)) -> dict:
    """Recall@K of the image-text matching protocol, in percent: the share of queries with at
    least one relevant item among their first K results. ``ranked`` is (Q, >= max K) result
    ids in rank order (-1 = no result); ``relevant`` is one id per query or a collection of
    ids per query (an image has several matching captions)."""
    ranked = np.asarray(ranked)
    check(ranked.ndim == 2 and ranked.shape[1] >= max(ks),
          f"recall needs at least {max(ks)} ranked results per query, got shape {ranked.shape}")
    check(len(relevant) == len(ranked), "one relevance entry per query is needed")
    first = np.full(len(ranked), np.inf)
    for q, rel in enumerate(relevant):
        hits = np.flatnonzero(np.isin(ranked[q], np.atleast_1d(rel)))
        if len(hits):
            first[q] = hits[0]
    return {k: float(100.0 * np.mean(first < k)) for k in ks}


DIRECTIONS = (("i2t", "image", "text"), ("t2i", "text", "image"))  # (name, query side, database side)


def evaluate_model(model, dataset, query_rows=None, db_rows=None, **metric_args):
    """Encode the query and database parts with ``model`` (the database by the same hash
    functions as the queries) and evaluate both directions. Returns ({"i2t": metrics,
    "t2i": metrics}, seconds spent encoding); ``metric_args`` go to :func:`evaluate_codes`."""
    q = dataset.part("query") if query_rows is None else query_rows
    db = dataset.part("database") if db_rows is None else db_rows
    t0 = time.perf_counter()
    codes = {(mod, part): model.encode_rows(dataset, mod, rows)
             for mod in ("image", "text") for part, rows in (("query", q), ("database", db))}
    enc_s = time.perf_counter() - t0
    return {name: evaluate_codes(codes[(qmod, "query")], codes[(dmod, "database")],
                                 dataset.labels[q], dataset.labels[db], **metric_args)
            for name, qmod, dmod in DIRECTIONS}, enc_s
