"""The engine: one layer above the models and the index that everything which searches shares.

- :func:`build_index`: encode a dataset with a checkpoint and write an LMDB index.
- :class:`Engine`: an index opened once with the model that built it (and optionally a
  matcher that re-ranks): encode a query (text, image features, a dataset item or codes),
  scan, re-rank, attach payloads; add and remove items; pick up other writers' commits.
- :func:`query_index`, :func:`index_info`, :func:`verify_index`: one call each, for the CLI.

``hashret query``, ``hashret serve`` (``hashret.serve``) and the Python API all go through
:class:`Engine`, so a query gives the same ids, distances and order wherever it is asked.
``hashret.index`` below keeps storage and the scan kernels only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hashret.data import BagOfWords
from hashret.errors import ConflictError, HashretError, NotFoundError, check, os_problem
from hashret.index.bits import as_packed, pack_codes
from hashret.index.hash_index import HashIndex, positive_int
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
                resume: bool = False, progress: bool = True, log=print, shards: int | None = None,
                ray=None, _shard: dict | None = None) -> dict:
    """Encode the ``part`` of a dataset (default: the checkpoint's dataset and split) with the
    checkpoint's ``modality`` student and write the codes to the LMDB index ``out``, one
    transaction per batch. Ids are the dataset's row numbers; payloads hold the item's key,
    label names and tags. ``append`` adds to an existing index built by the same model.

    The index records its build's progress with every batch (state 'partial', then
    'complete' with the last one), so a killed or failed build is never mistaken for a whole
    one: ``resume`` continues it from its last committed batch and ends equal to a build that
    was never interrupted. A fresh build that fails before its first commit leaves nothing
    behind. Returns the index's info.

    ``shards``: write a sharded index (:mod:`hashret.index.sharded`) -- the part's r-th item
    goes to shard r mod N, each shard built (and resumable) as an index of its own; ``ray``
    (True or an address) builds the shards as Ray tasks, in this process otherwise."""
    if shards is not None:
        return _build_sharded(checkpoint, modality, out, dataset, data_root, part, batch_size, append,
                              resume, progress, log, positive_int(shards, "--shards"), ray)
    from tqdm.auto import tqdm

    check(modality in OTHER, f"unknown modality {modality!r}: use 'image' or 'text'")
    batch_size = positive_int(batch_size, "--batch-size")
    check(not (append and resume), "--append starts a new build on an index, --resume finishes "
          "an interrupted one: pass one of them")
    model = load_checkpoint(checkpoint)
    fp = fingerprint(checkpoint)
    ds = checkpoint_dataset(checkpoint, dataset, data_root)
    rows, encode_batch, payloads = _source(model, ds, modality, part, batch_size)
    check(len(rows) > 0, f"the {part} part of {ds.name} is empty: nothing to index")
    if _shard is not None:  # one shard's share: items s, s + N, s + 2N, ... of the part
        rows = rows[_shard["position"]::_shard["of"]]
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"--out {out} is a file: pass a folder for the index")
    info = {"modality": modality, "model_fingerprint": fp, "model": model.config,
            "checkpoint": str(Path(checkpoint).resolve()), "dataset": ds.name,
            "dataset_spec": dataset or model.checkpoint_info.get("dataset_spec"),
            "dataset_fingerprint": ds.fingerprint(),
            "synthetic": ds.synthetic, "part": part}
    if _shard is not None:
        info["shard"] = dict(_shard)
    source = {"model_fingerprint": fp, "dataset_fingerprint": ds.fingerprint(), "modality": modality,
              "part": part, "rows": int(len(rows))}
    if _shard is not None:
        source["shard"] = [_shard["position"], _shard["of"]]
    existing = HashIndex.exists(out)
    done = 0
    if existing:
        meta = HashIndex.peek(out)  # nothing is written before every check passes
        have, build, n_before = meta["info"], meta["build"], meta["count"]
        if meta["bits"] != model.bits or have.get("model_fingerprint") != fp or have.get("modality") != modality:
            raise HashretError(f"{out} holds {meta['bits']}-bit {have.get('modality')} codes of model "
                               f"{have.get('model_fingerprint')}; refusing to mix in {model.bits}-bit "
                               f"{modality} codes of model {fp}: build a separate index")
        partial = build is not None and build.get("state") == "partial"
        if partial and n_before == 0 and not append:
            # a fresh build killed before its first batch committed: it holds nothing, start over
            HashIndex.open(out, readonly=False).close()  # refused if a writer still holds it
            _remove_folder(out)
            existing, partial, resume = False, False, False
        elif resume:
            check(partial, f"the build of {out} is complete: nothing to resume")
            check(build.get("source") == source,
                  f"{out} holds an interrupted build of {build.get('source')}; this command builds "
                  f"{source}: resume with the same checkpoint, --dataset, --split and --modality")
            done = n_before - build["first_row"]
            check(0 <= done <= len(rows), f"{out} holds {done} rows of a {len(rows)}-row build: "
                  "it is not the build this command resumes; rebuild it")
        elif partial:
            raise HashretError(f"{out} holds an interrupted build ({n_before - build['first_row']} of "
                               f"{build['source']['rows']} items committed): pass --resume to finish it, "
                               "or choose a new --out")
        else:
            check(append, f"{out} already holds an index: pass --append to add to it, or choose a new --out")
    if not existing:
        check(not resume, f"{out} holds no index to resume: run the build without --resume")
        check(not append, f"{out} holds no index to append to: build it without --append (or "
              "restore the index folder if it was lost)")
    t0 = time.perf_counter()
    first_batch = None
    if not existing:
        # encode before creating anything, so a build that cannot start leaves no folder behind
        first_batch = (pack_codes(encode_batch(rows[:batch_size])), payloads(rows[:batch_size]))
    created = not out.exists()
    index = bar = None
    committed = False
    try:
        if existing:
            index = HashIndex.open(out, readonly=False)
        else:
            if (out / "data.mdb").exists():
                _remove_folder(out, rmdir=False)  # data.mdb with no meta: a create that died first
            index = HashIndex.create(out, model.bits, info=info, build={
                "state": "partial", "source": source, "first_row": 0})
        start_state = {"state": "partial", "source": source, "first_row": index.n_rows - done}
        bar = tqdm(total=len(rows), initial=done, desc=f"indexing {modality}", unit="item",
                   disable=not progress, leave=False)
        for s in range(done, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            if first_batch is not None and s == 0:
                codes, items = first_batch
            else:
                codes, items = pack_codes(encode_batch(batch)), payloads(batch)
            last = s + batch_size >= len(rows)
            index.add(codes, ids=batch, items=items,
                      build={**start_state, "state": "complete" if last else "partial"})
            committed = True
            bar.update(len(batch))
        bar.close()
        result = index.info()
    except BaseException as exc:
        if bar is not None:
            bar.close()  # the error line must not run on from the progress bar's
        if index is not None:
            held = index.n_rows
            index.close()
            index = None
            if not committed and not existing:
                _remove_folder(out, rmdir=created)
            elif isinstance(exc, (HashretError, OSError)):
                why = exc if isinstance(exc, HashretError) else os_problem(exc)
                if committed or resume:
                    raise HashretError(f"{why} -- the build stopped; {out} holds {held} rows, marked "
                                       "partial: fix the cause and rerun with --resume") from None
                raise HashretError(f"{why} -- nothing of this build was committed; {out} is as it "
                                   f"was ({held} rows)") from None
        raise
    finally:
        if index is not None:
            index.close()
    seconds = time.perf_counter() - t0
    resolved = {**info, "items": result["items"], "bits": model.bits, "build_seconds": round(seconds, 3),
                "complete": True, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(resolved, indent=2))
    os.replace(tmp, out / "index.json")  # the resolved config, beside the index
    verb = "resumed and finished" if resume else "indexed"
    log(f"{verb} {len(rows) - done} {modality} items of {'SYNTHETIC ' if ds.synthetic else ''}{ds.name} "
        f"({model.bits} bits) into {out} in {seconds:.2f} s; the index holds {result['items']}")
    return result


def _build_sharded(checkpoint, modality, out, dataset, data_root, part, batch_size, append, resume,
                   progress, log, n, ray):
    """The manifest first (so an interrupted build is a sharded index whose shards say
    'partial'), then each shard's share, here or as one Ray task per shard. A shard folder
    whose creation a kill interrupted is started again; --resume is refused for any other
    checkpoint, modality, part or dataset than the build's."""
    from hashret.index.sharded import (MANIFEST, interrupted_build, is_sharded, read_manifest, shard_paths,
                                       shard_record, write_manifest)

    out = Path(out)
    check(not append, "--append to a sharded index: add through ShardedIndex.add or POST /items")
    model = load_checkpoint(checkpoint)
    want = {"modality": modality, "model_fingerprint": fingerprint(checkpoint), "part": part,
            "dataset_spec": dataset or model.checkpoint_info.get("dataset_spec")}
    if is_sharded(out):
        m = read_manifest(out)
        check(resume, f"{out} already holds a sharded index: pass --resume to finish its build, or "
              "choose a new --out")
        check(m["shards"] == n, f"{out} has {m['shards']} shards, not {n}: resume with the same --shards")
        for field, value in want.items():
            if field in m["info"] and m["info"][field] != value:
                raise HashretError(f"{out} is a build of {field} {m['info'][field]!r}; this command builds "
                                   f"{value!r}: resume with the same checkpoint, --modality, --split and "
                                   "--dataset as the build")
        check(interrupted_build(out, m) is not None, f"the build of {out} is complete: nothing to resume")
    else:
        check(not resume, f"{out} holds no sharded index to resume: build without --resume")
        # a build killed before its manifest was renamed in place left only the temporary file
        check(not out.exists() or all(p.name == MANIFEST + ".tmp" for p in out.iterdir()),
              f"--out {out} is not empty: choose a new folder")
        out.mkdir(parents=True, exist_ok=True)
        m = write_manifest(out, model.bits, n, {**want, "model": model.config,
                                                "checkpoint": str(Path(checkpoint).resolve()),
                                                "sharded_by": "row"})
    t0 = time.perf_counter()
    paths = shard_paths(out, n)
    started = [HashIndex.exists(p) for p in paths]
    todo = [s for s, p in enumerate(paths) if not (started[s] and index_info(p)["complete"])]
    args = [(checkpoint, modality, str(paths[s]), dataset, data_root, part, batch_size,
             resume and started[s], shard_record(m["set"], s, n)) for s in todo]
    if ray:
        import ray as ray_

        from hashret.index.sharded import connect_ray

        connect_ray(ray)
        task = ray_.remote(_build_one_shard).options(num_cpus=1)
        ray_.get([task.remote(*a) for a in args])
    else:
        for a in args:
            _build_one_shard(*a, progress=progress)
    items = sum(index_info(p)["items"] for p in paths)
    meta = {**m["info"], "items": items, "shards": n,
            "build_seconds": round(time.perf_counter() - t0, 3), "complete": True}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "index.json")  # the build's end: an interrupted one has none
    log(f"indexed {items} {modality} items into {n} shards at {out}"
        f"{' with Ray' if ray else ''} in {meta['build_seconds']:.2f} s")
    from hashret.index.sharded import ShardedIndex

    with ShardedIndex.open(out) as ix:
        return ix.info()


def _build_one_shard(checkpoint, modality, out, dataset, data_root, part, batch_size, resume, record,
                     progress=False):
    return build_index(checkpoint, modality, out, dataset=dataset, data_root=data_root, part=part,
                       batch_size=batch_size, resume=resume, progress=progress,
                       log=lambda *a: None, _shard=record)


def _remove_folder(out: Path, rmdir: bool = True):
    """Undo a fresh build that committed nothing: only files hashret itself writes there."""
    HashIndex.discard(out, also=("index.json", "index.json.tmp"), rmdir=rmdir)


def _is_matcher(model) -> bool:
    return getattr(model, "kind", None) == "matcher"


def _source(model, ds, modality, part, batch_size):
    """(rows, encode(rows) -> codes, payloads(rows)) of a dataset part for one modality. For
    a matcher's scene data, image rows are images and text rows are captions of the part."""
    if _is_matcher(model):
        model.check_data(ds)
        check(part != "all", "scene data is indexed one part at a time: pass --split database "
              "(the test part), train or query")
        p = ds.part(part)
        return (p.rows(modality), lambda b: model.encode_rows(p, modality, b),
                lambda b: ds.payloads(part, modality, b))
    check(ds.has(modality), f"dataset {ds.name} has no {modality} features to index: index the "
          f"{OTHER[modality]} side or use a dataset with both modalities")
    rows = np.arange(ds.n_items) if part == "all" else ds.part(part)
    return rows, lambda b: model.encode_rows(ds, modality, b, batch_size), lambda b: _payloads(ds, b)


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


class _RWLock:
    """Many readers or one writer: scans share the index; add, remove and refresh change
    the id map and the snapshot, so they run alone."""

    def __init__(self):
        import threading

        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    def read(self):
        return _Held(self, False)

    def write(self):
        return _Held(self, True)


class _Held:
    def __init__(self, lock, write):
        self.lock, self.write = lock, write

    def __enter__(self):
        c = self.lock._cond
        with c:
            if self.write:
                c.wait_for(lambda: not self.lock._writing and self.lock._readers == 0)
                self.lock._writing = True
            else:
                c.wait_for(lambda: not self.lock._writing)
                self.lock._readers += 1

    def __exit__(self, *exc):
        c = self.lock._cond
        with c:
            if self.write:
                self.lock._writing = False
            else:
                self.lock._readers -= 1
            c.notify_all()


_MODELS: dict = {}


def _model(run_dir, fp: str):
    """A checkpoint's model (fingerprint ``fp``), loaded once per process (several indexes
    share it)."""
    key = (str(Path(run_dir).resolve()), fp)
    if key not in _MODELS:
        _MODELS[key] = load_checkpoint(run_dir)
    return _MODELS[key]


class Engine:
    """An index opened with the model that built it.

    ``Engine.open(index, checkpoint)``: ``checkpoint`` may be None (codes-only search) or a
    model the index was not built with -- then queries that need the model are refused with
    one line naming both fingerprints, and code queries still work. ``rerank``: a matcher's
    RUN_DIR trained on the index's data, for the cascade. ``readonly=False`` makes this engine
    the index's one writer. Thread-safe: searches run concurrently, writes one at a time."""

    def __init__(self, index: HashIndex, path, checkpoint=None, rerank=None, dataset=None,
                 data_root=None):
        self.index, self.path = index, Path(path)
        self.name = self.path.name
        self.meta = index.info_meta
        self.modality = self.meta.get("modality")
        self.query_modality = OTHER.get(self.modality)
        self.checkpoint, self.dataset_spec, self.data_root = checkpoint, dataset, data_root
        self.model = self.reranker = None
        self.model_problem = "this engine has no checkpoint: only code queries can be answered"
        if checkpoint is not None:
            fp = fingerprint(checkpoint)
            if self.meta.get("model_fingerprint") == fp:
                self.model, self.model_problem = _model(checkpoint, fp), None
            else:
                self.model_problem = (f"the index {self.name} was built with model "
                                      f"{self.meta.get('model_fingerprint')}, the checkpoint is model {fp}: "
                                      f"query with the checkpoint the index was built from "
                                      f"({self.meta.get('checkpoint')})")
        if rerank is not None:
            self.reranker = _load_reranker(rerank, self.meta)
        self.lock = _RWLock()
        self._data = None

    @classmethod
    def open(cls, index, checkpoint=None, rerank=None, dataset=None, data_root=None,
             readonly: bool = True, verify: bool = True, ray=None) -> "Engine":
        """``index``: an index folder or a sharded one (``ray``: its shards as Ray actors)."""
        from hashret.index.sharded import ShardedIndex, is_sharded

        if is_sharded(index):
            ix = ShardedIndex.open(index, readonly=readonly, ray=ray, verify=verify)
        else:
            check(not ray, f"{index} is not a sharded index: --ray serves the shards of one")
            ix = HashIndex.open(index, readonly=readonly, verify=verify)
        try:
            return cls(ix, index, checkpoint, rerank, dataset, data_root)
        except BaseException:
            ix.close()
            raise

    def close(self):
        with self.lock.write():
            self.index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the pieces of a query ---------------------------------------------------------
    def data(self):
        """The checkpoint's dataset (for item and tag queries), loaded once."""
        if self._data is None:
            check(self.checkpoint is not None, "item and text queries need the checkpoint's dataset: "
                  "start with --checkpoint")
            self._data = checkpoint_dataset(self.checkpoint, self.dataset_spec, self.data_root)
        return self._data

    def warnings(self) -> list:
        build = self.index.build_state
        if build is not None and build.get("state") != "complete":
            got = self.index.n_rows - build.get("first_row", 0)
            return [f"the index at {self.path} is partial: its build committed {got} of "
                    f"{build['source']['rows']} items; finish it with 'hashret build-index ... --resume'"]
        return []

    def parse_codes(self, codes) -> np.ndarray:
        """Codes as hex strings of the packed bytes (``bits/8`` bytes each), or an array."""
        if isinstance(codes, np.ndarray):
            return as_packed(codes, self.index.bits, "codes")
        check(isinstance(codes, (list, tuple)) and len(codes) > 0 and all(isinstance(c, str) for c in codes),
              "codes must be a non-empty list of hex strings (the packed bytes of each code)")
        nb = self.index.bits // 8
        out = np.empty((len(codes), nb), dtype=np.uint8)
        for i, c in enumerate(codes):
            try:
                b = bytes.fromhex(c)
            except ValueError:
                raise HashretError(f"code {i} is not hex: give each code as the hex of its "
                                   f"{nb} packed bytes") from None
            check(len(b) == nb, f"code {i} has {len(b)} bytes; this index holds {self.index.bits}-bit "
                  f"codes: give {nb} bytes ({2 * nb} hex digits)")
            out[i] = np.frombuffer(b, np.uint8)
        return out

    def _need_model(self):
        if self.model_problem is not None:
            raise ConflictError(self.model_problem)
        return self.model

    def features(self, modality: str, text=None, image_features=None):
        """Model inputs of one modality: ``text`` (a string or a list of them) or
        ``image_features`` (a .npy path or an array; region sets for a matcher)."""
        model = self._need_model()
        extra = {"known_words": None, "unknown_words": None}
        if modality == "text":
            texts = [text] if isinstance(text, str) else text
            check(isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts),
                  "text must be a non-empty string or a list of them")
            check(all(t.strip() for t in texts), "the text query is empty: give some words")
            if _is_matcher(model):
                check(len(texts) == 1, "a matcher encodes one text at a time: send one text per request")
                tokens, lengths, known, unknown = model.vocab.encode_query(texts[0])
                feats = (tokens, lengths)
            else:
                ds = self.data()
                check(ds.vocab is not None, f"dataset {ds.name} has no word vocabulary (its text side "
                      f"is {ds.dim('text')}-d features): query with an item instead")
                bow = BagOfWords(ds.vocab)
                parts = [bow.encode_query(t) for t in texts]
                feats = np.vstack([p[0] for p in parts])
                known = [w for p in parts for w in p[1]]
                unknown = [w for p in parts for w in p[2]]
            extra.update(known_words=known, unknown_words=unknown)
            return feats, extra
        if _is_matcher(model):
            x = (_read_array(image_features, "region")
                 if isinstance(image_features, (str, os.PathLike)) else np.asarray(image_features))
            return model.check_images(x), extra
        dim = model.config["image_dim"]
        if isinstance(image_features, (str, os.PathLike)):
            return _read_features(image_features, dim, "image"), extra
        try:
            x = np.atleast_2d(np.asarray(image_features, dtype=np.float32))
        except (TypeError, ValueError):
            raise HashretError("image_features must be a list of rows of numbers") from None
        check(x.ndim == 2 and x.shape[1] == dim and len(x) > 0,
              f"image features of shape {x.shape}: the model's image side takes rows of {dim} numbers")
        check(np.isfinite(x).all(), "image features hold NaN or infinite values")
        return x, extra

    def encode_query(self, text=None, image_features=None, item=None, codes=None) -> dict:
        """One query -> {"codes": packed (Q, bits/8), "feats" (for a re-ranker), "known_words",
        "unknown_words"[, "query_item"]}. Exactly one of the four is given."""
        given = [x is not None for x in (text, image_features, item, codes)]
        check(sum(given) == 1, "give exactly one query: text, image features, an item or codes")
        qmod = self.query_modality
        if codes is not None:
            return {"codes": self.parse_codes(codes), "feats": None, "known_words": None, "unknown_words": None}
        if text is not None:
            check(qmod == "text", "the index holds text codes, so queries are images: use image "
                  "features or an item, or build an image index for text queries")
            feats, out = self.features("text", text=text)
        elif image_features is not None:
            check(qmod == "image", "the index holds image codes, so queries are texts: use a text "
                  "or an item, or build a text index for image queries")
            feats, out = self.features("image", image_features=image_features)
        else:
            model = self._need_model()
            ds = self.data()
            out = {"known_words": None, "unknown_words": None}
            if _is_matcher(model):
                part = ds.part(self.meta.get("part", "database"))
                n = part.n_images if qmod == "image" else part.n_captions
                row = _item_row_in(n, item, ds.name)
                feats = part.image_batch([row]) if qmod == "image" else part.text_batch([row])
                out["query_item"] = {"id": row, **ds.payloads(self.meta.get("part", "database"), qmod, [row])[0]}
            else:
                row = _item_row(ds, item)
                feats = ds.features(qmod, [row])
                out["query_item"] = {"id": row, **_payloads(ds, [row])[0]}
        out["codes"] = pack_codes(self._need_model().encode(feats, qmod))
        out["feats"] = feats
        return out

    def scan(self, codes: np.ndarray, width: int, threads: int | None = None):
        """(distances, ids) of the ``width`` nearest codes of each query: one kernel call for
        all of them (the server's micro-batches come through here)."""
        with self.lock.read():
            return self.index.search(codes, width, threads=threads)

    def rerank(self, feats, ids, dist, k):
        check(self.reranker is not None, "re-ranking needs a matcher: start with --rerank RUN_DIR")
        check(feats is not None, "code queries cannot be re-ranked (the matcher needs the query's "
              "features): send a text, image features or an item")
        return _rerank(self.reranker, self.data(), self.meta, feats, self.query_modality, ids, dist, k)

    def results(self, dist, ids, scores=None) -> list:
        """Per query: [{rank, id, distance, item[, score]}, ...] with the stored payloads."""
        out = []
        with self.lock.read():
            for q, (qd, qi) in enumerate(zip(dist, ids)):
                keep = qi >= 0
                found = qi[keep].tolist()
                payloads = self.index.items(found) if found and self.index.has_payloads else [None] * len(found)
                group = [{"rank": r + 1, "id": i, "distance": d, "item": p}
                         for r, (i, d, p) in enumerate(zip(found, qd[keep].tolist(), payloads))]
                if scores is not None:
                    for g, sc in zip(group, scores[q][keep]):
                        g["score"] = float(sc)
                out.append(group)
        return out

    def search_widths(self, k, rerank: bool = False, candidates=None):
        """(k, scan width): the cascade scans ``candidates`` (default 10 x k) to keep k."""
        k = positive_int(k, "k")
        if not rerank:
            check(candidates is None, "candidates needs a re-ranker (--rerank RUN_DIR, and rerank: true)")
            return k, k
        check(self.reranker is not None, "re-ranking needs a matcher: start with --rerank RUN_DIR")
        candidates = 10 * k if candidates is None else positive_int(candidates, "candidates")
        check(candidates >= k, f"candidates must be an integer >= k ({k}), got {candidates}")
        return k, candidates

    def search(self, text=None, image_features=None, item=None, codes=None, k: int = 10,
               rerank: bool = False, candidates=None) -> dict:
        """One query, whole: encode, scan, re-rank (cascade), payloads. Returns
        {"results": [[{rank, id, distance, item[, score]}, ...] per query], "query_modality",
        "known_words", "unknown_words", "warnings", "encode_ms", "search_ms"[, "rerank_ms",
        "query_item"]}."""
        k, width = self.search_widths(k, rerank, candidates)
        t0 = time.perf_counter()
        q = self.encode_query(text=text, image_features=image_features, item=item, codes=codes)
        t1 = time.perf_counter()
        dist, ids = self.scan(q["codes"], width)
        t2 = time.perf_counter()
        return self.finish(q, dist, ids, k, rerank, t1 - t0, t2 - t1)

    def finish(self, q, dist, ids, k, rerank, encode_s, search_s) -> dict:
        """Re-rank (if asked) and attach payloads to a query's scan."""
        out = {"query_modality": self.query_modality, "known_words": q["known_words"],
               "unknown_words": q["unknown_words"], "warnings": self.warnings()}
        if "query_item" in q:
            out["query_item"] = q["query_item"]
        scores = None
        t2 = time.perf_counter()
        if rerank:
            ids, dist, scores = self.rerank(q["feats"], ids, dist, k)
            out["rerank_ms"] = round((time.perf_counter() - t2) * 1e3, 3)
        else:
            dist, ids = dist[:, :k], ids[:, :k]
        out.update(results=self.results(dist, ids, scores), encode_ms=round(encode_s * 1e3, 3),
                   search_ms=round(search_s * 1e3, 3))
        return out

    # -- writes ---------------------------------------------------------------------------
    def add(self, codes=None, image_features=None, text=None, ids=None, items=None) -> dict:
        """Add items given as codes (hex or packed), or as features the index's model encodes
        (image features for an image index, texts for a text index); committed before this
        returns. Returns {"added", "ids", "items" (alive after)}."""
        given = [x is not None for x in (codes, image_features, text)]
        check(sum(given) == 1, "give exactly one of codes, image_features or text for the new items")
        if codes is not None:
            packed = self.parse_codes(codes)
        else:
            mod = "image" if image_features is not None else "text"
            check(mod == self.modality, f"the index holds {self.modality} codes: add "
                  f"{'image_features' if self.modality == 'image' else 'text'} (or codes), not {mod}")
            feats, _ = self.features(mod, text=text, image_features=image_features)
            packed = pack_codes(self._need_model().encode(feats, mod))
        with self.lock.write():
            new = self.index.add(packed, ids=ids, items=items)
            return {"added": int(len(new)), "ids": [int(i) for i in new], "items": len(self.index)}

    def remove(self, ids) -> dict:
        """Remove items by id (all must be known; nothing changes otherwise)."""
        check(isinstance(ids, (list, tuple, np.ndarray)) and len(ids) > 0, "ids must be a non-empty list")
        with self.lock.write():
            n = self.index.remove(np.asarray(ids))
            return {"removed": int(n), "items": len(self.index)}

    def refresh(self) -> bool:
        """Pick up what another writer committed (a read-only engine)."""
        with self.lock.write():
            return self.index.refresh()

    def info(self) -> dict:
        with self.lock.read():
            out = self.index.info()
        out.update(name=self.name, query_modality=self.query_modality,
                   model_ok=self.model_problem is None, rerank=self.reranker is not None)
        return out


def query_index(index, checkpoint=None, text: str | None = None, text_file=None, image_features=None,
                item=None, k: int = 10, dataset: str | None = None, data_root=None,
                rerank=None, candidates: int | None = None, codes=None, ray=None) -> dict:
    """Search ``index`` (a folder) for one query: free ``text`` (or a ``text_file``) through the
    dataset's vocabulary, ``image_features`` (.npy path or array; region sets N x n_o x d for
    a matcher's index), or the dataset ``item`` (row number or key) seen through the other
    modality. The query is encoded with the checkpoint for the modality opposite the index's.
    Or ``codes`` (hex strings of packed bytes, or an array), which need no checkpoint.

    Cascade: with ``rerank`` (a matcher's RUN_DIR trained on the index's data), the Hamming
    scan proposes ``candidates`` items (default 10 x k) and the matcher re-scores them; the
    best k by matcher score are returned, each with its ``score``.

    Returns what :meth:`Engine.search` returns."""
    k = positive_int(k, "-k")
    given = [x is not None for x in (text, text_file, image_features, item, codes)]
    check(sum(given) == 1, "give exactly one query: --text, --text-file, --image-features, --item or --codes")
    if rerank is None:
        check(candidates is None, "--candidates needs --rerank RUN_DIR (the matcher that re-scores them)")
    elif candidates is not None:
        candidates = positive_int(candidates, "--candidates")
        check(candidates >= k, f"--candidates must be an integer >= k ({k}), got {candidates}")
    if text_file is not None:
        path = Path(text_file)
        check(path.is_file(), f"text file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    with Engine.open(index, checkpoint, rerank=rerank, dataset=dataset, data_root=data_root, ray=ray) as eng:
        if eng.model_problem is not None and (checkpoint is not None or codes is None):
            raise ConflictError(eng.model_problem)
        return eng.search(text=text, image_features=image_features, item=item, codes=codes, k=k,
                          rerank=rerank is not None, candidates=candidates)


def _load_reranker(rerank, meta):
    reranker = load_checkpoint(rerank)
    check(_is_matcher(reranker), f"{rerank} holds a {reranker.config['model']} model, which cannot "
          "re-rank: pass the RUN_DIR of a matcher (sgraf, cgam, han, shan)")
    have = (reranker.checkpoint_info.get("dataset") or {}).get("fingerprint")
    check(have is not None and have == meta.get("dataset_fingerprint"),
          f"the re-ranker in {rerank} was trained on other data ({have}) than the index holds "
          f"({meta.get('dataset_fingerprint')}): re-rank with a matcher trained on the index's dataset")
    return reranker


def _rerank(reranker, ds, meta, feats, qmod, ids, dist, k):
    """Matcher scores for each query's Hamming candidates; the best k, best first."""
    from hashret.models.distill import rerank as rerank_candidates

    part = ds.part(meta.get("part", "database"))
    uniq = np.unique(ids[ids >= 0])
    gallery = reranker.encode_rows_for_matching(part, meta["modality"], uniq)
    query = reranker.encode_for_matching(feats, qmod)
    pos = np.where(ids >= 0, np.searchsorted(uniq, np.maximum(ids, 0)), -1)
    direction = "i2t" if qmod == "image" else "t2i"
    best, scores = rerank_candidates(reranker, query, gallery, pos, direction, k)
    new_ids = np.where(best >= 0, uniq[np.maximum(best, 0)], -1)
    lookup = [dict(zip(i.tolist(), d.tolist())) for i, d in zip(ids, dist)]
    new_dist = np.array([[lookup[q].get(int(i), -1) for i in row] for q, row in enumerate(new_ids)])
    return new_ids, new_dist, scores


def _read_array(path, what) -> np.ndarray:
    path = Path(path)
    check(path.is_file(), f"feature file {path} does not exist: pass a .npy of {what} features")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise HashretError(f"cannot read {path} as .npy ({exc}): save features with numpy.save") from None


def _item_row_in(n, item, name) -> int:
    s = str(item).strip()
    check(s.lstrip("-").isdigit(), f"unknown item {s!r}: give a row number")
    row = int(s)
    if not 0 <= row < n:
        raise NotFoundError(f"unknown item {row}: {name} has rows 0..{n - 1} on that side")
    return row


def _item_row(ds, item) -> int:
    s = str(item).strip()
    if s.lstrip("-").isdigit():
        row = int(s)
        if not 0 <= row < ds.n_items:
            raise NotFoundError(f"unknown item {row}: {ds.name} has rows 0..{ds.n_items - 1}")
        return row
    hits = np.flatnonzero(ds.ids == s)
    if len(hits) == 0:
        raise NotFoundError(f"unknown item {s!r}: not a row number or key of {ds.name}")
    return int(hits[0])


def index_info(index) -> dict:
    """Size, code length, model, dataset and build state ('complete' or not) of an index folder
    (or a sharded one)."""
    from hashret.index.sharded import ShardedIndex, interrupted_build, is_sharded, read_manifest, shard_paths

    if is_sharded(index):
        m = read_manifest(index)
        build = interrupted_build(index, m)
        if build is not None and not all(HashIndex.exists(p) for p in shard_paths(index, m["shards"])):
            # shards not created yet: nothing to open, but the build's state and how to finish it
            return {"bits": m["bits"], "shards": m["shards"], "path": str(index), "complete": False,
                    "build": build, "created": m.get("created"), "meta": m["info"]}
    with (ShardedIndex if is_sharded(index) else HashIndex).open(index) as ix:
        return ix.info()


def verify_index(index) -> dict:
    """Check every checksum and link of an index folder without loading it into memory:
    {"ok", "problems" (one line each, naming the damaged chunk and rows), "rows", "chunks",
    "items", "ids"}. Damage is reported, not raised; a folder that is no index raises."""
    from hashret.index.sharded import check_folder, is_sharded, read_manifest, shard_paths

    if is_sharded(index):  # the manifest against every shard, then every shard's own checksums
        problems = check_folder(index)
        reports = [verify_index(p) for p in shard_paths(index, read_manifest(index)["shards"]) if HashIndex.exists(p)]
        out = {"ok": not problems and all(r["ok"] for r in reports), "path": str(index),
               "shards": read_manifest(index)["shards"],
               "problems": problems + [f"{Path(r['path']).name}: {p}" for r in reports for p in r["problems"]]}
        for f in ("rows", "chunks", "items", "ids"):
            out[f] = sum(r[f] or 0 for r in reports)
        return out
    return HashIndex.verify_folder(index)
