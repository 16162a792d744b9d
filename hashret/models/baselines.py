"""Peer baselines, so that every mAP table has peers measured in the same run.

- ``cca-itq`` (unsupervised; Gong et al. 2013): regularised CCA between the modalities
  (over RBF anchor features, so that more directions than the raw dimensions exist), then an
  ITQ rotation learned on both projected modalities together.
- ``label-ridge`` (supervised, SePH/SCM-like in spirit): each training item's target code is
  the sign of the sum of its labels' codewords (rows of a Hadamard matrix: pairwise maximally
  distant); one kernel ridge regression per modality maps RBF anchor features onto it.
- ``dcmh-mlp`` (supervised, deep; Jiang & Li 2017 over features): two MLPs trained by DCMH's
  alternating scheme: the pairwise likelihood between the modalities' outputs, a quantisation
  term towards the shared codes B = sign(F + G) and a bit-balance term.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch import nn

from hashret.models.base import HashModel, TorchHashModel, adam, register
from hashret.models.losses import label_similarity, pairwise_nll


# -- shared pieces ---------------------------------------------------------------------------
def _sq_dists(x, anchors):
    return np.maximum((x * x).sum(1)[:, None] + (anchors * anchors).sum(1)[None, :]
                      - 2.0 * x @ anchors.T, 0.0)


def rbf_features(x, anchors, sigma):
    return np.exp(-_sq_dists(x, anchors) / (2.0 * sigma * sigma)).astype(np.float32)


def choose_anchors(x, m, rng):
    """m anchor rows drawn from x and an RBF width from the mean anchor distance."""
    idx = rng.choice(len(x), size=min(m, len(x)), replace=False)
    anchors = x[idx].astype(np.float32)
    sample = x[rng.choice(len(x), size=min(len(x), 1000), replace=False)]
    sigma = float(np.sqrt(_sq_dists(sample, anchors)).mean())
    return anchors, max(sigma, 1e-6)


def itq_rotation(v, bits, iters, rng):
    """ITQ (Gong & Lazebnik): R with orthonormal rows (r x bits, r <= bits) minimising
    ||sign(VR) - VR||_F. With r < bits (Wikipedia's text has 10 dimensions) it spreads r
    directions over more bits, which plain square ITQ cannot."""
    r = v.shape[1]
    rot = np.linalg.qr(rng.standard_normal((bits, bits)))[0][:r]
    for _ in range(iters):
        codes = np.where(v @ rot >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ codes, full_matrices=False)  # orthogonal Procrustes
        rot = u @ wt
    return rot.astype(np.float32)


def label_codewords(n_labels, bits, rng):
    """(n_labels, bits) +-1 codewords: Hadamard rows (pairwise distance bits/2) where they fit."""
    if n_labels < bits and bits & (bits - 1) == 0:
        h = scipy.linalg.hadamard(bits).astype(np.float32)
        return h[1 + rng.permutation(bits - 1)[:n_labels]]  # skip the all-ones row
    return np.where(rng.standard_normal((n_labels, bits)) >= 0, 1.0, -1.0).astype(np.float32)


class _AnchorFeatures:
    """Per-modality RBF anchor map held as plain arrays in the model state."""

    def __init__(self, n_anchors, seed):
        self.n_anchors, self.seed = n_anchors, seed
        self.anchors, self.sigma = {}, {}

    def fit_transform(self, x, modality, rng):
        self.anchors[modality], self.sigma[modality] = choose_anchors(x, self.n_anchors, rng)
        return self.transform(x, modality)

    def transform(self, x, modality):
        return rbf_features(x, self.anchors[modality], self.sigma[modality])

    def state(self):
        out = {}
        for mod in self.anchors:
            out[f"{mod}.anchors"] = self.anchors[mod]
            out[f"{mod}.sigma"] = np.array(self.sigma[mod], dtype=np.float32)
        return out

    @classmethod
    def from_model_state(cls, config, state):
        """Rebuild from a model state whose anchor entries are prefixed 'kernel.'."""
        kernel = cls(config["anchors"], config["seed"])
        kernel.load({k[7:]: v for k, v in state.items() if k.startswith("kernel.")})
        return kernel

    def load(self, state):
        for key, value in state.items():
            mod, what = key.split(".", 1)
            if what == "anchors":
                self.anchors[mod] = value.astype(np.float32)
            else:
                self.sigma[mod] = float(value)


# -- CCA-ITQ ---------------------------------------------------------------------------------
@register
class CCAITQ(HashModel):
    """anchors = 0 (default): linear CCA on the standardised features; anchors > 0: CCA over
    RBF anchor features. Directions are scaled by their canonical correlations (weak ones
    count less), then rotated by ITQ."""

    name = "cca-itq"
    supervised = False
    defaults = {"anchors": 0, "reg": 1e-1, "itq_iters": 50}

    def _fit(self, image, text, labels, progress=False, device="cpu"):
        cfg = self.config
        rng = np.random.default_rng(cfg["seed"])
        self.kernel = _AnchorFeatures(cfg["anchors"], cfg["seed"])
        x, y = image.astype(np.float64), text.astype(np.float64)
        if cfg["anchors"] > 0:
            x = self.kernel.fit_transform(image, "image", rng).astype(np.float64)
            y = self.kernel.fit_transform(text, "text", rng).astype(np.float64)
        self.mean = {"image": x.mean(0), "text": y.mean(0)}
        x, y = x - self.mean["image"], y - self.mean["text"]
        n = len(x)

        def inv_sqrt(c):
            c = c + cfg["reg"] * np.trace(c) / len(c) * np.eye(len(c))
            w, v = np.linalg.eigh(c)
            return (v / np.sqrt(np.maximum(w, 1e-12))) @ v.T

        wx, wy = inv_sqrt(x.T @ x / n), inv_sqrt(y.T @ y / n)
        u, corr, vt = np.linalg.svd(wx @ (x.T @ y / n) @ wy)
        k = min(self.bits, len(corr))
        self.proj = {"image": (wx @ u[:, :k] * corr[:k]).astype(np.float32),
                     "text": (wy @ vt.T[:, :k] * corr[:k]).astype(np.float32)}
        v = np.vstack([x @ self.proj["image"], y @ self.proj["text"]])
        self.rotation = itq_rotation(v, self.bits, cfg["itq_iters"], rng)

    def _features(self, x, modality):
        return self.kernel.transform(x, modality) if self.config["anchors"] > 0 else x

    def _project(self, x, modality):
        f = self._features(x, modality) - self.mean[modality]
        return f @ self.proj[modality] @ self.rotation

    def _state(self):
        out = {f"kernel.{k}": v for k, v in self.kernel.state().items()}
        for mod in ("image", "text"):
            out[f"mean.{mod}"] = self.mean[mod].astype(np.float32)
            out[f"proj.{mod}"] = self.proj[mod]
        out["rotation"] = self.rotation
        return out

    def _load_state(self, state):
        self.kernel = _AnchorFeatures.from_model_state(self.config, state)
        self.mean = {m: state[f"mean.{m}"] for m in ("image", "text")}
        self.proj = {m: state[f"proj.{m}"] for m in ("image", "text")}
        self.rotation = state["rotation"]


# -- label codewords + kernel ridge ----------------------------------------------------------
@register
class LabelRidge(HashModel):
    name = "label-ridge"
    defaults = {"anchors": 500, "ridge": 1.0}

    def _fit(self, image, text, labels, progress=False, device="cpu"):
        cfg = self.config
        rng = np.random.default_rng(cfg["seed"])
        self.codewords = label_codewords(labels.shape[1], self.bits, rng)
        target = np.where(labels @ self.codewords >= 0, 1.0, -1.0)
        self.kernel = _AnchorFeatures(cfg["anchors"], cfg["seed"])
        self.weights = {}
        for mod, x in (("image", image), ("text", text)):
            phi = self._with_bias(self.kernel.fit_transform(x, mod, rng)).astype(np.float64)
            gram = phi.T @ phi + cfg["ridge"] * np.eye(phi.shape[1])
            self.weights[mod] = np.linalg.solve(gram, phi.T @ target).astype(np.float32)

    @staticmethod
    def _with_bias(phi):
        return np.hstack([phi, np.ones((len(phi), 1), dtype=phi.dtype)])

    def _project(self, x, modality):
        return self._with_bias(self.kernel.transform(x, modality)) @ self.weights[modality]

    def _state(self):
        out = {f"kernel.{k}": v for k, v in self.kernel.state().items()}
        out.update({f"weights.{m}": w for m, w in self.weights.items()})
        out["codewords"] = self.codewords
        return out

    def _load_state(self, state):
        self.kernel = _AnchorFeatures.from_model_state(self.config, state)
        self.weights = {m: state[f"weights.{m}"] for m in ("image", "text")}
        self.codewords = state["codewords"]


# -- DCMH-style MLP pair ---------------------------------------------------------------------
def mlp(d_in, hidden, d_out, depth=1):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


@register
class DCMHMLP(TorchHashModel):
    name = "dcmh-mlp"
    # eta (DCMH's bit-balance weight) defaults to 0: on precomputed features any weight tried
    # cost mAP (Wikipedia, 32 bits, T->I: 0.71 at eta=0, 0.62 at 1e-3, 0.12 at 1e-2).
    defaults = {"hidden": 512, "epochs": 60, "batch_size": 128, "lr": 1e-2,
                "weight_decay": 1e-5, "gamma": 1.0, "eta": 0.0}

    def _build(self):
        cfg = self.config
        torch.manual_seed(cfg["seed"])
        self.nets = nn.ModuleDict({"image": mlp(cfg["image_dim"], cfg["hidden"], self.bits),
                                   "text": mlp(cfg["text_dim"], cfg["hidden"], self.bits)})

    def _fit(self, image, text, labels, progress=False, device="cpu"):
        from tqdm.auto import tqdm

        cfg = self.config
        self._build()
        self.nets.to(device)
        gen = torch.Generator().manual_seed(cfg["seed"])
        feats = {"image": torch.from_numpy(image).to(device), "text": torch.from_numpy(text).to(device)}
        lab = torch.from_numpy(labels).to(device)
        n = len(lab)
        with torch.no_grad():
            buf = {m: self.nets[m](feats[m]) for m in feats}  # F (image) and G (text)
        codes = torch.sign(buf["image"] + buf["text"])
        codes[codes == 0] = 1
        opts = {m: adam(self.nets[m].parameters(), cfg["lr"], cfg["weight_decay"]) for m in feats}
        self.updates = {m: 0 for m in feats}  # optimiser steps per net (benchmarks/train_speed.py)
        bar = tqdm(range(cfg["epochs"]), desc="dcmh-mlp", disable=not progress, leave=False)
        for epoch in bar:
            for mod, other in (("image", "text"), ("text", "image")):
                self.nets[mod].train()
                perm = torch.randperm(n, generator=gen).to(device)
                for s in range(0, n, cfg["batch_size"]):
                    idx = perm[s:s + cfg["batch_size"]]
                    out = self.nets[mod](feats[mod][idx])
                    sim = label_similarity(lab[idx], lab)
                    theta = 0.5 * out @ buf[other].T
                    total = buf[mod].sum(0) - buf[mod][idx].sum(0) + out.sum(0)
                    loss = (pairwise_nll(theta, sim)
                            + cfg["gamma"] * ((codes[idx] - out) ** 2).sum()
                            + cfg["eta"] * (total ** 2).sum()) / (len(idx) * n)
                    opts[mod].zero_grad()
                    loss.backward()
                    opts[mod].step()
                    self.updates[mod] += 1
                    buf[mod][idx] = out.detach()
            codes = torch.sign(buf["image"] + buf["text"])
            codes[codes == 0] = 1
            bar.set_postfix(loss=float(loss.detach()))
            self._epoch_done(epoch, cfg["epochs"])
        self.nets.to("cpu").eval()

    def _project(self, x, modality):
        net = self.nets[modality]
        net.eval()
        dev = next(net.parameters()).device  # also called mid-training, for validation scores
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x)).to(dev)).cpu().numpy()

