"""Region + caption data for the fine-grained matchers: the "precomp" layout of the SCAN /
SGRAF line of work, and a synthetic scene generator with planted attribute-object bindings.

A :class:`SceneDataset` holds parts ("train", "dev", "test"); each :class:`ScenePart` has
images as sets of region features (N x n_o x d, with a mask for padded regions) and captions
as word-id sequences, each caption pointing at its image. Items are indexed per modality:
image rows are image numbers, text rows are caption numbers.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hashret.errors import HashretError, check

PAD, UNK = "<pad>", "<unk>"
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list:
    return _WORD.findall(str(text).lower())


class Vocabulary:
    """Word <-> id; id 0 pads, id 1 stands for unknown words."""

    def __init__(self, words):
        self.words = [PAD, UNK] + [w for w in words if w not in (PAD, UNK)]
        self.ids = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def build(cls, captions, min_count: int = 1) -> "Vocabulary":
        counts = Counter(w for c in captions for w in tokenize(c))
        return cls(sorted(w for w, n in counts.items() if n >= min_count))

    def __len__(self):
        return len(self.words)

    def encode(self, captions, max_len: int | None = None):
        """(tokens (M x L) int64 padded with 0, lengths (M,)); unknown words map to 1."""
        seqs = [[self.ids.get(w, 1) for w in tokenize(c)] for c in captions]
        L = max([len(s) for s in seqs] + [1]) if max_len is None else max_len
        tokens = np.zeros((len(seqs), L), dtype=np.int64)
        lengths = np.zeros(len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            s = s[:L]
            tokens[i, :len(s)] = s
            lengths[i] = len(s)
        return tokens, lengths

    def encode_query(self, text: str):
        """One free-text query: (tokens (1 x L), lengths, known words, unknown words). A
        caption with no known word cannot be matched, so it is an error."""
        words = tokenize(text)
        check(words, "the text query is empty: give some words")
        known = [w for w in words if w in self.ids]
        unknown = sorted({w for w in words if w not in self.ids})
        check(known, f"no word of the query is in the model's vocabulary ({len(self)} words; "
              f"unknown: {', '.join(unknown[:10])}): use words from the training captions")
        tokens, lengths = self.encode([" ".join(words)])
        return tokens, lengths, known, unknown


@dataclass
class ScenePart:
    regions: np.ndarray            # (N, n_o, d) float32, may be a memory map
    mask: np.ndarray | None        # (N, n_o) bool, True = a real region; None = all real
    captions: list                 # M strings
    caption_image: np.ndarray      # (M,) image row of each caption
    tokens: np.ndarray = None      # (M, L) int64, set by the dataset
    lengths: np.ndarray = None     # (M,)
    image_ids: np.ndarray = None   # (N,) keys
    facts: list = None             # synthetic only: each image's "attribute object" bindings

    @property
    def n_images(self):
        return len(self.regions)

    @property
    def n_captions(self):
        return len(self.captions)

    def image_batch(self, rows):
        rows = np.asarray(rows)
        x = np.asarray(self.regions[np.sort(rows)] if isinstance(self.regions, np.memmap)
                       else self.regions[rows], dtype=np.float32)
        if isinstance(self.regions, np.memmap):  # memmaps want sorted reads; restore the order
            x = x[np.argsort(np.argsort(rows))]
        m = (np.ones(x.shape[:2], dtype=bool) if self.mask is None else self.mask[rows])
        return x, m

    def text_batch(self, rows):
        rows = np.asarray(rows)
        lengths = self.lengths[rows]
        L = max(int(lengths.max()) if len(rows) else 1, 1)
        return self.tokens[rows, :L], lengths

    def rows(self, modality: str) -> np.ndarray:
        return np.arange(self.n_images if modality == "image" else self.n_captions)

    def images_of(self, captions) -> np.ndarray:
        return self.caption_image[np.asarray(captions)]

    def captions_of(self, images) -> list:
        images = np.asarray(images)
        order = np.argsort(self.caption_image, kind="stable")
        starts = np.searchsorted(self.caption_image[order], images)
        ends = np.searchsorted(self.caption_image[order], images, side="right")
        return [order[a:b] for a, b in zip(starts, ends)]


@dataclass
class SceneDataset:
    name: str
    parts: dict
    vocab: Vocabulary
    synthetic: bool
    source: str
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        dims = {p.regions.shape[2] for p in self.parts.values()}
        check(len(dims) == 1, f"{self.name}: parts have different region sizes {sorted(dims)}")
        for name, p in self.parts.items():
            check(p.regions.ndim == 3, f"{self.name}/{name}: region features must be N x n_o x d, "
                  f"got shape {p.regions.shape}")
            check(len(p.caption_image) == p.n_captions and
                  (p.n_captions == 0 or 0 <= p.caption_image.min() <= p.caption_image.max() < p.n_images),
                  f"{self.name}/{name}: captions point at images that do not exist")
            if p.tokens is None:
                p.tokens, p.lengths = self.vocab.encode(p.captions)
            if p.image_ids is None:
                p.image_ids = np.array([f"{name}/{i}" for i in range(p.n_images)])

    split = None  # parts are fixed by the files or the generator's seed

    @property
    def n_items(self) -> int:
        return sum(p.n_images for p in self.parts.values())

    @property
    def region_dim(self) -> int:
        return next(iter(self.parts.values())).regions.shape[2]

    def part(self, name: str) -> ScenePart:
        aliases = {"val": "dev", "query": "test", "database": "test", "gallery": "test"}
        key = name if name in self.parts else aliases.get(name, name)
        check(key in self.parts, f"{self.name} has no part {name!r}: it has {', '.join(self.parts)}")
        return self.parts[key]

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.name.encode())
        h.update("\n".join(self.vocab.words).encode())
        for name in sorted(self.parts):
            p = self.parts[name]
            h.update(name.encode())
            h.update(np.asarray(p.regions.shape, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(p.regions[: min(64, p.n_images)], dtype=np.float32).tobytes())
            h.update(p.tokens.tobytes())
        return h.hexdigest()[:16]

    def payloads(self, part: str, modality: str, rows) -> list:
        p = self.part(part)
        rows = np.asarray(rows)
        if modality == "image":
            caps = p.captions_of(rows)
            return [{"key": str(p.image_ids[r]), "captions": [p.captions[c] for c in cs[:5]]}
                    for r, cs in zip(rows, caps)]
        return [{"key": f"{p.image_ids[p.caption_image[r]]}#{r}", "caption": p.captions[r],
                 "image": int(p.caption_image[r])} for r in rows]

    def summary(self) -> dict:
        return {"name": self.name, "synthetic": self.synthetic, "source": self.source,
                "region_dim": self.region_dim, "vocabulary": len(self.vocab),
                "parts": {k: {"images": p.n_images, "captions": p.n_captions,
                              "regions_per_image": p.regions.shape[1]} for k, p in self.parts.items()}}


# -- precomp layout ------------------------------------------------------------------------
PRECOMP_PARTS = ("train", "dev", "test", "testall")


def load_precomp(folder, min_count: int = 1, mmap: bool = True) -> SceneDataset:
    """The layout SCAN, SGRAF and their successors read: ``{split}_ims.npy`` (N x 36 x 2048
    bottom-up-attention regions; memory-mapped) and ``{split}_caps.txt`` (one caption per line,
    five per image in order, or one per image). The vocabulary is built from the training
    captions only."""
    folder = Path(folder)
    check(folder.is_dir(), f"precomp folder {folder} does not exist: pass the folder holding "
          "{split}_ims.npy and {split}_caps.txt")
    parts = {}
    for name in PRECOMP_PARTS:
        ims, caps = folder / f"{name}_ims.npy", folder / f"{name}_caps.txt"
        if not ims.exists() and not caps.exists():
            continue
        check(ims.is_file() and caps.is_file(), f"{folder}: {name} needs both {ims.name} and "
              f"{caps.name}; one is missing")
        try:
            regions = np.load(ims, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise HashretError(f"cannot read {ims} ({exc}): it must be a .npy array N x n_o x d") from None
        check(regions.ndim == 3, f"{ims} has shape {regions.shape}: region features must be "
              "N x n_regions x dim")
        with open(caps, encoding="utf-8", errors="replace") as fh:
            captions = [line.strip() for line in fh if line.strip()]
        n = len(regions)
        check(n > 0 and len(captions) % n == 0,
              f"{caps} has {len(captions)} captions for {n} images: expected a whole number per image")
        per = len(captions) // n
        parts[name] = ScenePart(regions=regions, mask=None, captions=captions,
                                caption_image=np.repeat(np.arange(n), per))
    check("train" in parts, f"{folder} has no train_ims.npy / train_caps.txt: the vocabulary is "
          "built from the training captions")
    vocab = Vocabulary.build(parts["train"].captions, min_count=min_count)
    return SceneDataset(name=f"precomp:{folder.name}", parts=parts, vocab=vocab, synthetic=False,
                        source=f"precomp region features in {folder}",
                        extra={"folder": str(folder.resolve())})


# -- synthetic scenes ----------------------------------------------------------------------
OBJECTS = ("cube ball cone ring lamp chair table cup vase book clock bottle shoe hat kite "
           "boat car bike dog cat bird tree flower house").split()
ATTRIBUTES = "red blue green yellow black white small large striped wooden shiny round".split()
JOINERS = ("and", "with", "near", "beside", "next to")
OPENERS = ("", "", "a photo of", "there is", "an image showing")


def make_scenes(n_train: int = 10000, n_dev: int = 500, n_test: int = 5000, n_objects: int = 24,
                n_attributes: int = 12, region_dim: int = 128, latent_dim: int = 32,
                min_objects: int = 2, max_objects: int = 4, background: int = 3,
                captions_per_image: int = 2, test_captions_per_image: int = 1,
                twin_fraction: float = 0.5, max_mentions: int = 3, noise: float = 0.35,
                graded: float = 0.0, seed: int = 0) -> SceneDataset:
    """SYNTHETIC scenes. An object region's feature is relu(P (e_object + e_attribute + noise)),
    a background region's relu(P (e_background + noise)); an image has ``min..max_objects``
    objects (distinct types) plus 1..``background`` background regions, padded to a common
    count (mask). A caption names 2..all of the image's objects with their attributes
    ("a red cube and a wooden boat"), at most ``max_mentions``. A ``twin_fraction`` of images come in pairs that differ
    only in one attribute-object binding (two objects swap attributes): each is the other's
    hard negative, which the mean of the regions cannot tell apart well.

    ``graded`` > 0 gives relevance degrees among non-pairs: that share of the scenes (twins
    aside) are variants of an earlier scene of their part -- its objects and attributes with
    one binding changed (an object swapped for another type, or an attribute for another) --
    so scenes come in families that share all but one binding, and a caption of one scene
    describes its relatives nearly as well (0, the default, draws every scene afresh: every
    non-pair equally wrong). Relations between objects are not modelled (the joiners are
    words only)."""
    check(2 <= min_objects <= max_objects <= n_objects <= len(OBJECTS),
          f"need 2 <= min_objects <= max_objects <= n_objects <= {len(OBJECTS)}")
    check(2 <= n_attributes <= len(ATTRIBUTES), f"n_attributes must lie in 2..{len(ATTRIBUTES)}")
    check(n_train > 0 and n_test > 0 and n_dev >= 0, "scene counts must be positive")
    check(0.0 <= graded <= 1.0, f"graded must lie in [0, 1] (the share of scenes that vary an earlier one), "
          f"got {graded}")
    rng = np.random.default_rng(seed)
    e_obj = rng.normal(size=(n_objects, latent_dim)).astype(np.float32)
    e_att = rng.normal(size=(n_attributes, latent_dim)).astype(np.float32)
    e_bg = rng.normal(size=(8, latent_dim)).astype(np.float32) * 1.5
    proj = (rng.normal(size=(latent_dim, region_dim)) / np.sqrt(latent_dim)).astype(np.float32)
    n_max = max_objects + background

    def scene_part(n, n_caps):
        objs, atts, swapped = [], [], []
        while len(objs) < n:
            if graded and objs and rng.random() < graded:  # a relative: one binding changed
                r0 = int(rng.integers(len(objs)))
                o, a = objs[r0].copy(), atts[r0].copy()
                j = int(rng.integers(len(o)))
                if rng.random() < 0.5 and len(o) < n_objects:
                    o[j] = rng.choice(np.setdiff1d(np.arange(n_objects), o))
                else:
                    a[j] = (a[j] + 1 + rng.integers(n_attributes - 1)) % n_attributes
                k = len(o)
            else:
                k = int(rng.integers(min_objects, max_objects + 1))
                o = rng.choice(n_objects, size=k, replace=False)
                a = rng.integers(0, n_attributes, size=k)
            objs.append(o)
            atts.append(a)
            swapped.append(None)
            if len(objs) < n and rng.random() < twin_fraction:
                j1, j2 = rng.choice(k, size=2, replace=False)
                if a[j1] == a[j2]:  # the swap must change a binding
                    a[j2] = (a[j2] + 1 + rng.integers(n_attributes - 1)) % n_attributes
                b = a.copy()
                b[j1], b[j2] = a[j2], a[j1]
                objs.append(o)
                atts.append(b)
                swapped[-1] = (j1, j2)
                swapped.append((j1, j2))
        regions = np.zeros((n, n_max, region_dim), dtype=np.float32)
        mask = np.zeros((n, n_max), dtype=bool)
        captions, cap_img = [], []
        for r in range(n):
            o, a = objs[r], atts[r]
            n_bg = int(rng.integers(1, background + 1))
            z = np.concatenate([e_obj[o] + e_att[a], e_bg[rng.integers(0, len(e_bg), n_bg)]])
            z = z + noise * rng.normal(size=z.shape).astype(np.float32)
            feats = np.maximum(z @ proj, 0.0)
            order = rng.permutation(len(feats))  # regions come in no particular order
            regions[r, :len(feats)] = feats[order]
            mask[r, :len(feats)] = True
            for c in range(n_caps):
                # a twin's first caption names both swapped objects, so it tells the twins apart
                m = int(rng.integers(2, min(len(o), max_mentions) + 1))
                pick = rng.choice(len(o), size=m, replace=False)
                if c == 0 and swapped[r] is not None:
                    rest = [j for j in rng.permutation(len(o)) if j not in swapped[r]]
                    pick = rng.permutation(list(swapped[r]) + rest[:m - 2])
                phrases = [f"a {ATTRIBUTES[a[j]]} {OBJECTS[o[j]]}" for j in pick]
                words = [OPENERS[rng.integers(len(OPENERS))]] if rng.random() < 0.5 else []
                for t, ph in enumerate(phrases):
                    if t:
                        words.append(JOINERS[rng.integers(len(JOINERS))])
                    words.append(ph)
                captions.append(" ".join(w for w in words if w))
                cap_img.append(r)
        facts = [[f"{ATTRIBUTES[a]} {OBJECTS[o]}" for o, a in zip(objs[r], atts[r])] for r in range(n)]
        return ScenePart(regions=regions, mask=mask, captions=captions,
                         caption_image=np.asarray(cap_img, dtype=np.int64), facts=facts)

    parts = {"train": scene_part(n_train, captions_per_image)}
    if n_dev:
        parts["dev"] = scene_part(n_dev, test_captions_per_image)
    parts["test"] = scene_part(n_test, test_captions_per_image)
    vocab = Vocabulary.build(parts["train"].captions)
    params = dict(n_train=n_train, n_dev=n_dev, n_test=n_test, n_objects=n_objects,
                  n_attributes=n_attributes, region_dim=region_dim, latent_dim=latent_dim,
                  min_objects=min_objects, max_objects=max_objects, background=background,
                  captions_per_image=captions_per_image,
                  test_captions_per_image=test_captions_per_image, twin_fraction=twin_fraction, max_mentions=max_mentions,
                  noise=noise, graded=graded, seed=seed)
    return SceneDataset(name="scenes", parts=parts, vocab=vocab, synthetic=True,
                        source="SYNTHETIC scene generator (objects with attributes + background "
                               "regions; captions name attribute-object bindings)",
                        extra={"generator": params})


def is_scene_spec(spec) -> bool:
    s = str(spec)
    return s == "scenes" or s.startswith("scenes:") or s.startswith("precomp:")


def load_scenes(spec: str) -> SceneDataset:
    """``scenes[:k=v,...]`` (synthetic, options of :func:`make_scenes`) or ``precomp:FOLDER``."""
    spec = str(spec)
    if spec.startswith("precomp:"):
        return load_precomp(spec.split(":", 1)[1])
    check(is_scene_spec(spec), f"{spec!r} is not a scene dataset: use scenes[:k=v,...] or precomp:FOLDER")
    import inspect

    from hashret.data.sources import spec_options

    opts = spec_options(spec, "scenes")

    known = set(inspect.signature(make_scenes).parameters)
    bad = sorted(set(opts) - known)
    check(not bad, f"unknown scenes option {', '.join(bad)}: known are {', '.join(sorted(known))}")
    return make_scenes(**opts)
