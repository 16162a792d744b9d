import shutil

import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp

from hashret.data import (BagOfWords, CrossModalDataset, Split, load_dataset, make_synthetic,
                          random_split)
from hashret.data.sources import PACKAGED
from hashret.errors import HashretError


def _shared_or_skip(name):
    try:
        return load_dataset(name)
    except HashretError as exc:
        pytest.skip(f"real data not reachable here: {exc}")


# -- real sets -------------------------------------------------------------------------------
def test_wikipedia_is_packaged_and_follows_the_protocol():
    ds = load_dataset("wikipedia")
    assert str(PACKAGED) in ds.source and not ds.synthetic
    assert (ds.n_items, ds.dim("image"), ds.dim("text"), ds.n_labels) == (2866, 128, 10, 10)
    assert ds.split.sizes() == {"query": 693, "train": 2173, "database": 2173}
    np.testing.assert_array_equal(ds.split.train, ds.split.database)
    assert np.intersect1d(ds.split.query, ds.split.database).size == 0
    assert (ds.labels.sum(1) == 1).all()  # single-label
    # SIFT bag-of-visual-words rows sum to 1
    np.testing.assert_allclose(ds.image.sum(1), 1.0, atol=1e-4)
    assert ds.label_names[0] == "art" and len(set(ds.ids)) == ds.n_items


def test_mirflickr_tags_and_labels():
    ds = _shared_or_skip("mirflickr25k")
    assert (ds.n_items, ds.n_labels, ds.dim("text")) == (20015, 24, 1386)
    assert not ds.has("image") and sp.issparse(ds.text)
    assert ds.split.sizes() == {"query": 2000, "train": 5000, "database": 18015}
    assert abs(ds.labels.sum(1).mean() - 3.78) < 0.01
    # first item's tags: cigarette,tattoos,smoke,red,dress,sunglasses
    words = {ds.vocab[j] for j in ds.text[0].indices}
    assert {"smoke", "red", "dress"} <= words
    with pytest.raises(HashretError, match="no image features"):
        ds.features("image")


def test_nuswide_tags_and_labels():
    ds = _shared_or_skip("nuswide")
    assert (ds.n_items, ds.n_labels, ds.dim("text")) == (7000, 10, 1000)
    assert ds.split.sizes() == {"query": 2000, "train": 5000, "database": 5000}


def test_synthetic_image_side_is_labelled(tmp_path):
    ds = _shared_or_skip("mirflickr25k+synthetic-image")
    assert ds.synthetic and "synthetic" in ds.name and ds.dim("image") == 512


def test_data_root_from_environment(tmp_path, monkeypatch):
    shutil.copytree(PACKAGED / "wikipedia", tmp_path / "wikipedia")
    monkeypatch.setenv("HASHRET_DATA", str(tmp_path))
    assert str(tmp_path) in load_dataset("wikipedia").source
    monkeypatch.setenv("HASHRET_DATA", str(tmp_path / "empty"))
    with pytest.raises(HashretError, match="not found"):
        load_dataset("wikipedia")


# -- splits ----------------------------------------------------------------------------------
def test_split_round_trip_and_checks(tmp_path):
    split = random_split(100, 10, 50, seed=3)
    path = split.save(tmp_path / "split.npz", dataset="x", n_items=100)
    back = Split.load(path, n_items=100)
    for part in ("query", "train", "database"):
        np.testing.assert_array_equal(getattr(back, part), getattr(split, part))
    assert back.seed == 3 and back.fingerprint() == split.fingerprint()
    assert np.intersect1d(split.query, split.database).size == 0
    assert np.isin(split.train, split.database).all()
    with pytest.raises(HashretError, match="made for 100 items"):
        Split.load(path, n_items=99)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(HashretError, match="unreadable"):
        Split.load(tmp_path / "bad.npz")
    with pytest.raises(HashretError, match="empty"):
        Split([], [1], [2])
    with pytest.raises(HashretError, match="disjoint"):
        Split([1, 2], [3], [2, 3]).validate(5)
    with pytest.raises(HashretError, match="outside"):
        Split([7], [1], [1]).validate(5)
    # a model must not train on its queries (the train part used to be unchecked)
    with pytest.raises(HashretError, match="query rows are also training rows"):
        Split([1, 2], [2, 3], [3, 4]).validate(5)


def test_validation_part_is_carved_from_train_seeded_saved_and_disjoint(tmp_path):
    split = random_split(1000, 100, 600, seed=3)
    carved = split.carve_validation(0.1, seed=5).validate(1000)
    assert len(carved.validation) == 100 and len(carved.train) == 500
    assert np.isin(carved.validation, split.train).all()                 # taken from train ...
    assert np.intersect1d(carved.validation, carved.train).size == 0      # ... and no longer in it
    assert np.intersect1d(carved.validation, carved.query).size == 0
    np.testing.assert_array_equal(carved.query, split.query)              # the test queries untouched
    np.testing.assert_array_equal(carved.validation, split.carve_validation(0.1, seed=5).validation)
    assert not np.array_equal(carved.validation, split.carve_validation(0.1, seed=6).validation)
    assert carved.sizes()["validation"] == 100 and carved.fingerprint() != split.fingerprint()
    back = Split.load(carved.save(tmp_path / "split.npz", n_items=1000), n_items=1000)
    np.testing.assert_array_equal(back.validation, carved.validation)
    assert back.fingerprint() == carved.fingerprint()
    old = Split.load(split.save(tmp_path / "plain.npz", n_items=1000), n_items=1000)
    assert len(old.validation) == 0 and old.fingerprint() == split.fingerprint()
    with pytest.raises(HashretError, match="validation rows are also query rows"):
        Split([1, 2], [3, 4], [3, 4, 5], validation=[2, 5]).validate(6)
    with pytest.raises(HashretError, match="validation rows are also train rows"):
        Split([1, 2], [3, 4], [3, 4, 5], validation=[4, 5]).validate(6)
    ds = make_synthetic(n_items=300, n_query=30, n_train=200, seed=0)
    with pytest.raises(HashretError, match="no validation part"):
        ds.part("validation")


def test_random_split_is_seeded():
    a, b, c = random_split(500, 50, 100, seed=1), random_split(500, 50, 100, seed=1), random_split(500, 50, 100, seed=2)
    np.testing.assert_array_equal(a.query, b.query)
    assert not np.array_equal(a.query, c.query)


# -- files in published layouts --------------------------------------------------------------
def _toy(n=60, c=4, v=30, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < 0.4).astype(np.uint8)
    labels[labels.sum(1) == 0, 0] = 1
    text = (rng.random((n, v)) < 0.2).astype(np.float32)
    pixels = rng.integers(0, 256, size=(n, 3, 16, 16), dtype=np.uint8)
    return labels, text, pixels


def _write_matlab_hdf5(path, **arrays):
    """Like MATLAB -v7.3: HDF5 behind a 512-byte header, arrays stored with axes reversed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=np.ascontiguousarray(np.asarray(v).T))
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .")


def test_dcmh_layout(tmp_path):
    labels, text, pixels = _toy()
    folder = tmp_path / "mirflickr"
    folder.mkdir()
    # IAll as MATLAB v7.3 (h5py reads it back as N x 3 x W x H), YAll and LAll as v5
    _write_matlab_hdf5(folder / "mirflickr25k-iall.mat", IAll=pixels.transpose(3, 2, 1, 0))
    scipy.io.savemat(folder / "mirflickr25k-yall.mat", {"YAll": text})
    scipy.io.savemat(folder / "mirflickr25k-lall.mat", {"LAll": labels})
    ds = load_dataset(str(folder))
    assert ds.n_items == 60 and ds.dim("text") == 30 and ds.image.ndim == 2
    np.testing.assert_array_equal(ds.labels, labels)
    assert np.intersect1d(ds.split.query, ds.split.database).size == 0
    np.testing.assert_array_equal(load_dataset(str(folder)).split.query, ds.split.query)  # seeded


def test_dcmh_layout_with_feature_matrix(tmp_path):
    labels, text, _ = _toy()
    feats = np.random.default_rng(1).random((60, 20)).astype(np.float32)
    scipy.io.savemat(tmp_path / "x-iall.mat", {"IAll": feats})
    scipy.io.savemat(tmp_path / "x-yall.mat", {"YAll": text})
    scipy.io.savemat(tmp_path / "x-lall.mat", {"LAll": labels})
    ds = load_dataset(str(tmp_path))
    np.testing.assert_allclose(ds.image, feats)


def test_gch_hdf5_layout(tmp_path):
    labels, text, pixels = _toy()
    path = tmp_path / "FLICKR-25K.mat"
    _write_matlab_hdf5(path, images=pixels.transpose(3, 2, 1, 0), YAll=text, LAll=labels)
    ds = load_dataset(str(path))
    assert ds.n_items == 60 and ds.dim("text") == 30
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.features("text"), text)


@pytest.mark.parametrize("suffix", [".npz", ".mat"])
def test_generic_file_with_split_and_ids(tmp_path, suffix):
    labels, text, _ = _toy()
    image = np.random.default_rng(2).random((60, 12))
    arrays = dict(image=image, text=text, labels=labels, query=np.arange(10),
                  train=np.arange(10, 40), database=np.arange(10, 60),
                  ids=np.array([f"item{i}" for i in range(60)]))
    path = tmp_path / f"mine{suffix}"
    np.savez(path, **arrays) if suffix == ".npz" else scipy.io.savemat(path, arrays)
    ds = load_dataset(str(path))
    assert ds.split.sizes() == {"query": 10, "train": 30, "database": 50}
    assert ds.ids[3] == "item3" and ds.dim("image") == 12


# -- bad input -------------------------------------------------------------------------------
def test_bad_files_and_names(tmp_path):
    with pytest.raises(HashretError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(HashretError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npz"))
    (tmp_path / "junk.mat").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(HashretError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.mat"))
    (tmp_path / "junk.npz").write_bytes(b"garbage")
    with pytest.raises(HashretError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "partial.npz", image=np.ones((3, 2)))
    with pytest.raises(HashretError, match="needs 'image', 'text'"):
        load_dataset(str(tmp_path / "partial.npz"))
    with pytest.raises(HashretError, match="no dataset"):
        load_dataset("")


def test_dataset_checks_rows_and_values():
    labels = np.eye(3, dtype=np.uint8)[[0, 1, 2, 0]]
    with pytest.raises(HashretError, match="5 rows but there are 4 label rows"):
        CrossModalDataset("x", np.ones((5, 2)), np.ones((4, 3)), labels)
    bad = np.ones((4, 2))
    bad[1, 1] = np.nan
    with pytest.raises(HashretError, match="NaN"):
        CrossModalDataset("x", bad, np.ones((4, 3)), labels)
    with pytest.raises(HashretError, match="0/1"):
        CrossModalDataset("x", np.ones((4, 2)), np.ones((4, 3)), labels * 2)
    with pytest.raises(HashretError, match="NaN"):
        CrossModalDataset("x", np.ones((4, 2)), sp.csr_matrix(np.full((4, 3), np.nan)), labels)


# -- synthetic and featurizers ---------------------------------------------------------------
def test_synthetic_has_planted_structure_and_is_seeded():
    ds = make_synthetic(n_items=1500, n_labels=8, image_dim=64, text_dim=200, n_query=100,
                        n_train=600, seed=4)
    assert ds.synthetic and ds.name == "synthetic" and sp.issparse(ds.text)
    assert ds.labels.sum(1).min() >= 1
    again = make_synthetic(n_items=1500, n_labels=8, image_dim=64, text_dim=200, n_query=100,
                           n_train=600, seed=4)
    np.testing.assert_array_equal(ds.image, again.image)
    assert (ds.text != again.text).nnz == 0
    # items that share a label look more alike, in both modalities
    rel = (ds.labels[:300].astype(float) @ ds.labels[:300].T) > 0
    off = ~np.eye(300, dtype=bool)
    for mod in ("image", "text"):
        x = ds.features(mod, np.arange(300))
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
        cos = x @ x.T
        assert cos[rel & off].mean() > cos[~rel].mean() + 0.05, mod


def test_synthetic_spec_parses_options():
    ds = load_dataset("synthetic:n_items=300,n_labels=5,image_dim=16,text_dim=40,n_query=30,n_train=100")
    assert ds.n_items == 300 and ds.n_labels == 5 and ds.synthetic
    with pytest.raises(HashretError, match="bad synthetic option"):
        load_dataset("synthetic:bogus=3")


def test_bag_of_words():
    bow = BagOfWords(["sky", "clouds", "sunset", "dog"])
    m = bow.transform(["sky,dog", "clouds", "unknown,sky,sky"])
    np.testing.assert_array_equal(m.toarray(), [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]])
    vec, known, unknown = bow.encode_query("Sky clouds over Paris")
    assert known == ["sky", "clouds"] and unknown == ["over", "paris"]
    np.testing.assert_array_equal(vec, [[1, 1, 0, 0]])
    with pytest.raises(HashretError, match="no word of the query"):
        bow.encode_query("zebra crossing")


def test_an_alias_names_a_dataset_with_its_synthetic_image_side_too():
    from hashret.data.sources import ALIASES, SYNTHETIC_IMAGE_SUFFIX

    assert ALIASES["nuswide"] == "nuswide-tc10"
    ds = load_dataset("flickr" + SYNTHETIC_IMAGE_SUFFIX)  # the packaged MIRFlickr tags
    assert ds.name == "mirflickr25k" + SYNTHETIC_IMAGE_SUFFIX
