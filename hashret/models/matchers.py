"""Fine-grained image-text matchers over region sets and word sequences: SGRAF (SGR, SAF and
their average), CGAM, HAN, SHAN, and a global mean-pooled (VSE-style) baseline.

Every matcher splits scoring in two, so a gallery is encoded once and only the cross part
runs per pair: ``encode_image(regions, mask)`` and ``encode_text(tokens, lengths)`` give
per-item encodings, ``pair_scores(img, txt)`` scores every image against every caption
(an n_img x n_txt matrix). Masks mark real regions / words; padding never reaches a score.
Notes on each model: ``shared/design/models.md``.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import nn

NEG = -1e4  # masked logits; finite so fully masked rows stay NaN-free


def l2norm(x, dim=-1, eps=1e-8):
    return x / x.norm(dim=dim, keepdim=True).clamp_min(eps)


def masked_softmax(logits, mask, dim=-1):
    return torch.softmax(logits.masked_fill(~mask, NEG), dim=dim) * mask


def masked_mean(x, mask, dim):
    """Mean of x over ``dim`` where mask is True (mask broadcast on x's trailing dim)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def masked_max(x, mask, dim):
    """Max of x over ``dim`` where mask is True; 0 where nothing is (mask as in masked_mean)."""
    m = mask.unsqueeze(-1)
    out = x.masked_fill(~m, NEG).amax(dim)
    return torch.where(m.any(dim), out, torch.zeros_like(out))


def cosine(a, b, dim=-1):
    return (l2norm(a, dim) * l2norm(b, dim)).sum(dim)


# -- shared encoders -----------------------------------------------------------------------
class RegionEncoder(nn.Module):
    """Region features -> embed (a linear map, as SCAN/SGRAF's precomp encoder), L2-normalised."""

    def __init__(self, d_in, embed):
        super().__init__()
        self.fc = nn.Linear(d_in, embed)

    def forward(self, regions, mask):
        return l2norm(self.fc(regions)) * mask.unsqueeze(-1)


class TextEncoder(nn.Module):
    """Learned word embeddings -> Bi-GRU (the two directions averaged), L2-normalised."""

    def __init__(self, vocab_size, word_dim, embed):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.gru = nn.GRU(word_dim, embed, batch_first=True, bidirectional=True)

    def forward(self, tokens, lengths):
        lengths = lengths.clamp_min(1)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        if (len(tokens) <= 8 and tokens.device.type == "cpu"
                and not (self.training or torch.is_grad_enabled())):
            # a query (or a few): compiled, ~5x faster than torch's GRU on one caption; from
            # ~10 captions on torch's batched steps win (12 words: 8 -> 0.60 vs 0.74 ms,
            # 16 -> 1.4 vs 0.76 ms)
            return _query_text_encoding(self.embed, self.gru, tokens, lengths), mask
        if bool((lengths == tokens.shape[1]).all()):
            # nothing padded: packing would only cost time (~0.2 ms a query)
            out, _ = self.gru(self.embed(tokens))
        else:
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(),
                                                       batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        half = out.shape[-1] // 2
        return l2norm((out[..., :half] + out[..., half:]) / 2) * mask.unsqueeze(-1), mask


@njit(cache=True, nogil=True)
def _bigru_mean_kernel(emb, tokens, lengths, w_ih, b_ih, w_hh, b_hh, out):
    """A one-layer bidirectional GRU over each caption's real words (the backward direction
    starts at its last real word, as through a packed sequence), the two directions averaged
    and L2-normalised into ``out`` (N, L, h), zero past a caption's end. emb (V, d); w_ih
    (2, d, 3h) and w_hh (2, h, 3h) transposed per direction, gates ordered r, z, n as torch's."""
    n_cap, n_tok = tokens.shape
    hd = w_hh.shape[1]
    g3 = 3 * hd
    out[:] = 0.0
    gi = np.empty(g3, dtype=out.dtype)
    gh = np.empty(g3, dtype=out.dtype)
    h = np.empty(hd, dtype=out.dtype)
    for i in range(n_cap):
        n = max(1, min(lengths[i], n_tok))
        for d in range(2):
            h[:] = 0.0
            for s in range(n):
                t = s if d == 0 else n - 1 - s
                x = emb[tokens[i, t]]
                gi[:] = b_ih[d]
                for k in range(x.shape[0]):         # rows of W^T: the inner loop vectorises
                    xk = x[k]
                    for j in range(g3):
                        gi[j] += xk * w_ih[d, k, j]
                gh[:] = b_hh[d]
                for k in range(hd):
                    hk = h[k]
                    for j in range(g3):
                        gh[j] += hk * w_hh[d, k, j]
                for j in range(hd):
                    r = 1.0 / (1.0 + np.exp(-(gi[j] + gh[j])))
                    z = 1.0 / (1.0 + np.exp(-(gi[hd + j] + gh[hd + j])))
                    c = np.tanh(gi[2 * hd + j] + r * gh[2 * hd + j])
                    h[j] = c + z * (h[j] - c)
                for j in range(hd):
                    out[i, t, j] += 0.5 * h[j]
        for t in range(n):
            sq = 0.0
            for j in range(hd):
                sq += out[i, t, j] * out[i, t, j]
            scale = 1.0 / max(np.sqrt(sq), 1e-8)
            for j in range(hd):
                out[i, t, j] *= scale


def _query_text_encoding(embed, gru, tokens, lengths):
    """TextEncoder's output for a few captions at inference, by :func:`_bigru_mean_kernel`:
    torch's CPU GRU dispatches ~40 ops per word and direction, so one caption took ~0.4 ms
    there and ~0.05 ms here -- the fixed cost of every text query of the cascade."""
    w_emb, w = _gru_weights(embed, gru)
    out = np.empty((len(tokens), tokens.shape[1], gru.hidden_size), dtype=w_emb.dtype)
    _bigru_mean_kernel(w_emb, tokens.numpy(), lengths.numpy(), *w, out)
    return torch.from_numpy(out)


def _gru_weights(embed, gru):
    """The embedding table and (W_ih^T, b_ih, W_hh^T, b_hh) of both directions as contiguous
    numpy arrays, kept on the module until a parameter changes (an optimiser step or a load
    bumps its version)."""
    params = [embed.weight] + [getattr(gru, f"{k}_l0{sfx}") for k in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")
                               for sfx in ("", "_reverse")]
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
    cached = getattr(gru, "_numpy_weights", None)
    if cached is None or cached[0] != key:
        a = [p.detach().numpy() for p in params]
        w = (np.ascontiguousarray(a[0]),
             (np.ascontiguousarray(np.stack([a[1].T, a[2].T])), np.stack(a[3:5]),
              np.ascontiguousarray(np.stack([a[5].T, a[6].T])), np.stack(a[7:9])))
        gru._numpy_weights = cached = (key, w)
    return cached[1]


class AttentionPool(nn.Module):
    """Additive self-attention pooling guided by the mean: weights softmax(w . tanh(W_l x_i +
    W_g mean(x))) over the fragments (SHAN's pooling)."""

    def __init__(self, embed):
        super().__init__()
        self.local = nn.Linear(embed, embed)
        self.glob = nn.Linear(embed, embed)
        self.w = nn.Linear(embed, 1, bias=False)  # a softmax cannot see a bias

    def forward(self, x, mask):
        g = masked_mean(x, mask, -2)
        logits = self.w(torch.tanh(self.local(x) + self.glob(g).unsqueeze(-2))).squeeze(-1)
        return l2norm((masked_softmax(logits, mask).unsqueeze(-1) * x).sum(-2))


class MaskedBatchNorm(nn.BatchNorm1d):
    """Batch norm over the last dimension whose training statistics come from the real
    entries only (``mask`` over the leading dimensions), so padding and the number of padded
    slots change nothing. In eval mode it is the usual fixed affine map."""

    def forward(self, x, mask=None):
        if self.training:
            real = x.reshape(-1, x.shape[-1]) if mask is None else x[mask]
            mean, var = real.mean(0), real.var(0, unbiased=False)
            if len(real) > 1:
                with torch.no_grad():
                    m = self.momentum
                    self.running_mean.mul_(1 - m).add_(m * mean)
                    self.running_var.mul_(1 - m).add_(m * var * len(real) / (len(real) - 1))
                    self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class SGRAFPool(nn.Module):
    """SGRAF's VisualSA / TextSA: weights softmax(w . (tanh(BN(W_l x_i)) * tanh(BN(W_g
    mean(x))))) over the fragments, pooled vector L2-normalised. As in the official code the
    image side has batch norm and the text side has none. One change: the official VisualSA
    normalises per region slot (BatchNorm1d over 36 positions), which only means something for
    a fixed count of ordered regions; here the image side normalises each feature over the
    batch's real regions, so any region count works and order stays irrelevant."""

    def __init__(self, embed, batch_norm, dropout=0.0):
        super().__init__()
        self.local, self.glob = nn.Linear(embed, embed), nn.Linear(embed, embed)
        self.bn_local = MaskedBatchNorm(embed) if batch_norm else None
        self.bn_glob = MaskedBatchNorm(embed) if batch_norm else None
        self.drop = nn.Dropout(dropout)
        self.common = nn.Linear(embed, 1, bias=False)  # the official bias is invisible to a softmax

    def forward(self, x, mask):
        g = self.glob(masked_mean(x, mask, -2))
        loc = self.local(x)
        if self.bn_local is not None:
            loc, g = self.bn_local(loc, mask), self.bn_glob(g)
        common = self.drop(torch.tanh(loc)) * self.drop(torch.tanh(g)).unsqueeze(-2)
        w = masked_softmax(self.common(common).squeeze(-1), mask)
        return l2norm((w.unsqueeze(-1) * x).sum(-2))


def attend(queries, keys, key_mask, temperature):
    """For every query vector, the softmax(temperature * cosine)-weighted sum of the keys.
    queries (..., Lq, e), keys (..., Lk, e), key_mask (..., Lk) -> (..., Lq, e)."""
    logits = temperature * (l2norm(queries) @ l2norm(keys).transpose(-1, -2))
    return masked_softmax(logits, key_mask.unsqueeze(-2)) @ keys


def scan_attend(words, regions, region_mask, lam):
    """SCAN's text-to-image attention as SGRAF's code runs it: region-word products through
    LeakyReLU(0.1), each region's row L2-normalised over the words, softmax(lam * .) over the
    regions per word, the attended vector L2-normalised. Padded words are zero vectors (the
    text encoder masks them), so they add nothing to a row's norm.
    words (..., L, e), regions (..., n_o, e), region_mask (..., n_o) -> (..., L, e)."""
    d = torch.nn.functional.leaky_relu(regions @ words.transpose(-1, -2), 0.1)   # (..., n_o, L)
    d = l2norm(d, -1).transpose(-1, -2)                                          # (..., L, n_o)
    return l2norm(masked_softmax(lam * d, region_mask.unsqueeze(-2)) @ regions)


# -- losses --------------------------------------------------------------------------------
def hardest_triplet(scores, margin=0.2):
    """VSE++ hinge triplet with the hardest in-batch negative, both directions. scores[i, j]
    = s(image i, caption j); the diagonal holds the matching pairs."""
    d = scores.diag()
    eye = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    cost_c = (margin + scores - d[:, None]).clamp_min(0).masked_fill(eye, 0)  # image -> captions
    cost_i = (margin + scores - d[None, :]).clamp_min(0).masked_fill(eye, 0)  # caption -> images
    return cost_c.max(1).values.sum() + cost_i.max(0).values.sum()


def sum_triplet(scores, margin=0.2):
    """Hinge triplet summed over every in-batch negative (the warm-up loss)."""
    return softmax_triplet(scores, margin, p=1.0)


def softmax_triplet(scores, margin=0.2, p=4.0):
    """HAN's soft-max triplet: sum_i ([sum_j [S_ij - S_ii + m]_+^p]^(1/p) + the same over
    columns). p = 1 sums every hinge; p -> inf keeps only the hardest."""
    d = scores.diag()
    eye = torch.eye(len(scores), dtype=torch.bool, device=scores.device)
    rows = (margin + scores - d[:, None]).clamp_min(0).masked_fill(eye, 0)
    cols = (margin + scores - d[None, :]).clamp_min(0).masked_fill(eye, 0)

    def pnorm(x, dim):
        # (sum x^p)^(1/p) = M (sum (x/M)^p)^(1/p) with M the largest hinge: no underflow for
        # large p (0.4^200 is 0 in float32), and 0 where every hinge is 0
        top = x.max(dim, keepdim=True).values
        safe = top.clamp_min(1e-12)
        s = ((x / safe) ** p).sum(dim) ** (1.0 / p)
        return torch.where(top.squeeze(dim) > 0, top.squeeze(dim) * s, torch.zeros_like(s))

    return pnorm(rows, 1).sum() + pnorm(cols, 0).sum()


# -- the matchers --------------------------------------------------------------------------
class Matcher(nn.Module):
    """Base: shared region and text encoders; subclasses define ``pair_scores``."""

    name = "matcher"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, **cfg):
        super().__init__()
        self.cfg = cfg
        self.regions = RegionEncoder(region_dim, embed)
        self.words = TextEncoder(vocab_size, word_dim, embed)

    def encode_image(self, regions, mask):
        return self.regions(regions, mask), mask

    def encode_text(self, tokens, lengths):
        return self.words(tokens, lengths)

    def pair_scores(self, img, txt):
        raise NotImplementedError

    def forward(self, regions, mask, tokens, lengths):
        return self.pair_scores(self.encode_image(regions, mask), self.encode_text(tokens, lengths))

    def loss(self, scores, epoch):
        """The paper's ranking loss, after ``warmup_epochs`` that sum every negative's hinge
        (the hardest negative alone gives little signal to a fresh model)."""
        margin = self.cfg.get("margin", 0.2)
        if epoch < self.cfg.get("warmup_epochs", 1):
            return sum_triplet(scores, margin)
        return self.ranking_loss(scores, margin)

    def ranking_loss(self, scores, margin):
        return hardest_triplet(scores, margin)


class _SimVector(nn.Module):
    """s(x, y; W) = W|x - y|^2 / ||W|x - y|^2||_2 (SGRAF's similarity representation)."""

    def __init__(self, embed, sim_dim):
        super().__init__()
        self.w = nn.Linear(embed, sim_dim)

    def forward(self, x, y):
        d = x - y
        return l2norm(self.w(d * d))  # d * d: pow(d, 2) is ~2x slower on CPU


class _SGRAFHead(nn.Module):
    """One of SGR (graph reasoning over the similarity nodes) or SAF (attention filtration),
    each with its own VisualSA / TextSA pooling and similarity maps, as SGRAF's code builds
    one model per module."""

    def __init__(self, embed, sim_dim, kind, steps, lam, dropout):
        super().__init__()
        self.kind, self.lam = kind, lam
        self.pool_img, self.pool_txt = SGRAFPool(embed, True, dropout), SGRAFPool(embed, False, dropout)
        self.sim_local, self.sim_global = _SimVector(embed, sim_dim), _SimVector(embed, sim_dim)
        if kind == "sgr":
            # one (W_in, W_out, W_r) per reasoning step, as the official GraphReasoning modules
            self.w_in = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
            self.w_out = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
            self.w_r = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
        else:
            self.w_f = nn.Linear(sim_dim, 1)
            self.bn_f = MaskedBatchNorm(1)
        self.out = nn.Linear(sim_dim, 1)

    def forward(self, img, txt):
        (v, vm, vg), (t, tm, tg) = img, txt
        I, T = len(v), len(t)
        a = scan_attend(t[None].expand(I, -1, -1, -1), v[:, None].expand(-1, T, -1, -1),
                        vm[:, None].expand(-1, T, -1), self.lam)   # (I, T, L, e): regions per word
        s_l = self.sim_local(a, t[None])                           # (I, T, L, m)
        s_g = self.sim_global(vg[:, None], tg[None])               # (I, T, m)
        nodes = torch.cat([s_g.unsqueeze(2), s_l], 2)              # (I, T, 1 + L, m)
        nm = torch.cat([torch.ones_like(tm[:, :1]), tm], 1)[None].expand(I, -1, -1)
        if self.kind == "sgr":
            for w_in, w_out, w_r in zip(self.w_in, self.w_out, self.w_r):
                e = masked_softmax(w_in(nodes) @ w_out(nodes).transpose(-1, -2), nm.unsqueeze(-2))
                nodes = torch.relu(w_r(e @ nodes))
            fused = nodes[:, :, 0]
        else:
            beta = torch.sigmoid(self.bn_f(self.w_f(nodes), nm).squeeze(-1)) * nm
            beta = beta / beta.sum(-1, keepdim=True).clamp_min(1e-8)
            fused = l2norm((beta.unsqueeze(-1) * nodes).sum(2))
        return torch.sigmoid(self.out(fused).squeeze(-1))


class SGRAF(Matcher):
    """SGRAF (Diao et al., AAAI 2021) as its paper and official code define it: fragments
    pooled by VisualSA / TextSA; local similarity vectors s(a_j, t_j; W_l) from SCAN's
    text-to-image attention, a global one s(v, t; W_g); SGR reasons over the nodes {s_g,
    s_l...} for ``steps`` steps with one (W_in, W_out, W_r) per step and scores the final
    global node; SAF weights the nodes by sigma(BN(W_f s)), L1-normalised, and scores the
    L2-normalised sum; score = sigmoid(FC(.)). SGR and SAF share nothing (each has its own
    encoders) and their losses are summed, which with disjoint parameters and per-head
    gradient clipping is training them separately, as the paper's ensemble does; the score is
    their average. ``variant`` = sgr | saf | sgraf. Deviations: batch norm over real regions
    instead of per region slot (see :class:`SGRAFPool`); nodes of one caption against a batch
    of images are normalised together with every other pair of the batch (the official code
    loops over captions); learned word embeddings as in the official code (no GloVe)."""

    name = "sgraf"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, sim_dim=64, steps=3,
                 lam=9.0, variant="sgraf", dropout=0.0, **cfg):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.variant = variant
        kinds = ["sgr", "saf"] if variant == "sgraf" else [variant]
        self.branches = nn.ModuleDict({
            k: nn.ModuleDict({"regions": RegionEncoder(region_dim, embed),
                              "words": TextEncoder(vocab_size, word_dim, embed),
                              "head": _SGRAFHead(embed, sim_dim, k, steps, lam, dropout)}) for k in kinds})

    # the pooled vectors depend on one item only: computed once per item, not once per pair
    def encode_image(self, regions, mask):
        out = {}
        for k, b in self.branches.items():
            v = b["regions"](regions, mask)
            out[k] = (v, mask, b["head"].pool_img(v, mask))
        return out

    def encode_text(self, tokens, lengths):
        out = {}
        for k, b in self.branches.items():
            t, m = b["words"](tokens, lengths)
            out[k] = (t, m, b["head"].pool_txt(t, m))
        return out

    def branch_scores(self, img, txt):
        return {k: b["head"](img[k], txt[k]) for k, b in self.branches.items()}

    def pair_scores(self, img, txt):
        s = list(self.branch_scores(img, txt).values())
        return sum(s) / len(s)

    def loss_terms(self, img, txt, epoch):
        return [self.loss(s, epoch) for s in self.branch_scores(img, txt).values()]


def _joint(img, txt):
    """Per pair (I x T), the image's fragments followed by the caption's: every tensor of
    ``img`` (I, n_o, ...) and ``txt`` (T, L, ...) -> (I, T, n_o + L, ...)."""
    I, T = len(img[0]), len(txt[0])
    return [torch.cat([a[:, None].expand(-1, T, *a.shape[1:]), b[None].expand(I, *b.shape)], 2)
            for a, b in zip(img, txt)]


class CGAM(Matcher):
    """CGAM (He et al., SIGIR 2021): joint attention over Z = [regions; words],
    A = Q K^T / N, builds shared concepts C = FC(A Z W + Z); each modality is reconstructed
    from C (softmax(H C^T) C); grouped (multi-head) cosines between features and their
    reconstructions -> FC, tanh, FC -> score. The linear maps act per fragment, so they are
    applied once per item in ``encode_*``; only the attention and the reconstruction run
    per pair. One change to the paper: the reconstruction softmax has an inverse temperature
    ``lam`` (as SCAN's attention), because with L2-normalised fragments the logits H C^T span
    a narrow range and the softmax rebuilt every fragment from nearly the same mixture of
    concepts (on the synthetic scenes, 1,000-image gallery: rSum 464 without, 584 with
    lam = 9)."""

    name = "cgam"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, heads=8, hidden=64, lam=9.0, **cfg):
        super().__init__(region_dim, vocab_size, embed, word_dim, **cfg)
        self.heads, self.lam = heads, lam
        self.q, self.k = nn.Linear(embed, embed), nn.Linear(embed, embed)
        self.wz = nn.Linear(embed, embed, bias=False)
        self.concept = nn.Linear(embed, embed)
        # no bias on the last layer: ranking losses cannot see a shift of every score
        self.fc1, self.fc2 = nn.Linear(2 * heads, hidden), nn.Linear(hidden, 1, bias=False)

    def _parts(self, x):
        # concept(A wz(Z) + Z) = A (wz(Z) W_c^T) + concept(Z): per-fragment pieces
        return x, self.q(x), self.k(x), self.wz(x) @ self.concept.weight.T, self.concept(x)

    def encode_image(self, regions, mask):
        return self._parts(self.regions(regions, mask)) + (mask,)

    def encode_text(self, tokens, lengths):
        t, m = self.words(tokens, lengths)
        return self._parts(t) + (m,)

    def _grouped_cos(self, x, r, mask):
        shape = x.shape[:-1] + (self.heads, x.shape[-1] // self.heads)
        return masked_mean(cosine(x.reshape(shape), r.reshape(shape)), mask, -2)   # (..., K)

    def pair_scores(self, img, txt):
        z, q, k, p, cz, zm = _joint(img, txt)
        no = img[0].shape[1]
        n = zm.sum(-1).to(z.dtype)[..., None, None]           # N = n_o + n_w (real ones)
        a = (q @ k.transpose(-1, -2)) / n * (zm.unsqueeze(-1) & zm.unsqueeze(-2))
        c = a @ p + cz                                          # (I, T, N, e) shared concepts
        w = masked_softmax(self.lam * (z @ c.transpose(-1, -2)), zm.unsqueeze(-2))
        r = w @ c                                               # every fragment rebuilt from C
        gi = self._grouped_cos(z[:, :, :no], r[:, :, :no], zm[:, :, :no])
        gt = self._grouped_cos(z[:, :, no:], r[:, :, no:], zm[:, :, no:])
        return self.fc2(torch.tanh(self.fc1(torch.cat([gi, gt], -1)))).squeeze(-1)


class _HANBlock(nn.Module):
    """One self-attention block of HAN's heterogeneous attention module:
    q, k, v = W h + b; a_ij = q_i . k_j; h~_i = fc(sum_j softmax_j(beta a_ij) v_j) + q_i."""

    def __init__(self, embed):
        super().__init__()
        self.q, self.k, self.v, self.fc = (nn.Linear(embed, embed) for _ in range(4))

    def parts(self, h):
        # fc(sum_j a_ij v_j) = sum_j a_ij fc(v_j) since each row of a sums to 1: fc(v) is per
        # fragment, so the first block's maps run once per item, not once per pair
        return self.q(h), self.k(h), self.fc(self.v(h))

    @staticmethod
    def mix(q, k, fv, mask, beta):
        att = masked_softmax(beta * (q @ k.transpose(-1, -2)), mask.unsqueeze(-2))
        return (att @ fv + q) * mask.unsqueeze(-1)


class HAN(Matcher):
    """HAN (Yu et al., SIGIR 2021): ``blocks`` stacked self-attention blocks over the joint
    sequence of L2-normalised regions and words (:class:`_HANBlock`, softmax(beta . q k^T) with
    beta multiplying the logits as in the paper), then each word attends over the updated
    regions (softmax(lam . cosine)); score = mean over words of cos(word, attended region).
    Trained with the soft-max triplet loss (``p``). The paper stacks blocks without giving
    their count in our notes; 2 by default. Only the first block's maps can run per item; the
    later ones see both modalities and run per pair."""

    name = "han"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, beta=10.0, lam=9.0, blocks=2, **cfg):
        super().__init__(region_dim, vocab_size, embed, word_dim, **cfg)
        from hashret.errors import check

        check(int(blocks) >= 1, f"HAN needs at least one attention block, got blocks={blocks}")
        self.beta, self.lam = beta, lam
        self.blocks = nn.ModuleList(_HANBlock(embed) for _ in range(int(blocks)))

    def encode_image(self, regions, mask):
        return self.blocks[0].parts(self.regions(regions, mask)) + (mask,)

    def encode_text(self, tokens, lengths):
        t, m = self.words(tokens, lengths)
        return self.blocks[0].parts(t) + (m,)

    def pair_scores(self, img, txt):
        q, k, fv, hm = _joint(img, txt)
        h = _HANBlock.mix(q, k, fv, hm, self.beta)
        for block in self.blocks[1:]:
            h = block.mix(*block.parts(h), hm, self.beta)
        no = img[0].shape[1]
        ho, hw = h[:, :, :no], h[:, :, no:]
        o = attend(hw, ho, hm[:, :, :no], self.lam)            # regions attended per word
        return masked_mean(cosine(hw, o).unsqueeze(-1), hm[:, :, no:], -2).squeeze(-1)

    def ranking_loss(self, scores, margin):
        return softmax_triplet(scores, margin, self.cfg.get("p", 4.0))


class SHAN(Matcher):
    """SHAN (Ji et al., IJCAI 2021), score = L2L + G2L + G2G.
    Fragment level (L2L): A = (W_v V)(W_t T)^T, attended text per region t*_i = sum_j
    softmax_j(lam A_ij) t_j and attended region per word v*_j; the mean of the region-side
    and word-side means of cos(v_i, t*_i), cos(t_j, v*_j).
    Context level (G2L): gated fusion v^c_i = g * v_i + (1 - g) * t*_i with g = sigmoid(W_g
    [v_i; t*_i] + b_g) (and for words), self-attention pooling -> the global contexts v_c,
    t_c; then each global context attends over the other modality's context fragments,
    t*_c = sum_j softmax_j(lam cos(v_c, t^c_j)) t^c_j and v*_c likewise; G2L = the mean of
    cos(v_c, t*_c) and cos(t_c, v*_c). G2G: v_g = v_c + t*_c, t_g = t_c + v*_c (element-wise),
    cos(v_g, t_g). Deviations: A is taken between L2-normalised projections, so lam acts as in
    SCAN whatever the projections' scale; word features are learned embeddings through the
    Bi-GRU (no GloVe vectors can be had here); the paper does not say which fragments the
    global contexts attend over -- the fused context fragments, the level they belong to."""

    name = "shan"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, lam=9.0, **cfg):
        super().__init__(region_dim, vocab_size, embed, word_dim, **cfg)
        self.lam = lam
        self.wv, self.wt = nn.Linear(embed, embed), nn.Linear(embed, embed)
        self.gate_v, self.gate_t = nn.Linear(2 * embed, embed), nn.Linear(2 * embed, embed)
        self.pool_v, self.pool_t = AttentionPool(embed), AttentionPool(embed)

    def encode_image(self, regions, mask):
        v = self.regions(regions, mask)
        return v, l2norm(self.wv(v)), mask

    def encode_text(self, tokens, lengths):
        t, m = self.words(tokens, lengths)
        return t, l2norm(self.wt(t)), m

    def pair_scores(self, img, txt):
        (v, pv, vm), (t, pt, tm) = img, txt
        I, T = len(v), len(t)
        V, PV, VM = v[:, None].expand(-1, T, -1, -1), pv[:, None], vm[:, None].expand(-1, T, -1)
        W, PW, WM = t[None].expand(I, -1, -1, -1), pt[None], tm[None].expand(I, -1, -1)
        a = self.lam * (PV @ PW.transpose(-1, -2))                                  # (I,T,n_o,L)
        t_star = masked_softmax(a, WM.unsqueeze(-2)) @ W                            # per region
        v_star = masked_softmax(a.transpose(-1, -2), VM.unsqueeze(-2)) @ V          # per word
        l2l = 0.5 * (masked_mean(cosine(V, t_star).unsqueeze(-1), VM, -2)
                     + masked_mean(cosine(W, v_star).unsqueeze(-1), WM, -2)).squeeze(-1)
        gv = torch.sigmoid(self.gate_v(torch.cat([V, t_star], -1)))
        gt = torch.sigmoid(self.gate_t(torch.cat([W, v_star], -1)))
        vc_i = (gv * V + (1 - gv) * t_star) * VM.unsqueeze(-1)                     # context fragments
        tc_j = (gt * W + (1 - gt) * v_star) * WM.unsqueeze(-1)
        vc, tc = self.pool_v(vc_i, VM), self.pool_t(tc_j, WM)                       # (I, T, e)
        t_c_star = attend(vc.unsqueeze(-2), tc_j, WM, self.lam).squeeze(-2)          # global -> local
        v_c_star = attend(tc.unsqueeze(-2), vc_i, VM, self.lam).squeeze(-2)
        g2l = 0.5 * (cosine(vc, t_c_star) + cosine(tc, v_c_star))
        g2g = cosine(vc + t_c_star, tc + v_c_star)
        return l2l + g2l + g2g


class GlobalEmbedding(Matcher):
    """VSE-style baseline: mean-pooled regions and mean-pooled words, cosine. Its scores are
    a dot product of per-item vectors, so it ranks a gallery with one matrix product."""

    name = "global"

    def encode_image(self, regions, mask):
        return l2norm(masked_mean(self.regions(regions, mask), mask, -2))

    def encode_text(self, tokens, lengths):
        t, m = self.words(tokens, lengths)
        return l2norm(masked_mean(t, m, -2))

    def pair_scores(self, img, txt):
        return img @ txt.T


MATCHERS = {cls.name: cls for cls in (SGRAF, CGAM, HAN, SHAN, GlobalEmbedding)}
MATCHER_DEFAULTS = {
    "embed": 64, "word_dim": 32, "margin": 0.2, "warmup_epochs": 1, "epochs": 4,
    "batch_size": 64, "lr": 1e-3, "grad_clip": 2.0,
}
PER_MATCHER_DEFAULTS = {
    "sgraf": {"sim_dim": 32, "steps": 3, "lam": 9.0, "variant": "sgraf", "dropout": 0.0},
    "cgam": {"heads": 8, "hidden": 64, "lam": 9.0},
    "han": {"beta": 10.0, "lam": 9.0, "p": 4.0, "blocks": 2},
    "shan": {"lam": 9.0},
    "global": {},
}
# "cpu" (the defaults above) is sized to train on 2 CPU cores in minutes: embed 64, lr 1e-3 so
# a few epochs suffice. "paper" is the papers' scale for a GPU user with real region features
# (SGRAF's official code: embed 1024, sim 256, 300-d words, Adam 2e-4, batch 128, dropout 0.4
# in the pooling; CGAM, HAN and SHAN report the same SCAN-family embed / word sizes; their other
# fields keep the CPU values, which our notes on those papers do not fix).
PRESETS = {
    "cpu": {},
    "paper": {"embed": 1024, "word_dim": 300, "lr": 2e-4, "batch_size": 128, "epochs": 20,
              "sgraf": {"sim_dim": 256, "dropout": 0.4}},
}
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "grad_clip")


def matcher_config(name: str, preset: str = "cpu") -> dict:
    """The resolved config fields of matcher ``name`` under ``preset`` (cpu | paper), the
    preset's name included; what a checkpoint's config records."""
    from hashret.errors import check

    check(name in MATCHERS, f"unknown matcher {name!r}: use one of {', '.join(MATCHERS)}")
    check(preset in PRESETS, f"unknown matcher preset {preset!r}: use one of {', '.join(PRESETS)}")
    own = {k: v for k, v in PRESETS[preset].items() if not isinstance(v, dict)}
    return {**MATCHER_DEFAULTS, **PER_MATCHER_DEFAULTS[name], **own,
            **PRESETS[preset].get(name, {}), "preset": preset}


def build_matcher(name: str, region_dim: int, vocab_size: int, preset: str = "cpu", **overrides) -> Matcher:
    """A matcher by name with its ``preset``'s sizes; ``overrides`` must be known config fields."""
    from hashret.errors import check

    cfg = matcher_config(name, preset)
    bad = sorted(set(overrides) - set(cfg))
    check(not bad, f"{name} has no config field {', '.join(bad)}: known fields are "
          f"{', '.join(sorted(cfg))}")
    cfg.update(overrides)
    model_cfg = {k: v for k, v in cfg.items() if k not in TRAINING_FIELDS + ("preset",)}
    return MATCHERS[name](region_dim, vocab_size, **model_cfg)


def score_chunks(matcher, img, txt, budget=512):
    """The full n_img x n_txt score matrix of two encodings, computed in blocks of about
    ``budget`` pairs (memory grows with pairs x fragments x embed)."""
    n_img, n_txt = n_rows(img), n_rows(txt)
    rows = max(1, budget // max(n_txt, 1))
    cols = n_txt if rows > 1 else max(1, budget)
    out = torch.empty(n_img, n_txt, device=_first_tensor(txt).device)
    for a in range(0, n_img, rows):
        ib = select(img, slice(a, a + rows))
        for b in range(0, n_txt, cols):
            out[a:a + rows, b:b + cols] = matcher.pair_scores(ib, select(txt, slice(b, b + cols)))
    return out


def select(enc, s):
    """Rows ``s`` of an encoding (a tensor, a tuple of tensors, or a dict of those)."""
    if isinstance(enc, dict):
        return {k: select(v, s) for k, v in enc.items()}
    if isinstance(enc, tuple):
        return tuple(select(v, s) for v in enc)
    return enc[s]


def _first_tensor(enc):
    while isinstance(enc, (dict, tuple)):
        enc = next(iter(enc.values())) if isinstance(enc, dict) else enc[0]
    return enc


def n_rows(enc) -> int:
    return len(_first_tensor(enc))
