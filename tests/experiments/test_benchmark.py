import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from hashret.cli import main
from hashret.errors import HashretError
from hashret.experiments.benchmark import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
TINY = "synthetic:n_items=400,n_labels=8,image_dim=24,text_dim=60,n_query=60,n_train=200"


def bench(*args, workers=1, **kwargs):
    """run_benchmark in this process (worker processes are tested on their own)."""
    return run_benchmark(*args, workers=workers, **kwargs)


def test_benchmark_writes_table_and_records(tmp_path):
    out = tmp_path / "bench"
    recs = bench(TINY, methods="cca-itq,label-ridge", bits="8,16", seeds="0,1", out=out,
                         topk="10", progress=False)
    assert len(recs) == 2 * 2 * 2 * 2  # methods x bits x directions x seeds
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(recs))
    for r in saved:
        assert {"dataset", "method", "bits", "direction", "seed", "map_all"} <= set(r)
        assert r["direction"] in ("i2t", "t2i") and 0 <= r["map_all"] <= 1 and r["synthetic"]
    table = (out / "table.md").read_text()
    assert "same learned hash functions" in table and "I→T 16" in table and "±" in table
    for name in ("results.csv", "p_at_n.csv", "pr_curve.csv", "split.npz", "run.json"):
        assert (out / name).is_file(), name
    assert (out / "models" / "cca-itq-8-seed0-c0" / "weights.pt").is_file()
    assert "Every choice was made on a validation part" in table and "validation mAP@all" in table
    # a second run with --reuse loads the models and gives the same numbers
    again = bench(TINY, methods="cca-itq", bits="8", seeds="0", out=out, topk="10",
                          reuse=True, progress=False)
    assert not again[0]["trained"]
    assert again[0]["map_all"] == recs[0]["map_all"]


def test_validation_only_makes_the_same_choices_and_never_encodes_a_test_query(tmp_path, monkeypatch):
    full = bench(TINY, methods="label-ridge,dcmh-mlp", bits="16", seeds="0", out=tmp_path / "a",
                         topk="10", settings={"epochs": 6}, progress=False)
    from hashret.data import load_dataset
    from hashret.models.base import HashModel

    query = set(load_dataset(TINY).part("query"))
    seen = []
    real = HashModel.encode_rows

    def spy(self, dataset, modality, rows, *a, **k):
        seen.extend(np.asarray(rows).tolist())
        return real(self, dataset, modality, rows, *a, **k)

    monkeypatch.setattr(HashModel, "encode_rows", spy)
    out = tmp_path / "b"
    recs = bench(TINY, methods="label-ridge,dcmh-mlp", bits="16", seeds="0", out=out, topk="10",
                         settings={"epochs": 6}, test=False, progress=False)
    assert not query & set(seen)
    assert all("map_all" not in r for r in recs) and len(recs) == len(full)
    for a, b in zip(full, recs):  # the same candidates, the same choice, the same validation mAP
        assert (a["method"], a["direction"], a["chosen"], a["map_val"]) == \
            (b["method"], b["direction"], b["chosen"], b["map_val"])
        assert b["trained_on"] < a["trained_on"]  # nothing refit on the validation rows
    table = (out / "table.md").read_text()
    assert "test queries were not scored" in table and f"{recs[0]['map_val']:.4f}" in table
    assert json.loads((out / "run.json").read_text())["test_scored"] is False
    assert not (out / "models" / "dcmh-mlp-16-seed0").exists()  # no refit model
    res = CliRunner().invoke(main, ["benchmark", "--dataset", TINY, "--methods", "label-ridge", "--bits", "16",
                                    "--validation-only", "--validation", "0", "--no-tune",
                                    "--out", str(tmp_path / "c")])
    assert res.exit_code != 0 and "--validation-only needs validation rows" in res.output


def test_benchmark_settings_reach_only_the_methods_that_have_the_field(tmp_path):
    out = tmp_path / "bench"
    bench(TINY, methods="cca-itq,label-ridge", bits="8", seeds="0", out=out, topk="10",
                  settings={"ridge": 5.0}, progress=False)
    info = json.loads((out / "run.json").read_text())
    assert info["settings"] == {"cca-itq": {}, "label-ridge": {"ridge": 5.0}}
    assert info["tuning"]["label-ridge"] == [{"anchors": 500}, {"anchors": 1000}]  # ridge fixed by the user
    saved = json.loads((out / "models" / "label-ridge-8-seed0-c0" / "config.json").read_text())
    assert saved["config"]["ridge"] == 5.0
    assert "label-ridge: ridge=5.0" in (out / "table.md").read_text()


def test_every_method_gets_the_same_budget_and_the_choice_is_made_on_validation(tmp_path):
    import numpy as np

    from hashret.data import Split
    from hashret.experiments.benchmark import TUNING

    assert len({len(grid) for grid in TUNING.values()}) == 1  # the same budget for every method
    out = tmp_path / "bench"
    recs = bench(TINY, methods="label-ridge,dcmh-mlp", bits="16", seeds="0", out=out, topk="10",
                         settings={"epochs": 6}, progress=False)
    split = Split.load(out / "split.npz")
    assert len(split.validation) > 0 and np.intersect1d(split.validation, split.query).size == 0
    assert np.intersect1d(split.validation, split.train).size == 0
    for method in ("label-ridge", "dcmh-mlp"):
        rec = [r for r in recs if r["method"] == method]
        assert rec[0]["candidates"] == len(TUNING[method])
        val = {}
        for c in range(len(TUNING[method])):
            info = json.loads((out / "models" / f"{method}-16-seed0-c{c}" / "config.json").read_text())
            val[c] = info["selection"]["map_val"]
        best = max(val, key=lambda c: val[c]["mean"])
        for r in rec:
            assert r["map_val"] == val[best][r["direction"]]
            assert {k: v for k, v in r["chosen"].items() if k != "epochs"} == TUNING[method][best]
        if method == "dcmh-mlp":
            assert rec[0]["chosen"]["epochs"] in (5, 6)


def test_the_chosen_setting_is_trained_again_on_every_training_row_before_the_queries(tmp_path):
    from hashret.data import Split, load_dataset
    from hashret.metrics import evaluate_model
    from hashret.models import build_for_dataset, load_checkpoint

    out = tmp_path / "bench"
    recs = bench(TINY, methods="label-ridge,dcmh-mlp", bits="16", seeds="0", out=out, topk="10",
                         settings={"epochs": 6}, progress=False)
    split = Split.load(out / "split.npz")
    rows = np.sort(np.concatenate([split.train, split.validation]))
    info = json.loads((out / "run.json").read_text())
    assert info["refit"] == {"rows": len(rows)} and info["torch_threads"] >= 1
    assert "trained again on all" in (out / "table.md").read_text()
    ds = load_dataset(TINY, split=out / "split.npz")
    for method in ("label-ridge", "dcmh-mlp"):
        rec = {r["direction"]: r for r in recs if r["method"] == method}
        assert rec["i2t"]["trained_on"] == len(rows) > len(split.train)
        final = load_checkpoint(out / "models" / f"{method}-16-seed0")
        assert {k: final.config[k] for k in rec["i2t"]["chosen"]} == rec["i2t"]["chosen"]
        # the scored model is the chosen setting fitted on training + validation rows, exactly
        # the chosen epoch count (no selection left to make), not the candidate that was chosen
        again = build_for_dataset(method, ds, 16, seed=0, **rec["i2t"]["chosen"])
        again.fit(ds.features("image", rows), ds.features("text", rows), ds.labels[rows])
        scores, _ = evaluate_model(again, ds, topk=(10,))
        for d in ("i2t", "t2i"):
            assert scores[d]["map_all"] == pytest.approx(rec[d]["map_all"], abs=1e-9)
            assert np.array_equal(again.encode_rows(ds, "image", ds.part("query")),
                                  final.encode_rows(ds, "image", ds.part("query")))
    # --no-refit scores the chosen candidate itself, trained on the training rows alone
    plain = bench(TINY, methods="label-ridge", bits="16", seeds="0", out=tmp_path / "plain",
                          topk="10", refit=False, progress=False)
    assert plain[0]["trained_on"] == len(split.train)
    assert json.loads((tmp_path / "plain" / "run.json").read_text())["refit"] is None
    assert plain[0]["map_all"] != [r for r in recs if r["method"] == "label-ridge"][0]["map_all"]


def test_a_refit_stopped_early_keeps_the_candidates_learning_rate_schedule(tmp_path):
    from hashret.models import load_checkpoint

    out = tmp_path / "bench"
    rec = bench(TINY, methods="gch", bits="16", seeds="0", out=out, topk="10", tune=False,
                        settings={"epochs": 10}, progress=False)[0]
    cand = load_checkpoint(out / "models" / "gch-16-seed0-c0")
    final = load_checkpoint(out / "models" / "gch-16-seed0")
    assert cand.config["lr_schedule"] == "cosine" and cand.config["lr_horizon"] is None
    assert rec["chosen"] == {"epochs": cand.selection["epochs"], "lr_horizon": 10}
    assert final.config["epochs"] == cand.selection["epochs"] and final.config["lr_horizon"] == 10


def test_a_lone_candidate_and_its_refit_keep_separate_checkpoints(tmp_path):
    out = tmp_path / "bench"
    args = dict(methods="dcmh-mlp", bits="16", seeds="0", out=out, topk="10", tune=False,
                settings={"epochs": 6}, progress=False)
    first = bench(TINY, **args)
    cand = json.loads((out / "models" / "dcmh-mlp-16-seed0-c0" / "config.json").read_text())
    final = json.loads((out / "models" / "dcmh-mlp-16-seed0" / "config.json").read_text())
    assert cand["selection"]["map_val"]["i2t"] == first[0]["map_val"]  # the candidate survives
    assert final["config"]["epochs"] == first[0]["chosen"]["epochs"]
    again = bench(TINY, **args, reuse=True)
    assert not again[0]["trained"] and again[0]["map_all"] == first[0]["map_all"]


def test_worker_processes_train_the_models_one_thread_trains_here(tmp_path, monkeypatch):
    """Two workers (one thread each) and this process at one thread: the same checkpoints,
    choices and table -- a training depends on its seed and thread count, not on where or in
    which order it ran. A worker's error reaches the caller as the one-line error."""
    import torch

    args = dict(methods="gch,dcmh-mlp", bits="16", seeds="0", topk="10", settings={"epochs": 5},
                progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = bench(TINY, out=tmp_path / "here", **args)
    finally:
        torch.set_num_threads(threads)
    pooled = bench(TINY, out=tmp_path / "pool", workers=2, **args)
    assert json.loads((tmp_path / "pool" / "run.json").read_text())["workers"] == 2
    strip = ("fit_s", "encode_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in here] == \
        [{k: v for k, v in r.items() if k not in strip} for r in pooled]
    for name in ("gch-16-seed0", "gch-16-seed0-c3", "dcmh-mlp-16-seed0-c1"):
        a = torch.load(tmp_path / "here" / "models" / name / "weights.pt", weights_only=True)
        b = torch.load(tmp_path / "pool" / "models" / name / "weights.pt", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    with pytest.raises(HashretError, match="unknown lr_schedule 'bogus'"):
        bench(TINY, out=tmp_path / "bad", workers=2, methods="gch", bits="16", seeds="0", topk="10",
              tune=False, settings={"epochs": 2, "lr_schedule": "bogus"}, progress=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(methods="cca-itq,nosuch"), "unknown model"),
    (dict(validation=0), "tuning needs validation rows"),
    (dict(validation=1.5), "share in"),
    (dict(settings={"beta_beacon": 1.0}), "no chosen method has the config field beta_beacon"),
    (dict(dataset="nosuch"), "unknown dataset"),
    (dict(bits="12"), "multiples of 8"),
    (dict(seeds=""), "no seed"),
    (dict(workers=0), "--workers must be >= 1"),
    (dict(dataset="mirflickr25k"), "no image features|not found"),
])
def test_benchmark_rejects_bad_arguments(kwargs, match, tmp_path):
    args = dict(dataset=TINY, methods="cca-itq", bits="8", seeds="0", out=tmp_path / "o")
    args.update(kwargs)
    with pytest.raises(HashretError, match=match):
        bench(**args, progress=False)


def _script(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mAP.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_map_script_end_to_end(tmp_path):
    res = _script("--dataset", TINY, "--methods", "label-ridge", "--bits", "16",
                  "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "label-ridge" in res.stdout and (tmp_path / "o" / "results.json").is_file()


@pytest.mark.parametrize("args,match", [
    (["--methods", "nosuch"], "unknown model"),
    (["--dataset", "nosuch"], "unknown dataset"),
    (["--dataset", "missing/file.npz"], "does not exist"),
])
def test_map_script_bad_input_is_one_line(args, match, tmp_path):
    res = _script(*args, "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def _bad_file(tmp_path, kind):
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = dict(image=rng.random((40, 5)), text=rng.random((40, 6)),
                  labels=np.eye(4, dtype=np.uint8)[rng.integers(0, 4, 40)])
    if kind == "rows":
        arrays["image"] = arrays["image"][:39]
    elif kind == "nan":
        arrays["text"][3, 2] = np.nan
    elif kind == "empty-split":
        arrays.update(query=np.zeros(0, int), train=np.arange(10, 40), database=np.arange(10, 40))
    path = tmp_path / f"{kind}.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("kind,match", [("rows", "image has shape (39, 5), no axis matches the 40 label rows"),
                                        ("nan", "NaN"), ("empty-split", "query split is empty")])
def test_map_script_bad_data_files(kind, match, tmp_path):
    res = _script("--dataset", _bad_file(tmp_path, kind), "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and match in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_describe_and_errors():
    runner = CliRunner()
    res = runner.invoke(main, ["describe", "--dataset", "wikipedia", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["items"] == 2866
    res = runner.invoke(main, ["describe", "--dataset", "nosuch"])
    assert res.exit_code == 2 and "error: unknown dataset" in res.output


def test_tag_views_splits_the_vocabulary_into_two_disjoint_real_views(tmp_path):
    """benchmarks/tag_views.py: the held-aside two-view set keeps each item's tags, split by a
    seeded vocabulary half into the image and text views, drops items empty on one side and
    keeps the queries as queries; benchmarks/mAP.py reads the file."""
    rng = np.random.default_rng(0)
    tags = (rng.random((60, 12)) < 0.3).astype(np.float32)
    tags[0] = 0                                              # no tag at all: dropped
    labels = (rng.random((60, 3)) < 0.5).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    src = tmp_path / "tags.npz"
    np.savez(src, image=rng.random((60, 4)).astype(np.float32), text=tags, labels=labels,
             query=np.arange(10), train=np.arange(10, 60), database=np.arange(10, 60))
    out = tmp_path / "views.npz"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tag_views.py"), "--dataset", str(src),
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    with np.load(out) as z:
        v = {k: z[k] for k in z.files}
    kept = (tags[:, :] > 0).any(1)
    assert v["image"].shape[1] + v["text"].shape[1] == 12 and v["image"].shape[1] == 6
    assert (v["image"].sum(1) > 0).all() and (v["text"].sum(1) > 0).all()
    rows = [int(i) for i in v["ids"]]
    assert set(rows) <= set(np.flatnonzero(kept))
    for r, a, b in zip(rows, v["image"], v["text"]):            # the item's own tags, split
        assert a.sum() + b.sum() == tags[r].sum()
    assert all(int(v["ids"][q]) < 10 for q in v["query"])      # queries stay queries
    res = _script("--dataset", str(out), "--methods", "label-ridge", "--bits", "8", "--no-tune",
                  "--validation", "0", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr


def _diagnostics():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gch_diagnostics", ROOT / "benchmarks" / "gch_diagnostics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_class_ranking_bound_against_a_ranked_list():
    """gch_diagnostics' bound: the AP of a database of perfect class clusters laid out class by
    class in the order of the scores, against AP computed on that explicit ranked list."""
    diag = _diagnostics()
    rng = np.random.default_rng(0)
    sizes = np.array([3, 7, 1, 5])
    scores, cls = rng.random((20, 4)), rng.integers(0, 4, 20)
    want = []
    for s, c in zip(scores, cls):
        ranked = np.concatenate([np.full(sizes[k], k) for k in np.argsort(-s)])
        hits = np.cumsum(ranked == c)
        want.append(np.mean([hits[i] / (i + 1) for i in np.flatnonzero(ranked == c)]))
    assert diag._oracle_map(scores, cls, sizes) == round(float(np.mean(want)), 4)
    one = np.eye(3)[[0, 0, 1, 2, 2, 2]]
    assert diag.graph_stats(one, 6) == {"neighbours": round(float(np.mean([1, 1, 0, 2, 2, 2])), 1),
                                        "same_label_set_share": 1.0}
    many = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1]])
    # item 0's neighbours: 1 (weight 1) and 2 (weight 1), none with its label set
    assert diag.graph_stats(many, 3)["same_label_set_share"] == 0.0


def test_gch_diagnostics_on_a_trained_checkpoint(tmp_path):
    """Both commands run on a saved GCH checkpoint and its split; a multi-label set is refused
    by t2i with one line, and a checkpoint without a GCN by beacons."""
    from hashret.data import load_dataset
    from hashret.models import build_for_dataset, save_checkpoint

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    centres = rng.normal(size=(3, 20))
    np.savez(tmp_path / "one.npz", image=(centres[y] + rng.normal(size=(240, 20))).astype(np.float32),
             text=(centres[y] @ rng.normal(size=(20, 12)) + rng.normal(size=(240, 12))).astype(np.float32),
             labels=np.eye(3, dtype=np.uint8)[y], query=np.arange(40), train=np.arange(40, 240),
             database=np.arange(40, 240))
    ds = load_dataset(str(tmp_path / "one.npz"), seed=0)
    ds.hold_out_validation(0.2)
    tr = ds.part("train")
    for name in ("gch", "gch-no-gcn"):
        m = build_for_dataset(name, ds, 16, seed=0, hidden=32, gcn_hidden=32, epochs=4, batch_size=64)
        m.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr])
        save_checkpoint(tmp_path / name, m, dataset=ds, extra={"trained_on": len(tr)})

    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gch_diagnostics.py"), *args,
                               "--dataset", str(tmp_path / "one.npz")], capture_output=True, text=True,
                              cwd=tmp_path, timeout=300)

    res = run("beacons", "--model", str(tmp_path / "gch"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == len(tr) and out["same_label_set_share"] == 1.0
    assert all(0 < out[f"map {k}->{k}"] <= 1 for k in ("image", "text", "teacher", "beacon"))
    res = run("t2i", "--model", str(tmp_path / "gch"))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["queries"] == 40 and out["database"] == 200
    assert 0 <= out["text code accuracy"] <= 1 and 0 < out["plain classifier ranking bound"] <= 1
    res = run("beacons", "--model", str(tmp_path / "gch-no-gcn"))
    assert res.returncode != 0 and "no GCN" in res.stderr and "Traceback" not in res.stderr
