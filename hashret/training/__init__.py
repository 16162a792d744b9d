"""Training entry point shared by ``hashret train`` and Python users."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch

from hashret.data import load_dataset
from hashret.errors import check
from hashret.metrics import evaluate_model
from hashret.models import build_for_dataset, save_checkpoint


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(model: str | None = "dcmh-mlp", dataset: str | None = None, bits: int | None = 64,
          seed: int = 0, out="runs/model", data_root=None, epochs: int | None = None,
          device: str = "cpu", options: dict | None = None, evaluate: bool = True,
          progress: bool = True, log=print, distill_from=None, validation: float = 0.1,
          refit: bool = True):
    """Train ``model`` on the training part of ``dataset`` and write a checkpoint to ``out``
    (weights.pt, config.json with the resolved config, split.npz). With ``evaluate``, mAP@all
    of both directions on the dataset's query/database parts is logged and saved in the
    checkpoint's config.json. ``validation``: the share of the training part held out
    (seeded, saved in split.npz; 0 = none) on which models trained by epochs choose their
    epoch count; the choice and its validation mAP go to config.json. With ``refit`` (and
    validation rows) the model is then trained once more, with what validation chose, on the
    whole training part, validation rows included -- as ``benchmarks/mAP.py`` does, so the
    checkpoint has seen every training row (a tenth of the database otherwise never trained
    on); ``refit=False`` keeps the model validation scored. Returns the trained model.

    Matchers (sgraf, cgam, han, shan, global) train on a scene dataset (``scenes`` or
    ``precomp:FOLDER``) through :func:`hashret.training.matching.train_scene_model`, with
    their distilled hash head; ``distill_from`` trains only the head of a trained matcher."""
    from hashret.models.matchers import MATCHERS

    if model in MATCHERS or distill_from is not None:
        from hashret.training.matching import train_scene_model

        return train_scene_model(model=model, dataset=dataset or "scenes",
                                 bits=bits or 64, seed=seed, out=out, epochs=epochs, device=device,
                                 options=options, distill_from=distill_from, evaluate=evaluate,
                                 progress=progress, log=log)
    check(model is not None, "no model given: pass --model (see 'hashret models')")
    dataset = dataset or "wikipedia"
    options = dict(options or {})
    if epochs is not None:
        options["epochs"] = int(epochs)
    ds = load_dataset(dataset, data_root=data_root)
    for mod in ("image", "text"):
        check(ds.has(mod), f"dataset {ds.name} has no {mod} features to train on: use "
              f"{ds.name}+synthetic-image or a dataset with both modalities")
    val = ds.hold_out_validation(validation)
    seed_everything(seed)
    net = build_for_dataset(model, ds, bits, seed=seed, **options)
    tr = ds.part("train")
    tag = "SYNTHETIC " if ds.synthetic else ""
    log(f"training {net.name} ({net.bits} bits, seed {seed}) on {tag}{ds.name}: {len(tr)} items"
        + (f", {len(val[2])} held out for validation" if val is not None else ""))
    t0 = time.perf_counter()
    net.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr], progress=progress,
            device=device, validation=val)
    selection = net.selection
    if "epochs" in selection:
        log(f"kept epoch {selection['epochs']} of {net.config['epochs']} (best validation mAP "
            f"{selection['map_val']['mean']:.4f})")
    refit = bool(refit and val is not None)
    if refit:
        tr = ds.refit_rows()
        seed_everything(seed)
        net = build_for_dataset(model, ds, bits, seed=seed, **{**options, **net.stopped_config()})
        log(f"training again on all {len(tr)} training rows (validation included)"
            + (f" for {net.config['epochs']} epochs" if "epochs" in selection else ""))
        net.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr], progress=progress,
                device=device)
    fit_s = time.perf_counter() - t0
    extra = {"dataset_spec": dataset, "data_root": str(data_root) if data_root else None,
             "train": {"seconds": round(fit_s, 2), "device": device, "items": int(len(tr)),
                       "refit": refit},
             "selection": selection}
    q, db = ds.part("query"), ds.part("database")
    if evaluate and len(q) * len(db) > 2e8:
        log(f"skipping the mAP of {len(q)} x {len(db)} pairs (minutes): run benchmarks/mAP.py for it")
        evaluate = False
    if evaluate:
        results, _ = evaluate_model(net, ds, topk=(100,), n_max=1)
        res = {name: r["map_all"] for name, r in results.items()}
        extra["eval"] = {"map_all": res, "queries": int(len(q)), "database": int(len(db))}
        log(f"mAP@all: I→T {res['i2t']:.4f}, T→I {res['t2i']:.4f} ({fit_s:.1f} s training)")
    save_checkpoint(out, net, dataset=ds, extra=extra)
    log(f"wrote {Path(out)}")
    return net
