"""One dataset shape for every source: features of two modalities, labels, ids and a split."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hashret.errors import HashretError, check

MODALITIES = ("image", "text")
SPLIT_PARTS = ("query", "train", "database")


def _as_index(values, part):
    arr = np.asarray(values)
    if arr.size == 0:
        raise HashretError(f"the {part} split is empty: give it at least one item")
    if arr.dtype.kind == "b":
        raise HashretError(f"the {part} split is a boolean mask: pass row indices instead")
    if arr.dtype.kind not in "iu":
        if arr.dtype.kind == "f" and np.all(np.mod(arr, 1) == 0):
            arr = arr.astype(np.int64)
        else:
            raise HashretError(f"the {part} split holds non-integer values: pass 0-based row indices")
    return arr.astype(np.int64).ravel()


@dataclass(frozen=True)
class Split:
    """Row indices of the query, training and database (retrieval) parts of a dataset.

    The evaluation protocol wants queries and database disjoint; the training items
    are usually drawn from the database (Wikipedia: train is the database).
    """

    query: np.ndarray
    train: np.ndarray
    database: np.ndarray
    seed: int | None = None
    note: str = ""
    # held out from training for every choice a method makes (epochs, settings); empty = none
    validation: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    def __post_init__(self):
        for part in SPLIT_PARTS:
            object.__setattr__(self, part, _as_index(getattr(self, part), part))
        val = np.asarray(self.validation)
        object.__setattr__(self, "validation", _as_index(val, "validation") if val.size else
                           np.empty(0, dtype=np.int64))

    def carve_validation(self, fraction: float = 0.1, seed: int = 0, at_least: int = 100) -> "Split":
        """A copy whose training part gives up a seeded random ``fraction`` (at least
        ``at_least`` rows, at most half) as the validation part; the test queries are never
        touched. Validation queries are scored against the remaining training rows."""
        check(len(self.validation) == 0, "this split already has a validation part")
        check(0 < fraction < 1, f"validation fraction must be in (0, 1), got {fraction}")
        n = len(self.train)
        size = min(max(int(round(fraction * n)), at_least), n // 2)
        check(size > 0, f"the training part ({n} rows) is too small to carve a validation part from")
        rng = np.random.default_rng(seed)
        val = np.sort(rng.choice(self.train, size=size, replace=False))
        return Split(self.query, np.setdiff1d(self.train, val), self.database, seed=self.seed,
                     note=f"{self.note}; validation: {size} rows carved from train, seed {seed}".lstrip("; "),
                     validation=val)

    def validate(self, n_items: int) -> "Split":
        for part in SPLIT_PARTS:
            idx = getattr(self, part)
            check(len(idx) > 0 or part == "train", f"the {part} split is empty: a split needs "
                  "queries and database items")
            if len(idx) == 0:
                continue
            check(idx.min() >= 0 and idx.max() < n_items,
                  f"the {part} split points outside the dataset (rows 0..{n_items - 1}): "
                  "rebuild the split for this dataset")
            check(len(np.unique(idx)) == len(idx),
                  f"the {part} split lists a row twice: give each row once")
        overlap = np.intersect1d(self.query, self.database)
        check(overlap.size == 0,
              f"{overlap.size} rows are both queries and database items: the protocol "
              "needs disjoint query and database parts")
        seen = np.intersect1d(self.query, self.train)
        check(seen.size == 0,
              f"{seen.size} query rows are also training rows (e.g. row {int(seen[0]) if seen.size else -1}): "
              "a model must not train on the queries it is scored on; draw train from the database part")
        val = self.validation
        if len(val):
            check(val.min() >= 0 and val.max() < n_items and len(np.unique(val)) == len(val),
                  f"the validation split points outside the dataset (rows 0..{n_items - 1}) or lists a "
                  "row twice: carve it again")
            for part in ("query", "train"):
                both = np.intersect1d(val, getattr(self, part))
                check(both.size == 0, f"{both.size} validation rows are also {part} rows (e.g. row "
                      f"{int(both[0]) if both.size else -1}): the validation part must be disjoint from "
                      "the queries and the rows a model trains on; carve it again")
        return self

    def sizes(self) -> dict:
        out = {part: int(len(getattr(self, part))) for part in SPLIT_PARTS}
        if len(self.validation):
            out["validation"] = int(len(self.validation))
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part in SPLIT_PARTS:
            h.update(getattr(self, part).astype("<i8").tobytes())
            h.update(b"|")
        if len(self.validation):  # splits without one keep the fingerprints they always had
            h.update(b"validation:" + self.validation.astype("<i8").tobytes())
        return h.hexdigest()[:16]

    def save(self, path, dataset: str = "", n_items: int | None = None) -> Path:
        """Write the split as ``.npz`` (written to a temp file, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"dataset": dataset, "n_items": n_items, "seed": self.seed, "note": self.note,
                "fingerprint": self.fingerprint()}
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, query=self.query, train=self.train, database=self.database,
                     validation=self.validation, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path, n_items: int | None = None) -> "Split":
        path = Path(path)
        check(path.is_file(), f"split file {path} does not exist: pass the split.npz saved beside the results")
        try:
            with np.load(path, allow_pickle=False) as z:
                parts = {part: z[part] for part in SPLIT_PARTS}
                if "validation" in z.files:
                    parts["validation"] = z["validation"]
                meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
        except Exception as exc:  # zip, npy and JSON readers fail in many ways on a damaged file
            raise HashretError(f"split file {path} is unreadable or corrupt ({type(exc).__name__}: "
                               f"{exc}): re-create it, or train again") from None
        split = cls(**parts, seed=meta.get("seed"), note=meta.get("note", ""))
        saved_n = meta.get("n_items")
        if n_items is not None:
            check(saved_n in (None, n_items),
                  f"split file {path} was made for {saved_n} items, the dataset has {n_items}: "
                  "use the split saved with this dataset")
            split.validate(n_items)
        return split


def random_split(n_items: int, n_query: int, n_train: int, seed: int = 0,
                 train_from_database: bool = True) -> Split:
    """The DCMH protocol's split: random queries, the rest is the database, training drawn from it."""
    check(0 < n_query < n_items, f"cannot draw {n_query} queries from {n_items} items: "
          "ask for fewer queries")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_items)
    query, database = np.sort(perm[:n_query]), perm[n_query:]
    pool = database if train_from_database else perm
    n_train = min(n_train, len(pool))
    train = np.sort(rng.choice(pool, size=n_train, replace=False))
    return Split(query, train, np.sort(database), seed=seed,
                 note=f"random: {n_query} query, {n_train} train from database, seed {seed}")


def _check_matrix(name, matrix, n_rows, what):
    if matrix is None:
        return None
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float32)
        data = matrix.data
    else:
        matrix = np.asarray(matrix)
        if matrix.dtype.kind not in "biuf":
            raise HashretError(f"{name}: {what} features are not numeric ({matrix.dtype}): "
                               "pass a numeric matrix")
        matrix = np.ascontiguousarray(matrix, dtype=np.float32)
        data = matrix
    check(matrix.ndim == 2, f"{name}: {what} features must be a 2-D matrix (items x dims), "
          f"got shape {matrix.shape}")
    check(matrix.shape[0] == n_rows,
          f"{name}: {what} features have {matrix.shape[0]} rows but there are {n_rows} label rows: "
          "each item needs one row of each")
    check(matrix.shape[1] > 0, f"{name}: {what} features have zero columns")
    if not np.isfinite(data).all():
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise HashretError(f"{name}: {what} features hold {bad} NaN/inf values: clean or impute "
                           "them before loading")
    return matrix


@dataclass
class CrossModalDataset:
    """Image features, text features, multi-hot labels, item ids and a split.

    ``image`` is an (N, d_i) float32 array, or None where the source has no image side;
    ``text`` is (N, d_t), dense or a scipy CSR bag-of-words. ``synthetic`` is True for any
    data with generated parts, and the name then says so.
    """

    name: str
    image: np.ndarray | None
    text: np.ndarray | sp.csr_matrix | None
    labels: np.ndarray
    ids: np.ndarray | None = None
    split: Split | None = None
    synthetic: bool = False
    label_names: list | None = None
    vocab: list | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)
    # per-item payload fields from a user's file (name -> one value per item), stored by
    # build-index with each item beside its key, label names and tags
    payload_fields: dict | None = None

    def __post_init__(self):
        labels = np.asarray(self.labels)
        if labels.ndim == 1:  # class indices -> one-hot
            check(labels.dtype.kind in "iu", f"{self.name}: 1-D labels must be class indices")
            labels = np.eye(int(labels.max()) + 1, dtype=np.uint8)[labels]
        check(labels.ndim == 2, f"{self.name}: labels must be (items x classes), got {labels.shape}")
        check(labels.shape[0] > 0, f"{self.name}: the dataset has no items")
        if not np.isfinite(labels.astype(np.float64)).all():
            raise HashretError(f"{self.name}: labels hold NaN/inf values: labels must be 0/1")
        check(np.isin(labels, (0, 1)).all(), f"{self.name}: labels must be multi-hot 0/1 values")
        self.labels = labels.astype(np.uint8)
        n = labels.shape[0]
        self.image = _check_matrix(self.name, self.image, n, "image")
        self.text = _check_matrix(self.name, self.text, n, "text")
        check(self.image is not None or self.text is not None, f"{self.name}: no features at all")
        if self.ids is None:
            self.ids = np.array([str(i) for i in range(n)])
        self.ids = np.asarray(self.ids).astype(str)
        check(len(self.ids) == n, f"{self.name}: {len(self.ids)} ids for {n} items")
        for name, values in (self.payload_fields or {}).items():
            check(len(values) == n, f"{self.name}: payload_{name} has {len(values)} values for {n} "
                  "items: one per item")
        if self.vocab is not None and self.text is not None:
            check(self.text.shape[1] == len(self.vocab), f"{self.name}: the vocabulary has "
                  f"{len(self.vocab)} words but the text features {self.text.shape[1]} columns: "
                  "one word per column")
        if self.label_names is not None:
            check(len(self.label_names) == labels.shape[1], f"{self.name}: {len(self.label_names)} "
                  f"label names for {labels.shape[1]} label columns: one name per column")
        if self.split is not None:
            self.split.validate(n)

    # -- sizes -------------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return int(self.labels.shape[0])

    @property
    def n_labels(self) -> int:
        return int(self.labels.shape[1])

    def dim(self, modality: str) -> int:
        m = self._matrix(modality)
        return int(m.shape[1])

    def has(self, modality: str) -> bool:
        return self._raw(modality) is not None

    # -- access ------------------------------------------------------------------------------
    def _raw(self, modality):
        if modality not in MODALITIES:
            raise HashretError(f"unknown modality {modality!r}: use 'image' or 'text'")
        return self.image if modality == "image" else self.text

    def _matrix(self, modality):
        m = self._raw(modality)
        if m is None:
            raise HashretError(f"{self.name} has no {modality} features: use a dataset with both "
                               "modalities (e.g. wikipedia or a synthetic one)")
        return m

    def features(self, modality: str, rows=None) -> np.ndarray:
        """Dense float32 features of ``modality`` for ``rows`` (all rows when None)."""
        m = self._matrix(modality)
        if rows is not None:
            m = m[np.asarray(rows)]
        if sp.issparse(m):
            m = m.toarray()
        return np.ascontiguousarray(m, dtype=np.float32)

    def part(self, name: str) -> np.ndarray:
        """Row indices of a split part: 'query', 'train', 'database' or 'validation'."""
        check(self.split is not None, f"{self.name} has no split: give one or use random_split")
        check(name in SPLIT_PARTS + ("validation",),
              f"unknown split part {name!r}: use one of {', '.join(SPLIT_PARTS)}, validation")
        if name == "validation":
            check(len(self.split.validation) > 0, f"{self.name}'s split has no validation part: "
                  "carve one with Split.carve_validation")
        return getattr(self.split, name)

    def refit_rows(self) -> np.ndarray:
        """The training part with the validation rows carved from it, sorted: what a model is
        trained on again once validation has made its choices (the papers train on every
        training row; the validation rows are also database items)."""
        return np.sort(np.concatenate([self.part("train"), self.split.validation]))

    def hold_out_validation(self, share: float, seed: int = 0):
        """Carve ``share`` of the training part as the validation part (unless the split has
        one already; 0 = none) and return the validation rows' (image, text, labels) for
        ``HashModel.fit``, or None when there are none."""
        check(0 <= share < 1, f"`validation` must be a share in [0, 1), got {share}")
        if share > 0 and len(self.split.validation) == 0:
            self.split = self.split.carve_validation(share, seed=seed).validate(self.n_items)
        if len(self.split.validation) == 0:
            return None
        rows = self.split.validation
        return self.features("image", rows), self.features("text", rows), self.labels[rows]

    def summary(self) -> dict:
        out = {"name": self.name, "items": self.n_items, "labels": self.n_labels,
               "synthetic": self.synthetic, "source": self.source,
               "image_dim": self.dim("image") if self.has("image") else None,
               "text_dim": self.dim("text") if self.has("text") else None,
               "text_sparse": bool(sp.issparse(self.text)) if self.has("text") else None,
               "labels_per_item": round(float(self.labels.sum(1).mean()), 3)}
        if self.split is not None:
            out["split"] = self.split.sizes()
        return out

    def fingerprint(self) -> str:
        """A short hash of the labels, sizes and split: identifies the data a model was fit on."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        for mod in MODALITIES:
            h.update(str(self.dim(mod) if self.has(mod) else None).encode())
        if self.split is not None:
            h.update(self.split.fingerprint().encode())
        return h.hexdigest()[:16]
