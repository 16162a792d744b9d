"""Attributes stored with the codes, and filtered search: every filtered result equals ranking
the matching items by brute force (post-filtering a full ranking), on both the masked scan and
the gathered one, in memory and on LMDB."""

import numpy as np
import pytest

from hashret.errors import CorruptError, HashretError
from hashret.index import HashIndex, kernels
from hashret.index import filtered, postings
from hashret.index import hash_index as hash_index_module
from hashret.index.attributes import Labels
from tests.index.test_hash_index import _flip_inside
from tests.index.test_kernels import brute_distances

LABELS = ["sky", "sea", "dog", "cat", "car", "tree", "road", "snow", "sand"]


def _data(n, bits, seed):
    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 256, size=(max(3, n // 25), bits // 8), dtype=np.uint8)  # ties
    codes = pool[rng.integers(0, len(pool), size=n)]
    hot = rng.random((n, len(LABELS))) < 0.25
    attrs = {"labels": Labels(hot, LABELS), "year": rng.integers(1990, 2030, n),
             "score": rng.random(n), "genre": rng.choice(["rock", "pop", "jazz", "folk"], n).tolist(),
             "taken": np.datetime64("2020-01-01T00:00:00") + rng.integers(0, 10**8, n).astype("timedelta64[s]")}
    plain = {"labels": hot, "year": attrs["year"], "score": attrs["score"],
             "genre": np.array(attrs["genre"]), "taken": attrs["taken"]}
    return codes, attrs, plain


def _post_filtered(db, q, k, ok):
    """The brute-force answer: rank every row, keep those ``ok`` selects, first k."""
    d = brute_distances(db, q)
    rows = np.flatnonzero(ok)
    out_d = np.full((len(q), k), -1)
    out_r = np.full((len(q), k), -1)
    for i in range(len(q)):
        order = rows[np.lexsort((rows, d[i][rows]))][:k]
        out_d[i, :len(order)] = d[i][order]
        out_r[i, :len(order)] = order
    return out_d, out_r


def _selective(plain, share, rng):
    """A filter expression and its rows, selecting about ``share`` of the rows."""
    year = plain["year"]
    if share >= 0.5:
        return {"labels": {"none": ["sky", "sea"]}}, ~plain["labels"][:, :2].any(axis=1)
    if share >= 0.1:
        return ({"year": {"gte": 2026}}, year >= 2026)
    if share >= 0.01:
        return ({"and": [{"year": {"eq": 2001}}, {"genre": {"in": ["rock", "jazz"]}}]},
                (year == 2001) & np.isin(plain["genre"], ["rock", "jazz"]))
    return ({"year": {"eq": 2001}, "genre": {"eq": "folk"}, "labels": {"all": ["dog", "cat"]}},
            (year == 2001) & (plain["genre"] == "folk") & plain["labels"][:, 2] & plain["labels"][:, 3])


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 128, 192, 256, 320])
# PICK_WORK 0: listed rows copied and scanned, never picked; COPIES_SHARE 0: picked where the
# rows lie (no list's codes copied)
@pytest.mark.parametrize("pick_work, copies", [(filtered.PICK_WORK, postings.COPIES_SHARE), (filtered.PICK_WORK, 0.0),
                                               (0, postings.COPIES_SHARE)])
def test_filtered_search_equals_brute_force_post_filtering(bits, pick_work, copies, tmp_path, monkeypatch):
    monkeypatch.setattr(filtered, "PICK_WORK", pick_work)
    monkeypatch.setattr(postings, "COPIES_SHARE", copies)
    n = 6000
    db, attrs, plain = _data(n, bits, bits)
    rng = np.random.default_rng(bits)
    q = np.vstack([db[:2], rng.integers(0, 256, size=(7, bits // 8), dtype=np.uint8)])
    removed = np.concatenate([np.arange(100, 400), rng.choice(n, 200, replace=False)])
    memory = HashIndex(bits)
    stored = HashIndex.create(tmp_path / "ix", bits, chunk_size=1000)
    for index in (memory, stored):
        index.add(db[:2500], attributes={c: (Labels(v.multi_hot[:2500], v.names) if c == "labels" else v[:2500])
                                         for c, v in attrs.items()})
        index.add(db[2500:], attributes={c: (Labels(v.multi_hot[2500:], v.names) if c == "labels" else v[2500:])
                                         for c, v in attrs.items()})
        index.remove(removed)
    alive = np.ones(n, bool)
    alive[removed] = False
    for share in (0.5, 0.1, 0.01, 0.001):
        expr, ok = _selective(plain, share, rng)
        for index in (memory, stored):
            for k in (1, 10, 300):
                for qq in (q, q[2:3], q[:4]):
                    if len(qq) < len(q):
                        index._filters.clear()  # a filter seen afresh: a few queries rank first
                    d, ids = index.search(qq, k, filter=expr)
                    bd, br = _post_filtered(db, qq, k, ok & alive)
                    np.testing.assert_array_equal(ids, br, err_msg=f"{share} {k}")
                    np.testing.assert_array_equal(d, bd)
            mask = ok.copy()  # a row array filters the same (removed rows stay out)
            np.testing.assert_array_equal(index.search(q, 10, filter=mask)[1], _post_filtered(db, q, 10, ok & alive)[1])
            lims, dist, ids = index.range_search(q, bits // 3, filter=expr)
            full = brute_distances(db, q)
            for i in range(len(q)):
                rows = np.flatnonzero(ok & alive & (full[i] <= bits // 3))
                rows = rows[np.lexsort((rows, full[i][rows]))]
                np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
                np.testing.assert_array_equal(dist[lims[i]:lims[i + 1]], full[i][rows])
    stored.close()


@pytest.mark.parametrize("copies", [postings.COPIES_SHARE, 0.0])
def test_a_rare_labels_rows_are_picked_from_its_lists_copy_of_their_codes(copies, tmp_path, monkeypatch):
    # the copy is in the list's order (a label's: rows ascending; a range's: value order), the
    # answer by (distance, row) all the same, removed rows left out
    monkeypatch.setattr(postings, "COPIES_SHARE", copies)
    rng = np.random.default_rng(5)
    n = 8000
    db = rng.integers(0, 256, size=(40, 8), dtype=np.uint8)[rng.integers(0, 40, n)]  # ties
    rare = rng.random(n) < 0.01
    year = rng.integers(0, 1000, n)
    index = HashIndex.create(tmp_path / "ix", 64, chunk_size=1500)
    index.add(db, attributes={"labels": Labels(np.stack([rare, ~rare], axis=1), ["rare", "common"]), "year": year})
    index.remove(np.flatnonzero(rare)[::3])
    alive = np.ones(n, bool)
    alive[np.flatnonzero(rare)[::3]] = False
    q = rng.integers(0, 256, size=(3, 8), dtype=np.uint8)
    for expr, ok in (({"labels": {"any": ["rare"]}}, rare), ({"year": {"gte": 990}}, year >= 990),
                     ({"year": {"lt": 30}, "labels": {"any": ["common"]}}, (year < 30) & ~rare)):
        for k in (1, 7, 200):
            index._filters.clear()
            d, ids = index.search(q[:1], k, filter=expr)
            bd, br = _post_filtered(db, q[:1], k, ok & alive)
            np.testing.assert_array_equal(ids, br, err_msg=f"{expr} {k}")
            np.testing.assert_array_equal(d, bd)
    assert (index._postings[1].copied_bytes > 0) == (copies > 0)
    index.close()


def test_each_plan_is_taken_where_it_pays_and_fewer_matches_than_k_give_fewer_results(monkeypatch):
    db, attrs, plain = _data(4000, 64, 1)
    index = HashIndex(64)
    index.add(db, attributes=attrs)
    took = []
    monkeypatch.setattr(filtered, "rank_first", lambda *a, real=filtered.rank_first: took.append("rank first") or real(*a))
    monkeypatch.setattr(filtered.Selection, "gathered", lambda self, segs, bits, real=filtered.Selection.gathered:
                        took.append("gathered") or real(self, segs, bits))
    monkeypatch.setattr(kernels, "pick_topk", lambda *a, real=kernels.pick_topk, **kw: took.append("picked") or real(*a, **kw))
    monkeypatch.setattr(kernels, "span_topk", lambda *a, real=kernels.span_topk: took.append("spanned") or real(*a))
    masked, over_all = [], []
    real_topk = kernels.topk
    monkeypatch.setattr(kernels, "topk", lambda segs, q, k, bits, deleted=None, threads=None:
                        masked.append(deleted is not None) or real_topk(segs, q, k, bits, deleted, threads))
    real_evaluate = hash_index_module.evaluate
    monkeypatch.setattr(hash_index_module, "evaluate", lambda tree, cols, n, look, rows=None:
                        over_all.append(rows is None) or real_evaluate(tree, cols, n, look, rows))
    # (a range alone is one slice of the column's list: the slice plan, below; ne is not)
    index.search(db[:1], 5, filter={"year": {"ne": 2001}})  # new, most rows, one query: rank first
    assert took == ["rank first"] and masked == [False] and not any(over_all)
    real_exclusion, passes = filtered.exclusion, []
    monkeypatch.setattr(filtered, "exclusion", lambda *a: passes.append(1) or real_exclusion(*a))
    index.search(db[:9], 5, filter={"year": {"ne": 2001}})  # a batch: one pass over the column, kept
    assert passes and not any(over_all)
    index.search(db[:9], 5, filter={"year": {"ne": 2001}, "labels": {"none": ["sky"]}})  # other forms
    assert over_all[-1]  # ... evaluated over all rows
    index.search(db[:1], 5, filter={"year": {"ne": 2001}})  # now kept: the masked scan, no ranking first
    assert took == ["rank first"] and masked == [False, True, True, True]
    took.clear(), over_all.clear()
    index.search(db[:1], 5, filter={"year": {"eq": 2001}})  # ~2.5%, new: the value's slice, every distance
    assert took == ["spanned"] and not any(over_all)
    took.clear()
    monkeypatch.setattr(filtered, "slice_topk", lambda *a, real=filtered.slice_topk: took.append("slice") or real(*a))
    index.search(db[:9], 5, filter={"year": {"eq": 2003}})  # a batch: one value's slice of the column's copy
    assert took == ["slice", "spanned"] and not any(over_all)  # ... few distances in all: each computed
    took.clear()
    index.search(db[:9], 100, filter={"labels": {"any": ["sky"]}})  # 25%, a batch: the label's copy
    index.search(db[:1], 100, filter={"labels": {"any": ["sky"]}})  # and one query: walked, too many to pick
    assert took == ["slice", "slice"] and not any(over_all)
    took.clear()
    index.search(db[:9], 100, filter={"labels": {"any": ["sky", "sea"]}})  # two lists, ~44%: no one slice, masked
    assert took == [] and masked[-1] and not any(over_all)
    took.clear()
    monkeypatch.setattr(filtered, "PICK_WORK", 0)
    index.search(db[:1], 100, filter={"year": {"eq": 2004}, "genre": {"eq": "folk"}})  # listed, too many to pick
    assert took == ["gathered"]  # ... a gathered copy
    took.clear(), over_all.clear()
    monkeypatch.setattr(filtered, "PICK_WORK", 1 << 21)
    index.search(db[:1], 200, filter={"year": {"eq": 2002}, "genre": {"eq": "folk"}})  # listed, then tested
    assert took == ["picked"] and over_all == [False]
    few = np.flatnonzero((plain["year"] == 2001) & (plain["genre"] == "folk"))
    d, ids = index.search(db[:2], len(few) + 20, filter={"year": {"eq": 2001}, "genre": {"eq": "folk"}})
    assert sorted(ids[0][ids[0] >= 0].tolist()) == few.tolist()
    assert (ids[:, len(few):] == -1).all() and (d[:, len(few):] == -1).all()
    d, ids = index.search(db[:2], 5, filter={"genre": {"in": ["none-such"]}})
    assert (ids == -1).all()


@pytest.mark.parametrize("copies,plan", [(postings.COPIES_SHARE, "picks"), (postings.COPIES_SHARE, "walk"),
                                         (postings.COPIES_SHARE, "sorted"), (0.0, "picks")])
def test_a_filter_that_is_one_slice_of_a_list_scans_that_slice_of_its_copy(copies, plan, tmp_path, monkeypatch):
    # one label's rows (in row order), one value's, and a range of values (in value order:
    # the ties at each query's k-th ordered by row again -- by the picks' keys, from the
    # wide list, or, where 30 distinct codes fill it, a radius search; or the slice sorted
    # first); removals before and after a search
    monkeypatch.setattr(postings, "COPIES_SHARE", copies)
    if plan != "picks":  # every distance computed: only where there are few
        monkeypatch.setattr(filtered, "PICK_WORK", 0)
    if plan == "walk":
        monkeypatch.setattr(filtered, "SORT_SLICE_ROWS", 0)
    picked, spanned, sorted_ = [], [], []
    monkeypatch.setattr(kernels, "pick_topk", lambda *a, real=kernels.pick_topk, **kw: picked.append(1) or real(*a, **kw))
    monkeypatch.setattr(kernels, "span_topk", lambda *a, real=kernels.span_topk: spanned.append(1) or real(*a))
    monkeypatch.setattr(filtered, "in_row_order", lambda part, real=filtered.in_row_order: sorted_.append(1) or real(part))
    rng = np.random.default_rng(11)
    n = 9000
    db = rng.integers(0, 256, size=(30, 8), dtype=np.uint8)[rng.integers(0, 30, n)]  # many ties
    hot = np.stack([rng.random(n) < 0.3, rng.random(n) < 0.6], axis=1)
    year = rng.integers(0, 100, n)
    index = HashIndex.create(tmp_path / "ix", 64, chunk_size=2000)
    index.add(db, attributes={"labels": Labels(hot, ["a", "b"]), "year": year})
    slices = []
    monkeypatch.setattr(filtered, "slice_topk", lambda *a, real=filtered.slice_topk: slices.append(1) or real(*a))
    alive = np.ones(n, bool)
    q = rng.integers(0, 256, size=(9, 8), dtype=np.uint8)
    cases = (({"labels": {"any": ["a"]}}, hot[:, 0], True), ({"labels": {"all": ["b"]}}, hot[:, 1], True),
             ({"year": {"eq": 42}}, year == 42, True), ({"year": {"lt": 20}}, year < 20, True),
             ({"year": {"gte": 30}}, year >= 30, True),  # 70%, in value order
             ({"year": {"lt": 2}}, year < 2, True),  # 2%: few enough to pick
             ({"year": {"gte": 99}}, year >= 99, True))  # a range of one value: its rows ascending
    for round_ in range(2):
        for expr, ok, sliced in cases:
            for qq in (q, q[:1]):
                for k in (1, 10, 700):
                    slices.clear(), picked.clear(), spanned.clear(), sorted_.clear()
                    d, ids = index.search(qq, k, filter=expr)
                    bd, br = _post_filtered(db, qq, k, ok & alive)
                    np.testing.assert_array_equal(ids, br, err_msg=f"{expr} {k} {len(qq)}")
                    np.testing.assert_array_equal(d, bd)
                    assert bool(slices) == (sliced and copies > 0), (expr, k, len(qq))
                    if slices:
                        by_value = "year" in expr and len(np.unique(year[ok])) > 1  # rows in value order
                        few = plan == "picks" and ok.sum() * filtered.PICK_SHARE <= n
                        side_by_side = few and round_ == 0 and len(qq) * ok.sum() < kernels.PICK_ALONE  # no removals
                        dense = few and (side_by_side or len(qq) == 1)
                        assert bool(spanned) == side_by_side, (expr, k, len(qq))
                        assert bool(picked) == (dense and not side_by_side), (expr, k, len(qq))
                        assert bool(sorted_) == (plan != "walk" and not dense and by_value and len(qq) > 1 and k >= 100)
            lims, dist, ids = index.range_search(q, 22, filter=expr)
            full = brute_distances(db, q)
            for i in range(len(q)):
                rows = np.flatnonzero(ok & alive & (full[i] <= 22))
                rows = rows[np.lexsort((rows, full[i][rows]))]
                np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
                np.testing.assert_array_equal(dist[lims[i]:lims[i + 1]], full[i][rows])
        gone = rng.choice(n, 2500, replace=False)  # the next round: a new state of the rows
        index.remove(gone)
        alive[gone] = False
    index.close()


def test_rank_first_grows_its_candidates_until_enough_match_and_stays_exact(monkeypatch):
    # the matching rows are all far from the query: the first candidates hold none of them
    rng = np.random.default_rng(2)
    q = rng.integers(0, 256, (1, 8), dtype=np.uint8)
    near = np.repeat(q, 3000, axis=0) ^ (rng.random((3000, 8)) < 0.05).astype(np.uint8)
    far = ~np.repeat(q, 3000, axis=0) ^ (rng.random((3000, 8)) < 0.05).astype(np.uint8)
    db = np.vstack([near, far])
    group = np.r_[np.zeros(3000, int), rng.integers(1, 3, 3000)]  # 1 or 2: far rows only
    index = HashIndex(64)
    index.add(db, attributes={"group": group})
    monkeypatch.setattr(filtered.Filter, "list_slice", lambda *a: None)  # one value's rows: else a slice
    widths = []
    real_topk = kernels.topk
    monkeypatch.setattr(kernels, "topk", lambda segs, qq, k, *a: widths.append(k) or real_topk(segs, qq, k, *a))
    for k in (1, 40):
        widths.clear()
        index._filters.clear()
        d, ids = index.search(q, k, filter={"group": {"eq": 1}})
        bd, br = _post_filtered(db, q, k, group == 1)
        np.testing.assert_array_equal(ids, br)
        np.testing.assert_array_equal(d, bd)
        assert len(widths) > 1 and widths == sorted(widths)  # grew, and found them


def test_each_operator_selects_what_its_definition_says():
    db, attrs, p = _data(3000, 32, 3)
    index = HashIndex(32)
    ids = index.add(db, attributes=attrs)
    t0 = np.datetime64("2021-06-01T00:00:00")
    cases = [
        ({"labels": {"any": ["dog", "snow"]}}, p["labels"][:, 2] | p["labels"][:, 7]),
        ({"labels": {"all": ["dog", "snow"]}}, p["labels"][:, 2] & p["labels"][:, 7]),
        ({"labels": {"none": ["dog", "snow"]}}, ~(p["labels"][:, 2] | p["labels"][:, 7])),
        ({"year": {"gt": 2010, "lte": 2015}}, (p["year"] > 2010) & (p["year"] <= 2015)),
        ({"year": {"lt": 1995}}, p["year"] < 1995),
        ({"year": {"ne": 2000}}, p["year"] != 2000),
        ({"year": {"in": [1991, 2003]}}, np.isin(p["year"], [1991, 2003])),
        ({"year": {"not_in": [1991, 2003]}}, ~np.isin(p["year"], [1991, 2003])),
        ({"score": {"gte": 0.25, "lt": 0.5}}, (p["score"] >= 0.25) & (p["score"] < 0.5)),
        ({"genre": {"ne": "pop"}}, p["genre"] != "pop"),
        ({"genre": {"not_in": ["pop", "rock"]}}, ~np.isin(p["genre"], ["pop", "rock"])),
        ({"taken": {"gte": "2021-06-01T00:00:00"}}, p["taken"] >= t0),
        ({"taken": {"lt": float((t0 - np.datetime64(0, "s")).astype(int))}}, p["taken"] < t0),
        ({"id": {"in": [3, 5, 2999]}}, np.isin(np.arange(3000), [3, 5, 2999])),
        ({"id": {"not_in": [3, 5]}}, ~np.isin(np.arange(3000), [3, 5])),
        ({"or": [{"year": {"eq": 2000}}, {"not": {"genre": {"eq": "jazz"}}}]},
         (p["year"] == 2000) | (p["genre"] != "jazz")),
    ]
    for expr, ok in cases:
        _, found = index.search(db[:1], 3000, filter=expr)
        assert sorted(found[0][found[0] >= 0].tolist()) == ids[ok].tolist(), expr
    assert index.attributes([7])[0] == {
        "labels": [n for n, h in zip(LABELS, p["labels"][7]) if h], "year": int(p["year"][7]),
        "score": float(p["score"][7]), "genre": p["genre"][7], "taken": str(p["taken"][7].astype("datetime64[us]"))}


@pytest.mark.parametrize("expr,message", [
    ({"colour": {"eq": "red"}}, "no attribute 'colour'; this index has id, labels, year"),
    ({"labels": {"any": ["dragon"]}}, "unknown label 'dragon'"),
    ({"labels": {"gte": 3}}, "filter.labels must be an object of any, all, none"),
    ({"year": {"gte": "2001"}}, "is not a number"),
    ({"score": {"in": 0.5}}, "filter.score.in must be a list"),
    ({"genre": {"eq": 3}}, "must name categories"),
    ({"taken": {"gte": "last tuesday"}}, "is not an ISO 8601 time"),
    ({"and": {}}, "filter.and must be a non-empty list"),
    ({"or": [{"year": {"eq": 1}}, 7]}, "filter.or[1] must be a non-empty JSON object"),
    ({"id": {"between": [1, 2]}}, 'filter.id must be {"in": [ids]}'),
    ([1, 2], "filter must be a non-empty JSON object"),
    (np.ones(5, bool), "one entry per row (3000)"),
    (np.ones(3000, np.int8), "must be boolean"),
])
def test_bad_filters_are_one_line_and_nothing_is_scanned(expr, message, monkeypatch):
    db, attrs, _ = _data(3000, 64, 4)
    index = HashIndex(64)
    index.add(db, attributes=attrs)
    scanned = []
    monkeypatch.setattr(kernels, "topk", lambda *a, **k: scanned.append(1))
    monkeypatch.setattr(kernels, "range_search", lambda *a, **k: scanned.append(1))
    for run in (lambda: index.search(db[:1], 5, filter=expr), lambda: index.range_search(db[:1], 5, filter=expr)):
        with pytest.raises(HashretError) as err:
            run()
        assert message in str(err.value) and "\n" not in str(err.value)
    assert scanned == []


def test_bad_attributes_are_refused_and_nothing_is_written(tmp_path):
    db, attrs, _ = _data(200, 64, 5)
    index = HashIndex.create(tmp_path / "ix", 64)
    index.add(db[:100], attributes={c: (Labels(v.multi_hot[:100], v.names) if c == "labels" else v[:100])
                                    for c, v in attrs.items()})
    rest = {c: (Labels(v.multi_hot[100:], v.names) if c == "labels" else v[100:]) for c, v in attrs.items()}
    bad = [
        (None, "this index stores attributes labels, year, score, genre, taken: pass"),
        ({c: v for c, v in rest.items() if c != "year"}, "got labels, score, genre, taken"),
        ({**rest, "extra": np.zeros(100, int)}, "pass `attributes` with these columns"),
        ({**rest, "year": rest["year"][:10]}, "attribute 'year' has 10 values for 100 codes"),
        ({**rest, "year": rest["score"]}, "attribute 'year' holds integers"),
        ({**rest, "genre": list(range(100))}, "attribute 'genre' holds categories"),
        ({**rest, "labels": [["dragon"]] * 100}, "unknown label 'dragon'"),
        ({**rest, "taken": ["yesterday"] * 100}, "attribute 'taken' holds times"),
        ({**rest, "score": np.full(100, np.nan)}, "holds NaN"),
    ]
    for given, message in bad:
        with pytest.raises(HashretError, match=message.replace("(", r"\(")):
            index.add(db[100:], attributes=given)
        assert index.n_rows == 100
    plain = HashIndex(64)
    plain.add(db[:10])
    with pytest.raises(HashretError, match="set by an index's first add"):
        plain.add(db[10:20], attributes={"year": np.arange(10)})
    with pytest.raises(HashretError, match="use letters, digits"):
        HashIndex(64).add(db[:2], attributes={"id": np.arange(2)})
    index.close()


def test_attributes_survive_reopen_compaction_and_category_growth(tmp_path):
    db, attrs, p = _data(3000, 64, 6)
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=700) as w:
        w.add(db[:1000], ids=np.arange(1000) * 2, attributes={
            "year": p["year"][:1000], "genre": p["genre"][:1000].tolist()})
        w.add(db[1000:], ids=np.arange(1000, 3000) * 2, attributes={
            "year": p["year"][1000:], "genre": ["new-" + g for g in p["genre"][1000:].tolist()]})
        w.remove(np.arange(0, 800) * 2)
        before = w.search(db[:4], 20, filter={"genre": {"in": ["rock", "new-pop"]}})
        w.compact()
        after = w.search(db[:4], 20, filter={"genre": {"in": ["rock", "new-pop"]}})
        np.testing.assert_array_equal(before[1], after[1])
    with HashIndex.open(tmp_path / "ix") as r:
        np.testing.assert_array_equal(r.search(db[:4], 20, filter={"genre": {"in": ["rock", "new-pop"]}})[1],
                                      before[1])
        assert r.attributes([2000])[0] == {"year": int(p["year"][1000]), "genre": "new-" + p["genre"][1000]}
        assert len(r.attribute_columns()[1]["categories"]) == 8
        assert r.verify()["ok"]


def test_a_flipped_byte_in_an_attribute_column_is_reported_not_served(tmp_path):
    n = 3000
    years = np.full(n, 0x1122334455667788, dtype=np.int64)
    years[1500:1600] = np.arange(100) + 0x0102030405060000
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=1000) as w:
        w.add(np.random.default_rng(0).integers(0, 256, (n, 8), dtype=np.uint8), attributes={"year": years})
    _flip_inside(tmp_path / "ix", years[1500:1600].astype("<i8").tobytes())
    with pytest.raises(CorruptError, match=r"attribute 'year' chunk 1 \(rows 1000..1999\) fails its checksum"):
        HashIndex.open(tmp_path / "ix")
    report = HashIndex.verify_folder(tmp_path / "ix")
    assert not report["ok"] and report["problems"] == ["attribute 'year' chunk 1 (rows 1000..1999) fails its checksum"]


def test_a_repeated_filter_is_evaluated_once_until_the_rows_change(monkeypatch):
    db, attrs, _ = _data(2000, 64, 7)
    index = HashIndex(64)
    index.add(db[:1000], attributes={c: (Labels(v.multi_hot[:1000], v.names) if c == "labels" else v[:1000])
                                     for c, v in attrs.items()})
    calls = []
    real = hash_index_module.evaluate
    # over every row (not a rank-first search's candidates): what is kept
    monkeypatch.setattr(hash_index_module, "evaluate", lambda *a: (len(a) < 5 and calls.append(1)) or real(*a))
    real_pass = filtered.exclusion  # (the one-pass form of the same work)
    monkeypatch.setattr(filtered, "exclusion",
                        lambda *a: (lambda got: (got is not None and calls.append(1)) or got)(real_pass(*a)))
    f = {"year": {"gte": 2000}, "labels": {"any": ["sky"]}}
    index.search(db[:8], 5, filter=f)
    index.search(db[:8], 5, filter=dict(reversed(list(f.items()))))  # the same filter, keys in another order
    index.search(db[:1], 5, filter=f)
    assert len(calls) == 1
    index.add(db[1000:], attributes={c: (Labels(v.multi_hot[1000:], v.names) if c == "labels" else v[1000:])
                                     for c, v in attrs.items()})
    _, ids = index.search(db[:8], 2000, filter=f)
    assert len(calls) == 2 and (ids[0] >= 1000).any()  # the new rows are seen


@pytest.mark.parametrize("explicit", [False, True])
def test_a_sharded_index_pushes_the_filter_to_every_shard_and_equals_one_index(explicit, tmp_path):
    from hashret.index import ShardedIndex

    db, attrs, p = _data(3000, 64, 8)
    ids = np.arange(3000) * 7 + 1 if explicit else None
    one = HashIndex(64)
    sharded = ShardedIndex.create(tmp_path / "sh", 64, shards=3)
    for index in (one, sharded):
        for lo, hi in ((0, 1100), (1100, 3000)):
            part = {c: (Labels(v.multi_hot[lo:hi], v.names) if c == "labels" else v[lo:hi]) for c, v in attrs.items()}
            index.add(db[lo:hi], None if ids is None else ids[lo:hi], None, attributes=part) \
                if index is one else index.add(db[lo:hi], None if ids is None else ids[lo:hi], attributes=part)
        index.remove((ids if explicit else np.arange(3000))[[4, 50, 2000]])
    some = (ids if explicit else np.arange(3000))[[1, 2, 3, 5, 1500, 2999]].tolist()
    for expr in ({"year": {"gte": 2020}}, {"genre": {"eq": "jazz"}, "year": {"eq": 2001}},
                 {"or": [{"id": {"in": some}}, {"labels": {"all": ["sky", "sea", "dog"]}}]},
                 {"id": {"not_in": some}}):
        for k in (1, 10, 500):
            np.testing.assert_array_equal(sharded.search(db[:5], k, filter=expr)[1], one.search(db[:5], k, filter=expr)[1])
        a, b = sharded.range_search(db[:3], 20, filter=expr), one.range_search(db[:3], 20, filter=expr)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    first = (ids if explicit else np.arange(3000))[[7]]
    assert sharded.attributes(first) == one.attributes(first)
    with pytest.raises(HashretError, match="attribute 'year' has 3 values"):
        sharded.add(db[:5], None if ids is None else ids[:5] + 10**6,
                    attributes={**{c: v[:5] for c, v in attrs.items() if c != "labels"},
                                "labels": Labels(attrs["labels"].multi_hot[:5], LABELS), "year": p["year"][:3]})
    with pytest.raises(HashretError, match="unknown label 'dragon'"):
        sharded.add(db[:1], None if ids is None else ids[:1] + 10**6,
                    attributes={**{c: v[:1] for c, v in attrs.items() if c != "labels"}, "labels": [["dragon"]]})
    assert sharded.n_rows == 3000  # nothing journaled, nothing written
    with pytest.raises(HashretError, match="takes a filter expression, not a row array"):
        sharded.search(db[:1], 5, filter=np.ones(3000, bool))
    sharded.close()
    with ShardedIndex.open(tmp_path / "sh") as back:  # the journal carried the attributes whole
        np.testing.assert_array_equal(back.search(db[:5], 10, filter={"year": {"gte": 2020}})[1],
                                      one.search(db[:5], 10, filter={"year": {"gte": 2020}})[1])


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_kept_selection_never_serves_a_removed_item(on_disk, tmp_path):
    db, attrs, _ = _data(3000, 64, 9)
    index = HashIndex.create(tmp_path / "ix", 64) if on_disk else HashIndex(64)
    index.add(db, attributes=attrs)
    f = {"year": {"gte": 1990}}
    for qq in (db[:8], db[:1]):
        _, ids = index.search(qq, 3, filter=f)  # kept by the batch, used by the lone query
    first = int(ids[0][0])
    index.remove([first])
    for qq in (db[:8], db[:1]):
        assert first not in index.search(qq, 3, filter=f)[1][0].tolist()
        assert first not in index.range_search(qq, 64, filter=f)[2].tolist()


def test_filters_kept_zero_keeps_nothing_and_a_bad_value_is_refused(monkeypatch):
    db, attrs, _ = _data(2000, 64, 10)
    index = HashIndex(64)
    index.add(db, attributes=attrs)
    index.search(db[:8], 5, filter={"year": {"ne": 2001}})
    index.filters_kept = 0
    calls = []
    real = hash_index_module.evaluate
    monkeypatch.setattr(hash_index_module, "evaluate", lambda *a: (len(a) < 5 and calls.append(1)) or real(*a))
    real_pass = filtered.exclusion  # (the one-pass form of the same work)
    monkeypatch.setattr(filtered, "exclusion",
                        lambda *a: (lambda got: (got is not None and calls.append(1)) or got)(real_pass(*a)))
    for _ in range(2):
        index.search(db[:8], 5, filter={"year": {"ne": 2001}})
    assert len(calls) == 2
    with pytest.raises(HashretError, match="filters_kept must be a non-negative integer"):
        index.filters_kept = -1


def test_the_example_in_docs_filters_runs_as_written(capsys):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "filters.md").read_text()
    block = text.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "docs/filters.md", "exec"), {})
    shown = capsys.readouterr().out
    assert "'labels': [" in shown and "'year':" in shown


def test_row_lists_bound_every_filter_and_give_its_rows(monkeypatch):
    # estimate: at least the filter's rows; rows(): those rows (exact) or a superset, no repeats,
    # sorted where said -- for every kind of condition and their and / or / not
    from hashret.index.attributes import evaluate, parse_filter
    from hashret.index.postings import Postings

    monkeypatch.setattr(postings, "COPIES_SHARE", 100.0)  # every list copied: each copy checked
    db, attrs, plain = _data(3000, 64, 5)
    index = HashIndex(64)
    index.add(db, ids=np.arange(3000) * 7, attributes=attrs)
    exprs = [{"labels": {"any": ["sky"]}}, {"labels": {"any": ["sky", "dog", "sand"]}}, {"labels": {"all": ["sea", "cat"]}},
             {"labels": {"none": ["sea"]}}, {"year": {"lt": 1995}}, {"year": {"lte": 1995}}, {"year": {"gt": 2027}},
             {"year": {"gte": 2027, "lt": 2029}}, {"year": {"eq": 2001}}, {"year": {"in": [2001, 1990, 2001]}},
             {"year": {"ne": 2001}}, {"year": {"not_in": [2001]}}, {"score": {"lt": 0.01}}, {"score": {"eq": 0.5}},
             {"genre": {"eq": "folk"}}, {"genre": {"in": ["rock", "none-such"]}}, {"genre": {"ne": "folk"}},
             {"taken": {"lt": "2020-01-05T00:00:00"}}, {"id": {"in": [0, 14, 7 * 2999, 5, -3]}}, {"id": {"not_in": [0]}},
             {"year": {"lt": 1992}, "labels": {"any": ["sky"]}}, {"or": [{"year": {"eq": 2001}}, {"genre": {"eq": "jazz"}}]},
             {"or": [{"year": {"eq": 2001}}, {"not": {"genre": {"eq": "jazz"}}}]}, {"not": {"year": {"eq": 2001}}},
             {"and": [{"not": {"year": {"eq": 2001}}}, {"labels": {"all": ["dog"]}}]}]
    state = {}
    index._scan(lambda segs, deleted, ids_of_rows, columns: state.update(columns=columns, segs=segs))
    lists = Postings(state["columns"], 3000, index.lookup_rows)
    for expr in exprs:
        tree = parse_filter(expr, state["columns"].schema, 3000)
        truth = np.flatnonzero(evaluate(tree, state["columns"], 3000, index.lookup_rows))
        est = lists.estimate(tree)
        if est is None:
            continue
        assert est >= len(truth), expr
        rows, exact, ascending, source = lists.rows(tree)
        assert len(np.unique(rows)) == len(rows) and np.isin(truth, rows).all(), expr
        assert lists.one_slice(tree) == (exact and source is not None), expr  # told before the rows are made
        if exact:
            np.testing.assert_array_equal(np.sort(rows), truth, err_msg=str(expr))
        if ascending:
            assert (np.diff(rows) > 0).all(), expr
        if source is not None:  # the rows are that list's slice, and its copy holds their codes
            key, lo, hi = source
            np.testing.assert_array_equal(lists.codes(key, state["segs"], 64).rows(np.arange(lo, hi)),
                                          state["segs"].rows(rows), err_msg=str(expr))
            assert est == hi - lo or not exact, expr
    assert lists.estimate(parse_filter({"labels": {"none": ["sea"]}}, state["columns"].schema, 3000)) is None


@pytest.mark.parametrize("compiled", [True, False])
def test_one_pass_exclusion_equals_the_evaluated_filter_with_removed_rows_out(compiled, tmp_path, monkeypatch):
    from hashret.index.attributes import evaluate, parse_filter
    from hashret.index.filtered import exclusion

    if not compiled:  # the kernels not compiled yet: numpy answers the same
        monkeypatch.setattr(kernels, "pick_ready", lambda *a: False)
    n = 3000
    db, attrs, plain = _data(n, 64, 9)
    index = HashIndex.create(tmp_path / "ix", 64, chunk_size=700)
    index.add(db, ids=np.arange(n) * 3, attributes=attrs)
    index.remove(np.arange(0, n * 3, 21))
    taken = int((np.datetime64("2021-06-01T00:00:00") - np.datetime64("1970-01-01T00:00:00")).astype("timedelta64[us]")
                .astype(np.int64))
    simple = [{"labels": {"any": ["sky"]}}, {"labels": {"any": ["sky", "sand"]}}, {"labels": {"all": ["sea", "cat"]}},
              {"labels": {"none": ["sea", "snow"]}}, {"labels": {"all": ["sky", "sea", "dog", "cat", "car", "tree",
                                                                          "road", "snow", "sand"]}},
              {"year": {"lt": 1995}}, {"year": {"lte": 1995}}, {"year": {"gt": 2027}}, {"year": {"gte": 2027}},
              {"year": {"gte": 2000, "lt": 2010}}, {"year": {"gt": 2000, "lte": 2010}}, {"year": {"eq": 2001}},
              {"year": {"ne": 2001}}, {"score": {"lt": 0.25}}, {"score": {"gte": 0.5, "lte": 0.75}},
              {"genre": {"eq": "folk"}}, {"genre": {"ne": "jazz"}}, {"taken": {"gte": "2021-06-01T00:00:00"}},
              {"taken": {"lt": taken / 1e6}}]
    other = [{"year": {"in": [2001, 2002]}}, {"year": {"lt": 1995.5}}, {"year": {"gt": 1991, "gte": 1995}},
             {"genre": {"eq": "none-such"}}, {"year": {"lt": 1995}, "labels": {"any": ["sky"]}},
             {"not": {"year": {"eq": 2001}}}, {"id": {"in": [3, 6]}}]
    state = {}
    index._scan(lambda segs, deleted, ids_of_rows, columns: state.update(columns=columns, deleted=deleted))
    cols, deleted = state["columns"], state["deleted"]
    assert deleted is not None and deleted.any()
    for expr in simple + other:
        tree = parse_filter(expr, cols.schema, n)
        got = exclusion(tree, cols, n, deleted, 64)
        if expr in other:
            assert got is None, expr
            continue
        want = ~evaluate(tree, cols, n, index.lookup_rows) | (deleted != 0)
        assert got is not None and got.dtype == np.uint8, expr
        np.testing.assert_array_equal(got, want.astype(np.uint8), err_msg=str(expr))
        assert exclusion(tree, cols, n, None, 64).sum() == (~evaluate(tree, cols, n, index.lookup_rows)).sum()
    index.close()
