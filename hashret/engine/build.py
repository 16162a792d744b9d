"""The build pipeline: a dataset encoded by a checkpoint's student, written to an index
batch by batch (or to the shards of a sharded one), resumable after a kill."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from hashret.engine.inputs import OTHER, is_matcher, payloads
from hashret.errors import HashretError, check, os_problem
from hashret.index import index_info
from hashret.index.attributes import Labels
from hashret.index.bits import pack_codes
from hashret.index.hash_index import HashIndex, positive_int

log = logging.getLogger(__name__)


def build_index(checkpoint, modality: str, out, dataset: str | None = None, data_root=None,
                part: str = "database", batch_size: int = 65536, append: bool = False,
                resume: bool = False, progress: bool = True, shards: int | None = None,
                ray=None, _shard: dict | None = None) -> dict:
    """Encode one side of a dataset with a checkpoint's student and write it to an index.

    Ids are the dataset's row numbers; payloads hold each item's key, label names and tags;
    the labels are also stored as the index's ``labels`` attribute, for filtered search.
    Each batch is one transaction that also records the build's progress, so a killed build
    is never taken for a whole one: ``resume`` finishes it from its last committed batch, equal
    to a build never interrupted; a fresh build that fails before its first commit leaves
    nothing behind.

    Parameters
    ----------
    checkpoint : str, os.PathLike or Checkpoint
        The RUN_DIR of a trained model.
    modality : {"image", "text"}
        The side to index (queries then come from the other side).
    out : str or os.PathLike
        The index folder.
    dataset : str, optional
        Another dataset than the checkpoint's (same feature sizes).
    part : {"database", "query", "train", "all"}, default "database"
    batch_size : int, default 65536
        Items per transaction.
    append : bool, default False
        Add to an existing index of the same model.
    resume : bool, default False
        Finish an interrupted build.
    shards : int, optional
        Write a sharded index of this many shards (item r in shard r mod N); ``ray`` (True
        or an address) builds them as Ray tasks.

    Returns
    -------
    dict
        The index's info: ``items``, ``bits``, ``complete``, ``meta`` (model, dataset, ...).

    Raises
    ------
    HashretError
        A folder that holds another model's index or an interrupted build (pass ``resume``),
        a checkpoint or dataset that cannot be read; the index is left as it was.

    Examples
    --------
    >>> import hashret
    >>> SPEC = "synthetic:n_items=500,n_query=50,n_train=250,n_labels=5,image_dim=16,text_dim=40"
    >>> _ = hashret.train("label-ridge", SPEC, bits=32, out=tmp / "run", progress=False, evaluate=False)
    >>> info = hashret.build_index(tmp / "run", "image", tmp / "images", progress=False)
    >>> info["items"], info["bits"], info["complete"]
    (450, 32, True)
    """
    if shards is not None:
        return _build_sharded(checkpoint, modality, out, dataset, data_root, part, batch_size, append,
                              resume, progress, positive_int(shards, "`shards`"), ray)
    from tqdm.auto import tqdm

    check(modality in OTHER, f"unknown modality {modality!r}: use 'image' or 'text'")
    batch_size = positive_int(batch_size, "`batch_size`")
    check(not (append and resume), "`append=True` starts a new build on an index, `resume=True` finishes "
          "an interrupted one: pass one of them")
    from hashret.models.checkpoint import Checkpoint  # torch: only for what encodes

    ck = Checkpoint.of(checkpoint)
    model, fp = ck.model, ck.fingerprint
    ds = ck.dataset(dataset, data_root)
    rows, encode_batch, payloads = _source(model, ds, modality, part, batch_size)
    check(len(rows) > 0, f"the {part} part of {ds.name} is empty: nothing to index")
    if _shard is not None:  # one shard's share: items s, s + N, s + 2N, ... of the part
        rows = rows[_shard["position"]::_shard["of"]]
    out = Path(out)
    check(not out.exists() or out.is_dir(), f"`out` {out} is a file: pass a folder for the index")
    info = {"modality": modality, "model_fingerprint": fp, "model": model.config,
            "checkpoint": str(ck.path.resolve()), "dataset": ds.name,
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
                  f"{source}: resume with the same checkpoint, `dataset`, `part` and `modality`")
            done = n_before - build["first_row"]
            check(0 <= done <= len(rows), f"{out} holds {done} rows of a {len(rows)}-row build: "
                  "it is not the build this command resumes; rebuild it")
        elif partial:
            raise HashretError(f"{out} holds an interrupted build ({n_before - build['first_row']} of "
                               f"{build['source']['rows']} items committed): pass `resume=True` to finish it, "
                               "or choose a new `out`")
        else:
            check(append, f"{out} already holds an index: pass `append=True` to add to it, or choose a new `out`")
    if not existing:
        check(not resume, f"{out} holds no index to resume: run the build without `resume=True`")
        check(not append, f"{out} holds no index to append to: build it without `append=True` (or "
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
        # the dataset's labels, stored as the index's label-set attribute (filters by label);
        # an index written before attributes existed is appended to as it is
        # (scene sets, a matcher's data, have no labels: their indexes store none)
        labels = getattr(ds, "labels", None)
        with_labels = labels is not None and (index.n_rows == 0 or bool(index.attribute_columns()))
        names = list(getattr(ds, "label_names", None) or [f"label{j}" for j in range(labels.shape[1])]) \
            if with_labels else []
        labels_of = (lambda b: {"labels": Labels(labels[b], names)}) if with_labels else (lambda b: None)
        bar = tqdm(total=len(rows), initial=done, desc=f"indexing {modality}", unit="item",
                   disable=not progress, leave=False)
        for s in range(done, len(rows), batch_size):
            batch = rows[s:s + batch_size]
            if first_batch is not None and s == 0:
                codes, items = first_batch
            else:
                codes, items = pack_codes(encode_batch(batch)), payloads(batch)
            last = s + batch_size >= len(rows)
            index.add(codes, ids=batch, items=items, attributes=labels_of(batch),
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
                                       "partial: fix the cause and rerun with `resume=True`") from None
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
    if _shard is None:  # the first query against this index should not wait for a compile
        HashIndex.warmup(model.bits)
    verb = "resumed and finished" if resume else "indexed"
    (log.debug if _shard is not None else log.info)(f"{verb} {len(rows) - done} {modality} items of {'SYNTHETIC ' if ds.synthetic else ''}{ds.name} "
        f"({model.bits} bits) into {out} in {seconds:.2f} s; the index holds {result['items']}")
    return result


def _build_sharded(checkpoint, modality, out, dataset, data_root, part, batch_size, append, resume,
                   progress, n, ray):
    """The manifest first (so an interrupted build is a sharded index whose shards say
    'partial'), then each shard's share, here or as one Ray task per shard. A shard folder
    whose creation a kill interrupted is started again; --resume is refused for any other
    checkpoint, modality, part or dataset than the build's."""
    from hashret.index.manifest import (MANIFEST, interrupted_build, is_sharded, read_manifest, shard_paths,
                                       shard_record, write_manifest)

    out = Path(out)
    check(not append, "`append=True` to a sharded index: add through ShardedIndex.add or POST /items")
    from hashret.models.checkpoint import Checkpoint

    ck = checkpoint = Checkpoint.of(checkpoint)
    model = ck.model
    want = {"modality": modality, "model_fingerprint": ck.fingerprint, "part": part,
            "dataset_spec": dataset or model.checkpoint_info.get("dataset_spec")}
    if is_sharded(out):
        m = read_manifest(out)
        check(resume, f"{out} already holds a sharded index: pass `resume=True` to finish its build, or "
              "choose a new `out`")
        check(m["shards"] == n, f"{out} has {m['shards']} shards, not {n}: resume with the same `shards`")
        for field, value in want.items():
            if field in m["info"] and m["info"][field] != value:
                raise HashretError(f"{out} is a build of {field} {m['info'][field]!r}; this command builds "
                                   f"{value!r}: resume with the same checkpoint, `modality`, `part` and "
                                   "`dataset` as the build")
        check(interrupted_build(out, m) is not None, f"the build of {out} is complete: nothing to resume")
    else:
        check(not resume, f"{out} holds no sharded index to resume: build without `resume=True`")
        # a build killed before its manifest was renamed in place left only the temporary file
        check(not out.exists() or all(p.name == MANIFEST + ".tmp" for p in out.iterdir()),
              f"`out` {out} is not empty: choose a new folder")
        out.mkdir(parents=True, exist_ok=True)
        m = write_manifest(out, model.bits, n, {**want, "model": model.config,
                                                "checkpoint": str(ck.path.resolve()),
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
        # a Ray task reads the checkpoint on its own node: it gets the folder, not this object
        ray_.get([task.remote(str(ck.path), *a[1:]) for a in args])
    else:
        for a in args:
            _build_one_shard(*a, progress=progress)
    HashIndex.warmup(model.bits)  # here too, so the first query on the shards does not compile
    items = sum(index_info(p)["items"] for p in paths)
    meta = {**m["info"], "items": items, "shards": n,
            "build_seconds": round(time.perf_counter() - t0, 3), "complete": True}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "index.json")  # the build's end: an interrupted one has none
    log.info(f"indexed {items} {modality} items into {n} shards at {out}"
        f"{' with Ray' if ray else ''} in {meta['build_seconds']:.2f} s")
    from hashret.index.sharded import ShardedIndex

    with ShardedIndex.open(out) as ix:
        return ix.info()


def _build_one_shard(checkpoint, modality, out, dataset, data_root, part, batch_size, resume, record,
                     progress=False):
    return build_index(checkpoint, modality, out, dataset=dataset, data_root=data_root, part=part,
                       batch_size=batch_size, resume=resume, progress=progress,
                       _shard=record)


def _remove_folder(out: Path, rmdir: bool = True):
    """Undo a fresh build that committed nothing: only files hashret itself writes there."""
    HashIndex.discard(out, also=("index.json", "index.json.tmp"), rmdir=rmdir)


def _source(model, ds, modality, part, batch_size):
    """(rows, encode(rows) -> codes, payloads(rows)) of a dataset part for one modality. For
    a matcher's scene data, image rows are images and text rows are captions of the part."""
    if is_matcher(model):
        model.check_data(ds)
        check(part != "all", "scene data is indexed one part at a time: pass `part=database` "
              "(the test part), train or query")
        p = ds.part(part)
        return (p.rows(modality), lambda b: model.encode_rows(p, modality, b),
                lambda b: ds.payloads(part, modality, b))
    check(ds.has(modality), f"dataset {ds.name} has no {modality} features to index: index the "
          f"{OTHER[modality]} side or use a dataset with both modalities")
    rows = np.arange(ds.n_items) if part == "all" else ds.part(part)
    return rows, lambda b: model.encode_rows(ds, modality, b, batch_size), lambda b: payloads(ds, b)
