import json

import pytest

from hashret.experiments.cascade import OPERATING, run_cascade_benchmark

FAST = {"epochs": 1, "head_epochs": 2, "embed": 16, "word_dim": 8, "head_hidden": 16, "list_size": 4}


def _tiny(tmp_path_factory, captions_per_image, seeds=(0,), extra=""):
    out = tmp_path_factory.mktemp("cascade")
    spec = f"scenes:n_train=160,n_dev=0,n_test=40,region_dim=16,test_captions_per_image={captions_per_image}{extra}"
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=40, out=out, seeds=seeds,
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
    assert [(r["matcher"], r["mode"], r.get("head")) for r in records] == \
        [("han", "exhaustive", None), ("han", "head", "distilled"), ("han", "cascade-1%", "distilled"),
         ("han", "cascade-5%", "distilled"), ("han", "head", "in-batch"), ("han", "head", "pairs"),
         ("han", "head", "smoothing"),
         ("han", "head", "shuffled"), ("global", "global", None)]
    saved = json.loads((out / "results.json").read_text())
    assert saved == records
    for r in saved:
        for key in ("rsum", "r10_i2t", "r10_t2i", "ms_per_query", "fraction_scored"):
            assert key in r
        if r["mode"] == "head":  # the operating points, keyed by K's percentage of the gallery
            assert r["seed"] == 0 and r["scenes"].startswith("scenes:")
            for key in ("agreement_i2t", "agreement_t2i", "r1_i2t", "r10_i2t", "r1_t2i", "r10_t2i"):
                assert list(r[key]) == list(OPERATING) and all(0 <= v <= 100 for v in r[key].values())
            assert 0 <= r["codes_r10_i2t"] <= 100
        else:
            assert 0 <= r["r10_i2t"] <= 100 and 0 <= r["r10_t2i"] <= 100
    frac = {r["mode"]: r["fraction_scored"] for r in records}
    assert frac["exhaustive"] == 1.0 and frac["head"] == 0.0 and frac["cascade-1%"] == 10 / 40
    table = (out / "table.md").read_text()
    assert "cascade-1%" in table and "agree I→T 1%" in table and "| han | shuffled |" in table


def test_operating_points_against_a_direct_count():
    # agreement and the cascade's recall, recomputed from scratch for hand-made scores and codes
    import numpy as np

    from hashret.experiments.cascade import operating_points

    class Part:  # one caption per image: query i's match is gallery item i
        def captions_of(self, q):
            return [np.array([i]) for i in q]

        def images_of(self, q):
            return np.asarray(q)

    rng = np.random.default_rng(0)
    n = 200
    scores = {d: rng.normal(size=(20, n)) for d in ("i2t", "t2i")}
    codes = {m: rng.integers(0, 256, (n, 4), dtype=np.uint8) for m in ("image", "text")}
    queries = {d: np.sort(rng.choice(n, 20, replace=False)) for d in ("i2t", "t2i")}
    got = operating_points(scores, codes, Part(), queries)
    for d, (qm, gm) in {"i2t": ("image", "text"), "t2i": ("text", "image")}.items():
        dist = np.unpackbits(codes[qm][queries[d]][:, None] ^ codes[gm][None], axis=2).sum(2)
        for pct in OPERATING:
            k = max(10, int(round(float(pct) / 100 * n)))
            agree, hit1, hit10 = [], [], []
            for i, q in enumerate(queries[d]):
                cand = np.lexsort((np.arange(n), dist[i]))[:k]  # Hamming top K, ties by row
                top10 = np.argsort(-scores[d][i], kind="stable")[:10]
                agree.append(len(set(top10) & set(cand)) / 10)
                reranked = cand[np.argsort(-scores[d][i][cand], kind="stable")][:10]
                hit1.append(reranked[0] == q)
                hit10.append(q in reranked)
            assert got[f"agreement_{d}"][pct] == round(100 * np.mean(agree), 2)
            assert got[f"r1_{d}"][pct] == round(100 * np.mean(hit1), 2)
            assert got[f"r10_{d}"][pct] == round(100 * np.mean(hit10), 2)


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
        if r["mode"] == "head":
            assert r["queries_every"] == 40
            assert r["rsum_every_query"] == pytest.approx(r["rsum"], abs=0.02)


def test_several_seeds_on_graded_scenes_give_each_seed_its_rows_and_their_mean_and_sd(tmp_path_factory):
    import numpy as np

    out, records = _tiny(tmp_path_factory, 1, seeds=(0, 1), extra=",graded=0.5")
    heads = [r for r in records if r["mode"] == "head"]
    assert sorted({(r["seed"], r["head"]) for r in heads}) == sorted(
        {(s, h) for s in (0, 1) for h in ("distilled", "in-batch", "pairs", "smoothing", "shuffled")})
    assert all(r["scenes"].endswith("graded=0.5") for r in heads)
    table = (out / "table.md").read_text()
    for kind in ("distilled", "pairs"):
        v = [r["agreement_i2t"]["1"] for r in heads if r["head"] == kind]
        assert f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" in table
    assert table.count("against the best control") == 2  # one verdict a direction


def test_each_heads_knob_is_chosen_on_the_dev_part_with_the_same_number_of_tries(tmp_path_factory):
    from hashret.experiments.cascade import HEAD_TUNING

    out = tmp_path_factory.mktemp("tuned")
    spec = "scenes:n_train=160,n_dev=30,n_test=40,region_dim=16"
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=40, out=out,
                                    options={"han": FAST, "global": {"epochs": 1}})
    heads = [r for r in records if r["mode"] == "head"]
    assert len(heads) == 5 and len({len(v) for v in HEAD_TUNING.values() for v in [v[1]]}) == 1
    for r in heads:
        field, values = HEAD_TUNING[r["head"]]
        tried = r["dev_agreement"][field]
        assert list(tried) == [str(v) for v in values]
        best = max(values, key=lambda v: (tried[str(v)], -values.index(v)))  # ties: the earlier
        assert r["chosen"] == {field: best}
    assert "The dev part's choice of default head" in (out / "table.md").read_text()


def test_later_seeds_keep_the_knob_the_first_seeds_dev_part_chose(tmp_path_factory):
    from hashret.experiments.cascade import HEAD_TUNING

    out = tmp_path_factory.mktemp("tuned-seeds")
    spec = "scenes:n_train=160,n_dev=30,n_test=40,region_dim=16"
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=20, out=out, seeds=(0, 1),
                                    options={"han": FAST, "global": {"epochs": 1}})
    heads = [r for r in records if r["mode"] == "head"]
    for kind, (field, values) in HEAD_TUNING.items():
        first, later = [r for r in heads if r["head"] == kind]
        assert first["seed"] == 0 and later["seed"] == 1
        assert list(first["dev_agreement"][field]) == [str(v) for v in values]
        assert later["dev_agreement"] is None and later["chosen"] == first["chosen"]
        assert first["tuned_on_seed"] == later["tuned_on_seed"] == 0


def test_runs_in_separate_processes_merge_into_one_report(tmp_path_factory):
    from hashret.errors import HashretError
    from hashret.experiments.cascade import merge_runs

    spec = "scenes:n_train=160,n_dev=0,n_test=40,region_dim=16"
    runs = []
    for seeds in ((0,), (0,), (1,)):
        out = tmp_path_factory.mktemp("part")
        run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=20, out=out, seeds=seeds,
                              options={"han": FAST, "global": {"epochs": 1}})
        runs.append(out)
    merged_dir = tmp_path_factory.mktemp("merged")
    merged = merge_runs(runs[:2], merged_dir)
    parts = [json.loads((r / "results.json").read_text()) for r in runs[:2]]
    assert merged == parts[0] + parts[1]
    assert json.loads((merged_dir / "results.json").read_text()) == merged
    assert "the sum of 2 runs'" in (merged_dir / "table.md").read_text()
    with pytest.raises(HashretError, match="other queries"):  # another first seed draws other queries
        merge_runs([runs[0], runs[2]], tmp_path_factory.mktemp("bad"))
    with pytest.raises(HashretError, match="no finished run"):
        merge_runs([runs[0], merged_dir / "nothing"], tmp_path_factory.mktemp("bad"))


def test_a_run_of_chosen_heads_trains_those_alone_and_times_the_first(tmp_path_factory):
    from hashret.errors import HashretError

    spec = "scenes:n_train=160,n_dev=0,n_test=40,region_dim=16"
    out = tmp_path_factory.mktemp("heads")
    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=20, out=out, heads=("pairs",),
                                    options={"han": FAST, "global": {"epochs": 1}})
    assert [r["head"] for r in records if r["mode"] == "head"] == ["pairs"]
    assert {r["head"] for r in records if r["mode"].startswith("cascade")} == {"pairs"}
    from hashret.models.distill import head_config

    records = run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=20, out=out, heads=("default",),
                                    options={"han": FAST, "global": {"epochs": 1}})
    assert [r["head"] for r in records if r["mode"] == "head"] == [head_config("han")["head"]]
    # no dev part to tune on: the head keeps the matcher's configured knob, not HEAD_TUNING's first try
    from hashret.experiments.cascade import HEAD_TUNING

    field, tries = HEAD_TUNING[head_config("han")["head"]]
    assert head_config("han")[field] != tries[0]  # (else this would not tell them apart)
    assert [r["chosen"] for r in records if r["mode"] == "head"] == [{field: head_config("han")[field]}]
    with pytest.raises(HashretError, match="unknown head teacher"):
        run_cascade_benchmark(spec, matchers=("han",), bits=32, n_queries=20, out=out, heads=("teacher",))


def test_the_dev_choice_is_the_head_with_the_best_try_on_dev_and_ignores_test_figures():
    from hashret.experiments.cascade import dev_choice

    def head(matcher, kind, tried, field="tau_teacher", test=50.0):
        best = max(tried, key=tried.get)
        return {"matcher": matcher, "mode": "head", "head": kind, "chosen": {field: float(best)},
                "dev_agreement": {field: tried}, "agreement_i2t": {"1": test}, "agreement_t2i": {"1": test}}

    records = [head("han", "in-batch", {"0.25": 60.0, "1.0": 61.5, "4.0": 59.0}, test=90.0),
               head("han", "distilled", {"0.25": 62.0, "1.0": 61.0, "4.0": 58.0}),
               head("han", "pairs", {"0.05": 40.0, "0.025": 41.0, "0.1": 39.0}, field="tau_student", test=99.0),
               {**head("han", "smoothing", {"0.5": 70.0}), "dev_agreement": None},  # a later seed: not a try
               head("sgraf", "smoothing", {"0.5": 50.0, "0.1": 55.0, "0.3": 52.0}, field="smoothing_eps"),
               head("sgraf", "in-batch", {"0.25": 54.0, "1.0": 53.0, "4.0": 52.0})]
    got = dev_choice(records)
    assert got["han"] == {"head": "distilled", "knob": {"tau_teacher": 0.25}, "dev_agreement": 62.0}
    assert got["sgraf"] == {"head": "smoothing", "knob": {"smoothing_eps": 0.1}, "dev_agreement": 55.0}


def test_a_cascade_is_compared_with_the_exhaustive_matcher_of_its_own_seed():
    from hashret.experiments.cascade import cascade_lines

    def rec(mode, seed, r10, ms):
        return {"matcher": "cgam", "mode": mode, "head": None if mode == "exhaustive" else "in-batch", "seed": seed,
                "r10_i2t": r10[0], "r10_t2i": r10[1], "ms_per_query": ms, "ms_per_query_i2t": ms,
                "ms_per_query_t2i": 2 * ms}

    records = [rec("exhaustive", 0, (97.0, 96.0), 100.0), rec("cascade-1%", 0, (98.5, 97.5), 2.0),
               rec("exhaustive", 1, (98.5, 100.0), 120.0), rec("cascade-1%", 1, (96.5, 99.5), 4.0)]
    lines = cascade_lines(records)
    assert "seed 0: R@10 I→T +1.5, T→I +1.5" in lines[0] and "(I→T 50.0x, T→I 50.0x)" in lines[0]
    assert "seed 1: R@10 I→T -2.0, T→I -0.5" in lines[1] and "(I→T 30.0x, T→I 30.0x)" in lines[1]
    assert "over 2 seeds: R@10 I→T -0.25, T→I +0.50" in lines[2] and "at least 30.0x faster I→T" in lines[2]
