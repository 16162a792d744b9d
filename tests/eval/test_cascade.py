import json

import pytest

from hashret.eval.cascade import MODES, run_cascade_benchmark


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cascade")
    spec = "scenes:n_train=160,n_dev=0,n_test=40,region_dim=16"
    fast = {"epochs": 1, "head_epochs": 2, "embed": 16, "word_dim": 8, "head_hidden": 16}
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=40, out=out,
                                    options={"han": fast, "global": {"epochs": 1}}, log=lambda *a: None)
    return out, records


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


def test_every_query_rsum_matches_the_per_query_loop_when_all_are_queries(tiny_run):
    # with the whole gallery as queries, the one-query-at-a-time Hamming path and the batch
    # path behind rsum_every_query rank the same items
    _, records = tiny_run
    for r in records:
        if r["mode"] in ("codes", "undistilled"):
            assert r["queries_every"] == 40
            assert r["rsum_every_query"] == pytest.approx(r["rsum"], abs=0.02)
