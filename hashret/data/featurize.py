"""Featurizers: tags / free text to bag-of-words, raw pixels to a small hand-made descriptor."""

from __future__ import annotations

import re

import numpy as np
import scipy.sparse as sp

from hashret.errors import HashretError, check

_WORD = re.compile(r"[a-z0-9_]+")


class BagOfWords:
    """Map tag lists or free text onto a fixed vocabulary (binary bag-of-words, CSR)."""

    def __init__(self, vocab):
        self.vocab = [str(w).strip().lower() for w in vocab]
        check(len(self.vocab) > 0, "the vocabulary is empty: pass the dataset's vocab.txt")
        self.index = {}
        for i, word in enumerate(self.vocab):
            self.index.setdefault(word, i)

    def __len__(self):
        return len(self.vocab)

    @staticmethod
    def tokenize(text: str) -> list:
        """Split free text or a comma-separated tag string into lower-case words."""
        return _WORD.findall(text.lower())

    def transform(self, docs, split_tags: str | None = ",") -> sp.csr_matrix:
        """``docs``: tag strings ('a,b,c') or lists of words. Unknown words are ignored."""
        rows, cols = [], []
        for r, doc in enumerate(docs):
            words = self._words(doc, split_tags)
            for w in words:
                j = self.index.get(w)
                if j is not None:
                    rows.append(r)
                    cols.append(j)
        data = np.ones(len(rows), dtype=np.float32)
        m = sp.csr_matrix((data, (rows, cols)), shape=(len(docs), len(self.vocab)), dtype=np.float32)
        m.data[:] = 1.0  # duplicates summed by the constructor: a tag is present or not
        return m

    def encode_query(self, text: str):
        """One free-text query -> (dense 1 x V vector, known words, unknown words)."""
        words = self.tokenize(text)
        known = [w for w in words if w in self.index]
        unknown = [w for w in words if w not in self.index]
        if not known:
            shown = ", ".join(unknown[:8]) if unknown else "(no words)"
            raise HashretError(f"no word of the query is in the vocabulary ({shown}): "
                               "use words from the dataset's tag vocabulary")
        vec = np.zeros((1, len(self.vocab)), dtype=np.float32)
        vec[0, [self.index[w] for w in known]] = 1.0
        return vec, known, unknown

    @staticmethod
    def _words(doc, split_tags):
        if isinstance(doc, str):
            if split_tags and split_tags in doc:
                return [t.strip().lower() for t in doc.split(split_tags) if t.strip()]
            return doc.strip().lower().split() if doc.strip() else []
        return [str(w).strip().lower() for w in doc]


def pixels_to_features(images, layout: str = "auto", grid: int = 4, bins: int = 8) -> np.ndarray:
    """A small colour/layout descriptor for raw pixel arrays (N images).

    Used only when a dataset ships pixels (the DCMH ``IAll`` array) and no CNN features:
    per-cell mean colour on a ``grid`` x ``grid`` layout plus a per-channel histogram.
    It is far weaker than CNN features; prefer precomputed features where you have them.
    """
    x = np.asarray(images)
    check(x.ndim == 4, f"pixel arrays must be 4-D (N, C, H, W) or (N, H, W, C), got {x.shape}")
    if layout == "auto":
        layout = "nchw" if x.shape[1] in (1, 3) else "nhwc"
    if layout == "nhwc":
        x = np.transpose(x, (0, 3, 1, 2))
    n, c, h, w = x.shape
    check(h >= grid and w >= grid, f"images of {h}x{w} pixels are smaller than the {grid}x{grid} grid")
    scale = 255.0 if x.dtype.kind in "ui" or x.max() > 1.5 else 1.0
    out = np.empty((n, c * grid * grid + c * bins), dtype=np.float32)
    hs = np.linspace(0, h, grid + 1).astype(int)
    ws = np.linspace(0, w, grid + 1).astype(int)
    for start in range(0, n, 256):  # chunks keep a 20k x 3 x 224 x 224 array out of float64
        xb = x[start:start + 256].astype(np.float32) / scale
        cells = [xb[:, :, hs[i]:hs[i + 1], ws[j]:ws[j + 1]].mean(axis=(2, 3))
                 for i in range(grid) for j in range(grid)]
        layout_part = np.stack(cells, axis=2).reshape(len(xb), -1)
        q = np.clip((xb * bins).astype(np.int64), 0, bins - 1).reshape(len(xb), c, -1)
        hist = np.stack([np.stack([np.bincount(q[k, ch], minlength=bins) for ch in range(c)])
                         for k in range(len(xb))]).reshape(len(xb), -1).astype(np.float32)
        hist /= float(h * w)
        out[start:start + len(xb)] = np.concatenate([layout_part, hist], axis=1)
    return out
