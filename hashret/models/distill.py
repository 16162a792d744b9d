"""Hash heads for the fine-grained matchers, and :class:`MatcherModel`, the trained pair
(matcher + hash head) that a checkpoint holds.

A hash head is two per-modality encoders (regions -> b, words -> b, tanh). What it learns from
is its ``head`` field (:data:`HEADS`); both heads that learn from the matcher are distilled.
``in-batch`` learns the matcher's in-batch score matrix: <h_I, h_T> / b is trained to
reproduce it -- KL between the row (image -> captions) and column (caption -> images)
softmaxes of teacher and student, each with a temperature, plus the true pairs' loss and a
quantisation term ||h - sign(h)||^2. ``distilled`` learns that and the matcher's ranking of
the head's own hard candidates (its current Hamming neighbours), listwise: the two differ in
those lists alone. Each matcher's default is the head its dev part chose
(:data:`HEAD_DEFAULTS`, overridden per matcher in :data:`HEAD_PER_MATCHER`). The controls
change the target only: ``pairs`` (one-hot, in-batch contrastive), ``smoothing`` (the pairs,
label-smoothed) and ``shuffled`` (the matcher's scores of each row in a random order). Every
head of a matcher trains on the same batches (``head_schedule`` in
:mod:`hashret.training.matching`): random at first, then groups of look-alikes, so that the
in-batch negatives include what the codes confuse.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from hashret.errors import HashretError, check
from hashret.index.bits import sign_codes
from hashret.models.matchers import (MATCHERS, build_matcher,
                                     masked_max, n_rows, score_chunks, select)

HEAD_DEFAULTS = {"head_hidden": 256, "head_word_dim": 32, "head_epochs": 8, "head_batch_size": 64,
                 "head_lr": 2e-3, "tau_teacher": 1.0, "tau_student": 0.05, "quantization": 0.1,
                 "hard_weight": 1.0, "head_group": 2,
                 "head": "distilled", "smoothing_eps": 0.5, "list_size": 8, "list_weight": 1.0,
                 "list_hard_weight": 0.0}
# Each matcher's default head and its knob: the head whose best try had the highest
# agreement@1% on the dev part of the graded scenes (seed 0; `python benchmarks/cascade.py
# --dataset scenes:n_train=3000,n_dev=300,n_test=5000,graded=0.5 --seeds 0,1,2`, three tries of
# its knob per head; the test figures and the three seeds' spread are in docs/matchers.md):
# the distilled head at tau 1 for all four (dev 52.1 / 59.0 / 57.2 / 58.6 for SGRAF / CGAM /
# HAN / SHAN, the in-batch head's best tries 48.1 / 57.1 / 55.9 / 57.4; every control lower) --
# HEAD_DEFAULTS' head and tau_teacher. HAN's heads train twice as long: its distilled head's
# margin was the thinnest, and of two dev probes (16 epochs, a hidden width of 512; each with
# the in-batch head too) 16 epochs lifted its dev agreement most, 55.5 -> 57.2 (512 wide: 56.8).
HEAD_PER_MATCHER: dict = {"han": {"head_epochs": 16}}
# what a hash head learns from (its "head" field): the two distillations, and the controls the
# cascade benchmark trains beside them on the same batches from the same initialisation
HEADS = {"distilled": "distilled from the matcher's in-batch scores and its ranking of the head's own hard "
                      "candidates",
         "in-batch": "distilled from the matcher's in-batch scores",
         "pairs": "the matching pairs alone",
         "smoothing": "the matching pairs, label-smoothed (smoothing_eps)",
         "shuffled": "the matcher's in-batch scores, each row's in a random order"}
# the field before "head" (checkpoints written then): uniform = smoothing at its default 1/2
LEGACY_DISTILL = {True: "in-batch", False: "pairs", "uniform": "smoothing"}


def saved_head_fields(cfg: dict) -> tuple[dict, str | None]:
    """A matcher config read from a checkpoint, with the head fields added since it was
    written set as that head was trained, so the config says how its codes were made: before
    ``list_hard_weight``, the true pair's loss among its list was weighted by ``hard_weight``.
    Returns (the config, a warning or None): a ``distilled`` head from before ``list_weight``
    learned its lists alone, without the in-batch term, which no setting of today's fields
    trains -- it loads (the codes are its weights'), but retraining it trains today's head."""
    cfg, warning = dict(cfg), None
    if "list_hard_weight" not in cfg:
        cfg["list_hard_weight"] = cfg.get("hard_weight", HEAD_DEFAULTS["hard_weight"])
    if cfg.get("head") == "distilled" and "list_weight" not in cfg:
        warning = ("its distilled head was trained on the matcher's ranking of its lists alone (the head "
                   "before the in-batch term was added); retraining it (--distill-from) trains today's head")
    return cfg, warning


def check_head(head):
    check(head in HEADS, f"head must be one of {', '.join(HEADS)} (what the hash head learns from), "
          f"got {head!r}")


def uses_matcher(head: str) -> bool:
    """Whether a head of this kind learns from the matcher's scores."""
    return head in ("distilled", "in-batch", "shuffled")


def head_config(name: str) -> dict:
    """The hash head's default fields for matcher ``name``."""
    return {**HEAD_DEFAULTS, **HEAD_PER_MATCHER.get(name, {})}


class HashHead(nn.Module):
    """Regions -> per-region MLP -> max over regions -> BN -> tanh(b); words -> word bigrams
    (a width-2 convolution) -> MLP -> max over bigrams -> BN -> tanh(b). The per-region MLP
    sees each attribute-object binding before pooling and a bigram sees "red cube" as one
    feature, so the codes keep bindings. Max pooling makes a feature an OR over bindings: a
    caption naming two of an image's four objects finds its features in that image as fully
    as in a two-object image, where a mean diluted each binding by the object count and
    ranked images with the same words in the wrong bindings above (HAN, pairs-only head,
    512 bits, synthetic scenes: Recall@1/10/50 T->I 74.6/94.4/99.0 with a mean, 80.9/97.5/99.9
    with the max). (A Bi-GRU text side, as in the matchers, fitted the training captions as
    well but generalised worse.)"""

    def __init__(self, region_dim, vocab_size, bits, hidden=256, word_dim=32):
        super().__init__()
        self.region_mlp = nn.Sequential(nn.LayerNorm(region_dim), nn.Linear(region_dim, hidden), nn.ReLU(),
                                        nn.Linear(hidden, hidden), nn.ReLU())
        # batch norm before tanh centres every bit over the data, so bits split items evenly
        # (without it the mean of positive ReLU features pushed all images to one code)
        self.image_out = nn.Sequential(nn.Linear(hidden, bits), nn.BatchNorm1d(bits))
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.ngram = nn.Conv1d(word_dim, hidden, kernel_size=2, padding=1)
        self.word_mlp = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.text_out = nn.Sequential(nn.Linear(hidden, bits), nn.BatchNorm1d(bits))

    def image(self, regions, mask):
        return torch.tanh(self.image_out(masked_max(self.region_mlp(regions), mask, -2)))

    def text(self, tokens, lengths):
        # word bigrams (conv of width 2): "red cube" is one feature, so a binding survives
        # the mean over the caption
        m = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]
        e = self.embed(tokens) * m.unsqueeze(-1)  # whatever follows the caption reads as padding
        g = self.ngram(e.transpose(1, 2)).transpose(1, 2)[:, 1:]       # bigram (word i, word i+1)
        return torch.tanh(self.text_out(masked_max(self.word_mlp(g), m, -2)))


def distill_loss(teacher, h_img, h_txt, tau_teacher=1.0, tau_student=0.05, quantization=0.1,
                 hard_weight=1.0):
    """Listwise KL, both directions, between the teacher's score matrix (z-scored over the
    batch, so every matcher's scale means the same) and the student's <h_I, h_T> / b; plus,
    as in Hinton's knowledge distillation, ``hard_weight`` x the loss on the true pairs."""
    t = (teacher - teacher.mean()) / teacher.std().clamp_min(1e-6) / tau_teacher
    s = (h_img @ h_txt.T) / h_img.shape[1] / tau_student
    kl = (nnf.kl_div(nnf.log_softmax(s, 1), nnf.log_softmax(t, 1), log_target=True, reduction="batchmean")
          + nnf.kl_div(nnf.log_softmax(s.T, 1), nnf.log_softmax(t.T, 1), log_target=True,
                       reduction="batchmean"))
    loss = kl + quantization * quantization_loss(h_img, h_txt)
    return loss + hard_weight * _true_pairs(s) if hard_weight else loss


def quantization_loss(*codes):
    return sum(((h - torch.where(h >= 0, 1.0, -1.0)) ** 2).mean() for h in codes)


def _true_pairs(logits):
    target = torch.arange(len(logits), device=logits.device)
    return nnf.cross_entropy(logits, target) + nnf.cross_entropy(logits.T, target)


def smoothing_loss(h_img, h_txt, eps=0.5, tau_student=0.05, quantization=0.1):
    """The matching pairs, label-smoothed: cross-entropy of each row's and each column's
    softmax of <h_I, h_T> / b against 1 - eps on the true pair plus eps spread evenly, times 2
    -- so that at eps = 1/2 it is :func:`distill_loss` against an all-equal teacher (hard
    weight 1) up to a constant: the control that tells what a teacher's ranking brings beyond a
    softened target."""
    s = (h_img @ h_txt.T) / h_img.shape[1] / tau_student
    n = len(s)
    target = torch.full_like(s, eps / n) + (1 - eps) * torch.eye(n, device=s.device, dtype=s.dtype)
    ce = -(target * nnf.log_softmax(s, 1)).sum(1).mean() - (target * nnf.log_softmax(s.T, 1)).sum(1).mean()
    return 2 * ce + quantization * quantization_loss(h_img, h_txt)


def shuffled_rows(scores, generator):
    """Each row's scores in a random order of its own: the teacher's spread kept, which
    caption it favours lost (the "shuffled" control)."""
    order = torch.argsort(torch.rand(scores.shape, generator=generator), dim=1).to(scores.device)
    return torch.gather(scores, 1, order)


def distilled_loss(teacher: dict, h_img, h_txt, cfg: dict):
    """The "distilled" head's loss: the in-batch distillation (:func:`distill_loss` against the
    matcher's batch x batch scores ``teacher["batch"]``) plus ``list_weight`` x
    :func:`listwise_loss` in both directions over each query's list -- its true pair, then its
    ``list_size`` candidates -- with ``teacher["i2t"]`` / ``teacher["t2i"]`` the matcher's list
    scores (Q x L) and the student's <h_I, h_T> / b of the same pairs. ``h_img`` / ``h_txt``:
    the Q batch items' codes, then the lists' (the captions of each image query, the images of
    each caption query), in query order. At ``list_weight`` 0 it is the in-batch head's loss:
    the lists are the one part the two differ in. The true pair's own loss among its list
    (``list_hard_weight``) is off by default: the in-batch term has the pairs' loss, and on the
    dev part of the graded scenes a pair loss against the head's look-alikes cost agreement
    (docs/matchers.md)."""
    n, m, b = len(teacher["i2t"]), cfg["list_size"], h_img.shape[1]
    hi, ht = h_img[:n], h_txt[:n]
    loss = distill_loss(teacher["batch"], hi, ht, cfg["tau_teacher"], cfg["tau_student"], cfg["quantization"],
                        cfg["hard_weight"])
    if not cfg["list_weight"]:
        return loss
    own = (hi * ht).sum(1, keepdim=True)
    s_i2t = torch.cat([own, torch.einsum("qd,qmd->qm", hi, h_txt[n:].view(n, m, b))], 1) / b / cfg["tau_student"]
    s_t2i = torch.cat([own, torch.einsum("qd,qmd->qm", ht, h_img[n:].view(n, m, b))], 1) / b / cfg["tau_student"]
    hard = cfg["list_hard_weight"]
    return loss + cfg["list_weight"] * (listwise_loss(teacher["i2t"], s_i2t, cfg["tau_teacher"], hard)
                                        + listwise_loss(teacher["t2i"], s_t2i, cfg["tau_teacher"], hard))


def head_loss(head: str, cfg: dict, teacher, h_img, h_txt):
    """The loss a head of kind ``head`` (:data:`HEADS`) trains on; ``teacher``: the matcher's
    in-batch scores (rows shuffled already for "shuffled"), None for the heads that take none."""
    if head == "pairs":
        return pairs_only_loss(h_img, h_txt, cfg["tau_student"], cfg["quantization"])
    if head == "smoothing":
        return smoothing_loss(h_img, h_txt, cfg["smoothing_eps"], cfg["tau_student"], cfg["quantization"])
    if head == "distilled":  # h_img / h_txt: the batch's codes, then each query's list's
        return distilled_loss(teacher, h_img, h_txt, cfg)
    return distill_loss(teacher, h_img, h_txt, cfg["tau_teacher"], cfg["tau_student"], cfg["quantization"],
                        cfg["hard_weight"])


LIST_FIRST_GAP = 0.1  # the true pair's lift above a candidate the matcher ranks higher, in list-score sds


def list_scores(matcher, img_enc, txt_enc, n_queries: int, list_size: int, direction: str):
    """The matcher's scores of each query against its list: (Q, 1 + list_size), the true pair
    first. The encodings hold the Q batch items first, then each query's list_size candidates
    in query order (i2t: images are the queries, captions the lists; t2i the reverse)."""
    out = []
    for i in range(n_queries):
        lst = torch.cat([torch.tensor([i]), n_queries + i * list_size + torch.arange(list_size)])
        if direction == "i2t":
            out.append(matcher.pair_scores(select(img_enc, slice(i, i + 1)), select(txt_enc, lst))[0])
        else:
            out.append(matcher.pair_scores(select(img_enc, lst), select(txt_enc, slice(i, i + 1)))[:, 0])
    return torch.stack(out)


def listwise_loss(teacher, student, tau_teacher=0.25, hard_weight=1.0):
    """KL between the teacher's and the student's softmax over each query's list (Q x L, the
    true pair in column 0), with the true pair kept first: where the matcher scores a candidate
    above it, its target is lifted LIST_FIRST_GAP list-score sds above the best candidate.
    Teacher scores are z-scored over the batch's lists (every matcher's scale means the same);
    plus ``hard_weight`` x the loss of the true pair among its list."""
    t = teacher.clone()
    gap = LIST_FIRST_GAP * t.std().clamp_min(1e-6)
    t[:, 0] = torch.maximum(t[:, 0], t[:, 1:].max(1).values + gap)
    z = (t - t.mean()) / t.std().clamp_min(1e-6) / tau_teacher
    kl = nnf.kl_div(nnf.log_softmax(student, 1), nnf.log_softmax(z, 1), log_target=True, reduction="batchmean")
    first = torch.zeros(len(student), dtype=torch.long, device=student.device)
    return kl + hard_weight * nnf.cross_entropy(student, first) if hard_weight else kl


def pairs_only_loss(h_img, h_txt, tau_student=0.05, quantization=0.1):
    """The undistilled control: the matching pairs alone (in-batch contrastive over
    <h_I, h_T> / b), so only the teacher's scores differ from :func:`distill_loss`."""
    s = (h_img @ h_txt.T) / h_img.shape[1] / tau_student
    return _true_pairs(s) + quantization * quantization_loss(h_img, h_txt)


def _to_tensors(x, modality):
    if modality == "image":
        regions, mask = x
        return torch.as_tensor(np.asarray(regions, dtype=np.float32)), torch.as_tensor(np.asarray(mask, dtype=bool))
    tokens, lengths = x
    return torch.as_tensor(np.asarray(tokens, dtype=np.int64)), torch.as_tensor(np.asarray(lengths, dtype=np.int64))


class MatcherModel:
    """A trained matcher and (once distilled) its hash head; what ``hashret train --model
    sgraf|cgam|han|shan`` writes and ``build-index`` / ``query --rerank`` read. Inputs:
    images as (regions N x n_o x d, mask N x n_o), captions as (tokens N x L, lengths N) or
    strings through the vocabulary."""

    kind = "matcher"

    def __init__(self, name, bits, region_dim, vocab, seed=0, **overrides):
        from hashret.models.matchers import matcher_config

        check(name in MATCHERS, f"unknown matcher {name!r}: use one of {', '.join(MATCHERS)}")
        check(int(bits) > 0 and int(bits) % 8 == 0,
              f"code length {bits} is not a positive multiple of 8: use e.g. 64, 128, 256 or 512")
        if "distill" in overrides:  # a config from before the "head" field
            legacy = overrides.pop("distill")
            check(legacy in LEGACY_DISTILL, f"distill must be true, false or 'uniform', got {legacy!r}: "
                  f"set head to one of {', '.join(HEADS)} instead")
            overrides.setdefault("head", LEGACY_DISTILL[legacy])
        matcher_fields = matcher_config(name, overrides.get("preset", "cpu"))
        fields = {**matcher_fields, **head_config(name)}
        bad = sorted(set(overrides) - set(fields))
        check(not bad, f"{name} has no config field {', '.join(bad)}: known fields are "
              f"{', '.join(sorted(fields))}")
        from hashret.data.scenes import PAD, UNK, Vocabulary

        self.name = name
        words = list(vocab)
        check(words[:2] == [PAD, UNK], "the vocabulary must start with <pad>, <unk> (a Vocabulary's words)")
        self.vocab = Vocabulary(words[2:])
        self.vocab_words = self.vocab.words
        self.config = {"model": name, "kind": self.kind, "bits": int(bits),
                       "region_dim": int(region_dim), "vocab_size": len(self.vocab_words),
                       "seed": int(seed), **fields, **overrides}
        check_head(self.config["head"])
        check(isinstance(self.config["list_size"], int) and self.config["list_size"] >= 1,
              f"list_size must be a positive integer (candidates per query), got {self.config['list_size']!r}")
        eps = self.config["smoothing_eps"]
        check(isinstance(eps, (int, float)) and 0 <= eps <= 1, f"smoothing_eps must be in [0, 1], got {eps!r}")
        check(int(self.config["head_group"]) >= 1,
              f"head_group must be at least 1 (1 = random batches), got {self.config['head_group']}")
        torch.manual_seed(int(seed))
        mcfg = {k: self.config[k] for k in matcher_fields}
        self.matcher = build_matcher(name, int(region_dim), len(self.vocab_words), **mcfg).eval()
        c = self.config
        self.head = HashHead(int(region_dim), len(self.vocab_words), int(bits), c["head_hidden"],
                             c["head_word_dim"]).eval()
        self.has_head = False
        self.checkpoint_info = {}

    @property
    def bits(self):
        return self.config["bits"]

    # -- state ---------------------------------------------------------------------------
    def state_dict(self):
        out = {f"matcher.{k}": v for k, v in self.matcher.state_dict().items()}
        if self.has_head:
            out.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return out

    def load_state_dict(self, state):
        m = {k[8:]: v for k, v in state.items() if k.startswith("matcher.")}
        h = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        self.matcher.load_state_dict(m)
        if h:
            self.head.load_state_dict(h)
            self.has_head = True
        self.matcher.eval()
        self.head.eval()
        return self

    # -- inputs --------------------------------------------------------------------------
    def check_data(self, dataset):
        """Refuse scene data other than this model's: another region size or vocabulary."""
        check(self.config["region_dim"] == dataset.region_dim,
              f"the {self.name} model takes {self.config['region_dim']}-d regions, the dataset has "
              f"{dataset.region_dim}: use the dataset it was trained on")
        check(self.vocab_words == dataset.vocab.words,
              f"the {self.name} model's vocabulary differs from the dataset's: use the dataset it was "
              "trained on")

    def check_images(self, regions, mask=None):
        regions = np.asarray(regions, dtype=np.float32)
        if regions.ndim == 2:
            regions = regions[None]
        check(regions.ndim == 3, f"region features must be N x n_regions x dim, got shape {regions.shape}")
        want = self.config["region_dim"]
        check(regions.shape[2] == want, f"region features have {regions.shape[2]} dimensions, the "
              f"{self.name} model takes {want}: use features from the same region extractor")
        check(len(regions) > 0 and regions.shape[1] > 0, "the image query holds no regions")
        if not np.isfinite(regions).all():
            raise HashretError("region features hold NaN/inf values: clean them first")
        mask = np.ones(regions.shape[:2], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        check(mask.shape == regions.shape[:2], f"region mask has shape {mask.shape}, expected {regions.shape[:2]}")
        return regions, mask

    def text_inputs(self, captions):
        """Strings -> (tokens, lengths); every caption must hold a known word."""
        vocab = self.vocab
        tokens, lengths = vocab.encode(captions)
        for c, row in zip(captions, tokens):
            check((row > 1).any(), f"the caption {c!r} has no word in the model's vocabulary "
                  f"({len(vocab)} words): use words from the training captions")
        return tokens, lengths

    # -- codes ---------------------------------------------------------------------------
    def project(self, x, modality):
        check(self.has_head, f"the {self.name} checkpoint has no hash head: train one with "
              "'hashret train --distill-from RUN_DIR'")
        with torch.inference_mode():  # no autograd bookkeeping: ~10% of a cascade query
            a, b = _to_tensors(x, modality)
            out = self.head.image(a, b) if modality == "image" else self.head.text(a, b)
        return out.numpy()

    def encode(self, x, modality):
        if modality == "image":
            x = self.check_images(*(x if isinstance(x, tuple) else (x, None)))
        elif isinstance(x, (list, str)):
            x = self.text_inputs([x] if isinstance(x, str) else x)
        return sign_codes(self.project(x, modality))

    def encode_rows(self, part, modality, rows, batch_size=2048):
        rows = np.asarray(rows)
        out = np.empty((len(rows), self.bits), dtype=np.int8)
        for s in range(0, len(rows), batch_size):
            r = rows[s:s + batch_size]
            x = part.image_batch(r) if modality == "image" else part.text_batch(r)
            out[s:s + batch_size] = sign_codes(self.project(x, modality))
        return out

    # -- matcher scores ------------------------------------------------------------------
    def encode_for_matching(self, x, modality):
        with torch.inference_mode():
            a, b = _to_tensors(x, modality)
            return self.matcher.encode_image(a, b) if modality == "image" else self.matcher.encode_text(a, b)

    def encode_rows_for_matching(self, part, modality, rows, batch_size=1024):
        rows = np.asarray(rows)
        encs = []
        for s in range(0, len(rows), batch_size):
            r = rows[s:s + batch_size]
            x = part.image_batch(r) if modality == "image" else _pad_to(part.text_batch(r), part)
            encs.append(self.encode_for_matching(x, modality))
        return concat(encs)

    def scores(self, img_enc, txt_enc, budget=512):
        """Matcher scores of every image against every caption (encodings from
        :meth:`encode_for_matching`)."""
        with torch.inference_mode():
            if self.name == "global":
                return self.matcher.pair_scores(img_enc, txt_enc)
            return score_chunks(self.matcher, img_enc, txt_enc, budget)


def _pad_to(text_batch, part):
    """Pad a caption batch to the part's full length, so encodings of different batches
    concatenate."""
    tokens, lengths = text_batch
    full = part.tokens.shape[1]
    if tokens.shape[1] < full:
        tokens = np.pad(tokens, ((0, 0), (0, full - tokens.shape[1])))
    return tokens, lengths


def concat(encs):
    first = encs[0]
    if isinstance(first, dict):
        return {k: concat([e[k] for e in encs]) for k in first}
    if isinstance(first, tuple):
        return tuple(concat([e[i] for e in encs]) for i in range(len(first)))
    return torch.cat(encs)


def exhaustive_ranking(model: MatcherModel, query_enc, gallery_enc, direction, k=10, budget=512):
    """Top-k gallery ids per query by the matcher's score over the whole gallery."""
    nq = n_rows(query_enc)
    out = np.empty((nq, k), dtype=np.int64)
    for q in range(nq):
        one = select(query_enc, slice(q, q + 1))
        s = (model.scores(one, gallery_enc, budget)[0] if direction == "i2t"
             else model.scores(gallery_enc, one, budget)[:, 0])
        out[q] = torch.topk(s, k).indices.numpy()
    return out


def rerank(model: MatcherModel, query_enc, gallery_enc, candidates, direction, k=10, budget=512):
    """Re-score each query's candidate gallery ids (Q x K, -1 = none) with the matcher and
    return (ids, scores) of the best k per query, best first."""
    candidates = np.asarray(candidates)
    nq = n_rows(query_enc)
    ids = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    for q in range(nq):
        cand = candidates[q][candidates[q] >= 0]
        if len(cand) == 0:
            continue
        one = select(query_enc, slice(q, q + 1))
        sub = select(gallery_enc, torch.from_numpy(cand))
        s = model.scores(one, sub, budget)[0] if direction == "i2t" else model.scores(sub, one, budget)[:, 0]
        top = torch.topk(s, min(k, len(cand)))
        ids[q, :len(top.indices)] = cand[top.indices.numpy()]
        scores[q, :len(top.indices)] = top.values.numpy()
    return ids, scores
