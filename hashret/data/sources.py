"""Dataset sources: the real sets in ``shared/data`` (and the copy packaged with hashret),
published ``.mat`` layouts, a generic ``.npz``/``.mat`` for a user's own data, and
synthetic data. :func:`load_dataset` is the one entry point.

Where data is looked for: ``data_root`` if given, else ``$HASHRET_DATA``, else the data
packaged inside hashret (Wikipedia), then ``../shared/data`` beside the working directory
or beside the checkout.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse as sp

from hashret.data.dataset import CrossModalDataset, Split, random_split
from hashret.data.featurize import BagOfWords, pixels_to_features
from hashret.data.synthetic import attach_synthetic_image, make_synthetic
from hashret.errors import HashretError, check

PACKAGED = Path(__file__).resolve().parent / "packaged"

# name -> (folder under a data root, loader); aliases map onto these names
REAL_DATASETS = {
    "wikipedia": "wikipedia",
    "mirflickr25k": "mirflickr25k",
    "nuswide-tc10": "nuswide_tc10",
}
ALIASES = {"wiki": "wikipedia", "mirflickr": "mirflickr25k", "flickr": "mirflickr25k",
           "nuswide": "nuswide-tc10", "nus-wide": "nuswide-tc10"}
SYNTHETIC_IMAGE_SUFFIX = "+synthetic-image"


def data_roots(data_root=None) -> list:
    """Folders searched for the real datasets, in order."""
    explicit = data_root or os.environ.get("HASHRET_DATA")
    if explicit:
        return [Path(explicit)]
    roots = [PACKAGED, Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data",
             PACKAGED.parents[2].parent / "shared" / "data"]
    seen, out = set(), []
    for r in roots:
        key = str(r.resolve()) if r.exists() else str(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def _find(folder: str, data_root=None) -> Path:
    roots = data_roots(data_root)
    for root in roots:
        if (root / folder).is_dir():
            return root / folder
    searched = ", ".join(str(r) for r in roots)
    raise HashretError(f"dataset folder '{folder}' not found (searched {searched}): "
                       "pass `data_root` or set HASHRET_DATA to the folder holding it")


def _read_lines(path: Path) -> list:
    check(path.is_file(), f"missing file {path}: the dataset folder is incomplete")
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n\r") for line in fh.read().splitlines()]


# -- real sets ------------------------------------------------------------------------------
def load_wikipedia(data_root=None) -> CrossModalDataset:
    """Wikipedia (Rasiwasia et al. 2010): 128-d SIFT BoVW images, 10-d LDA texts, 10 classes.
    Rows 0..2172 are the train pairs (training set and database), the rest the 693 queries."""
    folder = _find("wikipedia", data_root)
    mats = read_mat(folder / "raw_features.mat")
    for key in ("I_tr", "I_te", "T_tr", "T_te"):
        check(key in mats, f"{folder / 'raw_features.mat'} lacks '{key}': the file is not the "
              "Wikipedia features file")
    train_rows = [r.split("\t") for r in _read_lines(folder / "trainset_txt_img_cat.list") if r.strip()]
    test_rows = [r.split("\t") for r in _read_lines(folder / "testset_txt_img_cat.list") if r.strip()]
    n_tr, n_te = len(train_rows), len(test_rows)
    check(mats["I_tr"].shape[0] == n_tr and mats["I_te"].shape[0] == n_te,
          "Wikipedia lists and feature matrices disagree in length: the data copy is corrupt")
    classes = np.array([int(r[2]) - 1 for r in train_rows + test_rows])
    image = np.vstack([mats["I_tr"], mats["I_te"]])
    text = np.vstack([mats["T_tr"], mats["T_te"]])
    ids = np.array([r[0] for r in train_rows + test_rows])
    names = [n for n in _read_lines(folder / "categories.list") if n.strip()]
    labels = np.eye(len(names), dtype=np.uint8)[classes]
    split = Split(query=np.arange(n_tr, n_tr + n_te), train=np.arange(n_tr),
                  database=np.arange(n_tr), note="standard: 693 test queries; 2,173 train = database")
    return CrossModalDataset("wikipedia", image, text, labels, ids=ids, split=split,
                             label_names=names, source=f"real: {folder}")


def load_mirflickr25k(data_root=None) -> CrossModalDataset:
    """MIRFlickr-25K (20,015 items, 24 labels): real tags as a 1,386-word bag-of-words and real
    labels; no image side here. Split: the shipped 2,000 query / 5,000 train / 18,015 retrieval."""
    folder = _find("mirflickr25k", data_root)
    names = _read_lines(folder / "all_imgs.txt")
    tags = _read_lines(folder / "all_tags.txt")
    labels = np.loadtxt(folder / "all_labels.txt", dtype=np.uint8, ndmin=2)
    check(len(names) == len(tags) == len(labels),
          f"{folder}: all_imgs, all_tags and all_labels differ in length: the copy is corrupt")
    vocab = [w for w in _read_lines(folder / "vocab.txt") if w.strip()]
    bow = BagOfWords(vocab)
    text = bow.transform(tags)
    row_of = {n: i for i, n in enumerate(names)}

    def rows(part):
        items = [n for n in _read_lines(folder / "split" / part / "images.txt") if n.strip()]
        missing = [n for n in items if n not in row_of]
        check(not missing, f"split/{part} names {len(missing)} unknown images (e.g. {missing[:1]})")
        return np.array([row_of[n] for n in items])

    split = Split(rows("query"), rows("train"), rows("retrieval"),
                  note="shipped split: 2,000 query / 5,000 train / 18,015 retrieval")
    return CrossModalDataset("mirflickr25k", None, text, labels, ids=np.array(names), split=split,
                             label_names=_read_lines(folder / "label_names.txt"), vocab=vocab,
                             source=f"real tags+labels: {folder}")


def load_nuswide_tc10(data_root=None) -> CrossModalDataset:
    """NUS-WIDE TC-10 (7,000 items): real tags (1,000-word vocabulary) and 10 labels; no image
    side. Split: 2,000 queries; the 5,000 train items are also the database."""
    folder = _find("nuswide_tc10", data_root)
    vocab = [w for w in _read_lines(folder / "vocab.txt") if w.strip()]
    bow = BagOfWords(vocab)
    parts = {}
    for part in ("query", "train"):
        names = _read_lines(folder / part / "images.txt")
        texts = _read_lines(folder / part / "texts.txt")
        labels = np.loadtxt(folder / part / "labels.txt", dtype=np.uint8, ndmin=2)
        check(len(names) == len(texts) == len(labels),
              f"{folder / part}: images, texts and labels differ in length: the copy is corrupt")
        parts[part] = (names, texts, labels)
    nq = len(parts["query"][0])
    nt = len(parts["train"][0])
    names = parts["query"][0] + parts["train"][0]
    text = bow.transform(parts["query"][1] + parts["train"][1])
    labels = np.vstack([parts["query"][2], parts["train"][2]])
    split = Split(np.arange(nq), np.arange(nq, nq + nt), np.arange(nq, nq + nt),
                  note="shipped split: 2,000 query; 5,000 train = database")
    return CrossModalDataset("nuswide-tc10", None, text, labels, ids=np.array(names), split=split,
                             label_names=_read_lines(folder / "label_names.txt"), vocab=vocab,
                             source=f"real tags+labels: {folder}")


# -- files ----------------------------------------------------------------------------------
def read_mat(path) -> dict:
    """Variables of a MATLAB file, v5 (scipy) or v7.3 (HDF5, h5py), as numpy arrays.

    HDF5 arrays come back in h5py's axis order; callers orient them by the item count."""
    path = Path(path)
    check(path.is_file(), f"file {path} does not exist: check the path")
    try:
        raw = scipy.io.loadmat(path)
        return {k: v for k, v in raw.items() if not k.startswith("__")}
    except NotImplementedError:
        pass  # MATLAB v7.3: an HDF5 file
    except Exception as exc:  # scipy raises several types for garbage
        if not _looks_hdf5(path):
            raise HashretError(f"cannot read {path} as a .mat file ({type(exc).__name__}: {exc}): "
                               "the file is corrupt or not MATLAB") from None
    return _read_hdf5(path)


def _looks_hdf5(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(1024)
    return b"\x89HDF\r\n\x1a\n" in head


def _read_hdf5(path: Path) -> dict:
    import h5py
    try:
        with h5py.File(path, "r") as f:
            out = {}
            for key, obj in f.items():
                if isinstance(obj, h5py.Dataset) and not key.startswith("#"):
                    out[key] = obj[()]
            return out
    except OSError as exc:
        raise HashretError(f"cannot read {path} as HDF5/.mat v7.3 ({exc}): the file is corrupt") from None


def _orient(arr, n: int, what: str, path) -> np.ndarray:
    """Put the item axis first (MATLAB files saved through HDF5 come transposed)."""
    if sp.issparse(arr):
        arr = arr.tocsr()
        if arr.shape[0] == n:
            return arr
        check(arr.shape[1] == n, f"{path}: {what} has shape {arr.shape}, no axis of {n} items")
        return arr.T.tocsr()
    arr = np.asarray(arr)
    axes = [i for i, s in enumerate(arr.shape) if s == n]
    check(axes, f"{path}: {what} has shape {arr.shape}, no axis matches the {n} label rows: "
          "every variable needs one row per item")
    return np.moveaxis(arr, axes[0], 0)


def _item_count(labels, text, path) -> int:
    common = set(np.shape(labels)) & set(text.shape if sp.issparse(text) else np.shape(text))
    check(common, f"{path}: labels {np.shape(labels)} and text {np.shape(text)} share no item "
          "count: each needs one row per item")
    # prefer the labels' first axis when it fits (python-written files are row-major)
    return np.shape(labels)[0] if np.shape(labels)[0] in common else max(common)


def _image_features(arr, path) -> np.ndarray:
    if arr.ndim == 2:
        return arr.astype(np.float32)
    check(arr.ndim == 4, f"{path}: image array of shape {arr.shape} is neither features (2-D) nor "
          "pixels (4-D)")
    return pixels_to_features(arr)


def _assemble(name, path, image, text, labels, split, seed, n_query, n_train, source, ids=None,
              **described):
    n = _item_count(labels, text, path)
    labels = _orient(labels, n, "labels", path)
    text = text if sp.issparse(text) else _orient(text, n, "text", path)
    image = _image_features(_orient(image, n, "image", path), path) if image is not None else None
    if split is None:
        nq = min(n_query, max(1, n // 10))
        split = random_split(n, nq, n_train, seed=seed)
    return CrossModalDataset(name, image, text, np.asarray(labels), ids=ids, split=split,
                             source=source, **described)


PAYLOAD_PREFIX = "payload_"
_OWN_KEYS = ("image", "text", "texts", "labels", "query", "train", "database", "ids", "vocab",
             "label_names")


def _strings(arr) -> list:
    # MATLAB char matrices pad shorter strings with blanks
    return np.char.strip(np.asarray(arr).ravel().astype(str)).tolist()


def _own_data(mats: dict, path: Path) -> dict:
    """What a user's file may carry besides the features and labels: ``vocab`` (the words of
    the text side's columns, so text queries work), ``texts`` (one raw string per item, in
    place of ``text``: the bag-of-words over ``vocab``, or over the words in two or more
    texts when there is no ``vocab``), ``label_names``, and ``payload_<field>`` arrays, one
    value per item (titles, URLs, captions, numbers), which ``build-index`` stores with each
    item. Returns the dataset's text features and those descriptions."""
    unknown = sorted(k for k in mats if k not in _OWN_KEYS and not k.startswith(PAYLOAD_PREFIX))
    check(not unknown, f"{path} holds {', '.join(unknown)}, which hashret does not read: a dataset "
          f"file takes {', '.join(_OWN_KEYS)} and payload_<field> arrays (docs/own-data.md)")
    check(not ("text" in mats and "texts" in mats), f"{path} holds both 'text' (features) and "
          "'texts' (raw strings): keep one")
    vocab = _strings(mats["vocab"]) if "vocab" in mats else None
    text = mats.get("text")
    if "texts" in mats:
        texts = _strings(mats["texts"])
        if vocab is None:
            vocab = _common_words(texts)
            check(vocab, f"{path}: no word occurs in two or more of the 'texts': give a 'vocab'")
        text = BagOfWords(vocab).transform([BagOfWords.tokenize(t) for t in texts])
    names = _strings(mats["label_names"]) if "label_names" in mats else None
    fields = {k[len(PAYLOAD_PREFIX):]: np.asarray(v).ravel() for k, v in mats.items()
              if k.startswith(PAYLOAD_PREFIX)}
    check(all(f for f in fields), f"{path}: a payload array needs a field name after "
          f"'{PAYLOAD_PREFIX}' (e.g. payload_title)")
    taken = sorted(set(fields) & {"key", "labels", "tags"})
    check(not taken, f"{path}: payload_{taken[0] if taken else ''} would hide what hashret writes "
          "under that name (an item's key, label names, tags): rename the field")
    return {"text": text, "vocab": vocab, "label_names": names, "payload_fields": fields or None}


def _common_words(texts, min_docs: int = 2, most: int = 5000) -> list:
    """The words of at least ``min_docs`` texts, the ``most`` frequent, in order of first use."""
    from collections import Counter

    docs = Counter(w for t in texts for w in set(BagOfWords.tokenize(t)))
    keep = {w for w, c in docs.most_common(most) if c >= min_docs}
    return [w for w in dict.fromkeys(w for t in texts for w in BagOfWords.tokenize(t)) if w in keep]


def load_dcmh_mat(folder, seed=0, n_query=2000, n_train=10000) -> CrossModalDataset:
    """DCMH's published MIRFlickr files in ``folder``: ``*-iall.mat`` (IAll: pixels or features),
    ``*-yall.mat`` (YAll: tag bag-of-words), ``*-lall.mat`` (LAll: labels). Split: the DCMH
    protocol (random queries; training drawn from the rest), seeded."""
    folder = Path(folder)

    def one(suffix, key):
        hits = sorted(folder.glob(f"*-{suffix}.mat"))
        check(hits, f"{folder} has no *-{suffix}.mat: the DCMH layout needs iall, yall and lall files")
        mats = read_mat(hits[0])
        check(key in mats, f"{hits[0]} has no variable '{key}' (found {sorted(mats)})")
        return mats[key]

    labels, text, image = one("lall", "LAll"), one("yall", "YAll"), one("iall", "IAll")
    return _assemble(folder.name, folder, image, text, labels, None, seed, n_query, n_train,
                     source=f"DCMH .mat layout: {folder}")


def load_matrix_file(path, seed=0, n_query=2000, n_train=10000) -> CrossModalDataset:
    """A single file: GCH's HDF5 ``FLICKR-25K.mat`` (``images``, ``YAll``, ``LAll``) or a
    generic ``.npz``/``.mat`` with ``image``, ``text``, ``labels`` and optionally ``query``,
    ``train``, ``database`` (0-based row indices) and ``ids``."""
    path = Path(path)
    check(path.is_file(), f"dataset file {path} does not exist: check the path")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                mats = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise HashretError(f"cannot read {path} as .npz ({exc}): the file is corrupt") from None
    else:
        mats = read_mat(path)
    if {"images", "YAll", "LAll"} <= set(mats):
        return _assemble(path.stem, path, mats["images"], mats["YAll"], mats["LAll"], None, seed,
                         n_query, n_train, source=f"GCH HDF5 layout: {path}")
    check({"image", "labels"} <= set(mats) and ("text" in mats or "texts" in mats),
          f"{path} holds {sorted(mats)}: a dataset file needs 'image', 'text' (or raw 'texts') "
          "and 'labels' (or GCH's 'images', 'YAll', 'LAll')")
    split = None
    if {"query", "train", "database"} <= set(mats):
        split = Split(*(np.asarray(mats[k]).ravel() for k in ("query", "train", "database")),
                      note=f"from {path.name}")
    ids = np.asarray(_strings(mats["ids"])) if "ids" in mats else None
    own = _own_data(mats, path)
    text = own.pop("text")
    return _assemble(path.stem, path, mats["image"], text, mats["labels"], split, seed,
                     n_query, n_train, source=f"file: {path}", ids=ids, **own)


# -- the entry point ------------------------------------------------------------------------
_LOADERS = {"wikipedia": load_wikipedia, "mirflickr25k": load_mirflickr25k,
            "nuswide-tc10": load_nuswide_tc10}


def dataset_names() -> list:
    return sorted(_LOADERS) + [n + SYNTHETIC_IMAGE_SUFFIX for n in ("mirflickr25k", "nuswide-tc10")] \
        + ["synthetic"]


def spec_options(spec: str, what: str = "synthetic") -> dict:
    """The numeric options of a generator spec: 'synthetic' -> {}, 'scenes:n_train=100,noise=0.8'
    -> {'n_train': 100, 'noise': 0.8}."""
    params = {}
    if ":" in spec:
        for kv in spec.split(":", 1)[1].split(","):
            if not kv.strip():
                continue
            check("=" in kv, f"{what} option {kv!r} is not key=value")
            k, v = kv.split("=", 1)
            try:
                params[k.strip()] = float(v) if "." in v or "e" in v.lower() else int(v)
            except ValueError:
                raise HashretError(f"{what} option {k.strip()}={v!r} is not a number") from None
    return params


def load_dataset(spec: str, data_root=None, split=None, seed: int = 0) -> CrossModalDataset:
    """Load a dataset by name or path.

    ``spec``: ``wikipedia``, ``mirflickr25k``, ``nuswide-tc10`` (real), those with
    ``+synthetic-image`` (real text and labels, SYNTHETIC image side), ``synthetic`` or
    ``synthetic:key=value,...`` (see :func:`make_synthetic`), a folder in DCMH's ``.mat``
    layout, or a ``.mat``/``.npz``/``.h5`` file. ``split``: a saved ``split.npz`` (or a
    :class:`Split`) that replaces the source's own split. ``seed`` seeds random splits and
    synthetic data.
    """
    check(isinstance(spec, str) and spec.strip(), "no dataset given: name one of "
          + ", ".join(dataset_names()) + " or a path")
    name = spec.strip()
    base = ALIASES.get(name.lower(), name.lower())
    if base.endswith(SYNTHETIC_IMAGE_SUFFIX):  # an alias before the suffix too: nuswide+synthetic-image
        stem = base[: -len(SYNTHETIC_IMAGE_SUFFIX)]
        base = ALIASES.get(stem, stem) + SYNTHETIC_IMAGE_SUFFIX
    if base.startswith("synthetic"):
        params = spec_options(name, "synthetic")
        params.setdefault("seed", seed)
        try:
            ds = make_synthetic(**params)
        except TypeError as exc:
            raise HashretError(f"bad synthetic option ({exc}): see make_synthetic's parameters") from None
        if ":" in name:
            ds.name = name
    elif base.endswith(SYNTHETIC_IMAGE_SUFFIX) and base[: -len(SYNTHETIC_IMAGE_SUFFIX)] in _LOADERS:
        ds = attach_synthetic_image(_LOADERS[base[: -len(SYNTHETIC_IMAGE_SUFFIX)]](data_root), seed=seed)
    elif base in _LOADERS:
        ds = _LOADERS[base](data_root)
    else:
        path = Path(name)
        if path.is_dir():
            ds = load_dcmh_mat(path, seed=seed)
        elif path.is_file():
            ds = load_matrix_file(path, seed=seed)
        elif path.suffix or os.sep in name:
            raise HashretError(f"dataset path {name} does not exist: check the path")
        else:
            raise HashretError(f"unknown dataset {name!r}: use one of {', '.join(dataset_names())}, "
                               "or a path to a .mat/.npz file or a DCMH folder")
    if split is not None:
        ds.split = split if isinstance(split, Split) else Split.load(split, n_items=ds.n_items)
        ds.split.validate(ds.n_items)
    return ds
