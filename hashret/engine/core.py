"""The :class:`Engine`: an index opened once with the model that built it, the one path
every search takes (CLI, Python, the server, Ray shards)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from hashret.engine.inputs import OTHER, is_matcher, item_row, item_row_in, payloads, read_array, read_features
from hashret.errors import ConflictError, HashretError, check
from hashret.index import open_index
from hashret.index.bits import as_packed, pack_codes
from hashret.index.hash_index import HashIndex, positive_int


class _RWLock:
    """Many readers or one writer: scans share the index; add, remove and refresh change
    the id map and the snapshot, so they run alone."""

    def __init__(self):
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


def _model(ck):
    """A checkpoint's model, loaded once per process (several indexes share it)."""
    key = (str(ck.path.resolve()), ck.fingerprint)
    if key not in _MODELS:
        _MODELS[key] = ck.model
    return _MODELS[key]


class Engine:
    """An index opened with the model that built it: the one path every search takes.

    ``Engine.open(index, checkpoint)`` opens the index (a folder or a sharded one) once;
    :meth:`search` encodes a query (text, image features, a dataset item or codes), scans,
    re-ranks with a matcher (``rerank``) and attaches payloads; :meth:`add` and :meth:`remove`
    write (``readonly=False``); :meth:`refresh` picks up another writer's commits. Searches run
    concurrently, writes one at a time.

    Parameters
    ----------
    index : str or os.PathLike
        The index folder (to :meth:`open`).
    checkpoint : str, os.PathLike or Checkpoint, optional
        The RUN_DIR the index was built with. None, or another model: code queries still
        work, queries that need the model are refused naming both fingerprints.
    rerank : str or os.PathLike, optional
        A matcher's RUN_DIR trained on the index's data, for the cascade.
    readonly : bool, default True
        False makes this engine the index's one writer.

    Raises
    ------
    HashretError
        No index at ``index``, another writer holds it, or the re-ranker was trained on
        other data. CorruptError: a damaged index.

    Examples
    --------
    >>> import hashret
    >>> SPEC = "synthetic:n_items=500,n_query=50,n_train=250,n_labels=5,image_dim=16,text_dim=40"
    >>> _ = hashret.train("label-ridge", SPEC, bits=32, out=tmp / "run", progress=False, evaluate=False)
    >>> _ = hashret.build_index(tmp / "run", "image", tmp / "images", progress=False)
    >>> with hashret.Engine.open(tmp / "images", tmp / "run") as engine:
    ...     found = engine.search(item=0, k=3)
    >>> found["query_modality"], [hit["rank"] for hit in found["results"][0]]
    ('text', [1, 2, 3])
    """

    def __init__(self, index: HashIndex, path, checkpoint=None, rerank=None, dataset=None,
                 data_root=None):
        self.index, self.path = index, Path(path)
        self.name = self.path.name
        self.meta = index.info_meta
        self.modality = self.meta.get("modality")
        self.query_modality = OTHER.get(self.modality)
        self.checkpoint = None
        if checkpoint is not None:  # the model's modules (torch) load only for an engine that encodes
            from hashret.models.checkpoint import Checkpoint

            self.checkpoint = Checkpoint.of(checkpoint)
        self.dataset_spec, self.data_root = dataset, data_root
        self.model = self.reranker = None
        self.model_problem = "this engine has no checkpoint: only code queries can be answered"
        self.max_k = self.max_candidates = None  # a server's limits per request
        self.reads_files = True  # a server sets False: image_features must then be numbers, not paths
        if checkpoint is not None:
            fp = self.checkpoint.fingerprint
            if self.meta.get("model_fingerprint") == fp:
                self.model, self.model_problem = _model(self.checkpoint), None
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
        from hashret.index.manifest import is_sharded

        check(not ray or is_sharded(index), f"{index} is not a sharded index: --ray serves the shards of one")
        ix = open_index(index, readonly=readonly, verify=verify, ray=ray)
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
                  "start with `checkpoint`")
            self._data = self.checkpoint.dataset(self.dataset_spec, self.data_root)
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
        if isinstance(image_features, (str, os.PathLike)) and not self.reads_files:
            raise HashretError("image_features must be rows of numbers: this server opens no file a "
                               "request names")
        extra = {"known_words": None, "unknown_words": None}
        if modality == "text":
            texts = [text] if isinstance(text, str) else text
            check(isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts),
                  "text must be a non-empty string or a list of them")
            check(all(t.strip() for t in texts), "the text query is empty: give some words")
            if is_matcher(model):
                check(len(texts) == 1, "a matcher encodes one text at a time: send one text per request")
                tokens, lengths, known, unknown = model.vocab.encode_query(texts[0])
                feats = (tokens, lengths)
            else:
                ds = self.data()
                check(ds.vocab is not None, f"dataset {ds.name} has no word vocabulary (its text side "
                      f"is {ds.dim('text')}-d features): query with an item instead")
                from hashret.data import BagOfWords

                bow = BagOfWords(ds.vocab)
                parts = [bow.encode_query(t) for t in texts]
                feats = np.vstack([p[0] for p in parts])
                known = [w for p in parts for w in p[1]]
                unknown = [w for p in parts for w in p[2]]
            extra.update(known_words=known, unknown_words=unknown)
            return feats, extra
        if is_matcher(model):
            if isinstance(image_features, (str, os.PathLike)):
                x = read_array(image_features, "region")
            else:
                try:
                    x = np.asarray(image_features, dtype=np.float32)
                except (TypeError, ValueError):
                    raise HashretError("image_features must be region sets: rows of numbers, all rows of a "
                                       "set as long") from None
            return model.check_images(x), extra
        dim = model.config["image_dim"]
        if isinstance(image_features, (str, os.PathLike)):
            return read_features(image_features, dim, "image"), extra
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
            return {"codes": self.parse_codes(codes), "feats": None, "known_words": None, "unknown_words": None,
                    "kind": "codes"}
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
            if is_matcher(model):
                part = ds.part(self.meta.get("part", "database"))
                n = part.n_images if qmod == "image" else part.n_captions
                row = item_row_in(n, item, ds.name)
                feats = part.image_batch([row]) if qmod == "image" else part.text_batch([row])
                out["query_item"] = {"id": row, **ds.payloads(self.meta.get("part", "database"), qmod, [row])[0]}
            else:
                row = item_row(ds, item)
                feats = ds.features(qmod, [row])
                out["query_item"] = {"id": row, **payloads(ds, [row])[0]}
        out["codes"] = pack_codes(self._need_model().encode(feats, qmod))
        out["feats"] = feats
        return out

    def scan(self, codes: np.ndarray, width: int, filter=None, threads: int | None = None):
        """(distances, ids) of the ``width`` nearest codes of each query among the items
        ``filter`` selects: one kernel call for all of them (the server's micro-batches, one
        per filter, come through here)."""
        with self.lock.read():
            return self.index.search(codes, width, threads=threads, filter=filter)

    def rerank(self, feats, ids, dist, k):
        check(self.reranker is not None, "re-ranking needs a matcher: start with `rerank=RUN_DIR`")
        check(feats is not None, "code queries cannot be re-ranked (the matcher needs the query's "
              "features): send a text, image features or an item")
        return _rerank(self.reranker, self.data(), self.meta, feats, self.query_modality, ids, dist, k)

    def results(self, dist, ids, scores=None) -> list:
        """Per query: [{rank, id, distance, item[, attributes][, score]}, ...] with the stored
        payloads (and attributes, where the index stores any)."""
        out = []
        with self.lock.read():
            columns = self.index.attribute_columns()
            for q, (qd, qi) in enumerate(zip(dist, ids)):
                keep = qi >= 0
                found = qi[keep].tolist()
                payloads = self.index.items(found) if found and self.index.has_payloads else [None] * len(found)
                group = [{"rank": r + 1, "id": i, "distance": d, "item": p}
                         for r, (i, d, p) in enumerate(zip(found, qd[keep].tolist(), payloads))]
                if found and columns:
                    for g, a in zip(group, self.index.attributes(found)):
                        g["attributes"] = a
                if scores is not None:
                    for g, sc in zip(group, scores[q][keep]):
                        g["score"] = float(sc)
                out.append(group)
        return out

    def search_widths(self, k, rerank: bool = False, candidates=None):
        """(k, scan width): the cascade scans ``candidates`` (default 10 x k) to keep k."""
        k = positive_int(k, "k")
        if not rerank:
            check(candidates is None, "candidates needs a re-ranker (`rerank=RUN_DIR`, and rerank: true)")
            width = k
        else:
            check(self.reranker is not None, "re-ranking needs a matcher: start with `rerank=RUN_DIR`")
            width = 10 * k if candidates is None else positive_int(candidates, "candidates")
            check(width >= k, f"candidates must be an integer >= k ({k}), got {width}")
        check(self.max_k is None or k <= self.max_k, f"k must be at most {self.max_k}, got {k}")
        check(self.max_candidates is None or width <= self.max_candidates,
              f"candidates must be at most {self.max_candidates}, got {width}")
        return k, width

    def search(self, text=None, image_features=None, item=None, codes=None, k: int = 10,
               rerank: bool = False, candidates=None, scan=None, filter=None) -> dict:
        """One query, whole: encode, scan, re-rank (cascade), payloads.

        Parameters
        ----------
        text : str or list of str, optional
            Free text, for an index of image codes.
        image_features : array_like (Q, image_dim) float, or a .npy path, optional
            Image features (region sets (Q, n_regions, dim) for a matcher), for a text index.
        item : int or str, optional
            A row number or key of the checkpoint's dataset, seen through the other modality.
        codes : list of str (hex of packed bytes) or uint8 array (Q, bits/8), optional
            Codes to scan with; need no model. Exactly one of the four is given.
        k : int, default 10
            Results per query.
        rerank : bool, default False
            Re-rank ``candidates`` Hamming neighbours (default 10 x k) with the engine's matcher.
        scan : callable, optional
            ``scan(codes, width, filter) -> (distances, ids)``; default :meth:`scan`. (The server,
            whose scan is awaited, drives the same steps, :meth:`search_steps`, with its
            micro-batcher.)
        filter : dict or bool array, optional
            Only items it selects: an expression over the index's attributes, or (one index,
            not sharded) a boolean array over its rows; see :mod:`hashret.index.attributes`.

        Returns
        -------
        dict
            ``results``: per query, a list of ``{rank, id, distance, item[, score]}``;
            ``query_modality``, ``known_words``, ``unknown_words``, ``warnings``, ``encode_ms``,
            ``search_ms`` [, ``rerank_ms``, ``query_item``].

        Raises
        ------
        HashretError
            A malformed query (one line naming it); NotFoundError for an unknown item;
            ConflictError for a query this index's model cannot answer.
        """
        steps = self.search_steps(text, image_features, item, codes, k, rerank, candidates, filter)
        return finish(steps, (scan or self.scan)(*next(steps)))

    def search_steps(self, text=None, image_features=None, item=None, codes=None, k: int = 10,
                     rerank: bool = False, candidates=None, filter=None):
        """:meth:`search` as steps around its scan, for a caller that scans its own way (the
        server awaits its micro-batcher): a generator that checks and encodes the query, yields
        ``(codes, width, filter)``, is sent the scan's ``(distances, ids)``, then re-ranks and
        attaches payloads; :func:`finish` sends the scan and returns what :meth:`search` returns."""
        k, width = self.search_widths(k, rerank, candidates)
        with self.lock.read():
            self.index.check_filter(filter)  # before any encoding: a bad filter costs nothing
        t0 = time.perf_counter()
        q = self.encode_query(text=text, image_features=image_features, item=item, codes=codes)
        t1 = time.perf_counter()
        dist, ids = yield q["codes"], width, filter
        t2 = time.perf_counter()
        return self.finish(q, dist, ids, k, rerank, t1 - t0, t2 - t1)

    def finish(self, q, dist, ids, k, rerank, encode_s, search_s) -> dict:
        """Re-rank (if asked) and attach payloads to a query's scan."""
        # what the query was: a text or an image (an item is seen as one), or codes
        out = {"query_modality": q.get("kind", self.query_modality), "known_words": q["known_words"],
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
    def add(self, codes=None, image_features=None, text=None, ids=None, items=None, attributes=None) -> dict:
        """Add items given as codes (hex or packed), or as features the index's model encodes
        (image features for an image index, texts for a text index), with their ``items``
        (payloads) and ``attributes``; committed before this returns. Returns {"added",
        "ids", "items" (alive after)}."""
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
            new = self.index.add(packed, ids=ids, items=items, attributes=attributes)
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


def finish(steps, scanned) -> dict:
    """Send a scan's ``(distances, ids)`` to :meth:`Engine.search_steps` and return its result."""
    try:
        steps.send(scanned)
    except StopIteration as done:
        return done.value
    raise RuntimeError("internal: a search took a second scan")


def query_index(index, checkpoint=None, text: str | None = None, text_file=None, image_features=None,
                item=None, k: int = 10, dataset: str | None = None, data_root=None,
                rerank=None, candidates: int | None = None, codes=None, ray=None, filter=None) -> dict:
    """Search ``index`` (a folder) for one query: free ``text`` (or a ``text_file``, one query a
    line) through the
    dataset's vocabulary, ``image_features`` (.npy path or array; region sets N x n_o x d for
    a matcher's index), or the dataset ``item`` (row number or key) seen through the other
    modality. The query is encoded with the checkpoint for the modality opposite the index's.
    Or ``codes`` (hex strings of packed bytes, or an array), which need no checkpoint.

    Cascade: with ``rerank`` (a matcher's RUN_DIR trained on the index's data), the Hamming
    scan proposes ``candidates`` items (default 10 x k) and the matcher re-scores them; the
    best k by matcher score are returned, each with its ``score``.

    ``filter``: only items it selects (an expression over the index's attributes, see
    :mod:`hashret.index.attributes`).

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
        text = read_queries(text_file)
    with Engine.open(index, checkpoint, rerank=rerank, dataset=dataset, data_root=data_root, ray=ray) as eng:
        if eng.model_problem is not None and (checkpoint is not None or codes is None):
            raise ConflictError(eng.model_problem)
        return eng.search(text=text, image_features=image_features, item=item, codes=codes, k=k,
                          rerank=rerank is not None, candidates=candidates, filter=filter)


def read_queries(text_file) -> list:
    """The text queries of a file, one a line (blank lines skipped)."""
    path = Path(text_file)
    check(path.is_file(), f"text file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    check(lines, f"text file {path} holds no query: write one query a line")
    return lines


def _load_reranker(rerank, meta):
    from hashret.models.checkpoint import Checkpoint

    reranker = Checkpoint.of(rerank).model
    check(is_matcher(reranker), f"{rerank} holds a {reranker.config['model']} model, which cannot "
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
