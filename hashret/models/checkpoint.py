"""A checkpoint is a folder: ``weights.pt`` (a flat dict of tensors: ``torch.load`` with
``weights_only=True``), ``config.json`` (the resolved config, the dataset's name and
fingerprint) and ``split.npz``. Each file is written to a temporary name and renamed;
``config.json`` is written last, so a folder with it is complete."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from hashret.errors import CorruptError, HashretError, check, os_problem

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


def _read(path: Path) -> bytes:
    """Every checkpoint file is read here, once per :class:`Checkpoint`."""
    with open(path, "rb") as fh:
        return fh.read()


def _atomic_write(path: Path, write):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(run_dir, model, dataset=None, extra: dict | None = None) -> Path:
    """Write ``model`` (and the dataset's split) to ``run_dir``."""
    from hashret import __version__

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v)))
               for k, v in model.state_dict().items()}
    _atomic_write(run_dir / "weights.pt", lambda fh: torch.save(tensors, fh))
    info = {"format_version": FORMAT_VERSION, "hashret_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": model.config}
    if dataset is not None:
        info["dataset"] = {"name": dataset.name, "fingerprint": dataset.fingerprint(),
                           "synthetic": dataset.synthetic, "items": dataset.n_items}
        if dataset.split is not None:
            dataset.split.save(run_dir / "split.npz", dataset=dataset.name, n_items=dataset.n_items)
    if extra:
        info.update(extra)
    _atomic_write(run_dir / "config.json",
                  lambda fh: fh.write(json.dumps(info, indent=2, sort_keys=True).encode()))
    return run_dir


def read_checkpoint_info(run_dir) -> dict:
    """config.json of a checkpoint, checked: present, JSON, of this format, with every field
    the model needs (a HashretError naming the file and the field otherwise)."""
    run_dir = Path(run_dir)
    check(run_dir.is_dir(), f"checkpoint folder {run_dir} does not exist: pass a RUN_DIR written "
          "by 'hashret train'")
    cfg = run_dir / "config.json"
    check(cfg.is_file(), f"{run_dir} has no config.json: the checkpoint is incomplete; train again")
    try:
        info = json.loads(_read(cfg).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise CorruptError(f"{cfg} is corrupt ({type(exc).__name__}: {exc}): train again") from None
    check(isinstance(info, dict) and isinstance(info.get("config"), dict),
          f"{cfg} is not a hashret checkpoint config (no 'config' object): train again")
    check(info.get("format_version") == FORMAT_VERSION,
          f"{run_dir} has checkpoint format {info.get('format_version')}, this hashret reads "
          f"{FORMAT_VERSION}: retrain with this version")
    _check_config(cfg, info)
    return info


def _check_config(path: Path, info: dict):
    config = info["config"]

    def need(field, kind, lo=None):
        v = config.get(field)
        ok = isinstance(v, kind) and not isinstance(v, bool) and (lo is None or v >= lo)
        check(ok, f"{path}: config field '{field}' is {'missing' if field not in config else repr(v)}"
              f"{'' if lo is None else f', not an integer >= {lo}'}: the checkpoint is damaged; train again")

    need("model", str)
    need("bits", int, 1)
    need("seed", int)
    if config.get("kind") == "matcher":
        need("region_dim", int, 1)
        vocab = info.get("vocab")
        check(isinstance(vocab, list) and all(isinstance(w, str) for w in vocab),
              f"{path}: the field 'vocab' (the matcher's word list) is missing or not a list of "
              "words: the checkpoint is damaged; train again")
    else:
        for field in ("image_dim", "text_dim", "n_labels"):
            need(field, int, 0)


class Checkpoint:
    """A trained model's folder, each file read once.

    Parameters
    ----------
    path : str or os.PathLike
        A RUN_DIR written by ``hashret train`` (``config.json``, ``weights.pt``, ``split.npz``).

    Attributes
    ----------
    path : pathlib.Path
    info : dict
        ``config.json``, checked: the model's resolved config under ``"config"``, the
        dataset's name and fingerprint under ``"dataset"``.
    fingerprint : str
        16 hex digits identifying the weights and config (what an index records).
    model : HashModel or MatcherModel
        The trained model, built on first use.

    Raises
    ------
    HashretError
        The folder, ``config.json`` or a config field is missing or of another format.
    CorruptError
        ``config.json`` or ``weights.pt`` cannot be read.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.info = read_checkpoint_info(self.path)
        self.config = self.info["config"]
        self._weights: bytes | None = None
        self._fingerprint: str | None = None
        self._model = None
        self._datasets: dict = {}

    @classmethod
    def of(cls, checkpoint) -> "Checkpoint":
        """``checkpoint`` itself if it is a :class:`Checkpoint`, else the one in that folder."""
        return checkpoint if isinstance(checkpoint, cls) else cls(checkpoint)

    def _weight_bytes(self) -> bytes:
        if self._weights is None:
            weights = self.path / "weights.pt"
            check(weights.is_file(), f"{self.path} has no weights.pt: the checkpoint is incomplete; train again")
            try:
                self._weights = _read(weights)
            except OSError as exc:
                raise HashretError(f"cannot read {weights}: {os_problem(exc)}") from None
        return self._weights

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha256()
            # the data an index's items come from is part of what it was built with
            h.update(json.dumps({"config": self.config, "dataset_spec": self.info.get("dataset_spec"),
                                 "data_root": self.info.get("data_root")}, sort_keys=True).encode())
            h.update(self._weight_bytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    @property
    def model(self):
        if self._model is None:
            _ = self.fingerprint  # from the same bytes the weights load from
            self._model = _build(self.path, self.info, self._weight_bytes())
            self._weights = None
        return self._model

    def dataset(self, dataset=None, data_root=None):
        """The dataset the model was trained on (with its saved split), or ``dataset`` if
        given; loaded once per (dataset, data_root)."""
        key = (dataset, None if data_root is None else str(data_root))
        if key not in self._datasets:
            self._datasets[key] = _dataset(self.path, self.info, dataset, data_root)
        return self._datasets[key]


def load_checkpoint(run_dir):
    """The trained model in ``run_dir``.

    Parameters
    ----------
    run_dir : str or os.PathLike
        A RUN_DIR written by ``hashret train`` (or :func:`hashret.train`).

    Returns
    -------
    HashModel or MatcherModel
        The model, its weights loaded; ``model.encode(features, modality)`` gives +-1 codes.

    Raises
    ------
    HashretError
        A file or config field is missing, or the weights do not fit the config.
    CorruptError
        A file cannot be read.

    Examples
    --------
    >>> import hashret
    >>> SPEC = "synthetic:n_items=500,n_query=50,n_train=250,n_labels=5,image_dim=16,text_dim=40"
    >>> _ = hashret.train("label-ridge", SPEC, bits=32, out=tmp / "run", progress=False, evaluate=False)
    >>> model = hashret.load_checkpoint(tmp / "run")
    >>> model.bits, model.config["model"]
    (32, 'label-ridge')
    """
    return Checkpoint.of(run_dir).model


def _build(run_dir: Path, info: dict, weights: bytes):
    from hashret.models import build_model

    cfg = dict(info["config"])
    name = cfg.pop("model")
    try:
        if cfg.pop("kind", None) == "matcher":
            from hashret.models.distill import MatcherModel, saved_head_fields

            cfg, warning = saved_head_fields(cfg)
            if warning:
                log.warning(f"{run_dir}: {warning}")
            dims = {k: cfg.pop(k) for k in ("bits", "region_dim", "seed")}
            cfg.pop("vocab_size", None)
            model = MatcherModel(name, vocab=info["vocab"], **dims, **cfg)
        else:
            dims = {k: cfg.pop(k) for k in ("bits", "image_dim", "text_dim", "n_labels", "seed")}
            model = build_model(name, **dims, **cfg)
    except HashretError as exc:
        raise HashretError(f"{run_dir}/config.json: {exc}") from None
    except (TypeError, ValueError, KeyError) as exc:
        raise HashretError(f"{run_dir}/config.json does not describe a model this hashret builds "
                           f"({type(exc).__name__}: {exc}): train again") from None
    model = _load_weights(run_dir, model, info, weights)
    if "selection" in info and hasattr(model, "selection"):
        model.selection = info["selection"]
    return model


def _load_weights(run_dir, model, info, data: bytes):
    import io

    weights = run_dir / "weights.pt"
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CorruptError(f"{weights} is unreadable ({type(exc).__name__}): the checkpoint is "
                           "corrupt; train again") from None
    check(isinstance(state, dict), f"{weights} does not hold a dict of tensors: train again")
    try:
        model.load_state_dict(state)
    except HashretError as exc:
        raise HashretError(f"{weights} does not fit {run_dir}/config.json ({exc}): the files come "
                           "from different runs or are damaged; train again") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "mismatch" in ln or "key" in ln.lower()),
                      first[0] if first else type(exc).__name__)
        raise HashretError(f"{weights} does not fit {run_dir}/config.json ({detail[:200]}): the "
                           "files come from different runs or are damaged; train again") from None
    model.checkpoint_info = info
    return model


def checkpoint_dataset(run_dir, dataset=None, data_root=None):
    """The dataset a checkpoint was trained on (with its saved split), or ``dataset`` if given."""
    return Checkpoint.of(run_dir).dataset(dataset, data_root)


def _dataset(run_dir: Path, info: dict, dataset, data_root):
    from hashret.data import load_dataset
    from hashret.data.scenes import is_scene_spec, load_scenes

    spec = info.get("dataset_spec")
    if dataset is None:
        check(spec is not None, f"{run_dir} does not record its dataset: pass `dataset`")
        dataset = spec
        data_root = data_root or info.get("data_root")
    if is_scene_spec(dataset):
        return load_scenes(dataset)
    own = dataset == spec
    split = run_dir / "split.npz" if own and (run_dir / "split.npz").is_file() else None
    ds = load_dataset(dataset, data_root=data_root, split=split)
    want = (info.get("dataset") or {}).get("fingerprint")
    if own and want is not None and ds.fingerprint() != want:
        raise HashretError(f"the data {run_dir} was trained on ({spec}) no longer matches it: its "
                           f"split.npz is {'missing' if split is None else 'another one'} or the data "
                           "files changed; restore them, or pass `dataset` to use other data on purpose")
    return ds


def fingerprint(run_dir) -> str:
    """Identifies a trained model: a hash of its weights file and its config."""
    return Checkpoint.of(run_dir).fingerprint


def encode(run_dir, modality: str, features=None, part: str = "database", dataset=None,
           data_root=None, packed: bool = True):
    """Codes from a checkpoint's student for ``modality``: of ``features`` if given, else of
    the dataset's ``part`` ('query', 'train', 'database' or 'all'). Packed uint8
    (np.packbits order, +1 -> 1) by default, else int8 +-1. Returns (codes, row indices)."""
    from hashret.index.bits import pack_codes

    ck = Checkpoint.of(run_dir)
    model = ck.model
    if getattr(model, "kind", None) == "matcher":
        if features is not None:
            check(modality == "image", "a matcher's text side takes captions, not a feature file: "
                  "encode a dataset part (`part`) instead")
            codes = model.encode(np.asarray(features, dtype=np.float32), "image")
            rows = np.arange(len(codes))
        else:
            check(part != "all", "scene data is encoded one part at a time: pass `part`")
            p = ck.dataset(dataset, data_root).part(part)
            rows = p.rows(modality)
            codes = model.encode_rows(p, modality, rows)
        return (pack_codes(codes) if packed else codes), rows
    if features is not None:
        rows = np.arange(len(np.atleast_2d(features)))
        codes = model.encode(np.atleast_2d(np.asarray(features, dtype=np.float32)), modality)
    else:
        ds = ck.dataset(dataset, data_root)
        rows = np.arange(ds.n_items) if part == "all" else ds.part(part)
        codes = model.encode_rows(ds, modality, rows)
    return (pack_codes(codes) if packed else codes), rows
