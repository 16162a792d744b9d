"""hashret.training.train: the validation's choice, then the refit on every training row."""

import json

import numpy as np
from click.testing import CliRunner

from hashret.cli import main
from hashret.data import load_dataset
from hashret.models import build_for_dataset, load_checkpoint
from hashret.training import train

SPEC = "synthetic:n_items=500,n_labels=5,image_dim=12,text_dim=30,n_query=50,n_train=300"
SMALL = {"hidden": 32, "gcn_hidden": 32, "batch_size": 64}
QUIET = {}


def _codes(model, ds, rows):
    return [model.encode(ds.features(m, rows), m) for m in ("image", "text")]


def test_refit_trains_the_chosen_epochs_again_on_train_and_validation_rows(tmp_path):
    net = train("gch", SPEC, 16, seed=3, out=tmp_path / "run", epochs=15, options=SMALL,
                validation=0.2, evaluate=False, progress=False, **QUIET)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    chosen = info["selection"]["epochs"]
    ds = load_dataset(SPEC)
    ds.hold_out_validation(0.2)
    rows = ds.refit_rows()
    assert len(rows) == 300 and set(rows) == set(ds.part("train")) | set(ds.part("validation"))
    assert info["train"] == {**info["train"], "items": 300, "refit": True}
    # the refit is exactly the chosen setting trained on every training row: same epochs, and
    # the 15-epoch cosine horizon the candidate followed
    assert net.config["epochs"] == chosen and net.config["lr_horizon"] == 15
    direct = build_for_dataset("gch", ds, 16, seed=3, **SMALL, epochs=chosen, lr_horizon=15)
    direct.fit(ds.features("image", rows), ds.features("text", rows), ds.labels[rows])
    q = ds.part("query")
    saved = load_checkpoint(tmp_path / "run")
    for a, b in zip(_codes(saved, ds, q), _codes(direct, ds, q)):
        np.testing.assert_array_equal(a, b)


def test_no_refit_keeps_the_model_validation_scored(tmp_path):
    net = train("gch", SPEC, 16, seed=3, out=tmp_path / "run", epochs=10, options=SMALL,
                validation=0.2, refit=False, evaluate=False, progress=False, **QUIET)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert info["train"]["items"] == 200 and info["train"]["refit"] is False
    # the kept model is the validated epoch's, trained on the 200 rows left after the (at least 100) validation rows
    ds = load_dataset(SPEC)
    ds.hold_out_validation(0.2)
    tr = ds.part("train")
    again = build_for_dataset("gch", ds, 16, seed=3, **SMALL, epochs=10)
    again.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr],
              validation=(ds.features("image", ds.part("validation")), ds.features("text", ds.part("validation")),
                          ds.labels[ds.part("validation")]))
    assert again.selection == info["selection"]
    q = ds.part("query")
    for a, b in zip(_codes(net, ds, q), _codes(again, ds, q)):
        np.testing.assert_array_equal(a, b)


def test_cli_train_refits_by_default_and_says_so(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--model", "dcmh-mlp", "--bits", "16", "--dataset", SPEC,
                               "--epochs", "5", "--set", "hidden=32", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "training again on all 300 training rows (validation included) for 5 epochs" in res.output
    res = runner.invoke(main, ["train", "--model", "dcmh-mlp", "--bits", "16", "--dataset", SPEC,
                               "--epochs", "5", "--set", "hidden=32", "--no-refit", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "training again" not in res.output
    items = [json.loads((tmp_path / d / "config.json").read_text())["train"]["items"] for d in "ab"]
    assert items == [300, 200]  # validation takes at least 100 rows


def test_a_users_own_npz_gets_gch_with_its_defaults_and_validation_choices(tmp_path):
    # bring-your-own-data: arrays in an .npz (no split in it), gch's defaults but for size
    from hashret.models.gch import GCH

    rng = np.random.default_rng(5)
    labels = np.eye(4, dtype=np.float32)[rng.integers(0, 4, 240)]
    centres = rng.normal(size=(4, 9)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", image=labels @ centres + 0.3 * rng.normal(size=(240, 9)).astype(np.float32),
             text=labels @ rng.normal(size=(4, 20)).astype(np.float32), labels=labels)
    net = train("gch", str(tmp_path / "mine.npz"), 16, seed=0, out=tmp_path / "run", epochs=10,
                options=SMALL, evaluate=True, progress=False)
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {k: v for k, v in info["config"].items() if k in GCH.defaults and k not in SMALL and k != "epochs"
            and k != "lr_horizon"} == {k: v for k, v in GCH.defaults.items() if k not in SMALL and k not in
                                       ("epochs", "lr_horizon")}
    assert info["selection"]["epochs"] in (5, 10) and info["train"]["refit"] is True
    assert net.config["epochs"] == info["selection"]["epochs"]
    assert (tmp_path / "run" / "split.npz").is_file() and info["eval"]["map_all"]["i2t"] > 0.5
