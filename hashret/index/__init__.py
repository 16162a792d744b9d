"""Codes on disk and the Hamming scan: ``HashIndex`` (in memory or on LMDB), ``ShardedIndex``
(N of them searched as one, in process or on Ray), the Numba kernels behind them, and the
one bit convention (``pack_codes`` / ``unpack_codes``).

``HashIndex`` is imported on first use, so code that needs only the bit convention (the
metrics, the models) does not load Numba and LMDB."""

from __future__ import annotations

from pathlib import Path

from hashret.index.bits import pack_codes, sign_codes, unpack_codes

__all__ = ["HashIndex", "ShardedIndex", "open_index", "index_info", "verify_index", "pack_codes",
           "sign_codes", "unpack_codes"]


def __getattr__(name):
    if name == "HashIndex":
        from hashret.index.hash_index import HashIndex

        return HashIndex
    if name == "ShardedIndex":
        from hashret.index.sharded import ShardedIndex

        return ShardedIndex
    raise AttributeError(f"module 'hashret.index' has no attribute {name!r}")


def open_index(path, readonly: bool = True, verify: bool = True, ray=None):
    """Open the index in the folder ``path``: a :class:`HashIndex`, or a :class:`ShardedIndex`
    where ``path`` holds a sharded one.

    Parameters
    ----------
    path : str or os.PathLike
        An index folder written by ``hashret build-index``, :meth:`HashIndex.create` or
        :meth:`ShardedIndex.create`.
    readonly : bool, default True
        False opens the index as its one writer (``add``, ``remove``).
    verify : bool, default True
        Check every chunk's checksum now (at memory speed).
    ray : bool or str, optional
        A sharded index only: its shards as Ray actors (True: a local Ray, or an address).

    Returns
    -------
    HashIndex or ShardedIndex
        Open; close it (or use ``with``) when done.

    Raises
    ------
    HashretError
        ``path`` holds no index, or another writer holds it (``readonly=False``).
    CorruptError
        A checksum or link does not match: the damage is named, nothing is served.

    Examples
    --------
    >>> import hashret, numpy as np
    >>> ix = hashret.HashIndex.create(tmp / "idx", bits=64)
    >>> ix.add(np.random.default_rng(0).integers(0, 256, (100, 8), dtype=np.uint8)).shape
    (100,)
    >>> ix.close()
    >>> with hashret.open_index(tmp / "idx") as ix:
    ...     len(ix)
    100
    """
    from hashret.errors import check
    from hashret.index.hash_index import HashIndex
    from hashret.index.manifest import is_sharded
    from hashret.index.sharded import ShardedIndex

    if is_sharded(path):
        return ShardedIndex.open(path, readonly=readonly, ray=ray, verify=verify)
    check(not ray, f"{path} is not a sharded index: ray serves the shards of one")
    return HashIndex.open(path, readonly=readonly, verify=verify)


def index_info(index) -> dict:
    """Size, code length, model, dataset and build state ('complete' or not) of an index folder
    (or a sharded one)."""
    from hashret.index.hash_index import HashIndex
    from hashret.index.manifest import interrupted_build, is_sharded, read_manifest, shard_paths

    if is_sharded(index):
        m = read_manifest(index)
        build = interrupted_build(index, m)
        if build is not None and not all(HashIndex.exists(p) for p in shard_paths(index, m["shards"])):
            # shards not created yet: nothing to open, but the build's state and how to finish it
            return {"bits": m["bits"], "shards": m["shards"], "path": str(index), "complete": False,
                    "build": build, "created": m.get("created"), "meta": m["info"]}
    with open_index(index) as ix:
        return ix.info()


def verify_index(index) -> dict:
    """Check every checksum and link of an index folder without loading it into memory:
    {"ok", "problems" (one line each, naming the damaged chunk and rows), "rows", "chunks",
    "items", "ids"}. Damage is reported, not raised; a folder that is no index raises."""
    from hashret.index.hash_index import HashIndex
    from hashret.index.manifest import check_folder, is_sharded, read_manifest, shard_paths

    if is_sharded(index):  # the manifest against every shard, then every shard's own checksums
        problems = check_folder(index)
        n = read_manifest(index)["shards"]
        reports = [verify_index(p) for p in shard_paths(index, n) if HashIndex.exists(p)]
        out = {"ok": not problems and all(r["ok"] for r in reports), "path": str(index), "shards": n,
               "problems": problems + [f"{Path(r['path']).name}: {p}" for r in reports for p in r["problems"]]}
        for f in ("rows", "chunks", "items", "ids"):
            out[f] = sum(r[f] or 0 for r in reports)
        return out
    return HashIndex.verify_folder(index)
