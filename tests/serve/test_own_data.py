"""A user's own file, end to end: arrays, raw texts, label names and payload fields in an
.npz -> train -> build-index -> serve -> a text query whose hits carry the payload fields."""

import numpy as np
import pytest

from hashret.data import load_dataset
from hashret.engine import build_index
from hashret.errors import HashretError
from hashret.training import train

WORDS = {0: ["sea", "boat", "wave"], 1: ["forest", "tree", "moss"], 2: ["city", "street", "car"]}


def _own_file(path, n=240, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, 3, n)
    labels = np.eye(3, dtype=np.uint8)[cls]
    image = (labels @ rng.normal(size=(3, 16)) + 0.4 * rng.normal(size=(n, 16))).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS[c], 2, replace=False)) + f", photo {i}." for i, c in enumerate(cls)]
    np.savez(path, image=image, texts=np.array(texts), labels=labels,
             label_names=np.array(["coast", "woods", "town"]),
             payload_title=np.array([f"picture {i}" for i in range(n)]),
             payload_url=np.array([f"https://example.org/{i}.jpg" for i in range(n)]),
             payload_year=np.arange(2000, 2000 + n))
    return cls


def test_own_npz_with_texts_and_payloads_through_train_index_and_serve(tmp_path, server):
    cls = _own_file(tmp_path / "mine.npz")
    ds = load_dataset(str(tmp_path / "mine.npz"))
    assert {"sea", "forest", "city", "photo"} <= set(ds.vocab) and "1" not in ds.vocab  # words of 2+ texts
    assert ds.text.shape == (240, len(ds.vocab)) and ds.label_names == ["coast", "woods", "town"]
    train("label-ridge", str(tmp_path / "mine.npz"), 32, out=tmp_path / "run", progress=False, evaluate=False)
    build_index(tmp_path / "run", "image", tmp_path / "ix", progress=False)
    srv = server("--index", tmp_path / "ix", "--checkpoint", tmp_path / "run")
    status, reply = srv.post("/search", {"text": "boat on the sea", "k": 5})
    assert status == 200, reply
    hits = reply["results"][0]
    assert len(hits) == 5
    for hit in hits:
        item = hit["item"]
        row = int(item["key"])
        assert item["title"] == f"picture {row}" and item["url"] == f"https://example.org/{row}.jpg"
        assert item["year"] == 2000 + row and isinstance(item["year"], int)
        assert item["labels"] == [["coast", "woods", "town"][cls[row]]]
    # a text about the sea finds the coast's pictures
    assert sum(h["item"]["labels"] == ["coast"] for h in hits) >= 4


@pytest.mark.parametrize("extra,match", [
    ({"payload_key": np.arange(10)}, "payload_key would hide"),
    ({"payload_title": np.arange(9)}, "payload_title has 9 values for 10 items"),
    ({"notes": np.arange(10)}, "holds notes, which hashret does not read"),
    ({"label_names": np.array(["a"])}, "1 label names for 2 label columns"),
    ({"vocab": np.array(["x"])}, "the vocabulary has 1 words but the text features 4 columns"),
])
def test_own_file_mistakes_are_one_line_each(tmp_path, extra, match):
    arrays = {"image": np.zeros((10, 3), np.float32), "text": np.zeros((10, 4), np.float32),
              "labels": np.eye(2, dtype=np.uint8)[np.arange(10) % 2], **extra}
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(HashretError, match=match):
        load_dataset(str(tmp_path / "bad.npz"))
