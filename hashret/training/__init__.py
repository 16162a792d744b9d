"""Training entry point shared by ``hashret train`` and Python users."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from hashret.data import load_dataset
from hashret.errors import check
from hashret.metrics import evaluate_model
from hashret.models import build_for_dataset, save_checkpoint

log = logging.getLogger(__name__)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(model: str | None = "dcmh-mlp", dataset: str | None = None, bits: int | None = 64,
          seed: int = 0, out="runs/model", data_root=None, epochs: int | None = None,
          device: str = "cpu", options: dict | None = None, evaluate: bool = True,
          progress: bool = True, distill_from=None, validation: float = 0.1,
          refit: bool = True):
    """Train a hash model on the training part of a dataset and write a checkpoint.

    Parameters
    ----------
    model : str
        A model name (``hashret models``): ``gch``, ``dcmh-mlp``, ``cca-itq``, ``label-ridge``,
        ... or a matcher (``sgraf``, ``cgam``, ``han``, ``shan``, ``global``), which trains on
        scene data with its distilled hash head.
    dataset : str, optional
        A dataset name or spec (default ``wikipedia``; ``scenes`` for a matcher).
    bits : int, default 64
        Code length.
    seed : int, default 0
    out : str or os.PathLike
        The RUN_DIR written: ``weights.pt``, ``config.json`` (the resolved config, the data's
        fingerprint, the epoch choice), ``split.npz``.
    epochs : int, optional
        Epochs of a model trained by epochs; by default the config's, cut to the best on
        validation.
    device : str, default "cpu"
        ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    options : dict, optional
        Config fields (``--set key=value``).
    evaluate : bool, default True
        Score mAP@all of both directions on the query/database parts, saved in config.json.
    validation : float, default 0.1
        Share of the training part held out (seeded, saved) to choose the epoch count on;
        0 = none. ``refit`` (default) trains again with that choice on the whole training part.
    distill_from : str or os.PathLike, optional
        A trained matcher's RUN_DIR: train only its hash head.

    Returns
    -------
    HashModel or MatcherModel
        The trained model (also written to ``out``).

    Raises
    ------
    HashretError
        An unknown model or dataset, or a setting the model does not take.

    Examples
    --------
    >>> import hashret, numpy as np
    >>> SPEC = "synthetic:n_items=500,n_query=50,n_train=250,n_labels=5,image_dim=16,text_dim=40"
    >>> model = hashret.train("label-ridge", SPEC, bits=32, out=tmp / "run", progress=False, evaluate=False)
    >>> model.encode(np.zeros((2, 16), np.float32), "image").shape
    (2, 32)
    """
    from hashret.models.matchers import MATCHERS

    if model in MATCHERS or distill_from is not None:
        from hashret.training.matching import train_scene_model

        return train_scene_model(model=model, dataset=dataset or "scenes",
                                 bits=bits or 64, seed=seed, out=out, epochs=epochs, device=device,
                                 options=options, distill_from=distill_from, evaluate=evaluate,
                                 progress=progress)
    check(model is not None, "no model given: pass `model` (see 'hashret models')")
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
    log.info(f"training {net.name} ({net.bits} bits, seed {seed}) on {tag}{ds.name}: {len(tr)} items"
        + (f", {len(val[2])} held out for validation" if val is not None else ""))
    t0 = time.perf_counter()
    net.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr], progress=progress,
            device=device, validation=val)
    selection = net.selection
    if "epochs" in selection:
        log.info(f"kept epoch {selection['epochs']} of {net.config['epochs']} (best validation mAP "
            f"{selection['map_val']['mean']:.4f})")
    refit = bool(refit and val is not None)
    if refit:
        tr = ds.refit_rows()
        seed_everything(seed)
        net = build_for_dataset(model, ds, bits, seed=seed, **{**options, **net.stopped_config()})
        log.info(f"training again on all {len(tr)} training rows (validation included)"
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
        log.info(f"skipping the mAP of {len(q)} x {len(db)} pairs (minutes): run benchmarks/mAP.py for it")
        evaluate = False
    if evaluate:
        results, _ = evaluate_model(net, ds, topk=(100,), n_max=1)
        res = {name: r["map_all"] for name, r in results.items()}
        extra["eval"] = {"map_all": res, "queries": int(len(q)), "database": int(len(db))}
        log.info(f"mAP@all: I→T {res['i2t']:.4f}, T→I {res['t2i']:.4f} ({fit_s:.1f} s training)")
    save_checkpoint(out, net, dataset=ds, extra=extra)
    log.info(f"wrote {Path(out)}")
    return net
