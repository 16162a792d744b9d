"""What every hash model shares: a resolved config, input standardisation, sign codes, and a
state made only of arrays (so a checkpoint loads with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import copy

import numpy as np

from hashret.data.dataset import MODALITIES
from hashret.errors import HashretError, check
from hashret.index.bits import sign_codes

REGISTRY: dict = {}


def resolve_device(device) -> str:
    """'cpu', 'cuda', 'cuda:N' or 'auto' (the GPU when there is one); a clear error otherwise."""
    import torch

    device = str(device or "cpu").lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        check(torch.cuda.is_available(), f"device {device!r} asked for, but torch sees no GPU "
              "here: use `device=cpu`")
        return device
    check(device == "cpu", f"unknown device {device!r}: use cpu, cuda, cuda:N or auto")
    return device


def adam(params, lr: float, weight_decay: float = 0.0):
    """Adam as every torch model here trains: ``fused``, the whole update of all of a net's
    tensors in one kernel. On CPU torch's default is a loop of ~10 ops per tensor and
    ``foreach`` still ~1.1 ms a step for a 512-wide MLP; fused takes ~0.38 ms (2 threads), the
    same update up to floating-point order (max |diff| 3e-8 after 50 steps)."""
    import torch

    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def register(cls):
    """Class decorator: make a model buildable by its ``name`` through the factory."""
    REGISTRY[cls.name] = cls
    return cls


class HashModel:
    """A cross-modal hash model: two hash functions (image, text) into one Hamming space.

    Subclasses set ``name``, ``defaults`` (config fields with default values) and implement
    ``_fit(image, text, labels)``, ``_project(x, modality)`` (real-valued outputs of
    already standardised features) and the array state (``_state`` / ``_load_state``).
    """

    name = "base"
    supervised = True
    defaults: dict = {}

    def __init__(self, bits: int, image_dim: int, text_dim: int, n_labels: int, seed: int = 0,
                 **overrides):
        check(int(bits) > 0 and int(bits) % 8 == 0,
              f"code length {bits} is not a positive multiple of 8: use 16, 32, 64 or 128")
        unknown = sorted(set(overrides) - set(self.defaults))
        check(not unknown, f"{self.name} has no config field {', '.join(unknown)}: known fields "
              f"are {', '.join(sorted(self.defaults)) or 'none'}")
        self.config = {"model": self.name, "bits": int(bits), "image_dim": int(image_dim),
                       "text_dim": int(text_dim), "n_labels": int(n_labels), "seed": int(seed),
                       **copy.deepcopy(self.defaults), **overrides}
        self.stats: dict = {}
        self.selection: dict = {}  # what validation chose (fit with validation rows; saved in config.json)
        self.fitted = False

    @property
    def bits(self) -> int:
        return self.config["bits"]

    # -- training ------------------------------------------------------------------------
    def fit(self, image, text, labels, progress: bool = False, device: str = "cpu", validation=None):
        """Train on (N, d_i) image features, (N, d_t) text features and (N, c) labels.
        ``device`` is used by the torch models ("cpu", "cuda", "cuda:1", ...).
        ``validation``: (image, text, labels) of held-out rows (never the test queries). Models
        trained by epochs then keep the epoch whose validation mAP is best (queries: these rows,
        database: the training rows; I->T and T->I averaged); every model records its
        validation mAP in ``self.selection``."""
        image, text, labels = self._checked_part(image, text, labels, "training")
        for mod, x in (("image", image), ("text", text)):
            mean = x.mean(axis=0)
            std = x.std(axis=0)
            self.stats[mod] = (mean.astype(np.float32), np.where(std > 1e-8, std, 1.0).astype(np.float32))
        image, text = self._standardise(image, "image"), self._standardise(text, "text")
        self.selection, self._validation, self._best_state = {}, None, None
        if validation is not None:
            vi, vt, vl = self._checked_part(*validation, "validation")
            self._validation = {"query": {"image": self._standardise(vi, "image"),
                                          "text": self._standardise(vt, "text")}, "query_labels": vl,
                                "database": {"image": image, "text": text}, "database_labels": labels}
        try:
            self._fit(image, text, labels, progress=progress, device=resolve_device(device))
            self._keep_best()
            if self._validation is not None and not self.selection:
                self.selection = self._validation_map()
        finally:
            self._validation = None
        self.fitted = True
        return self

    def _checked_part(self, image, text, labels, what):
        image = np.asarray(image, dtype=np.float32)
        text = np.asarray(text, dtype=np.float32)
        labels = np.asarray(labels, dtype=np.float32)
        self._check_input(image, "image")
        self._check_input(text, "text")
        check(len(image) == len(text) == len(labels),
              f"{what} parts differ in length: {len(image)} images, {len(text)} texts, "
              f"{len(labels)} label rows")
        check(len(labels) > 0, f"the {what} part is empty")
        check(labels.ndim == 2 and labels.shape[1] == self.config["n_labels"],
              f"{what} labels have {labels.shape[-1]} classes, the model was configured for "
              f"{self.config['n_labels']}")
        return image, text, labels

    def _validation_map(self) -> dict:
        """mAP@all of the model as it stands on the validation rows (standardised inputs)."""
        from hashret.metrics import map_all

        v = self._validation
        codes = {(m, part): sign_codes(np.asarray(self._project(v[part][m], m), dtype=np.float32))
                 for m in MODALITIES for part in ("query", "database")}
        out = {d: round(float(map_all(codes[(a, "query")], codes[(b, "database")], v["query_labels"],
                                      v["database_labels"])), 6)
               for d, a, b in (("i2t", "image", "text"), ("t2i", "text", "image"))}
        out["mean"] = round((out["i2t"] + out["t2i"]) / 2, 6)
        return {"map_val": out}

    def _fit(self, image, text, labels, progress=False, device="cpu"):
        raise NotImplementedError

    def _keep_best(self):
        """After training: models that choose their epoch on validation restore it."""

    def stopped_config(self) -> dict:
        """The config fields that train this model again to where validation stopped it (the
        chosen epoch count; empty when nothing was chosen) -- what a refit overrides."""
        return {"epochs": self.selection["epochs"]} if "epochs" in self.selection else {}

    # -- encoding ------------------------------------------------------------------------
    def project(self, x, modality: str) -> np.ndarray:
        """Real-valued hash-layer outputs (N, bits) for raw features of ``modality``."""
        check(self.fitted, f"the {self.name} model is not trained: fit it or load a checkpoint")
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        self._check_input(x, modality)
        if len(x) == 0:
            return np.zeros((0, self.bits), dtype=np.float32)
        out = np.asarray(self._project(self._standardise(x, modality), modality), dtype=np.float32)
        if not np.isfinite(out).all():
            raise HashretError(f"the {self.name} model produced non-finite outputs: retrain with a "
                               "lower learning rate")
        return out

    def encode(self, x, modality: str) -> np.ndarray:
        """Codes in {-1, +1} (int8), sign(0) -> +1."""
        return sign_codes(self.project(x, modality))

    def encode_rows(self, dataset, modality: str, rows, batch_size: int = 65536) -> np.ndarray:
        """Codes of a dataset's ``rows``, densified batch by batch (a million sparse
        bag-of-words rows would not fit in memory as one dense matrix)."""
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.bits), dtype=np.int8)
        for s in range(0, len(rows), batch_size):
            out[s:s + batch_size] = self.encode(dataset.features(modality, rows[s:s + batch_size]), modality)
        return out

    def _project(self, x, modality):
        raise NotImplementedError

    # -- helpers -------------------------------------------------------------------------
    def _check_input(self, x, modality):
        check(modality in MODALITIES, f"unknown modality {modality!r}: use 'image' or 'text'")
        want = self.config[f"{modality}_dim"]
        check(x.ndim == 2, f"{modality} features must be 2-D (items x dims), got shape {x.shape}")
        check(x.shape[1] == want, f"{modality} features have {x.shape[1]} dimensions but the "
              f"{self.name} model takes {want}: use features from the dataset it was trained on")
        if not np.isfinite(x).all():
            raise HashretError(f"{modality} features hold NaN/inf values: clean them first")

    def _standardise(self, x, modality):
        mean, std = self.stats[modality]
        return (x - mean) / std

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Flat name -> array mapping (numpy or torch), standardisation included."""
        out = {}
        for mod, (mean, std) in self.stats.items():
            out[f"stats.{mod}.mean"] = mean
            out[f"stats.{mod}.std"] = std
        for k, v in self._state().items():
            out[f"model.{k}"] = v
        return out

    def load_state_dict(self, state: dict):
        state = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                 for k, v in state.items()}
        for mod in MODALITIES:
            if f"stats.{mod}.mean" in state:
                self.stats[mod] = (state[f"stats.{mod}.mean"], state[f"stats.{mod}.std"])
        self._load_state({k[6:]: v for k, v in state.items() if k.startswith("model.")})
        self.fitted = True
        self._probe()
        return self

    def _probe(self):
        """Weights from another run can load without complaint and fail only when encoding:
        one zero input per modality must give ``bits`` outputs."""
        for mod in MODALITIES:
            dim = self.config.get(f"{mod}_dim")
            if not dim:
                continue
            try:
                out = np.asarray(self._project(self._standardise(np.zeros((1, dim), np.float32), mod), mod))
            except Exception as exc:  # noqa: BLE001 -- any failure means the arrays do not fit
                raise HashretError(f"the {mod} side fails on a {dim}-d input ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
            check(out.shape == (1, self.bits), f"the {mod} side gives {out.shape[-1]} outputs where the "
                  f"config says {self.bits} bits")

    def _state(self) -> dict:
        raise NotImplementedError

    def _load_state(self, state: dict):
        raise NotImplementedError


class TorchHashModel(HashModel):
    """A hash model whose networks live in ``self.nets`` (an nn.ModuleDict made by ``_build``).
    ``_fit`` calls :meth:`_epoch_done` after every epoch; with validation rows, the best
    epoch's weights are kept (``fit`` restores them through :meth:`_keep_best`)."""

    VAL_EVERY = 5  # epochs between validation scores (and the last epoch)

    def _build(self):
        raise NotImplementedError

    def _epoch_done(self, epoch: int, total: int):
        if self._validation is None or ((epoch + 1) % self.VAL_EVERY and epoch + 1 != total):
            return
        score = self._validation_map()["map_val"]
        curve = self.selection.setdefault("curve", [])
        curve.append([epoch + 1, score["mean"]])
        best = self.selection.get("map_val")
        if best is None or score["mean"] > best["mean"]:
            self.selection.update(map_val=score, epochs=epoch + 1)
            self._best_state = {k: v.detach().clone() for k, v in self.nets.state_dict().items()}

    def _keep_best(self):
        if self._best_state is not None:
            self.nets.load_state_dict(self._best_state)
            self._best_state = None

    def _state(self):
        return {k: v.detach().clone() for k, v in self.nets.state_dict().items()}

    def _load_state(self, state):
        import torch

        self._build()
        self.nets.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        self.nets.eval()
