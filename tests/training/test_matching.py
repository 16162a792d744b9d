"""Matcher checkpoints through the CLI: train, distil, build-index, query, cascade."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from hashret.cli import main
from hashret.data.scenes import load_scenes
from hashret.index import HashIndex
from hashret.engine import build_index, query_index
from hashret.models.checkpoint import load_checkpoint
from hashret.models.distill import exhaustive_ranking, rerank
from hashret.training import train

SPEC = ("scenes:n_train=120,n_dev=0,n_test=40,region_dim=16,n_objects=6,n_attributes=4,"
        "min_objects=2,max_objects=3,background=1")
QUIET = dict(progress=False)
SMALL = {"embed": 16, "word_dim": 8, "epochs": 1, "batch_size": 32, "head_epochs": 1,
         "head_hidden": 16, "head_word_dim": 8, "head_batch_size": 32}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("matchers")
    train("han", SPEC, 32, seed=0, out=root / "han", options=dict(SMALL), evaluate=False, **QUIET)
    build_index(root / "han", "image", root / "ix_image", **QUIET)
    build_index(root / "han", "text", root / "ix_text", **QUIET)
    return root


def test_checkpoint_round_trip_gives_identical_codes_and_scores(runs):
    a = load_checkpoint(runs / "han")
    b = load_checkpoint(runs / "han")
    part = load_scenes(SPEC).part("test")
    np.testing.assert_array_equal(a.encode_rows(part, "image", np.arange(10)),
                                  b.encode_rows(part, "image", np.arange(10)))
    info = json.loads((runs / "han" / "config.json").read_text())
    assert info["config"]["kind"] == "matcher" and info["dataset"]["synthetic"]
    assert info["config"]["embed"] == 16 and info["vocab"][:2] == ["<pad>", "<unk>"]


def test_index_holds_gallery_codes_and_payloads(runs):
    part = load_scenes(SPEC).part("test")
    model = load_checkpoint(runs / "han")
    with HashIndex.open(runs / "ix_text") as ix:
        assert len(ix) == part.n_captions and ix.bits == 32
        from hashret.index import pack_codes
        np.testing.assert_array_equal(ix.packed_codes(ix.rows_of(np.arange(5))),
                                      pack_codes(model.encode_rows(part, "text", np.arange(5))))
        assert ix.items([3])[0]["caption"] == part.captions[3]


def test_cascade_with_the_whole_gallery_equals_the_exhaustive_matcher(runs):
    ds = load_scenes(SPEC)
    part = ds.part("test")
    model = load_checkpoint(runs / "han")
    res = query_index(runs / "ix_image", runs / "han", item=7, k=5, rerank=runs / "han",
                      candidates=part.n_images)
    got = [r["id"] for r in res["results"][0]]
    q = model.encode_for_matching(part.text_batch([7]), "text")
    gallery = model.encode_rows_for_matching(part, "image", np.arange(part.n_images))
    want = exhaustive_ranking(model, q, gallery, "t2i", k=5)[0]
    assert got == want.tolist()
    scores = [r["score"] for r in res["results"][0]]
    assert scores == sorted(scores, reverse=True)
    # and in the library: candidates = everything, in any order
    cand = np.random.default_rng(0).permutation(part.n_images)[None]
    ids, _ = rerank(model, q, gallery, cand, "t2i", k=5)
    assert ids[0].tolist() == want.tolist()


def test_cli_query_text_and_rerank(runs):
    r = CliRunner().invoke(main, ["query", "--index", str(runs / "ix_image"), "--checkpoint",
                                  str(runs / "han"), "--text", "a red cube and a zebra", "-k", "3",
                                  "--rerank", str(runs / "han"), "--candidates", "20", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 3 and all("score" in x for x in rows)
    assert "zebra" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--text", "zebra giraffe"], "no word of the query"),
    (["--text", "a red cube", "--candidates", "5"], "needs --rerank"),
    (["--text", "a red cube", "--rerank", "{han}", "--candidates", "2"], ">= k"),
    (["--image-features", "{bad}"], "takes 16"),
])
def test_bad_queries_give_one_error_line(runs, tmp_path, args, message):
    import re

    np.save(tmp_path / "bad.npy", np.zeros((4, 9), np.float32))
    args = [a.format(han=runs / "han", bad=tmp_path / "bad.npy") for a in args]
    ix = runs / ("ix_text" if "--image-features" in args else "ix_image")
    r = CliRunner().invoke(main, ["query", "--index", str(ix), "--checkpoint", str(runs / "han"), *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert re.search(message, r.stderr), r.stderr


def test_reranker_must_be_a_matcher_of_the_same_data(runs, tmp_path):
    other = "scenes:n_train=60,n_dev=0,n_test=20,region_dim=16,n_objects=6,n_attributes=4,min_objects=2,max_objects=3,background=1,seed=5"
    train("han", other, 32, seed=0, out=tmp_path / "other", options=dict(SMALL), evaluate=False, **QUIET)
    with pytest.raises(Exception, match="trained on other data"):
        query_index(runs / "ix_image", runs / "han", text="a red cube", rerank=tmp_path / "other")
    train("label-ridge", "synthetic:n_items=200,n_labels=4,image_dim=8,text_dim=20,n_query=20,n_train=100",
          32, out=tmp_path / "lr", evaluate=False, **QUIET)
    with pytest.raises(Exception, match="cannot re-rank"):
        query_index(runs / "ix_image", runs / "han", text="a red cube", rerank=tmp_path / "lr")


def test_distill_from_trains_only_the_head(runs, tmp_path):
    before = load_checkpoint(runs / "han")
    train(None, SPEC, 16, out=tmp_path / "d", distill_from=runs / "han",
          options={"head_epochs": 1}, evaluate=False, **QUIET)
    after = load_checkpoint(tmp_path / "d")
    assert after.bits == 16 and after.name == "han"
    for k, v in before.matcher.state_dict().items():
        assert (after.matcher.state_dict()[k] == v).all()
    r = CliRunner().invoke(main, ["train", "--distill-from", str(runs / "ix_image"), "--dataset", SPEC,
                                  "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and r.stderr.startswith("error: ")


def test_an_older_checkpoint_says_how_its_head_was_trained(runs, tmp_path, caplog):
    import shutil

    part = load_scenes(SPEC).part("test")
    want = load_checkpoint(runs / "han").encode_rows(part, "image", np.arange(5))
    old = tmp_path / "old"
    shutil.copytree(runs / "han", old)
    info = json.loads((old / "config.json").read_text())
    # written before list_hard_weight: the pair's loss among its list followed hard_weight
    del info["config"]["list_hard_weight"]
    info["config"]["hard_weight"] = 0.5
    (old / "config.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        model = load_checkpoint(old)
    assert model.config["list_hard_weight"] == 0.5 and not caplog.records
    np.testing.assert_array_equal(model.encode_rows(part, "image", np.arange(5)), want)
    # a distilled head from before list_weight learned its lists alone: loads, and says so
    del info["config"]["list_weight"]
    for head, warned in (("distilled", True), ("in-batch", False)):
        info["config"]["head"] = head
        (old / "config.json").write_text(json.dumps(info))
        caplog.clear()
        with caplog.at_level("WARNING"):
            model = load_checkpoint(old)
        assert any("lists alone" in r.getMessage() for r in caplog.records) == warned
        np.testing.assert_array_equal(model.encode_rows(part, "image", np.arange(5)), want)


def test_cli_encode_of_a_matcher_checkpoint(runs, tmp_path):
    r = CliRunner().invoke(main, ["encode", "--checkpoint", str(runs / "han"), "--modality", "text",
                                  "--out", str(tmp_path / "c.npy")])
    assert r.exit_code == 0, r.output
    codes = np.load(tmp_path / "c.npy")
    part = load_scenes(SPEC).part("test")
    assert codes.shape == (part.n_captions, 4)
    x, m = part.image_batch([1])
    np.save(tmp_path / "r.npy", x[0][m[0]])  # one image: its real regions only
    r = CliRunner().invoke(main, ["encode", "--checkpoint", str(runs / "han"), "--modality", "image",
                                  "--features", str(tmp_path / "r.npy"), "--out", str(tmp_path / "i.npy")])
    assert r.exit_code == 0, r.output
    from hashret.index import pack_codes
    np.testing.assert_array_equal(np.load(tmp_path / "i.npy"),
                                  pack_codes(load_checkpoint(runs / "han").encode_rows(part, "image", [1])))


def test_look_alike_groups_are_the_nearest_images_by_the_current_codes():
    import torch

    from hashret.models.distill import HashHead
    from hashret.training.matching import _epoch_pairs, _look_alike_order

    ds = load_scenes(SPEC)
    part = ds.part("train")
    n, group = part.n_images, 3
    torch.manual_seed(0)
    head = HashHead(ds.region_dim, len(ds.vocab), 32, hidden=16, word_dim=8).train()
    images, captions = _epoch_pairs(part, np.random.default_rng(0))
    order, caps = _look_alike_order(head, part, images, captions, group, np.random.default_rng(1), "cpu")
    assert head.training  # put back as it was
    assert sorted(order.tolist()) == list(range(n))  # every image once per epoch
    caption_of = dict(zip(images.tolist(), captions.tolist()))
    assert [caption_of[i] for i in order.tolist()] == caps.tolist()  # each keeps its caption

    # reference: brute-force Hamming distances from each anchor's caption to every image,
    # ties by row, and the same greedy grouping over the 4 x group nearest
    head.eval()
    with torch.no_grad():
        x, m = part.image_batch(np.arange(n))
        t, ln = part.text_batch(np.array([caption_of[i] for i in range(n)]))
        bi = head.image(torch.from_numpy(x), torch.from_numpy(m)).numpy() >= 0
        bt = head.text(torch.from_numpy(t), torch.from_numpy(ln)).numpy() >= 0
    dist = (bt[:, None, :] != bi[None, :, :]).sum(-1)
    used, want = np.zeros(n, dtype=bool), []
    for anchor in np.random.default_rng(1).permutation(n):
        if used[anchor]:
            continue
        members = [anchor]
        used[anchor] = True
        for j in np.argsort(dist[anchor], kind="stable")[:4 * group]:
            if len(members) < group and not used[j]:
                members.append(j)
                used[j] = True
        want.extend(members)
    assert order.tolist() == [int(i) for i in want]


def test_head_group_must_be_positive():
    from hashret.errors import HashretError

    from hashret.models.distill import MatcherModel

    ds = load_scenes(SPEC)
    with pytest.raises(HashretError, match="head_group must be at least 1"):
        MatcherModel("han", 32, ds.region_dim, ds.vocab.words, head_group=0)


def test_the_server_answers_the_cascade_as_the_cli_does(runs):
    # a matcher's codes, scene payloads and the re-ranker, through hashret serve
    from tests.serve.conftest import Server, free_port

    s = Server(["--index", str(runs / "ix_image"), "--index", str(runs / "ix_text"), "--checkpoint",
                str(runs / "han"), "--rerank", str(runs / "han")], free_port())
    try:
        s.wait_ready()
        cli = CliRunner().invoke(main, ["query", "--index", str(runs / "ix_image"), "--checkpoint",
                                        str(runs / "han"), "--text", "a red cube", "-k", "4",
                                        "--rerank", str(runs / "han"), "--candidates", "20", "--json"])
        status, out = s.post("/search", {"text": "a red cube", "k": 4, "rerank": True, "candidates": 20})
        assert status == 200 and out["index"] == "ix_image" and "rerank_ms" in out
        assert out["results"][0] == json.loads(cli.stdout)
        status, out = s.post("/search", {"item": 3, "k": 4, "index": "ix_text"})
        assert status == 200 and out["query_item"]["id"] == 3 and len(out["results"][0]) == 4
        status, out = s.post("/search", {"codes": ["00000000"], "k": 2, "rerank": True, "index": "ix_text"})
        assert status == 400 and "features" in out["error"]
        # region sets as numbers: one set (2-D) or several (3-D); a ragged set is one 400 line
        status, out = s.post("/search", {"image_features": [[0.5] * 16] * 3, "k": 2, "index": "ix_text"})
        assert status == 200 and len(out["results"]) == 1
        status, out = s.post("/search", {"image_features": [[[0.5] * 16] * 3] * 2, "k": 2, "index": "ix_text"})
        assert status == 200 and len(out["results"]) == 2
        status, out = s.post("/search", {"image_features": [[[0.5] * 16] * 3, [[0.5] * 9]], "index": "ix_text"})
        assert status == 400 and "region" in out["error"]
    finally:
        s.stop()


def test_every_head_trains_on_the_same_batches_and_only_the_matchers_heads_read_it(monkeypatch):
    # the controls are pinned where they are trained: pairs and smoothing never score with
    # the matcher; in-batch gets the matcher's scores of the batch, shuffled a row-wise
    # permutation of them; and every head sees the same (images, captions) in the same order
    import torch

    from hashret.models.distill import HEADS, MatcherModel
    from hashret.training import matching

    ds = load_scenes(SPEC)
    options = {**SMALL, "head_epochs": 2, "list_size": 4}
    base = MatcherModel("han", 32, ds.region_dim, ds.vocab.words, 0, **options)
    schedule = matching.head_schedule(base, ds)
    assert len(schedule) == 2 and sorted(schedule[1][0].tolist()) == list(range(ds.part("train").n_images))
    again = matching.head_schedule(MatcherModel("han", 32, ds.region_dim, ds.vocab.words, 0, **options), ds)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(schedule, again))
    seen = {}
    real_batch, real_scores, real_loss = matching._batch, matching.score_chunks, matching.head_loss

    def batch(part, images, captions, device):
        if len(images) <= options["head_batch_size"]:  # (the distilled head's lists come in a second call)
            seen.setdefault(kind, []).append((np.array(images), np.array(captions)))
        return real_batch(part, images, captions, device)

    def scores(*a, **k):
        out = real_scores(*a, **k)
        scored.append(out)
        return out

    def loss(head, cfg, teacher, hi, ht):
        taught.append(teacher)
        return real_loss(head, cfg, teacher, hi, ht)

    monkeypatch.setattr(matching, "_batch", batch)
    monkeypatch.setattr(matching, "score_chunks", scores)
    monkeypatch.setattr(matching, "head_loss", loss)
    for kind in HEADS:
        scored, taught = [], []
        model = MatcherModel("han", 32, ds.region_dim, ds.vocab.words, 0, **{**options, "head": kind})
        model.matcher = base.matcher
        matching.train_head(model, ds, schedule)
        if kind in ("pairs", "smoothing"):
            assert scored == [] and all(t is None for t in taught), kind
        elif kind == "distilled":  # the matcher's batch scores, and of each query's list, the true pair first
            assert len(scored) == len(taught) > 0
            for s, t in zip(scored, taught):
                assert set(t) == {"batch", "i2t", "t2i"} and t["i2t"].shape[1] == 1 + options["list_size"]
                assert torch.equal(s, t["batch"]) and s.shape == (len(t["i2t"]),) * 2
        else:
            assert len(scored) == len(taught) > 0
            for s, t in zip(scored, taught):
                if kind == "in-batch":
                    assert torch.equal(s, t)
                else:
                    assert not torch.equal(s, t) and torch.equal(s.sort(1).values, t.sort(1).values)
    first = seen["pairs"]
    for kind in HEADS:
        assert len(seen[kind]) == len(first)
        assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(seen[kind], first)), kind


def test_hard_candidates_are_each_querys_nearest_others_under_the_heads_codes():
    # brute force: Hamming distances of the head's codes, ties by row, the query's own pair(s) left out
    from hashret.index.bits import pack_codes
    from hashret.models.distill import MatcherModel
    from hashret.training.matching import hard_candidates

    ds = load_scenes(SPEC)
    part = ds.part("train")
    model = MatcherModel("han", 32, ds.region_dim, ds.vocab.words, 0, **SMALL)
    model.has_head = True  # an untrained head's codes serve as well as any
    caps, imgs = hard_candidates(model.head, part, 5)
    img = pack_codes(model.encode_rows(part, "image", np.arange(part.n_images)))
    txt = pack_codes(model.encode_rows(part, "text", np.arange(part.n_captions)))
    d = np.unpackbits(img[:, None] ^ txt[None], axis=2).sum(2)  # images x captions
    for i in range(part.n_images):
        others = np.flatnonzero(part.caption_image != i)
        want = others[np.lexsort((others, d[i, others]))][:5]
        np.testing.assert_array_equal(caps[i], want)
    for c in range(part.n_captions):
        others = np.flatnonzero(np.arange(part.n_images) != part.caption_image[c])
        want = others[np.lexsort((others, d[others, c]))][:5]
        np.testing.assert_array_equal(imgs[c], want)
