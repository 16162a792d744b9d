import json

import pytest

from hashret.experiments.cascade import MODES, run_cascade_benchmark

FAST = {"epochs": 1, "head_epochs": 2, "embed": 16, "word_dim": 8, "head_hidden": 16}


def _tiny(tmp_path_factory, captions_per_image):
    out = tmp_path_factory.mktemp("cascade")
    spec = f"scenes:n_train=160,n_dev=0,n_test=40,region_dim=16,test_captions_per_image={captions_per_image}"
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=40, out=out,
                                    options={"han": FAST, "global": {"epochs": 1}})
    return out, records


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _tiny(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def five_captions_run(tmp_path_factory):
    # five captions per test image, as in the precomp layout: the two galleries differ in size
    return _tiny(tmp_path_factory, 5)


def test_the_benchmark_writes_every_mode_with_the_promised_keys(tiny_run):
    out, records = tiny_run
    assert [(r["matcher"], r["mode"]) for r in records] == \
        [("han", m) for m in MODES[:-1]] + [("global", "global")]
    saved = json.loads((out / "results.json").read_text())
    assert saved == records
    for r in saved:
        for key in ("rsum", "r10_i2t", "r10_t2i", "ms_per_query", "fraction_scored"):
            assert key in r
        assert 0 <= r["r10_i2t"] <= 100 and 0 <= r["r10_t2i"] <= 100
    frac = {r["mode"]: r["fraction_scored"] for r in records}
    assert frac["exhaustive"] == 1.0 and frac["codes"] == 0.0 and frac["cascade-1%"] == 10 / 40
    table = (out / "table.md").read_text()
    assert "cascade-1%" in table and "distilled vs undistilled" in table
    assert "distilled vs uniform-teacher" in table


def test_the_cascade_counts_each_direction_against_its_own_gallery(five_captions_run):
    _, records = five_captions_run
    for pct in (1, 5):
        r = next(x for x in records if x["mode"] == f"cascade-{pct}%")
        assert r["gallery"] == 40 and r["gallery_captions"] == 200
        # at least 10 candidates, else pct of that direction's gallery
        assert r["candidates_i2t"] == max(10, round(pct / 100 * 200))
        assert r["candidates_t2i"] == max(10, round(pct / 100 * 40))
        assert r["fraction_scored_i2t"] == round(r["candidates_i2t"] / 200, 4)
        assert r["fraction_scored_t2i"] == round(r["candidates_t2i"] / 40, 4)
        assert r["fraction_scored"] == max(r["fraction_scored_i2t"], r["fraction_scored_t2i"])


def test_every_query_rsum_matches_the_per_query_loop_when_all_are_queries(tiny_run):
    # with the whole gallery as queries, the one-query-at-a-time Hamming path and the batch
    # path behind rsum_every_query rank the same items
    _, records = tiny_run
    for r in records:
        if r["mode"] in ("codes", "undistilled", "uniform-teacher"):
            assert r["queries_every"] == 40
            assert r["rsum_every_query"] == pytest.approx(r["rsum"], abs=0.02)
