"""Synthetic cross-modal data with planted multi-label structure (always named synthetic).

labels -> latent semantic vector -> image features (dense, non-negative, CNN-like) and a
text bag-of-words sampled from a label-dependent word distribution. Used for scale runs
and wherever the real data lacks a modality.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from hashret.data.dataset import CrossModalDataset, random_split
from hashret.errors import check


def _sample_labels(rng, n, c, per_item):
    # popularity falls off like real tag data: a few frequent concepts, many rare ones
    pop = 1.0 / np.arange(1, c + 1) ** 0.7
    pop = rng.permutation(pop / pop.sum())
    k = np.clip(1 + rng.poisson(max(per_item - 1.0, 0.0), size=n), 1, c)
    # Gumbel top-k draws k distinct labels per row with probability ~ popularity
    keys = np.log(pop)[None, :] + rng.gumbel(size=(n, c))
    order = np.argsort(-keys, axis=1)
    labels = np.zeros((n, c), dtype=np.uint8)
    mask = np.arange(c)[None, :] < k[:, None]
    rows = np.repeat(np.arange(n), c).reshape(n, c)
    labels[rows[mask], order[mask]] = 1
    return labels


def _latent(rng, labels, latent_dim, noise, prototypes=None):
    c = labels.shape[1]
    if prototypes is None:
        prototypes = rng.standard_normal((c, latent_dim)).astype(np.float32)
    z = labels.astype(np.float32) @ prototypes
    z /= np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-6)
    z += noise * rng.standard_normal(z.shape).astype(np.float32) / np.sqrt(latent_dim)
    return z, prototypes


def synthetic_image_features(rng, z, dim, noise):
    w = rng.standard_normal((z.shape[1], dim)).astype(np.float32)
    x = z @ w + noise * rng.standard_normal((z.shape[0], dim)).astype(np.float32)
    return np.maximum(x, 0.0).astype(np.float32)


def synthetic_bag_of_words(rng, z, vocab_size, words_per_item, sharpness=3.0, chunk=4096):
    """Each row draws ~Poisson(words_per_item) words from softmax(sharpness * z W)."""
    w = rng.standard_normal((z.shape[1], vocab_size)).astype(np.float32)
    n = z.shape[0]
    rows_all, cols_all = [], []
    for s in range(0, n, chunk):
        zb = z[s:s + chunk]
        logits = sharpness * (zb @ w)  # rows of z have unit norm, so logits ~ N(0, sharpness^2)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        cdf = np.cumsum(p, axis=1)
        cdf[:, -1] = 1.0
        m = max(int(words_per_item * 2), 4)
        counts = np.clip(rng.poisson(words_per_item, size=len(zb)), 1, m)
        u = rng.random((len(zb), m))
        # one searchsorted over all rows: row r's cdf shifted by r
        flat = (cdf + np.arange(len(zb))[:, None]).ravel()
        pos = np.searchsorted(flat, (u + np.arange(len(zb))[:, None]).ravel())
        cols = pos.reshape(len(zb), m) - np.arange(len(zb))[:, None] * vocab_size
        cols = np.clip(cols, 0, vocab_size - 1)
        keep = np.arange(m)[None, :] < counts[:, None]
        rows_all.append((np.arange(len(zb))[:, None] + s).repeat(m, 1)[keep])
        cols_all.append(cols[keep])
    rows = np.concatenate(rows_all)
    cols = np.concatenate(cols_all)
    bow = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, vocab_size))
    bow.data[:] = 1.0
    return bow


def make_synthetic(n_items: int = 20015, n_labels: int = 24, image_dim: int = 512,
                   text_dim: int = 1386, latent_dim: int = 64, labels_per_item: float = 3.0,
                   noise: float = 0.6, image_noise: float = 1.0, words_per_item: float = 8.0,
                   n_query: int = 2000, n_train: int = 10000, seed: int = 0) -> CrossModalDataset:
    """A MIRFlickr-sized synthetic set by default (20,015 items, 24 labels, 2,000 queries,
    10,000 train from the 18,015 database items). ``noise`` blurs the label -> latent map
    (how separable the classes are); ``image_noise`` adds feature noise on top."""
    check(n_items > 2 and n_labels > 0 and image_dim > 0 and text_dim > 0,
          "synthetic data needs n_items > 2 and positive sizes")
    check(0 < n_query < n_items, f"n_query must lie in 1..{n_items - 1}")
    rng = np.random.default_rng(seed)
    labels = _sample_labels(rng, n_items, n_labels, labels_per_item)
    z, _ = _latent(rng, labels, latent_dim, noise)
    image = synthetic_image_features(rng, z, image_dim, image_noise)
    text = synthetic_bag_of_words(rng, z, text_dim, words_per_item)
    split = random_split(n_items, n_query, n_train, seed=seed)
    params = dict(n_items=n_items, n_labels=n_labels, image_dim=image_dim, text_dim=text_dim,
                  latent_dim=latent_dim, labels_per_item=labels_per_item, noise=noise,
                  image_noise=image_noise, words_per_item=words_per_item, seed=seed)
    return CrossModalDataset(
        name="synthetic", image=image, text=text, labels=labels,
        ids=np.array([f"syn{i}" for i in range(n_items)]), split=split, synthetic=True,
        label_names=[f"concept{j}" for j in range(n_labels)],
        vocab=[f"w{j}" for j in range(text_dim)],
        source="synthetic generator (planted label -> latent -> features structure)",
        extra={"generator": params})


def attach_synthetic_image(ds: CrossModalDataset, image_dim: int = 512, noise: float = 0.6,
                           image_noise: float = 1.0, latent_dim: int = 64,
                           seed: int = 0) -> CrossModalDataset:
    """Give a text+labels dataset a synthetic image side generated from its real labels."""
    rng = np.random.default_rng(seed)
    z, _ = _latent(rng, ds.labels, latent_dim, noise)
    image = synthetic_image_features(rng, z, image_dim, image_noise)
    return CrossModalDataset(
        name=f"{ds.name}+synthetic-image", image=image, text=ds.text, labels=ds.labels,
        ids=ds.ids, split=ds.split, synthetic=True, label_names=ds.label_names, vocab=ds.vocab,
        source=f"{ds.source}; image side SYNTHETIC from the real labels",
        extra={**ds.extra, "synthetic_image": dict(image_dim=image_dim, noise=noise,
                                                    image_noise=image_noise, seed=seed)})
