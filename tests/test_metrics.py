import itertools

import numpy as np
import pytest

from hashret.errors import HashretError
from hashret.metrics import evaluate_codes, hamming_distances, map_all, map_at_k


# -- obviously-correct references: one query at a time, plain Python -------------------------
def naive_rank(qc, dc):
    dist = [int(np.sum(qc != row)) for row in dc]
    return dist, sorted(range(len(dc)), key=lambda j: (dist[j], j))


def naive_ap(order, rel, cutoff=None, mode="all"):
    hits, s = 0, 0.0
    cut = len(order) if cutoff is None else min(cutoff, len(order))
    for rank, j in enumerate(order[:cut], start=1):
        if rel[j]:
            hits += 1
            s += hits / rank
    total = sum(rel)
    if mode == "all":
        return s / total if total else 0.0
    if mode == "found":
        return s / hits if hits else 0.0
    denom = min(total, cut)
    return s / denom if denom else 0.0


def naive_expected_ap(dist, rel):
    """Average AP over every order within each group of equal distance (small cases only)."""
    groups = [[j for j in range(len(dist)) if dist[j] == d] for d in sorted(set(dist))]
    aps = []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [j for p in perms for j in p]
        aps.append(naive_ap(order, rel))
    return float(np.mean(aps))


def naive_all(qcodes, dcodes, ql, dl, ks, radius, n_max):
    qs = np.where(np.asarray(qcodes) >= 0, 1, -1)
    ds = np.where(np.asarray(dcodes) >= 0, 1, -1)
    out = {"ap": [], "found": {k: [] for k in ks}, "trunc": {k: [] for k in ks}, "pn": []}
    ret = relret = nrel = 0
    for i in range(len(qs)):
        dist, order = naive_rank(qs[i], ds)
        rel = [bool(np.dot(ql[i], dl[j]) > 0) for j in range(len(ds))]
        out["ap"].append(naive_ap(order, rel))
        for k in ks:
            out["found"][k].append(naive_ap(order, rel, k, "found"))
            out["trunc"][k].append(naive_ap(order, rel, k, "truncated"))
        out["pn"].append([sum(rel[j] for j in order[:n]) / n for n in range(1, n_max + 1)])
        inside = [j for j in range(len(ds)) if dist[j] <= radius]
        ret += len(inside)
        relret += sum(rel[j] for j in inside)
        nrel += sum(rel)
    return out, (relret / ret if ret else 0.0), (relret / nrel if nrel else 0.0)


# -- hand-computed cases ----------------------------------------------------------------------
def hand_case():
    q = np.array([[1, 1, 1, 1], [1, 1, 1, 1]])
    db = np.array([[1, 1, 1, -1],    # d0: distance 1, relevant to query 0
                   [1, 1, 1, 1],     # d1: distance 0, not relevant
                   [-1, 1, 1, 1],    # d2: distance 1, not relevant
                   [-1, -1, 1, 1]])  # d3: distance 2, relevant
    ql = np.array([[1, 0, 0], [0, 0, 1]])  # query 1 has no relevant item
    dl = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0], [1, 1, 0]])
    return q, db, ql, dl


def test_hand_case_with_ties_and_a_query_without_relevant_items():
    q, db, ql, dl = hand_case()
    res = evaluate_codes(q, db, ql, dl, topk=(2,), radius=1, n_max=4)
    # stable order d1, d0, d2, d3: relevant at ranks 2 and 4 -> AP = (1/2 + 2/4)/2 = 0.5;
    # the query with no relevant item counts 0
    assert res["map_all"] == pytest.approx(0.25, abs=1e-12)
    # d0 and d2 tie at distance 1: AP is 0.5 or (1/3 + 2/4)/2 with equal chance
    assert res["map_expected"] == pytest.approx((0.5 + (1 / 3 + 0.5) / 2) / 2 / 2, abs=1e-12)
    # top 2 = d1, d0: one relevant found at rank 2
    assert res["map_at_k"][2]["found"] == pytest.approx(0.5 / 2, abs=1e-12)
    assert res["map_at_k"][2]["truncated"] == pytest.approx(0.25 / 2, abs=1e-12)
    # radius 1: query 0 gets d1, d0, d2 (one relevant); query 1 gets the same 3, none relevant
    assert res["precision_radius"] == pytest.approx(1 / 6, abs=1e-12)
    assert res["recall_radius"] == pytest.approx(1 / 2, abs=1e-12)
    np.testing.assert_allclose(res["p_at_n"], [0, 0.25, 1 / 6, 0.25], atol=1e-12)


def test_sign_zero_counts_as_plus_one():
    q = np.array([[0.0, -1.0, 0.0, 2.0]])
    db = np.array([[1, -1, 1, 1], [-1, -1, -1, 1]])
    np.testing.assert_array_equal(hamming_distances(q, db), [[0, 2]])


def test_perfect_and_reversed_rankings():
    q = np.array([[1, 1, 1, 1]])
    db = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]])
    assert map_all(q, db, [[1, 0]], [[1, 0], [0, 1]]) == 1.0
    assert map_all(q, db, [[0, 1]], [[1, 0], [0, 1]]) == 0.5


# -- random cases against the naive loop ------------------------------------------------------
@pytest.mark.parametrize("seed,bits,nq,nd", [(0, 8, 13, 57), (1, 16, 7, 200), (2, 5, 20, 31)])
def test_matches_naive_loop(seed, bits, nq, nd):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((nq, bits))
    d = rng.integers(-1, 2, size=(nd, bits))  # includes exact zeros
    ql = (rng.random((nq, 5)) < 0.25).astype(int)
    dl = (rng.random((nd, 5)) < 0.25).astype(int)
    ks, radius, n_max = (1, 10, nd + 5), 2, 40
    res = evaluate_codes(q, d, ql, dl, topk=ks, radius=radius, n_max=n_max, chunk=3)
    ref, prec, rec = naive_all(q, d, ql, dl, ks, radius, min(n_max, nd))
    assert res["map_all"] == pytest.approx(np.mean(ref["ap"]), abs=1e-9)
    np.testing.assert_allclose(res["ap_per_query"], ref["ap"], atol=1e-9)
    for k in ks:
        assert res["map_at_k"][k]["found"] == pytest.approx(np.mean(ref["found"][k]), abs=1e-9)
        assert res["map_at_k"][k]["truncated"] == pytest.approx(np.mean(ref["trunc"][k]), abs=1e-9)
    np.testing.assert_allclose(res["p_at_n"], np.mean(ref["pn"], axis=0), atol=1e-9)
    assert res["precision_radius"] == pytest.approx(prec, abs=1e-9)
    assert res["recall_radius"] == pytest.approx(rec, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_expected_ap_equals_average_over_tie_orders(seed):
    rng = np.random.default_rng(seed)
    bits, nq, nd = 3, 4, 7  # few distances -> big tie groups, still enumerable
    q = rng.choice([-1, 1], size=(nq, bits))
    d = rng.choice([-1, 1], size=(nd, bits))
    ql = (rng.random((nq, 3)) < 0.4).astype(int)
    dl = (rng.random((nd, 3)) < 0.4).astype(int)
    res = evaluate_codes(q, d, ql, dl, topk=(1,), n_max=1)
    ref = []
    for i in range(nq):
        dist = [int(np.sum(q[i] != row)) for row in d]
        rel = [bool(np.dot(ql[i], dl[j]) > 0) for j in range(nd)]
        ref.append(naive_expected_ap(dist, rel))
    assert res["map_expected"] == pytest.approx(np.mean(ref), abs=1e-9)


def test_chunking_does_not_change_results():
    rng = np.random.default_rng(5)
    q, d = rng.standard_normal((50, 32)), rng.standard_normal((300, 32))
    ql, dl = rng.random((50, 6)) < 0.2, rng.random((300, 6)) < 0.2
    a = evaluate_codes(q, d, ql, dl, chunk=1)
    b = evaluate_codes(q, d, ql, dl, chunk=1000)
    assert a["map_all"] == b["map_all"] and a["map_expected"] == pytest.approx(b["map_expected"])
    np.testing.assert_array_equal(a["p_at_n"], b["p_at_n"])


def test_map_at_k_by_name():
    q, db, ql, dl = hand_case()
    assert map_at_k(q, db, ql, dl, 2, "found") == pytest.approx(0.25)
    assert map_at_k(q, db, ql, dl, 2, "truncated") == pytest.approx(0.125)
    with pytest.raises(HashretError, match="definition"):
        map_at_k(q, db, ql, dl, 2, "other")


@pytest.mark.parametrize("bad,match", [
    (dict(q=np.ones((0, 8))), "query set is empty"),
    (dict(d=np.ones((3, 16))), "bits"),
    (dict(q=np.full((2, 8), np.nan)), "NaN"),
    (dict(ql=np.ones((3, 2))), "query label rows"),
])
def test_bad_input_is_named(bad, match):
    args = dict(q=np.ones((2, 8)), d=np.ones((3, 8)), ql=np.ones((2, 2)), dl=np.ones((3, 2)))
    args.update(bad)
    with pytest.raises(HashretError, match=match):
        evaluate_codes(args["q"], args["d"], args["ql"], args["dl"])
