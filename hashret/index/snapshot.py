"""A :class:`Snapshot`: one consistent read of an index, its code chunks viewed where
LMDB's memory map has them."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hashret.errors import CorruptError, check

from hashret.index.attributes import row_bytes
from hashret.index.pages import SEAL, chunk_key, column_key


class Snapshot:
    """One consistent state of an index, read in place.

    Holds a read transaction open and views every code and id chunk where LMDB's memory map
    has it: ``codes`` is a list of (rows, n_words) word arrays (``layout(bytes per code)``
    gives the word type and count; a chunk is copied only where a code needs padding to
    whole words), ``ids`` a list of int64 arrays (explicit ids) or None. Every chunk's
    checksum is checked (in parallel; XXH3 runs at memory speed) unless ``verify`` is False,
    except chunks that ``previous`` had checked at the same address and length: LMDB does not
    reuse a page a live reader can see, so such a chunk is the same value.

    Scans ``acquire()`` it and ``release()`` it; ``retire()`` ends the transaction once the
    last user has released it (a newer snapshot takes over)."""

    def __init__(self, store, layout, previous: "Snapshot | None", verify: bool):
        import threading

        self.path = store.path
        self._lock = threading.Lock()
        self._users = 0
        self._retired = False
        self._deleted = None
        self.txn = store.env.begin(buffers=True)
        try:
            self._read(store, layout, previous, verify)
        except BaseException:
            self.txn.abort()
            raise

    def _read(self, store, layout, previous, verify):
        txn = self.txn
        meta = store.meta_in(txn)
        count, cs, nbytes = meta["count"], meta["chunk_size"], meta["bits"] // 8
        word_dtype, n_words = layout(nbytes)
        word_dtype = np.dtype(word_dtype).newbyteorder("<")
        width = n_words * word_dtype.itemsize
        check(nbytes <= width, "internal: word count too small for the code length")
        n_chunks = (count + cs - 1) // cs
        have = txn.stat(store.db["codes"])["entries"]
        if have != n_chunks:
            raise store.corrupt(f"it holds {have} code chunks where its meta (count {count}, "
                                f"chunk size {cs}) needs {n_chunks}")
        explicit = meta["id_mode"] == "explicit"
        if explicit and txn.stat(store.db["ids"])["entries"] != n_chunks:
            raise store.corrupt(f"it holds {txn.stat(store.db['ids'])['entries']} id chunks where "
                                f"{n_chunks} are needed")
        schema = meta.get("attributes", [])
        if schema and count and "attrs" not in store.db:
            raise store.corrupt("its attribute table is missing")
        # (checked-key, table, key of chunk c, bytes a row, what a chunk is called): codes, ids
        # (explicit ids only), then each attribute column
        spaces = [("codes", "codes", chunk_key, nbytes, "code chunk")]
        if explicit:
            spaces.append(("ids", "ids", chunk_key, 8, "id chunk"))
        for j, col in enumerate(schema):
            spaces.append((f"attr{j}", "attrs", lambda c, j=j: column_key(j, c), row_bytes(col),
                           f"attribute {col['name']!r} chunk"))
        known = previous.checked if previous is not None else {}
        # Appends only write from the last, partial chunk on, so while no compaction has
        # renumbered rows (same epoch) the previous snapshot's full chunks are still these
        # values; those in overflow pages (which start 16 bytes into a page: LMDB's page
        # header) also stay at their address, so their views are reused without a lookup.
        # Smaller values sit inside B-tree pages, which move when a neighbour changes.
        keep = 0
        if (previous is not None and previous.meta["epoch"] == meta["epoch"]
                and count >= previous.count and previous.chunk_size == cs
                and len(previous.columns) == len(schema)):
            keep = previous.count // cs
        psize = store.env.stat()["psize"]
        self.checked = {}
        todo = []
        self.codes, self.ids = [], [] if explicit else None
        self.columns = [[] for _ in schema]
        sinks = {"codes": self.codes, "ids": self.ids}
        sinks.update({f"attr{j}": self.columns[j] for j in range(len(schema))})
        prev = {} if previous is None else {"codes": previous.codes, "ids": previous.ids,
                                            **{f"attr{j}": col for j, col in enumerate(previous.columns)}}
        for c in range(n_chunks):
            lo = c * cs
            rows = min(cs, count - lo)
            if c < keep and all(known.get((sp[0], c), (1, 0))[0] % psize == 16 for sp in spaces):
                for sp in spaces:
                    sinks[sp[0]].append(prev[sp[0]][c])
                    self.checked[(sp[0], c)] = known[(sp[0], c)]
                continue
            for space, table, keyf, size, called in spaces:
                what = f"{called} {c} (rows {lo}..{lo + rows - 1})"
                key = keyf(c)
                raw = txn.get(key, db=store.db[table])
                if raw is None:
                    raise store.corrupt(f"{what} is missing")
                if len(raw) != rows * size + SEAL.size:
                    raise store.corrupt(f"{what} holds {len(raw) - SEAL.size} bytes where "
                                        f"{rows * size} are expected")
                whole = np.frombuffer(raw, np.uint8)
                place = (whole.ctypes.data, len(whole))
                if verify and known.get((space, c)) != place:
                    todo.append((table, key, raw, what))
                self.checked[(space, c)] = place  # checked now, before, or trusted (verify=False)
                payload = whole[:rows * size]
                if space == "ids":
                    self.ids.append(payload.view("<i8"))
                elif space != "codes":
                    sinks[space].append(payload)
                elif width == nbytes:
                    self.codes.append(payload.view(word_dtype).reshape(rows, n_words))
                else:  # padding to whole words: this chunk is copied
                    buf = np.zeros((rows, width), dtype=np.uint8)
                    buf[:, :nbytes] = payload.reshape(rows, nbytes)
                    self.codes.append(buf.view(word_dtype).reshape(rows, n_words))
        self._check(store, todo)
        self.has_items = txn.stat(store.db["present"])["entries"] > 0
        self.tomb = store.tombstones_in(txn, meta)
        self._any_removed = self.tomb.any()  # once: any() walks the bits (~75 us per 10^7 rows)
        self.meta, self.count, self.chunk_size = meta, count, cs
        self.schema = schema
        self.word_dtype, self.n_words = word_dtype, n_words
        self.generation = meta["generation"]

    @staticmethod
    def _check(store, todo):
        def one(job):
            table, key, raw, what = job
            try:
                store.unseal(table, key, raw, what)
            except CorruptError as exc:
                return exc
            return None

        big = sum(len(j[2]) for j in todo) > (8 << 20)
        if big and len(todo) > 1:
            with ThreadPoolExecutor(min(len(todo), os.cpu_count() or 1, 8)) as pool:
                problems = list(pool.map(one, todo))
        else:
            problems = [one(j) for j in todo]
        first = next((p for p in problems if p is not None), None)
        if first is not None:
            raise first

    # -- rows -------------------------------------------------------------------------------
    def deleted_mask(self):
        """uint8 per row (1 = removed), or None when nothing is removed."""
        if not self._any_removed:
            return None
        if self._deleted is None:
            self._deleted = np.frombuffer(self.tomb.unpack(), dtype=np.uint8)[: self.count].copy()
        return self._deleted

    def ids_of_rows(self, rows) -> np.ndarray:
        """External ids of rows (-1 stays -1)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.ids is None:
            return rows.copy()
        out = np.full(rows.shape, -1, dtype=np.int64)
        ok = rows >= 0
        c = rows // self.chunk_size
        for chunk in np.unique(c[ok]).tolist():
            at = ok & (c == chunk)
            out[at] = self.ids[chunk][rows[at] - chunk * self.chunk_size]
        return out

    def items_of_rows(self, store, rows) -> list:
        """Payloads of rows as of this snapshot (a transaction serves one thread at a time)."""
        if not self.has_items:
            return [None] * len(rows)
        with self._lock:
            return store.items_of_rows(rows, txn=self.txn)

    def all_ids(self) -> np.ndarray:
        """Every row's id (a copy; explicit ids only)."""
        return np.concatenate(self.ids) if self.ids else np.zeros(0, np.int64)

    # -- lifetime -----------------------------------------------------------------------------
    def acquire(self) -> "Snapshot":
        with self._lock:
            check(not self._retired, "internal: a retired snapshot was used")
            self._users += 1
        return self

    def release(self):
        with self._lock:
            self._users -= 1
            end = self._retired and self._users == 0
        if end:
            self._end()

    def retire(self):
        with self._lock:
            self._retired = True
            end = self._users == 0
        if end:
            self._end()

    def _end(self):
        if self.txn is not None:
            self.codes, self.ids, self.columns = [], None, []
            self.txn.abort()
            self.txn = None
