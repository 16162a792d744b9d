import numpy as np
import pytest

from hashret.data import make_synthetic
from hashret.errors import HashretError
from hashret.metrics import evaluate_codes
from hashret.models import (build_for_dataset, build_model, load_checkpoint, model_names,
                            parse_model_name, save_checkpoint)
from hashret.models.baselines import itq_rotation, label_codewords

FAST = {"dcmh-mlp": {"epochs": 8, "hidden": 64}}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_items=1200, n_labels=12, labels_per_item=1.5, image_dim=48, text_dim=120, n_query=150,
                          n_train=700, noise=0.4, seed=1)


def _fit(name, ds, bits=16, seed=0):
    tr = ds.part("train")
    model = build_for_dataset(name, ds, bits, seed=seed, **FAST.get(name, {}))
    return model.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr])


def _maps(model, ds):
    q, db = ds.part("query"), ds.part("database")
    out = []
    for qm, dm in (("image", "text"), ("text", "image")):
        out.append(evaluate_codes(model.encode(ds.features(qm, q), qm),
                                  model.encode(ds.features(dm, db), dm),
                                  ds.labels[q], ds.labels[db])["map_all"])
    return out


def _random_map(ds, bits=16):
    rng = np.random.default_rng(0)
    q, db = ds.part("query"), ds.part("database")
    return evaluate_codes(rng.standard_normal((len(q), bits)), rng.standard_normal((len(db), bits)),
                          ds.labels[q], ds.labels[db])["map_all"]


@pytest.mark.parametrize("name", ["cca-itq", "label-ridge", "dcmh-mlp"])
def test_baseline_learns_codes_well_above_random(name, data):
    model = _fit(name, data)
    codes = model.encode(data.features("image", data.part("query")), "image")
    assert codes.shape == (150, 16) and set(np.unique(codes)) <= {-1, 1}
    chance = _random_map(data)
    for m in _maps(model, data):
        assert m > chance + 0.1, (name, m, chance)


@pytest.mark.parametrize("name", ["cca-itq", "label-ridge", "dcmh-mlp"])
def test_checkpoint_round_trip_gives_identical_codes(name, data, tmp_path):
    model = _fit(name, data)
    save_checkpoint(tmp_path / "run", model, dataset=data)
    back = load_checkpoint(tmp_path / "run")
    assert back.config == model.config
    x = data.features("text", data.part("query"))
    np.testing.assert_array_equal(back.encode(x, "text"), model.encode(x, "text"))
    assert (tmp_path / "run" / "split.npz").is_file()


def test_training_is_seeded(data):
    a, b = _fit("dcmh-mlp", data, seed=3), _fit("dcmh-mlp", data, seed=3)
    x = data.features("image", data.part("query"))
    np.testing.assert_array_equal(a.encode(x, "image"), b.encode(x, "image"))


def test_bad_checkpoints(data, tmp_path):
    with pytest.raises(HashretError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    model = _fit("label-ridge", data)
    save_checkpoint(tmp_path / "run", model, dataset=data)
    (tmp_path / "run" / "weights.pt").write_bytes(b"truncated")
    with pytest.raises(HashretError, match="corrupt"):
        load_checkpoint(tmp_path / "run")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(HashretError, match="corrupt"):
        load_checkpoint(tmp_path / "run")


def test_wrong_input_is_named(data):
    model = _fit("label-ridge", data)
    with pytest.raises(HashretError, match="have 10 dimensions but the label-ridge model takes 48"):
        model.encode(np.ones((2, 10)), "image")
    with pytest.raises(HashretError, match="NaN"):
        model.encode(np.full((2, 48), np.nan), "image")
    with pytest.raises(HashretError, match="unknown modality"):
        model.encode(np.ones((2, 48)), "audio")
    with pytest.raises(HashretError, match="not trained"):
        build_for_dataset("cca-itq", data, 16).encode(np.ones((2, 48)), "image")


def test_factory_names():
    assert {"cca-itq", "label-ridge", "dcmh-mlp"} <= set(model_names())
    assert parse_model_name("cca-itq-32") == ("cca-itq", 32)
    assert build_model("dcmh-mlp-64", image_dim=4, text_dim=4, n_labels=2).bits == 64
    with pytest.raises(HashretError, match="unknown model"):
        parse_model_name("resnet")
    with pytest.raises(HashretError, match="multiple of 8"):
        build_model("cca-itq", 12, 4, 4, 2)
    with pytest.raises(HashretError, match="no config field"):
        build_model("cca-itq", 16, 4, 4, 2, learning_rate=3)


def test_itq_rotation_has_orthonormal_rows():
    v = np.random.default_rng(0).standard_normal((200, 6))
    r = itq_rotation(v, 16, 10, np.random.default_rng(1))
    assert r.shape == (6, 16)
    np.testing.assert_allclose(r @ r.T, np.eye(6), atol=1e-5)


def test_label_codewords_are_far_apart():
    c = label_codewords(10, 32, np.random.default_rng(0))
    d = (32 - c @ c.T) / 2
    assert (d[~np.eye(10, dtype=bool)] == 16).all()
