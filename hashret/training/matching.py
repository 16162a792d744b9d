"""Training the fine-grained matchers and their hash heads, and ranking a gallery with them:
exhaustively, by codes alone, or as a cascade (Hamming top-K, then the matcher)."""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hashret.errors import check
from hashret.metrics import recall_at_k
from hashret.models.distill import (HEADS, MatcherModel, exhaustive_ranking, head_loss, list_scores,
                                    pairs_only_loss, select, shuffled_rows, uses_matcher)
from hashret.models.base import adam
from hashret.models.matchers import score_chunks

log = logging.getLogger(__name__)


def _epoch_pairs(part, rng):
    """Each training image once, with one of its captions drawn at random (two captions of
    one image in a batch would be false negatives)."""
    caps = part.captions_of(np.arange(part.n_images))
    images = rng.permutation(part.n_images)
    captions = np.array([caps[i][rng.integers(len(caps[i]))] for i in images])
    return images, captions


def _batch(part, images, captions, device):
    x, m = part.image_batch(images)
    t, ln = part.text_batch(captions)
    return (torch.from_numpy(x).to(device), torch.from_numpy(m).to(device),
            torch.from_numpy(t).to(device), torch.from_numpy(ln).to(device))


def _look_alike_order(head, part, images, captions, group, rng, device):
    """Reorder an epoch's (image, caption) pairs into groups of ``group``: a random anchor,
    then the images whose codes lie nearest to the anchor's caption under the head as it
    stands (what the codes confuse now, often the anchor's twin), each image once per epoch.
    Consecutive groups fill a batch, so the in-batch loss sees the look-alikes it must tell
    apart; random batches almost never hold them (trained this way, the HAN head's R@1 on the
    synthetic scenes rose from ~55% to ~75% at 256 bits, R@50 unchanged)."""
    from hashret.index import HashIndex

    n = part.n_images
    caption_of = np.empty(n, dtype=np.int64)
    caption_of[images] = captions
    img_codes, txt_codes = _head_codes(head, part, np.arange(n), caption_of, device)
    index = HashIndex(img_codes.shape[1] * 8)
    index.add(img_codes)
    _, near = index.search(txt_codes, min(n, 4 * group))
    used = np.zeros(n, dtype=bool)
    order = []
    for anchor in rng.permutation(n):
        if used[anchor]:
            continue
        members = [anchor]
        used[anchor] = True
        for j in near[anchor]:
            if len(members) == group:
                break
            if j >= 0 and not used[j]:
                members.append(j)
                used[j] = True
        order.extend(members)
    order = np.asarray(order, dtype=np.int64)
    return order, caption_of[order]


def _epochs(dataset, seed, epochs, batch_size, desc, progress, device, step, schedule=None) -> list:
    """The loop the matcher and its heads share: each epoch, the training images in a seeded
    order with one caption each (or ``schedule[epoch]``'s (images, captions)), in batches;
    ``step(epoch, regions, mask, tokens, lengths, rows)`` updates the model and returns the
    batch's loss (``rows``: the batch's (images, captions) numbers). Returns the mean loss per
    epoch."""
    from tqdm.auto import tqdm

    part = dataset.part("train")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        images, captions = _epoch_pairs(part, rng) if schedule is None else schedule[epoch]
        total, steps = 0.0, 0
        for s in range(0, len(images) - 1, batch_size):
            rows = images[s:s + batch_size], captions[s:s + batch_size]
            x, m, t, ln = _batch(part, *rows, device)
            if len(x) < 2:
                continue
            total += step(epoch, x, m, t, ln, rows)
            steps += 1
        history.append(total / max(steps, 1))
        bar.set_postfix(loss=round(history[-1], 4))
    return history


def train_matcher(model: MatcherModel, dataset, progress=False, device="cpu") -> list:
    """Train the matcher with its paper's loss on the dataset's training part (seeded)."""
    cfg = model.config
    net = model.matcher.to(device).train()
    groups = ([list(b.parameters()) for b in net.branches.values()] if hasattr(net, "branches")
              else [list(net.parameters())])
    opt = adam(net.parameters(), cfg["lr"])

    def step(epoch, x, m, t, ln, rows):
        img, txt = net.encode_image(x, m), net.encode_text(t, ln)
        terms = (net.loss_terms(img, txt, epoch) if hasattr(net, "loss_terms")
                 else [net.loss(net.pair_scores(img, txt), epoch)])
        loss = sum(terms)
        opt.zero_grad()
        loss.backward()
        for g in groups:  # SGR and SAF are clipped separately: trained as two models
            torch.nn.utils.clip_grad_norm_(g, cfg["grad_clip"])
        opt.step()
        return float(loss.detach()) / len(x)

    history = _epochs(dataset, cfg["seed"], cfg["epochs"], cfg["batch_size"],
                      f"{model.name} matcher", progress, device, step)
    model.matcher = net.to("cpu").eval()
    return history


def head_schedule(model: MatcherModel, dataset, device="cpu") -> list:
    """The batches every hash head of ``model``'s matcher trains on, made once, so that heads
    that learn from different targets see the same pairs in the same order: per epoch, the
    training images (seeded order) with one caption each; from the second epoch on, with
    ``head_group`` > 1, regrouped into look-alikes (:func:`_look_alike_order`) under the codes
    of a reference head -- ``model``'s initial head trained one epoch on the first epoch's
    batches from the pairs alone, the same for every head whatever it learns from."""
    import copy

    cfg = model.config
    part = dataset.part("train")
    rng = np.random.default_rng(cfg["seed"] + 1)
    schedule = [_epoch_pairs(part, rng) for _ in range(cfg["head_epochs"])]
    group = int(cfg["head_group"])
    if group > 1 and len(schedule) > 1:
        reference = copy.deepcopy(model.head).to(device).train()
        opt = adam(reference.parameters(), cfg["head_lr"])

        def step(epoch, x, m, t, ln, rows):
            loss = pairs_only_loss(reference.image(x, m), reference.text(t, ln), cfg["tau_student"],
                                   cfg["quantization"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            return float(loss.detach())

        _epochs(dataset, cfg["seed"] + 1, 1, cfg["head_batch_size"], "reference head", False, device, step,
                schedule[:1])
        for e in range(1, len(schedule)):
            schedule[e] = _look_alike_order(reference, part, *schedule[e], group, rng, device)
    return schedule


def hard_candidates(head, part, list_size: int, device="cpu"):
    """Each training image's ``list_size`` nearest captions of other images, and each
    caption's ``list_size`` nearest other images, under the head's codes as they stand
    (Hamming, ties by row): the lists the "distilled" head learns the matcher's ranking of."""
    from hashret.index import HashIndex

    img, txt = _head_codes(head, part, np.arange(part.n_images), np.arange(part.n_captions), device)
    per_image = int(np.bincount(part.caption_image).max())
    out = []
    for queries, gallery, k in ((img, txt, list_size + per_image), (txt, img, list_size + 1)):
        index = HashIndex(img.shape[1] * 8)
        index.add(gallery)
        _, near = index.search(queries, min(k, len(gallery)))
        if queries is img:  # an image's own captions, a caption's own image: not candidates
            mine = part.caption_image[near] == np.arange(len(queries))[:, None]
        else:
            mine = near == part.caption_image[:, None]
        keep = np.argsort(mine, axis=1, kind="stable")[:, :list_size]  # others first, in rank order
        out.append(np.take_along_axis(near, keep, axis=1))
    return out[0], out[1]


def _head_codes(head, part, images, captions, device, chunk=2048):
    """Packed codes of ``images`` and ``captions`` (rows of ``part``) under the head as it
    stands, batch norm in inference mode (codes as the index would hold them)."""
    from hashret.index.bits import pack_codes

    was_training = head.training
    head.eval()
    with torch.no_grad():
        img = [pack_codes(head.image(*_to_device(part.image_batch(images[s:s + chunk]), device)).cpu().numpy())
               for s in range(0, len(images), chunk)]
        txt = [pack_codes(head.text(*_to_device(part.text_batch(captions[s:s + chunk]), device)).cpu().numpy())
               for s in range(0, len(captions), chunk)]
    head.train(was_training)
    return np.concatenate(img), np.concatenate(txt)


def _to_device(batch, device):
    return tuple(torch.from_numpy(np.asarray(a)).to(device) for a in batch)


def train_head(model: MatcherModel, dataset, schedule=None, progress=False, device="cpu") -> list:
    """Train the hash head on what its ``head`` field names (:data:`~hashret.models.distill.HEADS`):
    the matcher's in-batch score matrix (``in-batch``), that and the matcher's ranking of the
    head's own hard candidates (``distilled``: each epoch, every training query's ``list_size``
    nearest items under the head's codes, scored by the frozen matcher), or a control -- the pairs
    alone, the pairs label-smoothed, the in-batch scores shuffled within each row.
    ``schedule``: the batches (:func:`head_schedule`, made here when not given; the cascade
    benchmark makes one and trains every head of a matcher on it)."""
    cfg = model.config
    kind = cfg["head"]
    matcher = model.matcher.to(device).eval()
    head = model.head.to(device).train()
    schedule = head_schedule(model, dataset, device) if schedule is None else schedule
    opt = adam(head.parameters(), cfg["head_lr"])
    shuffle = torch.Generator().manual_seed(int(cfg["seed"]) + 2)  # the shuffled control's orders
    part = dataset.part("train")
    lists = {"epoch": None}

    def listed(epoch, rows):
        """The batch followed by each query's list: images (queries, then the captions' lists)
        and captions (queries, then the images' lists), as inputs."""
        if lists["epoch"] != epoch:
            lists["captions"], lists["images"] = hard_candidates(head, part, cfg["list_size"], device)
            lists["epoch"] = epoch
        images, captions = (np.asarray(r) for r in rows)
        all_images = np.concatenate([images, lists["images"][captions].ravel()])
        all_captions = np.concatenate([captions, lists["captions"][images].ravel()])
        return _batch(part, all_images, all_captions, device)

    def step(epoch, x, m, t, ln, rows):
        if kind == "distilled":
            x, m, t, ln = listed(epoch, rows)
        hi, ht = head.image(x, m), head.text(t, ln)
        teacher = None
        if uses_matcher(kind):
            with torch.no_grad():
                img, txt = matcher.encode_image(x, m), matcher.encode_text(t, ln)
                if kind == "distilled":
                    n = len(rows[0])
                    teacher = {d: list_scores(matcher, img, txt, n, cfg["list_size"], d) for d in ("i2t", "t2i")}
                    teacher["batch"] = score_chunks(matcher, select(img, slice(0, n)), select(txt, slice(0, n)))
                else:  # in blocks: one 64 x 64 pass over all fragments ran ~1.5x slower (cache misses)
                    teacher = score_chunks(matcher, img, txt)
            if kind == "shuffled":
                teacher = shuffled_rows(teacher, shuffle)
        loss = head_loss(kind, cfg, teacher, hi, ht)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss.detach())

    history = _epochs(dataset, cfg["seed"] + 1, cfg["head_epochs"], cfg["head_batch_size"],
                      f"{model.name} hash head ({HEADS[kind]})", progress, device, step, schedule)
    model.head = head.to("cpu").eval()
    model.matcher = matcher.to("cpu")
    model.has_head = True
    return history


# -- ranking a gallery ---------------------------------------------------------------------
def ground_truth(part, direction, queries):
    """Relevant gallery ids per query: i2t -> the image's captions, t2i -> the caption's image."""
    if direction == "i2t":
        return part.captions_of(queries)
    return part.images_of(queries)


def recall_report(ranked, part, direction, queries) -> dict:
    r = recall_at_k(ranked, ground_truth(part, direction, queries), ks=(1, 5, 10))
    return {f"r{k}": v for k, v in r.items()}


def matcher_recall(model: MatcherModel, dataset, part_name="test", n_queries=200, seed=0) -> dict:
    """Exhaustive Recall@1/5/10 both directions on ``n_queries`` queries per direction."""
    part = dataset.part(part_name)
    rng = np.random.default_rng(seed)
    out = {}
    img_enc = model.encode_rows_for_matching(part, "image", np.arange(part.n_images))
    txt_enc = model.encode_rows_for_matching(part, "text", np.arange(part.n_captions))
    for direction in ("i2t", "t2i"):
        n = part.n_images if direction == "i2t" else part.n_captions
        queries = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
        q_enc = select(img_enc if direction == "i2t" else txt_enc, torch.from_numpy(queries))
        g_enc = txt_enc if direction == "i2t" else img_enc
        t0 = time.perf_counter()
        ranked = exhaustive_ranking(model, q_enc, g_enc, direction)
        out[direction] = {**recall_report(ranked, part, direction, queries),
                          "ms_per_query": 1e3 * (time.perf_counter() - t0) / len(queries)}
    return out


def part_codes(model: MatcherModel, part) -> dict:
    """Packed hash codes of every image and every caption of a part, by modality."""
    from hashret.index.bits import pack_codes

    return {m: pack_codes(model.encode_rows(part, m, part.rows(m))) for m in ("image", "text")}


def codes_recall(model: MatcherModel, dataset, part_name="test", n_queries=1000, seed=0,
                 ks=(1, 5, 10), codes=None) -> dict:
    """Recall@K of the hash codes alone (Hamming ranking, ties by row), both directions;
    ``codes``: the part's :func:`part_codes`, when the caller has them already."""
    from hashret.index import HashIndex

    part = dataset.part(part_name)
    codes = part_codes(model, part) if codes is None else codes
    rng = np.random.default_rng(seed)
    out = {}
    for direction, (qm, gm) in {"i2t": ("image", "text"), "t2i": ("text", "image")}.items():
        n = len(codes[qm])
        queries = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
        ix = HashIndex(model.bits)
        ix.add(codes[gm])
        _, ranked = ix.search(codes[qm][queries], max(ks))
        out[direction] = {f"r{k}": v for k, v in
                          recall_at_k(ranked, ground_truth(part, direction, queries), ks).items()}
    return out


def train_scene_model(model: str = "sgraf", dataset: str = "scenes", bits: int = 64, seed: int = 0,
                      out="runs/matcher", epochs: int | None = None, device: str = "cpu",
                      options: dict | None = None, distill_from=None, evaluate: bool = True,
                      progress: bool = True) -> MatcherModel:
    """Train a matcher (sgraf, cgam, han, shan or the global baseline) on a scene dataset
    (``scenes[:k=v,...]`` or ``precomp:FOLDER``), then its hash head, and write a checkpoint.
    With ``distill_from`` (a RUN_DIR holding a trained matcher), only the head is trained.
    ``options`` may hold any matcher or head field (``head=pairs`` trains the head on the
    matching pairs alone)."""
    from hashret.data.scenes import load_scenes
    from hashret.models.checkpoint import load_checkpoint, save_checkpoint
    from hashret.training import seed_everything

    options = dict(options or {})
    if epochs is not None:
        options["epochs"] = int(epochs)
    ds = load_scenes(dataset)
    seed_everything(seed)
    tag = "SYNTHETIC " if ds.synthetic else ""
    t0 = time.perf_counter()
    if distill_from is not None:
        teacher = load_checkpoint(distill_from)
        check(getattr(teacher, "kind", None) == "matcher",
              f"{distill_from} holds a {teacher.config['model']} model, not a matcher: pass a RUN_DIR "
              "written by 'hashret train --model sgraf|cgam|han|shan'")
        check(model in (None, teacher.name), f"{distill_from} holds a {teacher.name} matcher, not "
              f"{model}: drop `model` or pass the matching RUN_DIR")
        teacher.check_data(ds)
        keep = {k: v for k, v in teacher.config.items()
                if k not in ("model", "kind", "bits", "region_dim", "vocab_size", "seed")}
        net = MatcherModel(teacher.name, bits, ds.region_dim, ds.vocab.words, seed, **{**keep, **options})
        net.matcher = teacher.matcher
        log.info(f"distilling the {net.name} matcher of {distill_from} into {bits}-bit codes")
    else:
        net = MatcherModel(model, bits, ds.region_dim, ds.vocab.words, seed, **options)
        n = ds.part("train").n_images
        log.info(f"training the {net.name} matcher (seed {seed}) on {tag}{ds.name}: {n} images")
        train_matcher(net, ds, progress=progress, device=device)
    matcher_s = time.perf_counter() - t0
    train_head(net, ds, progress=progress, device=device)
    head_s = time.perf_counter() - t0 - matcher_s
    extra = {"dataset_spec": dataset, "vocab": ds.vocab.words,
             "train": {"matcher_seconds": round(matcher_s, 2), "head_seconds": round(head_s, 2),
                       "device": device, "distilled_from": str(distill_from) if distill_from else None}}
    if evaluate:
        ev = {"matcher": matcher_recall(net, ds, n_queries=200), "codes": codes_recall(net, ds)}
        extra["eval"] = ev
        for what, r in ev.items():
            log.info(f"{what}: R@1/5/10 I→T {r['i2t']['r1']:.1f}/{r['i2t']['r5']:.1f}/{r['i2t']['r10']:.1f}, "
                f"T→I {r['t2i']['r1']:.1f}/{r['t2i']['r5']:.1f}/{r['t2i']['r10']:.1f}")
    save_checkpoint(out, net, dataset=ds, extra=extra)
    log.info(f"wrote {out}")
    return net
