"""The sharded index's batch journal: what makes a write across N shards all or nothing.

A batch touches N LMDB environments, and no transaction spans them. So before the first
shard commits, the writer records the whole batch -- its operation, its data and every
shard's row count before and after it -- in ``journal`` beside the manifest, durably (written
to a temporary file, fsynced, renamed over the old journal, the folder fsynced). Then it
commits the shards one by one, then marks the journal ``done``; only then is the batch
acknowledged. The sequence number grows with every batch and survives in the ``done`` record.

Why that is enough (one writer holds every shard's writer lock, so nothing else moves a
shard between the journal and its commits):

- A crash before the journal's rename leaves the previous journal (``done``): no shard was
  touched, and the batch was never acknowledged -- it is in no shard.
- A crash after it leaves a ``pending`` journal holding the batch. The next writer to open
  the index rolls it forward: an add is re-applied to each shard whose row count is still the
  journal's ``before`` (a shard at ``after`` committed it already; any other count is damage,
  named); a removal is re-applied to every shard (removing a removed item changes nothing).
  The batch is then in every shard -- it was unacknowledged, and is now whole.
- An acknowledged batch was committed by every shard before the ``done`` record, so it is
  present after any crash.

Readers never write: while the journal is ``pending`` (a crashed writer, or a live one
between its commits) a reader hides a pending add (each shard's rows past ``before``) and
applies a pending removal (its ids are left out), so it never serves part of a batch. A
reader reads the journal before and after taking its shard snapshots and retries if the
sequence moved in between, so the snapshots and the journal describe the same moment.

File layout: ``HRJ1``, a 4-byte header length, the JSON header, its 8-byte XXH3-64, then
the payload (an add: packed codes, then int64 ids if given, then the payloads as JSON, then
the attributes as JSON; a removal: int64 ids), whose XXH3-64 the header holds. A journal that fails either check is
reported as damaged, never replayed.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import xxhash

from hashret.errors import CorruptError, HashretError

NAME = "journal"
MAGIC = b"HRJ1"
_LEN = struct.Struct("<I")
_DIGEST = struct.Struct("<Q")


def _digest(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data, seed=0x4A524E4C)


def _damaged(path: Path, why: str) -> CorruptError:
    return CorruptError(f"the batch journal {path} {why}: restore the sharded index's folder from a copy")


class Batch:
    """One journal record: ``seq``, ``state`` ('pending' or 'done'), ``op`` ('add' or
    'remove'), ``before`` / ``after`` (each shard's row count), and for a pending batch its
    data: ``codes`` (n, bytes) uint8, ``ids`` int64 or None, ``items`` list or None,
    ``attributes`` (the JSON form of :func:`hashret.index.attributes.to_json`) or None."""

    def __init__(self, seq: int, state: str, op: str | None = None, before=None, after=None,
                 codes=None, ids=None, items=None, set_id: str | None = None, attributes=None):
        self.seq, self.state, self.op = int(seq), state, op
        self.before, self.after = before, after
        self.codes, self.ids, self.items, self.set_id = codes, ids, items, set_id
        self.attributes = attributes

    @property
    def pending(self) -> bool:
        return self.state == "pending"

    def key(self):
        """What a reader compares before and after taking its snapshots."""
        return (self.seq, self.state)


NONE = Batch(0, "done")


def read(folder, set_id: str, header_only: bool = False) -> Batch:
    """The journal of the sharded index in ``folder`` (seq 0, done, if it has none yet)."""
    path = Path(folder) / NAME
    try:
        raw = path.read_bytes() if not header_only else _read_header_bytes(path)
    except FileNotFoundError:
        return NONE
    except OSError as exc:
        raise HashretError(f"cannot read the batch journal {path} ({exc.strerror or exc})") from None
    if len(raw) < 8 or raw[:4] != MAGIC:
        raise _damaged(path, "is not a hashret journal (wrong magic or truncated)")
    (hlen,) = _LEN.unpack(raw[4:8])
    end = 8 + hlen + _DIGEST.size
    if len(raw) < end:
        raise _damaged(path, "is truncated")
    header = raw[8:8 + hlen]
    if _digest(header) != _DIGEST.unpack(raw[8 + hlen:end])[0]:
        raise _damaged(path, "fails its header checksum")
    try:
        h = json.loads(header)
    except ValueError:
        raise _damaged(path, "has a header that is not JSON") from None
    if h.get("set") != set_id:
        raise _damaged(path, f"belongs to another sharded index (set {h.get('set')!r}, this one is {set_id!r})")
    b = Batch(h["seq"], h["state"], h.get("op"), h.get("before"), h.get("after"), set_id=set_id)
    if not b.pending or header_only:
        return b
    payload = raw[end:]
    if len(payload) != h["payload_bytes"] or _digest(payload) != h["payload_digest"]:
        raise _damaged(path, "fails its payload checksum")
    at = 0
    if b.op == "add":
        n, nb = h["n"], h["code_bytes"]
        b.codes = np.frombuffer(payload, np.uint8, n * nb, at).reshape(n, nb)
        at += n * nb
        if h["has_ids"]:
            b.ids = np.frombuffer(payload, "<i8", n, at).astype(np.int64)
            at += 8 * n
        if h["has_items"]:
            end_items = at + h.get("items_bytes", len(payload) - at)
            b.items = json.loads(payload[at:end_items])
            at = end_items
        if h.get("has_attributes"):
            b.attributes = json.loads(payload[at:])
    else:
        b.ids = np.frombuffer(payload, "<i8", h["n"], 0).astype(np.int64)
    return b


def _read_header_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return head
        (hlen,) = _LEN.unpack(head[4:8])
        return head + f.read(hlen + _DIGEST.size)


def write(folder, set_id: str, batch: Batch, durable: bool = True):
    """Replace the journal with ``batch`` atomically; ``durable``: fsync file and folder
    before returning (a pending record must be on disk before any shard commits)."""
    folder = Path(folder)
    h = {"seq": batch.seq, "state": batch.state, "set": set_id, "op": batch.op,
         "before": batch.before, "after": batch.after}
    payload = b""
    if batch.pending:
        if batch.op == "add":
            parts = [np.ascontiguousarray(batch.codes, np.uint8).tobytes()]
            if batch.ids is not None:
                parts.append(np.asarray(batch.ids, "<i8").tobytes())
            if batch.items is not None:
                parts.append(json.dumps(batch.items).encode())
                h["items_bytes"] = len(parts[-1])
            if batch.attributes is not None:
                parts.append(json.dumps(batch.attributes).encode())
            payload = b"".join(parts)
            h.update(n=int(len(batch.codes)), code_bytes=int(batch.codes.shape[1]),
                     has_ids=batch.ids is not None, has_items=batch.items is not None,
                     has_attributes=batch.attributes is not None)
        else:
            payload = np.asarray(batch.ids, "<i8").tobytes()
            h.update(n=int(len(batch.ids)))
        h.update(payload_bytes=len(payload), payload_digest=_digest(payload))
    header = json.dumps(h).encode()
    tmp = folder / (NAME + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + _LEN.pack(len(header)) + header + _DIGEST.pack(_digest(header)) + payload)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, folder / NAME)
        if durable:
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as exc:
        raise HashretError(f"cannot write the batch journal in {folder} ({exc.strerror or exc}); "
                           "no shard was changed by this batch") from None
