"""Fine-grained image-text matchers over region sets and word sequences: SGRAF (SGR, SAF and
their average), CGAM, HAN, SHAN, and a global mean-pooled (VSE-style) baseline.

Every matcher splits scoring in two, so a gallery is encoded once and only the cross part
runs per pair: ``encode_image(regions, mask)`` and ``encode_text(tokens, lengths)`` give
per-item encodings, ``pair_scores(img, txt)`` scores every image against every caption
(an n_img x n_txt matrix). Masks mark real regions / words; padding never reaches a score.
Notes on each model: ``shared/design/models.md``.
"""

from __future__ import annotations

import torch
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
        if bool((lengths == tokens.shape[1]).all()):
            # nothing padded (e.g. one query): packing would only cost time (~0.2 ms a query)
            out, _ = self.gru(self.embed(tokens))
        else:
            packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(),
                                                       batch_first=True, enforce_sorted=False)
            out, _ = self.gru(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        half = out.shape[-1] // 2
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        return l2norm((out[..., :half] + out[..., half:]) / 2) * mask.unsqueeze(-1), mask


class AttentionPool(nn.Module):
    """Self-attention pooling guided by the mean (SGRAF's VisualSA / TextSA, SHAN's pooling)."""

    def __init__(self, embed):
        super().__init__()
        self.local = nn.Linear(embed, embed)
        self.glob = nn.Linear(embed, embed)
        self.w = nn.Linear(embed, 1, bias=False)  # a softmax cannot see a bias

    def forward(self, x, mask):
        g = masked_mean(x, mask, -2)
        logits = self.w(torch.tanh(self.local(x) + self.glob(g).unsqueeze(-2))).squeeze(-1)
        return l2norm((masked_softmax(logits, mask).unsqueeze(-1) * x).sum(-2))


def attend(queries, keys, key_mask, temperature):
    """For every query vector, the softmax(temperature * cosine)-weighted sum of the keys.
    queries (..., Lq, e), keys (..., Lk, e), key_mask (..., Lk) -> (..., Lq, e)."""
    logits = temperature * (l2norm(queries) @ l2norm(keys).transpose(-1, -2))
    return masked_softmax(logits, key_mask.unsqueeze(-2)) @ keys


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
        return l2norm(self.w((x - y) ** 2))


class _SGRAFHead(nn.Module):
    """One of SGR (graph reasoning over similarity nodes) or SAF (attention filtration)."""

    def __init__(self, embed, sim_dim, kind, steps, lam):
        super().__init__()
        self.kind, self.lam = kind, lam
        self.pool_img, self.pool_txt = AttentionPool(embed), AttentionPool(embed)
        self.sim_local, self.sim_global = _SimVector(embed, sim_dim), _SimVector(embed, sim_dim)
        if kind == "sgr":
            self.w_in = nn.Linear(sim_dim, sim_dim)
            self.w_out = nn.Linear(sim_dim, sim_dim)
            self.w_r = nn.ModuleList(nn.Linear(sim_dim, sim_dim) for _ in range(steps))
        else:
            self.w_f = nn.Linear(sim_dim, 1)
        self.out = nn.Linear(sim_dim, 1)

    def forward(self, img, txt):
        (v, vm), (t, tm) = img, txt
        vg, tg = self.pool_img(v, vm), self.pool_txt(t, tm)  # (I, e), (T, e)
        V, VM = v[:, None], vm[:, None]                     # (I, 1, n_o, e)
        T = t[None]                                          # (1, T, L, e)
        a = attend(T.expand(len(v), -1, -1, -1), V.expand(-1, len(t), -1, -1),
                   VM.expand(-1, len(t), -1), self.lam)       # (I, T, L, e): regions per word
        s_l = self.sim_local(a, T)                           # (I, T, L, m)
        s_g = self.sim_global(vg[:, None], tg[None])         # (I, T, m)
        nodes = torch.cat([s_g.unsqueeze(2), s_l], 2)        # (I, T, 1 + L, m)
        nm = torch.cat([torch.ones_like(tm[:, :1]), tm], 1)[None].expand(len(v), -1, -1)
        if self.kind == "sgr":
            for w_r in self.w_r:
                e = self.w_in(nodes) @ self.w_out(nodes).transpose(-1, -2)
                e = masked_softmax(e, nm.unsqueeze(-2))
                nodes = torch.relu(w_r(e @ nodes))
            fused = nodes[:, :, 0]
        else:
            beta = torch.sigmoid(self.w_f(nodes).squeeze(-1)) * nm
            beta = beta / beta.sum(-1, keepdim=True).clamp_min(1e-8)
            fused = (beta.unsqueeze(-1) * nodes).sum(2)
        return torch.sigmoid(self.out(fused).squeeze(-1))


class SGRAF(Matcher):
    """SGRAF (Diao et al., AAAI 2021): SGR and SAF heads over the same similarity
    representations. They share nothing (each has its own encoders), and their losses are
    summed, which with disjoint parameters and per-head gradient clipping is training them
    separately; the score is their average. ``variant`` = sgr | saf | sgraf."""

    name = "sgraf"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, sim_dim=64, steps=3,
                 lam=9.0, variant="sgraf", **cfg):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.variant = variant
        kinds = ["sgr", "saf"] if variant == "sgraf" else [variant]
        self.branches = nn.ModuleDict({
            k: nn.ModuleDict({"regions": RegionEncoder(region_dim, embed),
                              "words": TextEncoder(vocab_size, word_dim, embed),
                              "head": _SGRAFHead(embed, sim_dim, k, steps, lam)}) for k in kinds})

    def encode_image(self, regions, mask):
        return {k: (b["regions"](regions, mask), mask) for k, b in self.branches.items()}

    def encode_text(self, tokens, lengths):
        return {k: b["words"](tokens, lengths) for k, b in self.branches.items()}

    def branch_scores(self, img, txt):
        return {k: b["head"](img[k], txt[k]) for k, b in self.branches.items()}

    def pair_scores(self, img, txt):
        s = list(self.branch_scores(img, txt).values())
        return sum(s) / len(s)

    def loss_terms(self, img, txt, epoch):
        return [self.loss(s, epoch) for s in self.branch_scores(img, txt).values()]


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
        I, T = len(img[0]), len(txt[0])
        joint = [torch.cat([a[:, None].expand(-1, T, *a.shape[1:]), b[None].expand(I, *b.shape)], 2)
                 for a, b in zip(img, txt)]
        z, q, k, p, cz, zm = joint
        no = img[0].shape[1]
        n = zm.sum(-1).to(z.dtype)[..., None, None]           # N = n_o + n_w (real ones)
        a = (q @ k.transpose(-1, -2)) / n * (zm.unsqueeze(-1) & zm.unsqueeze(-2))
        c = a @ p + cz                                          # (I, T, N, e) shared concepts
        w = masked_softmax(self.lam * (z @ c.transpose(-1, -2)), zm.unsqueeze(-2))
        r = w @ c                                               # every fragment rebuilt from C
        gi = self._grouped_cos(z[:, :, :no], r[:, :, :no], zm[:, :, :no])
        gt = self._grouped_cos(z[:, :, no:], r[:, :, no:], zm[:, :, no:])
        return self.fc2(torch.tanh(self.fc1(torch.cat([gi, gt], -1)))).squeeze(-1)


class HAN(Matcher):
    """HAN (Yu et al., SIGIR 2021): self-attention over the joint sequence of L2-normalised
    regions and words (h~ = fc(softmax(q k^T / beta) v) + q), then each word attends over the
    updated regions; score = mean over words of cos(word, attended region). Trained with the
    soft-max triplet loss (p). With one block every linear map acts per fragment
    (fc(att v) = att fc(v) + bias, the attention rows summing to 1), so q, k and fc(v) are
    computed once per item."""

    name = "han"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, beta=0.1, lam=9.0, **cfg):
        super().__init__(region_dim, vocab_size, embed, word_dim, **cfg)
        self.beta, self.lam = beta, lam
        self.q, self.k, self.v, self.o = (nn.Linear(embed, embed) for _ in range(4))

    def _parts(self, x):
        return self.q(x), self.k(x), self.o(self.v(x))

    def encode_image(self, regions, mask):
        return self._parts(self.regions(regions, mask)) + (mask,)

    def encode_text(self, tokens, lengths):
        t, m = self.words(tokens, lengths)
        return self._parts(t) + (m,)

    def pair_scores(self, img, txt):
        I, T = len(img[0]), len(txt[0])
        q, k, ov, hm = [torch.cat([a[:, None].expand(-1, T, *a.shape[1:]), b[None].expand(I, *b.shape)], 2)
                        for a, b in zip(img, txt)]
        att = masked_softmax((q @ k.transpose(-1, -2)) / self.beta, hm.unsqueeze(-2))
        h = (att @ ov + q) * hm.unsqueeze(-1)
        no = img[0].shape[1]
        ho, hw = h[:, :, :no], h[:, :, no:]
        o = attend(hw, ho, hm[:, :, :no], self.lam)            # regions attended per word
        return masked_mean(cosine(hw, o).unsqueeze(-1), hm[:, :, no:], -2).squeeze(-1)

    def ranking_loss(self, scores, margin):
        return softmax_triplet(scores, margin, self.cfg.get("p", 4.0))


class SHAN(Matcher):
    """SHAN (Ji et al., IJCAI 2021): three levels summed. L2L: cross attention both ways
    (A = (W_v V)(W_t T)^T), cosine of each fragment with its attended counterpart. G2L: gated
    fusion of each fragment with its attended context, attention-pooled, cosine. G2G: pooled
    fragments concatenated with pooled attended counterparts, cosine."""

    name = "shan"

    def __init__(self, region_dim, vocab_size, embed=128, word_dim=64, lam=9.0, **cfg):
        super().__init__(region_dim, vocab_size, embed, word_dim, **cfg)
        self.lam = lam
        self.wv, self.wt = nn.Linear(embed, embed), nn.Linear(embed, embed)
        self.gate_v, self.gate_t = nn.Linear(2 * embed, embed), nn.Linear(2 * embed, embed)
        self.pool_v, self.pool_t = AttentionPool(embed), AttentionPool(embed)
        self.pool_vs, self.pool_ts = AttentionPool(embed), AttentionPool(embed)

    def pair_scores(self, img, txt):
        (v, vm), (t, tm) = img, txt
        I, T = len(v), len(t)
        V, VM = v[:, None].expand(-1, T, -1, -1), vm[:, None].expand(-1, T, -1)
        W, WM = t[None].expand(I, -1, -1, -1), tm[None].expand(I, -1, -1)
        a = self.lam * (l2norm(self.wv(V)) @ l2norm(self.wt(W)).transpose(-1, -2))  # (I,T,n_o,L)
        t_star = masked_softmax(a, WM.unsqueeze(-2)) @ W                           # per region
        v_star = masked_softmax(a.transpose(-1, -2), VM.unsqueeze(-2)) @ V         # per word
        l2l = 0.5 * (masked_mean(cosine(V, t_star).unsqueeze(-1), VM, -2)
                     + masked_mean(cosine(W, v_star).unsqueeze(-1), WM, -2)).squeeze(-1)
        gv = torch.sigmoid(self.gate_v(torch.cat([V, t_star], -1)))
        gt = torch.sigmoid(self.gate_t(torch.cat([W, v_star], -1)))
        vc = self.pool_v(gv * V + (1 - gv) * t_star, VM)
        tc = self.pool_t(gt * W + (1 - gt) * v_star, WM)
        g2l = cosine(vc, tc)
        ts, vs = self.pool_ts(t_star, VM), self.pool_vs(v_star, WM)
        g2g = cosine(torch.cat([vc, ts], -1), torch.cat([tc, vs], -1))
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
    "sgraf": {"sim_dim": 32, "steps": 3, "lam": 9.0, "variant": "sgraf"},
    "cgam": {"heads": 8, "hidden": 64, "lam": 9.0},
    "han": {"beta": 0.1, "lam": 9.0, "p": 4.0},
    "shan": {"lam": 9.0},
    "global": {},
}
TRAINING_FIELDS = ("epochs", "batch_size", "lr", "grad_clip")


def build_matcher(name: str, region_dim: int, vocab_size: int, **overrides) -> Matcher:
    """A matcher by name with its defaults; ``overrides`` must be known config fields."""
    from hashret.errors import check

    check(name in MATCHERS, f"unknown matcher {name!r}: use one of {', '.join(MATCHERS)}")
    cfg = {**MATCHER_DEFAULTS, **PER_MATCHER_DEFAULTS[name]}
    bad = sorted(set(overrides) - set(cfg))
    check(not bad, f"{name} has no config field {', '.join(bad)}: known fields are "
          f"{', '.join(sorted(cfg))}")
    cfg.update(overrides)
    model_cfg = {k: v for k, v in cfg.items() if k not in TRAINING_FIELDS}
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
