"""A sharded index: N ordinary hashret LMDB indexes and a manifest, searched as one.

The rule: the item added r-th (r counts from 0 over the index's life, removed items
included) lives in shard ``r mod N`` as that shard's row ``r // N``. So row j of shard s is
global row ``j*N + s``, and merging the shards' top-k by (distance, global row) gives exactly
what one :class:`~hashret.index.HashIndex` holding the same codes in the same order gives --
ids, distances and order, ties included. Every shard is a whole hashret index (checksums,
one writer, resumable builds), so every integrity guarantee carries over.

Ids: with row ids, an item's id is its global row; with explicit ids, the shards store them
and the one that holds an id owns it (a removal asks every shard, which is one id-map lookup
each). A batch (add or removal) commits one transaction per shard, in shard order, after the
whole batch is recorded in the batch journal (:mod:`hashret.index.journal`, which says why
that is correct): a crash leaves it in every shard or in none once the index is next opened
for writing, and readers never see part of it.

What cannot lie: see :mod:`hashret.index.manifest`: ``shards.json`` and every shard's own
record are checked against each other on every open.

Two modes: in-process (all shards in this process: tests, small machines) and on Ray (one
actor per shard holding it open and running the same kernel; ``open(path, ray=True)`` or
``ray="ray://host:10001"``). An actor that dies is restarted by Ray from its LMDB shard and
its call is retried once; a shard that still cannot answer fails the search with one line
naming it, unless ``allow_partial=True``, which answers from the shards that did and says
which did not.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np

from hashret.errors import CorruptError, HashretError, NotFoundError, check
from hashret.index import journal
from hashret.index.hash_index import DEFAULT_CHUNK, HashIndex, check_ids, json_items, positive_int
from hashret.index.attributes import encode, from_json, localise, new_schema, to_json
from hashret.index.manifest import (MANIFEST, RESTORE, RULE, interrupted_build, is_sharded, read_manifest, shard_paths, shard_problem, shard_record, split_problem, write_manifest)


_STATE = {  # what the merge needs of a shard beyond HashIndex's verbs (one round trip on Ray)
    "state": lambda ix: {"rows": ix.n_rows, "mode": ix.info()["id_mode"], "bits": ix.bits,
                         "info": ix.info_meta, "build": ix.build_state, "payloads": ix.has_payloads},
    "n_alive": lambda ix, ids: int(sum(ix.contains(int(i)) for i in ids)),
}


def _call(ix: HashIndex, method: str, *args):
    if method in _STATE:
        return _STATE[method](ix, *args)
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


def connect_ray(ray_address):
    import ray

    if not ray.is_initialized():
        if ray_address is True:
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        else:
            ray.init(address=ray_address, ignore_reinit_error=True, log_to_driver=False)


class ShardedIndex:
    """N hashret indexes searched as one, in this process or as Ray actors.

    The r-th item added lives in shard r mod N, so a search merges the shards' answers into
    exactly what one :class:`HashIndex` holding the same codes gives (ids, distances, order,
    ties). Same verbs as HashIndex: ``create`` / ``open``, ``add``, ``search``,
    ``range_search``, ``remove``, ``items``, ``info``, ``refresh``, ``close``. Writes go
    through the batch journal (:mod:`hashret.index.journal`): a batch is in every shard or in
    none, and opening for writing completes a batch that a crash interrupted.

    Parameters
    ----------
    path : str or os.PathLike
        The folder: ``shards.json`` and one index folder per shard.
    bits : int
        Code length (to :meth:`create`), a multiple of 8.
    shards : int
        Shard count (to :meth:`create`).
    ray : bool or str, optional
        Hold the shards in Ray actors (True: a local Ray; or ``ray://host:10001``).

    Raises
    ------
    HashretError
        A folder that holds no sharded index, a second writer. CorruptError: the manifest
        and a shard disagree (the shard and the field are named), or a shard is damaged.

    Examples
    --------
    >>> import hashret, numpy as np
    >>> codes = np.random.default_rng(0).integers(0, 256, (10, 8), dtype=np.uint8)
    >>> with hashret.ShardedIndex.create(tmp / "sharded", bits=64, shards=3) as index:
    ...     ids = index.add(codes)
    ...     dist, found = index.search(codes[:2], k=1)
    >>> dist.tolist(), found.tolist()
    ([[0], [0]], [[0], [1]])
    """

    def __init__(self, path, manifest: dict, shards: list, ray_mode: bool, readonly: bool, seen):
        self.path, self.manifest, self.shards, self.ray = Path(path), manifest, shards, ray_mode
        self.n = len(shards)
        self.bits = manifest["bits"]
        self.set_id = manifest["set"]
        self.info_meta = manifest["info"]
        self.readonly = readonly
        self.last_partial = None
        self.recovered = None
        self._settle(seen)
        if not readonly and self._batch.pending:
            self._recover()

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
        set_id = uuid.uuid4().hex
        for s, p in enumerate(shard_paths(path, n)):
            HashIndex.create(p, bits, {**(info or {}), "shard": shard_record(set_id, s, n)},
                             chunk_size=chunk_size).close()
        write_manifest(path, bits, n, dict(info or {}), set_id)
        return cls.open(path, readonly=False, ray=ray)

    @classmethod
    def open(cls, path, readonly: bool = True, ray=None, verify: bool = True) -> "ShardedIndex":
        """Open every shard: in this process, or (``ray``: True for a local or the current
        cluster, an address such as "ray://host:10001") one Ray actor per shard. Every shard's
        own record is checked against the manifest; ``readonly=False`` takes every shard's
        writer lock and completes a batch that a crash interrupted."""
        from hashret.index.store import is_initialised

        path = Path(path)
        check(is_sharded(path), f"{path} holds no sharded index (no {MANIFEST}): pass a folder "
              "written by 'hashret build-index --shards N'")
        m = read_manifest(path)
        extra = sorted(p.name for p in path.glob("shard-*") if p.is_dir()
                       and p not in shard_paths(path, m["shards"]))
        check(not extra, f"{path} holds shard folders the manifest does not list ({', '.join(extra)}; it "
              f"says {m['shards']} shards): {RESTORE}")
        for s, p in enumerate(shard_paths(path, m["shards"])):
            if not is_initialised(p):
                build = interrupted_build(path, m)
                if build is not None:
                    raise HashretError(f"{path} is an interrupted sharded build (shard {s} was not created "
                                       f"yet): finish it with '{build['resume']}'")
                check(p.is_dir(), f"shard {s} of {path} is missing ({p}): {RESTORE}")
        seen = journal.read(path, m["set"], header_only=True)  # before the snapshots: see _settle
        if ray:
            connect_ray(ray)
        make = _RayShard if ray else _Shard
        shards = []
        try:
            for s, p in enumerate(shard_paths(path, m["shards"])):
                shards.append(make(s, p, readonly, verify))
            return cls(path, m, shards, bool(ray), readonly, seen)
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
    def _all(self, method, *args, allow_partial: bool = False, args_of=None):
        """method(*args) on every shard at once (``args_of(s)``: shard s's own args);
        [result or None (a shard down, allowed)]."""
        pending = [(sh, sh.submit(method, *(args if args_of is None else args_of(s))))
                   for s, sh in enumerate(self.shards)]
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

    def _settle(self, seen):
        """Take every shard's state, and the journal's record that goes with it: ``seen`` was
        read before the shards' snapshots were taken; if the journal moved since, a writer
        committed meanwhile, so the snapshots are taken again until it holds still."""
        for _ in range(200):
            states = self._all("state")
            now = journal.read(self.path, self.set_id, header_only=True)
            if now.key() == seen.key():
                break
            seen = now
            self._all("refresh")
            time.sleep(0.002)
        else:
            raise HashretError(f"{self.path} changed with every read (a writer commits without pause): retry")
        if seen.pending:
            seen = journal.read(self.path, self.set_id)  # its data: the ids a removal hides
            if seen.key() != now.key():
                return self._settle(seen)
        self._apply(states, seen)

    def _apply(self, states, batch):
        """Adopt the shards' states under the journal's record ``batch``, checking every
        shard's record against the manifest and the row counts against the rule."""
        for s, st in enumerate(states):
            problem = shard_problem(self.path, self.manifest, s, st["bits"], st["info"], st["build"])
            if problem:
                raise CorruptError(problem)
        self._counts = [int(st["rows"]) for st in states]
        self._builds = [st["build"] for st in states]
        self._mode = "explicit" if any(st["mode"] == "explicit" for st in states) else "rows"
        self._payloads = any(st["payloads"] for st in states)
        self._columns = None  # shard 0's attribute columns, asked again after a change
        self._batch = batch
        if not any(b is not None and b.get("state") == "partial" for b in self._builds):
            problem = split_problem(self.path, self._counts, batch)
            if problem:
                raise CorruptError(problem)
        self._visible = list(batch.before) if batch.pending and batch.op == "add" else list(self._counts)
        self._hidden = np.zeros(0, np.int64)
        self._hidden_alive = 0
        if batch.pending and batch.op == "remove":  # readers see the removal whole
            self._hidden = np.unique(batch.ids)
            ids, owner = self._owners(self._hidden)
            self._hidden_alive = sum(sh.result(sh.submit("n_alive", self._local_ids(s, ids[owner == s])))
                                     for s, sh in enumerate(self.shards) if (owner == s).any())

    def _rows(self):
        return list(self._visible)

    def _recover(self):
        """Complete the journal's pending batch in every shard that lacks it (a writer only)."""
        batch = journal.read(self.path, self.set_id)
        if not batch.pending:
            return
        if batch.op == "add":
            self._visible = list(self._counts)
            self._write_shares(batch)
        else:
            self._hidden = np.zeros(0, np.int64)
            self._remove_shares(batch.ids)
        journal.write(self.path, self.set_id, journal.Batch(batch.seq, "done"), durable=False)
        self.recovered = {"batch": batch.seq, "op": batch.op,
                          "items": int(len(batch.codes) if batch.op == "add" else len(batch.ids))}
        self._settle(journal.read(self.path, self.set_id, header_only=True))

    def _write_shares(self, batch):
        """Each shard's share of an add, in shard order, skipping shards that hold it."""
        n = len(batch.codes)
        shard_of = (sum(batch.before) + np.arange(n)) % self.n
        for s, sh in enumerate(self.shards):
            at = np.flatnonzero(shard_of == s)
            if len(at) and self._counts[s] == batch.before[s]:
                sh.result(sh.submit("add", batch.codes[at], None if batch.ids is None else batch.ids[at],
                                    None if batch.items is None else [batch.items[i] for i in at], None,
                                    from_json(batch.attributes, at.tolist())))
                self._counts[s] = batch.after[s]

    def _remove_shares(self, ids) -> int:
        ids, owner = self._owners(ids)
        removed = 0
        for s, sh in enumerate(self.shards):
            mine = ids[owner == s]
            if len(mine):
                removed += sh.result(sh.submit("remove", self._local_ids(s, mine)))
        return removed

    def _journaled(self, batch, apply):
        """Record ``batch`` durably, apply it to the shards, mark it done: the batch is
        acknowledged (this returns) only once every shard holds it."""
        check(not self.readonly, f"{self.path} is open read-only: open it with readonly=False to write")
        if self._batch.pending:  # an earlier batch of this writer stopped between shards
            self._recover()
        journal.write(self.path, self.set_id, batch)
        self._batch = batch
        try:
            result = apply()
        except BaseException as exc:
            # not acknowledged; the journal keeps it and the next write or open completes it.
            # Until then this writer shows what readers show: none of the batch.
            if batch.op == "add":
                self._visible = list(batch.before)
            if isinstance(exc, HashretError):
                raise HashretError(f"{exc} -- this {batch.op} was not acknowledged; the shards that "
                                   "committed it keep it and it is completed in the others when the "
                                   "index is next written or opened for writing") from None
            raise
        journal.write(self.path, self.set_id, journal.Batch(batch.seq, "done"), durable=False)
        self._batch = journal.Batch(batch.seq, "done")
        return result

    # -- adding ----------------------------------------------------------------------------------
    def add(self, codes, ids=None, items=None, attributes=None) -> np.ndarray:
        """Append codes (as ``HashIndex.add``, ``attributes`` too); item r of the batch gets
        global row T + r and goes to shard (T + r) mod N. Explicit ids and the attributes are
        checked first (against every shard, and the columns shard 0 holds). The whole batch
        is journaled first, so a crash leaves it in every shard or in none."""
        from hashret.index.bits import as_packed

        packed = as_packed(codes, self.bits, "codes")
        n = len(packed)
        check(n > 0, "nothing to add: the code array is empty")
        if self._batch.pending and not self.readonly:
            self._recover()
        if ids is not None:
            ids = check_ids(ids, n)
            for known in self._all("lookup_rows", ids):
                if (known >= 0).any():
                    raise HashretError(f"id {int(ids[known >= 0][0])} is already in the index: ids must be unique")
        if items is not None:
            items = json_items(items, n)
        columns = to_json(attributes, n)
        self._check_attributes(columns, n)
        total = sum(self._rows())
        if total:
            check((ids is not None) == (self._mode == "explicit"),
                  "this index uses explicit ids: pass ids to add" if self._mode == "explicit"
                  else "this index uses row numbers as ids: add without ids")
        before = list(self._counts)
        after = [c + int(((total + np.arange(n)) % self.n == s).sum()) for s, c in enumerate(before)]
        batch = journal.Batch(self._batch.seq + 1, "pending", "add", before, after, packed, ids, items,
                              attributes=columns)
        self._journaled(batch, lambda: self._write_shares(batch))
        self._visible = list(self._counts)
        self._mode = "explicit" if ids is not None else "rows"
        self._payloads = self._payloads or (items is not None and any(it is not None for it in items))
        self._columns = None
        return ids if ids is not None else np.arange(total, total + n, dtype=np.int64)

    def _check_attributes(self, columns, n):
        """Refuse, before the journal records anything, attributes a shard would refuse: a
        batch in the journal that no shard can take could never be completed."""
        schema = self.attribute_columns()
        if not schema:
            check(columns is None or sum(self._rows()) == 0,
                  f"this index has {sum(self._rows())} rows without attributes: attribute columns are "
                  "set by an index's first add")
            if columns is not None:
                encode(new_schema(from_json(columns)), from_json(columns), n)
            return
        encode(schema, from_json(columns), n)

    def attribute_columns(self) -> list:
        """The attribute columns (as ``HashIndex.attribute_columns``; shard 0's, whose
        categories are those its items hold), asked of shard 0 once per change of the index
        (every search checks its filter against them: on Ray, a round trip saved)."""
        if self._columns is None:
            self._columns = self.shards[0].result(self.shards[0].submit("attribute_columns"))
        return [dict(c) for c in self._columns]

    def check_filter(self, filter):
        """Raise HashretError (one line) where ``filter`` cannot be applied to this index."""
        if filter is not None:
            self._shard_filter(filter)
            from hashret.index.attributes import parse_filter

            parse_filter(filter, self.attribute_columns(), self.n_rows)

    def _shard_filter(self, filter):
        """args_of for a filter: every shard gets it, its id lists made shard-local in rows mode."""
        check(not isinstance(filter, np.ndarray), "a sharded index takes a filter expression, not a row "
              "array: each shard numbers its own rows")
        if filter is None or self._mode == "explicit":
            return lambda s: filter
        return lambda s: localise(filter, s, self.n)

    # -- searching -------------------------------------------------------------------------------
    def _global(self, s, rows, ids, explicit):
        """Global rows and ids of shard ``s``'s results; rows a pending batch hides are -1."""
        rows = np.asarray(rows)
        keep = (rows >= 0) & (rows < self._visible[s])
        seq = np.where(keep, rows * self.n + s, -1)
        gid = ids if explicit else seq
        if len(self._hidden):
            gone = np.isin(gid, self._hidden) & keep
            seq, gid = np.where(gone, -1, seq), np.where(gone, -1, gid)
        return seq, gid

    def _slack(self) -> int:
        """Results a shard may have to drop for a pending batch (see :mod:`journal`)."""
        return max(c - v for c, v in zip(self._counts, self._visible)) + len(self._hidden)

    def search(self, queries, k: int, threads: int | None = None, allow_partial: bool = False, filter=None):
        """As ``HashIndex.search``: (distances, ids) of shape (Q, min(k, rows)), merged from
        every shard's top-k by (distance, global row); ``filter`` (an expression) is applied
        by every shard to its own rows."""
        k = positive_int(k, "k")
        local = self._shard_filter(filter)
        parts = self._all("search_rows", allow_partial=allow_partial,
                          args_of=lambda s: (queries, k + self._slack(), threads, local(s)))
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

    def range_search(self, queries, radius: int, threads: int | None = None, allow_partial: bool = False,
                     filter=None):
        """As ``HashIndex.range_search``: (lims, distances, ids), each query's results by
        distance, then global row; ``filter`` as in :meth:`search`."""
        local = self._shard_filter(filter)
        parts = self._all("range_search_rows", allow_partial=allow_partial,
                          args_of=lambda s: (queries, radius, threads, local(s)))
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
                keep = sq >= 0
                d.append(dd[a:b][keep])
                seq.append(sq[keep])
                gid.append(g[keep])
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
        visible = np.array(self._rows())
        if self._mode == "explicit":
            for s, rows in enumerate(self._all("lookup_rows", ids)):
                hit = (rows >= 0) & (rows < visible[s])
                owner[hit], row[hit] = s, rows[hit]
        else:
            s, r = ids % self.n, ids // self.n
            ok = (ids >= 0) & (r < visible[s])
            owner[ok], row[ok] = s[ok], r[ok]
        if (owner < 0).any():
            raise NotFoundError(f"unknown id {int(ids[owner < 0][0])}: it is not in the index")
        return ids, owner

    def remove(self, ids) -> int:
        """Remove items by id: each from the shard that holds it (all must be known first).
        Journaled like ``add``: after a crash the removal is in every shard or in none."""
        if self._batch.pending and not self.readonly:
            self._recover()
        ids, _ = self._owners(ids)
        c = list(self._counts)
        batch = journal.Batch(self._batch.seq + 1, "pending", "remove", c, c, ids=ids)
        return self._journaled(batch, lambda: self._remove_shares(ids))

    def _local_ids(self, s, ids):
        """Ids as shard s knows them (row-id shards number their own rows)."""
        if self.id_mode == "explicit":
            return ids
        return ids // self.n

    def items(self, ids) -> list:
        return self._per_item("items", ids)

    def attributes(self, ids) -> list:
        """Each item's attributes (as ``HashIndex.attributes``), from the shard that holds it."""
        return self._per_item("attributes", ids)

    def _per_item(self, method, ids) -> list:
        ids, owner = self._owners(ids)
        out = [None] * len(ids)
        for s, sh in enumerate(self.shards):
            at = np.flatnonzero(owner == s)
            if len(at):
                for i, it in zip(at, sh.result(sh.submit(method, self._local_ids(s, ids[at])))):
                    out[i] = it
        return out

    def contains(self, ext_id) -> bool:
        try:
            ids, owner = self._owners([ext_id])
        except HashretError:
            return False
        if len(self._hidden) and np.isin(ids, self._hidden).any():
            return False
        sh = self.shards[owner[0]]
        return bool(sh.result(sh.submit("contains", int(self._local_ids(owner[0], ids)[0]))))

    def refresh(self) -> bool:
        """Pick up what the writer committed since; a batch it is still writing stays hidden
        until it is whole."""
        seen = journal.read(self.path, self.set_id, header_only=True)
        changed = any(self._all("refresh"))
        if not changed and seen.key() == self._batch.key():
            return False
        self._settle(seen)
        return True

    # -- sizes and state -----------------------------------------------------------------------
    @property
    def id_mode(self) -> str:
        return self._mode

    @property
    def n_rows(self) -> int:
        return sum(self._rows())

    def __len__(self) -> int:
        pending_rows = sum(c - v for c, v in zip(self._counts, self._visible))
        return sum(int(i["items"]) for i in self._all("info")) - pending_rows - self._hidden_alive

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
        out = {"state": "partial", "first_row": sum((b or {}).get("first_row", 0) for b in builds),
               "source": {"rows": sum(((b or {}).get("source") or {}).get("rows", 0) for b in builds)}}
        resume = interrupted_build(self.path, self.manifest)
        if resume is not None:
            out["resume"] = resume["resume"]
        return out

    def info(self) -> dict:
        per = self._all("info")
        build = self.build_state
        pending_rows = sum(c - v for c, v in zip(self._counts, self._visible))
        b = self._batch
        return {"bits": self.bits, "items": len(self), "rows": self.n_rows,
                "removed": sum(i["removed"] for i in per) + self._hidden_alive, "id_mode": self.id_mode,
                "path": str(self.path), "persistent": True, "readonly": all(i["readonly"] for i in per),
                "complete": build is None or build.get("state") == "complete", "build": build,
                "created": self.manifest.get("created"), "shards": self.n, "rule": RULE,
                "ray": self.ray, "shard_items": [i["items"] for i in per],
                "journal": {"batch": b.seq, "pending": b.op if b.pending else None,
                            "hidden_rows": pending_rows, "hidden_removals": self._hidden_alive},
                "recovered": self.recovered,
                "code_bytes": sum(i["code_bytes"] for i in per), "meta": self.info_meta}
