"""A sharded index: N ordinary hashret LMDB indexes and a manifest, searched as one.

The rule: the item added r-th (r counts from 0 over the index's life, removed items
included) lives in shard ``r mod N`` as that shard's row ``r // N``. So row j of shard s is
global row ``j*N + s``, and merging the shards' top-k by (distance, global row) gives exactly
what one :class:`~hashret.index.HashIndex` holding the same codes in the same order gives --
ids, distances and order, ties included. Every shard is a whole hashret index (checksums,
one writer, resumable builds), so every integrity guarantee carries over.

Ids: with row ids, an item's id is its global row; with explicit ids, the shards store them
and the one that holds an id owns it (a removal asks every shard, which is one id-map lookup
each). Adding a batch commits one transaction per shard, in shard order; if a process dies
between them, the shards no longer split round-robin and opening says so (restore from a
copy or rebuild) rather than serving a mixed state.

Two modes: in-process (all shards in this process: tests, small machines) and on Ray (one
actor per shard holding it open and running the same kernel; ``open(path, ray=True)`` or
``ray="ray://host:10001"``). An actor that dies is restarted by Ray from its LMDB shard and
its call is retried once; a shard that still cannot answer fails the search with one line
naming it, unless ``allow_partial=True``, which answers from the shards that did and says
which did not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from hashret.errors import HashretError, NotFoundError, check, is_integer
from hashret.index.hash_index import DEFAULT_CHUNK, HashIndex, check_ids, positive_int

MANIFEST = "shards.json"
FORMAT = 1
RULE = "round-robin by global row: the r-th item added lives in shard r mod N as its row r // N"


def is_sharded(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shard_paths(path, n: int) -> list:
    return [Path(path) / f"shard-{s:03d}" for s in range(n)]


def read_manifest(path) -> dict:
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise HashretError(f"cannot read the manifest {f} ({exc}): restore it, or rebuild the sharded index") from None
    ok = (isinstance(m, dict) and m.get("format") == FORMAT and is_integer(m.get("shards"))
          and m["shards"] >= 1 and is_integer(m.get("bits")) and isinstance(m.get("info"), dict))
    check(ok, f"{f} is not a hashret shard manifest (format {FORMAT}): restore it, or rebuild the sharded index")
    return m


def write_manifest(path, bits: int, n: int, info: dict):
    """The manifest, written last and atomically: a folder without one is no index."""
    m = {"format": FORMAT, "bits": int(bits), "shards": int(n), "rule": RULE, "info": info,
         "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    tmp = Path(path) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(m, indent=2))
    os.replace(tmp, Path(path) / MANIFEST)


_STATE = {  # what the merge needs of a shard beyond HashIndex's methods
    "rows_and_mode": lambda ix: (ix.n_rows, ix.info()["id_mode"]),
    "build_info": lambda ix: ix.build_state,
    "payloads_given": lambda ix: ix.has_payloads,
}


def _call(ix: HashIndex, method: str, *args):
    if method in _STATE:
        return _STATE[method](ix)
    return getattr(ix, method)(*args)


class _Shard:
    """A shard in this process: its HashIndex's verbs, called directly."""

    def __init__(self, s: int, path, readonly: bool, verify: bool):
        self.s, self.path = s, Path(path)
        self.ix = HashIndex.open(path, readonly=readonly, verify=verify)

    def submit(self, method, *args):
        return _call(self.ix, method, *args)

    def result(self, pending):
        return pending

    def close(self):
        self.ix.close()


class _ShardActor:
    """The Ray actor holding one shard (Ray restarts it by calling this again)."""

    def __init__(self, path, readonly, verify):
        self.ix = HashIndex.open(path, readonly=readonly, verify=verify)

    def call(self, method, *args):
        return _call(self.ix, method, *args)

    def pid(self):
        return os.getpid()


class _RayShard:
    """A shard held by a Ray actor; calls go out at once and are awaited together."""

    def __init__(self, s: int, path, readonly: bool, verify: bool):
        import ray

        self.s, self.path = s, Path(path)
        # num_cpus=0: an actor holds a shard, its scans use Numba's threads; passive OpenMP
        # waits, or the actors' idle threads spin on each other's cores
        cls = ray.remote(_ShardActor).options(max_restarts=-1, max_task_retries=1, num_cpus=0,
                                              runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})
        self.actor = cls.remote(str(path), readonly, verify)
        self.result(self.submit("info"))  # opened (or its error) before the index is used

    def submit(self, method, *args):
        return self.actor.call.remote(method, *args)

    def result(self, pending):
        import ray

        try:
            return ray.get(pending)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, HashretError):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise ShardDown(self.s, self.path, str(exc).splitlines()[0][:200]) from None

    def close(self):
        import ray

        try:
            ray.get(self.actor.call.remote("close"), timeout=30)
        except Exception:  # noqa: BLE001 -- closing a dead actor: nothing left to close
            pass
        ray.kill(self.actor)


class ShardDown(HashretError):
    def __init__(self, s, path, why):
        super().__init__(f"shard {s} ({path}) cannot answer ({why}); Ray restarted it and the call "
                         "was retried once: check that node and the shard's folder, or pass "
                         "allow_partial=True to answer from the other shards")
        self.shard = s


def _connect(ray_address):
    import ray

    if not ray.is_initialized():
        if ray_address is True:
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)


class ShardedIndex:
    """N hashret indexes searched as one (see the module's notes). Same verbs as HashIndex:
    ``create`` / ``open``, ``add``, ``search``, ``range_search``, ``remove``, ``items``,
    ``info``, ``refresh``, ``close``."""

    def __init__(self, path, manifest: dict, shards: list, ray_mode: bool):
        self.path, self.manifest, self.shards, self.ray = Path(path), manifest, shards, ray_mode
        self.n = len(shards)
        self.bits = manifest["bits"]
        self.info_meta = manifest["info"]
        self.last_partial = None
        self._sync()
        self._check_split()

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def create(cls, path, bits: int, shards: int, info: dict | None = None,
               chunk_size: int = DEFAULT_CHUNK, ray=None) -> "ShardedIndex":
        """A new, empty sharded index in the folder ``path``, open for writing."""
        path = Path(path)
        n = positive_int(shards, "shards")
        check(not is_sharded(path) and not (path / "data.mdb").exists(),
              f"{path} already holds an index: open it, or choose a new folder")
        path.mkdir(parents=True, exist_ok=True)
        for p in shard_paths(path, n):
            HashIndex.create(p, bits, info, chunk_size=chunk_size).close()
        write_manifest(path, bits, n, dict(info or {}))
        return cls.open(path, readonly=False, ray=ray)

    @classmethod
    def open(cls, path, readonly: bool = True, ray=None, verify: bool = True) -> "ShardedIndex":
        """Open every shard: in this process, or (``ray``: True for a local or the current
        cluster, an address such as "ray://host:10001") one Ray actor per shard."""
        path = Path(path)
        check(is_sharded(path), f"{path} holds no sharded index (no {MANIFEST}): pass a folder "
              "written by 'hashret build-index --shards N'")
        m = read_manifest(path)
        if ray:
            _connect(ray)
        make = _RayShard if ray else _Shard
        shards = []
        try:
            for s, p in enumerate(shard_paths(path, m["shards"])):
                check(p.is_dir(), f"shard {s} of {path} is missing ({p}): restore it from a copy")
                shards.append(make(s, p, readonly, verify))
            return cls(path, m, shards, bool(ray))
        except BaseException:
            for sh in shards:
                sh.close()
            raise

    def close(self):
        for sh in self.shards:
            sh.close()
        self.shards = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- fan-out -------------------------------------------------------------------------------
    def _all(self, method, *args, allow_partial: bool = False):
        """method(*args) on every shard at once; [result or None (a shard down, allowed)]."""
        pending = [(sh, sh.submit(method, *args)) for sh in self.shards]
        out, down = [], []
        for sh, p in pending:
            try:
                out.append(sh.result(p))
            except ShardDown as exc:
                if not allow_partial:
                    raise
                out.append(None)
                down.append(exc.shard)
        self.last_partial = down or None
        if down and len(down) == self.n:
            raise HashretError(f"no shard of {self.path} can answer (shards {down} are down): check the Ray cluster")
        return out

    def _sync(self):
        """Row counts and id mode of every shard (kept here: a search needs them, and on Ray
        each question is a round trip)."""
        state = self._all("rows_and_mode")
        self._counts = [int(r) for r, _ in state]
        self._mode = "explicit" if any(m == "explicit" for _, m in state) else "rows"
        self._builds = self._all("build_info")
        self._payloads = any(self._all("payloads_given"))

    def _rows(self):
        return list(self._counts)

    def _check_split(self):
        counts = self._rows()
        total = sum(counts)
        expect = [(total - s + self.n - 1) // self.n for s in range(self.n)]
        builds = [b for b in self._builds if b is not None]
        if counts != expect and not any(b.get("state") == "partial" for b in builds):
            raise HashretError(f"the shards of {self.path} hold {counts} rows, which do not split "
                               f"round-robin ({expect} for {total}): an add was interrupted between "
                               "shards; restore the folder from a copy or rebuild it")

    # -- adding ----------------------------------------------------------------------------------
    def add(self, codes, ids=None, items=None) -> np.ndarray:
        """Append codes (as ``HashIndex.add``); item r of the batch gets global row T + r and
        goes to shard (T + r) mod N. Explicit ids are checked against every shard first."""
        from hashret.index.bits import as_packed

        packed = as_packed(codes, self.bits, "codes")
        n = len(packed)
        check(n > 0, "nothing to add: the code array is empty")
        if ids is not None:
            ids = check_ids(ids, n)
            for known in self._all("lookup_rows", ids):
                if (known >= 0).any():
                    raise HashretError(f"id {int(ids[known >= 0][0])} is already in the index: ids must be unique")
        if items is not None:
            from hashret.index.hash_index import _json_items

            items = _json_items(items, n)
        total = sum(self._rows())
        if total:
            check((ids is not None) == (self._mode == "explicit"),
                  "this index uses explicit ids: pass ids to add" if self._mode == "explicit"
                  else "this index uses row numbers as ids: add without ids")
        shard_of = (total + np.arange(n)) % self.n
        for s, sh in enumerate(self.shards):
            at = np.flatnonzero(shard_of == s)
            if len(at):
                sh.result(sh.submit("add", packed[at], None if ids is None else ids[at],
                                    None if items is None else [items[i] for i in at]))
                self._counts[s] += len(at)
        self._mode = "explicit" if ids is not None else "rows"
        self._payloads = self._payloads or (items is not None and any(it is not None for it in items))
        return ids if ids is not None else np.arange(total, total + n, dtype=np.int64)

    # -- searching -------------------------------------------------------------------------------
    def _global(self, s, rows, ids, explicit):
        seq = np.where(rows >= 0, rows * self.n + s, -1)
        return seq, (ids if explicit else seq)

    def search(self, queries, k: int, threads: int | None = None, allow_partial: bool = False):
        """As ``HashIndex.search``: (distances, ids) of shape (Q, min(k, rows)), merged from
        every shard's top-k by (distance, global row)."""
        k = positive_int(k, "k")
        parts = self._all("search_rows", queries, k, threads, allow_partial=allow_partial)
        explicit = self._mode == "explicit"
        width = min(k, sum(self._rows()))
        dists, seqs, gids = [], [], []
        for s, part in enumerate(parts):
            if part is None:
                continue
            d, rows, ids = part
            seq, gid = self._global(s, rows, ids, explicit)
            dists.append(d.astype(np.int64))
            seqs.append(seq)
            gids.append(gid)
        nq = len(next(p for p in parts if p is not None)[0])
        if not dists or width == 0:
            return np.zeros((nq, 0), np.int32), np.zeros((nq, 0), np.int64)
        d, seq, gid = np.hstack(dists), np.hstack(seqs), np.hstack(gids)
        big = np.int64(1) << 40
        key = np.where(seq >= 0, d * big + seq, np.iinfo(np.int64).max)
        order = np.argsort(key, axis=1, kind="stable")[:, :width]
        pick = np.take_along_axis
        out_d, out_seq, out_id = pick(d, order, 1), pick(seq, order, 1), pick(gid, order, 1)
        miss = out_seq < 0
        if order.shape[1] < width:  # every shard had fewer columns than the whole index
            pad = width - order.shape[1]
            out_d = np.hstack([out_d, np.full((nq, pad), -1)])
            out_id = np.hstack([out_id, np.full((nq, pad), -1)])
            miss = np.hstack([miss, np.ones((nq, pad), bool)])
        out_d = np.where(miss, -1, out_d).astype(np.int32)
        out_id = np.where(miss, -1, out_id).astype(np.int64)
        return out_d, out_id

    def range_search(self, queries, radius: int, threads: int | None = None, allow_partial: bool = False):
        """As ``HashIndex.range_search``: (lims, distances, ids), each query's results by
        distance, then global row."""
        parts = self._all("range_search_rows", queries, radius, threads, allow_partial=allow_partial)
        explicit = self._mode == "explicit"
        nq = next(len(p[0]) - 1 for p in parts if p is not None)
        lims = np.zeros(nq + 1, np.int64)
        dist_out, id_out = [], []
        for q in range(nq):
            d, seq, gid = [], [], []
            for s, part in enumerate(parts):
                if part is None:
                    continue
                lm, dd, rows, ids = part
                a, b = lm[q], lm[q + 1]
                sq, g = self._global(s, rows[a:b], ids[a:b], explicit)
                d.append(dd[a:b])
                seq.append(sq)
                gid.append(g)
            d, seq, gid = np.concatenate(d), np.concatenate(seq), np.concatenate(gid)
            o = np.lexsort((seq, d))
            dist_out.append(d[o])
            id_out.append(gid[o])
            lims[q + 1] = lims[q] + len(o)
        return (lims, np.concatenate(dist_out).astype(np.int32) if dist_out else np.zeros(0, np.int32),
                np.concatenate(id_out).astype(np.int64) if id_out else np.zeros(0, np.int64))

    # -- ids, items, removal -----------------------------------------------------------------------
    def _owners(self, ids) -> tuple:
        """(shard of each id, its row there); NotFoundError naming an unknown id."""
        ids = np.atleast_1d(np.asarray(ids))
        check(ids.dtype != object and ids.dtype.kind in "iu", f"ids must be integers, got {ids.dtype}")
        ids = ids.astype(np.int64)
        owner = np.full(len(ids), -1)
        row = np.full(len(ids), -1, dtype=np.int64)
        if self._mode == "explicit":
            for s, rows in enumerate(self._all("lookup_rows", ids)):
                hit = rows >= 0
                owner[hit], row[hit] = s, rows[hit]
        else:
            counts = self._rows()
            s, r = ids % self.n, ids // self.n
            ok = (ids >= 0) & (r < np.array(counts)[s])
            owner[ok], row[ok] = s[ok], r[ok]
        if (owner < 0).any():
            raise NotFoundError(f"unknown id {int(ids[owner < 0][0])}: it is not in the index")
        return ids, owner

    def remove(self, ids) -> int:
        """Remove items by id: each from the shard that holds it (all must be known first)."""
        ids, owner = self._owners(ids)
        removed = 0
        for s, sh in enumerate(self.shards):
            mine = ids[owner == s]
            if len(mine):
                removed += sh.result(sh.submit("remove", self._local_ids(s, mine)))
        return removed

    def _local_ids(self, s, ids):
        """Ids as shard s knows them (row-id shards number their own rows)."""
        if self.id_mode == "explicit":
            return ids
        return ids // self.n

    def items(self, ids) -> list:
        ids, owner = self._owners(ids)
        out = [None] * len(ids)
        for s, sh in enumerate(self.shards):
            at = np.flatnonzero(owner == s)
            if len(at):
                for i, it in zip(at, sh.result(sh.submit("items", self._local_ids(s, ids[at])))):
                    out[i] = it
        return out

    def contains(self, ext_id) -> bool:
        try:
            ids, owner = self._owners([ext_id])
        except HashretError:
            return False
        sh = self.shards[owner[0]]
        return bool(sh.result(sh.submit("contains", int(self._local_ids(owner[0], ids)[0]))))

    def refresh(self) -> bool:
        changed = any(self._all("refresh"))
        if changed:
            self._sync()
        return changed

    # -- sizes and state -----------------------------------------------------------------------
    @property
    def id_mode(self) -> str:
        return self._mode

    @property
    def n_rows(self) -> int:
        return sum(self._rows())

    def __len__(self) -> int:
        return sum(int(i["items"]) for i in self._all("info"))

    @property
    def has_payloads(self) -> bool:
        return self._payloads

    @property
    def build_state(self) -> dict | None:
        builds = self._builds
        if all(b is None for b in builds):
            return None
        if all(b is not None and b.get("state") == "complete" for b in builds):
            return {"state": "complete"}
        return {"state": "partial", "first_row": sum((b or {}).get("first_row", 0) for b in builds),
                "source": {"rows": sum(((b or {}).get("source") or {}).get("rows", 0) for b in builds)}}

    def info(self) -> dict:
        per = self._all("info")
        build = self.build_state
        return {"bits": self.bits, "items": sum(i["items"] for i in per), "rows": sum(i["rows"] for i in per),
                "removed": sum(i["removed"] for i in per), "id_mode": self.id_mode, "path": str(self.path),
                "persistent": True, "readonly": all(i["readonly"] for i in per),
                "complete": build is None or build.get("state") == "complete", "build": build,
                "created": self.manifest.get("created"), "shards": self.n, "rule": RULE,
                "ray": self.ray, "shard_items": [i["items"] for i in per],
                "code_bytes": sum(i["code_bytes"] for i in per), "meta": self.info_meta}
