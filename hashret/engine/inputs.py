"""What a query or a build reads: feature files (``.npy``), dataset items by row or key, and
the payload stored with each indexed item."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hashret.errors import HashretError, NotFoundError, check

OTHER = {"image": "text", "text": "image"}


def is_matcher(model) -> bool:
    return getattr(model, "kind", None) == "matcher"


def payloads(ds, rows) -> list:
    """Per item: its key, label names, (tag data) its tags and (a user's file) its payload
    fields -- built per batch, since slicing a CSR matrix row by row costs ~20 us each."""
    rows = np.asarray(rows)
    out = [{"key": str(k)} for k in ds.ids[rows]]
    for name, values in (ds.payload_fields or {}).items():
        for p, v in zip(out, np.asarray(values)[rows].tolist()):  # numpy scalars -> JSON's
            p[name] = v
    if ds.label_names is not None:
        names = np.asarray(ds.label_names, dtype=object)
        lab = ds.labels[rows].astype(bool)
        for p, m in zip(out, lab):
            p["labels"] = names[m].tolist()
    import scipy.sparse as sp  # only where a dataset is open, which loaded it already

    if ds.vocab is not None and ds.has("text") and sp.issparse(ds.text):
        sub = ds.text[rows]
        vocab = np.asarray(ds.vocab, dtype=object)
        for p, a, b in zip(out, sub.indptr[:-1], sub.indptr[1:]):
            p["tags"] = " ".join(vocab[sub.indices[a:b]])
    return out


def read_array(path, what: str) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (``what``: 'image', 'region', ... for the
    messages); HashretError naming the file if it is missing or not a ``.npy``."""
    path = Path(path)
    check(path.is_file(), f"feature file {path} does not exist: pass a .npy of {what} features")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HashretError(f"cannot read {path} as .npy ({exc}): save features with numpy.save") from None


def read_features(path, dim: int, what: str) -> np.ndarray:
    """float32 (N, ``dim``) feature rows from the ``.npy`` file ``path``, checked."""
    path = Path(path)
    check(path.is_file(), f"feature file {path} does not exist: pass a .npy of {what} features")
    try:
        x = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HashretError(f"cannot read {path} as .npy ({exc}): save features with numpy.save") from None
    x = np.atleast_2d(np.asarray(x, dtype=np.float32))
    check(x.ndim == 2 and x.shape[1] == dim, f"{path} holds features of shape {x.shape}, the model's "
          f"{what} side takes {dim} dimensions: use features from the same extractor")
    check(len(x) > 0, f"{path} holds no feature rows: the query is empty")
    return x


def item_row_in(n, item, name) -> int:
    s = str(item).strip()
    check(s.lstrip("-").isdigit(), f"unknown item {s!r}: give a row number")
    row = int(s)
    if not 0 <= row < n:
        raise NotFoundError(f"unknown item {row}: {name} has rows 0..{n - 1} on that side")
    return row


def item_row(ds, item) -> int:
    s = str(item).strip()
    if s.lstrip("-").isdigit():
        row = int(s)
        if not 0 <= row < ds.n_items:
            raise NotFoundError(f"unknown item {row}: {ds.name} has rows 0..{ds.n_items - 1}")
        return row
    hits = np.flatnonzero(ds.ids == s)
    if len(hits) == 0:
        raise NotFoundError(f"unknown item {s!r}: not a row number or key of {ds.name}")
    return int(hits[0])
