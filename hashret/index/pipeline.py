"""From a trained checkpoint to an index and back: :func:`build_index` and :func:`query_index`,
the functions behind ``hashret build-index`` and ``hashret query``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hashret.data import BagOfWords
from hashret.errors import HashretError, check
from hashret.index.bits import pack_codes
from hashret.index.hash_index import HashIndex
from hashret.models.checkpoint import checkpoint_dataset, fingerprint, load_checkpoint

OTHER = {"image": "text", "text": "image"}


def _payloads(ds, rows) -> list:
    """Per item: its key, label names and (tag data) its tags -- built per batch, since
    slicing a CSR matrix row by row costs ~20 us each."""
    rows = np.asarray(rows)
    out = [{"key": str(k)} for k in ds.ids[rows]]
    if ds.label_names is not None:
        names = np.asarray(ds.label_names, dtype=object)
        lab = ds.labels[rows].astype(bool)
        for p, m in zip(out, lab):
            p["labels"] = names[m].tolist()
    if ds.vocab is not None and ds.has("text") and sp.issparse(ds.text):
        sub = ds.text[rows]
        vocab = np.asarray(ds.vocab, dtype=object)
        for p, a, b in zip(out, sub.indptr[:-1], sub.indptr[1:]):
            p["tags"] = " ".join(vocab[sub.indices[a:b]])
    return out


def build_index(checkpoint, modality: str, out, dataset: str | None = None, data_root=None,
                part: str = "database", batch_size: int = 65536, append: bool = False,
                progress: bool = True, log=print) -> dict:
    """Encode the ``part`` of a dataset (default: the checkpoint's dataset and split) with the
    checkpoint's ``modality`` student and write the codes to the LMDB index ``out``, one
    transaction per batch. Ids are the dataset's row numbers; payloads hold the item's key,
    label names and tags. ``append`` adds to an existing index built by the same model.
    Returns the index's info."""
    from tqdm.auto import tqdm

    check(modality in OTHER, f"unknown modality {modality!r}: use 'image' or 'text'")
    check(batch_size > 0, "batch size must be positive")
    model = load_checkpoint(checkpoint)
    fp = fingerprint(checkpoint)
    ds = checkpoint_dataset(checkpoint, dataset, data_root)
    check(ds.has(modality), f"dataset {ds.name} has no {modality} features to index: index the "
          f"{OTHER[modality]} side or use a dataset with both modalities")
    rows = np.arange(ds.n_items) if part == "all" else ds.part(part)
    out = Path(out)
    info = {"modality": modality, "model_fingerprint": fp, "model": model.config,
            "checkpoint": str(Path(checkpoint).resolve()), "dataset": ds.name,
            "dataset_spec": dataset or model.checkpoint_info.get("dataset_spec"),
            "synthetic": ds.synthetic, "part": part}
    if (out / "data.mdb").exists():
        check(append, f"{out} already holds an index: pass --append to add to it, or choose a new --out")
        index = HashIndex.open(out, readonly=False)
        have = index.info_meta
        if index.bits != model.bits or have.get("model_fingerprint") != fp or have.get("modality") != modality:
            index.close()
            raise HashretError(f"{out} holds {index.bits}-bit {have.get('modality')} codes of model "
                               f"{have.get('model_fingerprint')}; refusing to mix in {model.bits}-bit "
                               f"{modality} codes of model {fp}: build a separate index")
    else:
        index = HashIndex.create(out, model.bits, info=info)
    t0 = time.perf_counter()
    try:
        bar = tqdm(total=len(rows), desc=f"indexing {modality}", unit="item", disable=not progress)
        for s in range(0, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            codes = pack_codes(model.encode_rows(ds, modality, batch, batch_size))
            index.add(codes, ids=batch, items=_payloads(ds, batch))
            bar.update(len(batch))
        bar.close()
        result = index.info()
    finally:
        index.close()
    seconds = time.perf_counter() - t0
    resolved = {**info, "items": result["items"], "bits": model.bits, "build_seconds": round(seconds, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(resolved, indent=2))
    os.replace(tmp, out / "index.json")  # the resolved config, beside the index
    log(f"indexed {len(rows)} {modality} items of {'SYNTHETIC ' if ds.synthetic else ''}{ds.name} "
        f"({model.bits} bits) into {out} in {seconds:.2f} s; the index holds {result['items']}")
    return result


def _read_features(path, dim: int, what: str) -> np.ndarray:
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


def query_index(index, checkpoint, text: str | None = None, text_file=None, image_features=None,
                item=None, k: int = 10, dataset: str | None = None, data_root=None) -> dict:
    """Search ``index`` (a folder) for one query: free ``text`` (or a ``text_file``) through the
    dataset's tag vocabulary, ``image_features`` (.npy path or array, one row per query), or
    the dataset ``item`` (row number or key) seen through the other modality. The query is
    encoded with the checkpoint's student for the modality opposite the index's.

    Returns {"results": [[{rank, id, distance, item}, ...] per query], "query_modality",
    "known_words", "unknown_words", "encode_ms", "search_ms"}."""
    check(isinstance(k, (int, np.integer)) and k > 0, f"-k must be a positive integer, got {k}")
    given = [x is not None for x in (text, text_file, image_features, item)]
    check(sum(given) == 1, "give exactly one query: --text, --text-file, --image-features or --item")
    ix = HashIndex.open(index)
    try:
        meta = ix.info_meta
        fp = fingerprint(checkpoint)
        check(meta.get("model_fingerprint") == fp,
              f"the index was built with model {meta.get('model_fingerprint')}, the checkpoint is "
              f"model {fp}: query with the checkpoint the index was built from ({meta.get('checkpoint')})")
        model = load_checkpoint(checkpoint)
        qmod = OTHER[meta["modality"]]
        out = {"query_modality": qmod, "known_words": None, "unknown_words": None}
        t0 = time.perf_counter()
        if text is not None or text_file is not None:
            check(qmod == "text", "the index holds text codes, so queries are images: use "
                  "--image-features or --item, or build an image index for text queries")
            if text_file is not None:
                path = Path(text_file)
                check(path.is_file(), f"text file {path} does not exist")
                text = path.read_text(encoding="utf-8")
            check(text.strip(), "the text query is empty: give some words")
            ds = checkpoint_dataset(checkpoint, dataset, data_root)
            check(ds.vocab is not None, f"dataset {ds.name} has no word vocabulary (its text side is "
                  f"{ds.dim('text')}-d features): query with --item instead")
            vec, known, unknown = BagOfWords(ds.vocab).encode_query(text)
            out["known_words"], out["unknown_words"] = known, unknown
            feats = vec
        elif image_features is not None:
            check(qmod == "image", "the index holds image codes, so queries are texts: use --text, "
                  "--text-file or --item, or build a text index for image queries")
            dim = model.config["image_dim"]
            feats = (_read_features(image_features, dim, "image")
                     if isinstance(image_features, (str, os.PathLike))
                     else np.atleast_2d(np.asarray(image_features, dtype=np.float32)))
        else:
            ds = checkpoint_dataset(checkpoint, dataset, data_root)
            row = _item_row(ds, item)
            feats = ds.features(qmod, [row])
            out["query_item"] = {"id": row, **_payloads(ds, [row])[0]}
        codes = pack_codes(model.encode(feats, qmod))
        t1 = time.perf_counter()
        dist, ids = ix.search(codes, int(k))
        t2 = time.perf_counter()
        results = []
        for qd, qi in zip(dist, ids):
            keep = qi >= 0
            payloads = ix.items(qi[keep]) if keep.any() else []
            results.append([{"rank": r + 1, "id": int(i), "distance": int(d), "item": p}
                            for r, (i, d, p) in enumerate(zip(qi[keep], qd[keep], payloads))])
        out.update(results=results, encode_ms=round((t1 - t0) * 1e3, 3),
                   search_ms=round((t2 - t1) * 1e3, 3))
        return out
    finally:
        ix.close()


def _item_row(ds, item) -> int:
    s = str(item).strip()
    if s.lstrip("-").isdigit():
        row = int(s)
        check(0 <= row < ds.n_items, f"unknown item {row}: {ds.name} has rows 0..{ds.n_items - 1}")
        return row
    hits = np.flatnonzero(ds.ids == s)
    check(len(hits) > 0, f"unknown item {s!r}: not a row number or key of {ds.name}")
    return int(hits[0])


def index_info(index) -> dict:
    """Size, code length, model and dataset of an index folder."""
    with HashIndex.open(index) as ix:
        out = ix.info()
        out["created"] = getattr(ix, "created", None)
    return out
