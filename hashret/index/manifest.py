"""The manifest of a sharded index (``shards.json``) and the checks that keep it honest.

What cannot lie: ``shards.json`` carries a checksum and the id of its set of shards; each
shard records the set, its position and the shard count in its own (checksummed) meta. On
every open each shard's record, code length, model fingerprint, modality, part and build
source are checked against the manifest, and the row counts against the rule: a swapped,
replaced or foreign shard, or an edited manifest, is one line naming the shard and the field,
never served.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import xxhash

from hashret.errors import CorruptError, HashretError, check, is_integer
from hashret.index import journal

MANIFEST = "shards.json"
FORMAT = 2
RULE = "round-robin by global row: the r-th item added lives in shard r mod N as its row r // N"
# what a shard's own record must agree on with the manifest (where the manifest states it)
CHECKED_INFO = ("model_fingerprint", "modality", "dataset_spec", "part")
RESTORE = "restore the shard folders and shards.json from one copy, or rebuild the index"


def is_sharded(path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def shard_paths(path, n: int) -> list:
    return [Path(path) / f"shard-{s:03d}" for s in range(n)]


def _manifest_digest(m: dict) -> str:
    body = json.dumps({k: v for k, v in m.items() if k != "checksum"}, sort_keys=True)
    return xxhash.xxh3_64_hexdigest(body.encode(), seed=0x53484152)


def read_manifest(path) -> dict:
    """The manifest of the sharded index in ``path``, its checksum and fields checked."""
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as exc:
        raise HashretError(f"cannot read the manifest {f} ({exc}): restore it, or rebuild the sharded index") from None
    if isinstance(m, dict) and m.get("format") == 1:
        raise HashretError(f"{f} was written by an older hashret (manifest format 1: no checksum, no shard "
                           "records): rebuild the index with 'hashret build-index --shards N'")
    check(isinstance(m, dict) and m.get("format") == FORMAT,
          f"{f} is not a hashret shard manifest (format {FORMAT}): restore it, or rebuild the sharded index")
    if m.get("checksum") != _manifest_digest(m):
        raise CorruptError(f"{f} fails its checksum (edited or damaged): {RESTORE}")
    ok = (is_integer(m.get("shards")) and m["shards"] >= 1 and is_integer(m.get("bits")) and m["bits"] > 0
          and m["bits"] % 8 == 0 and isinstance(m.get("info"), dict) and isinstance(m.get("set"), str))
    check(ok, f"{f} has fields of the wrong type or range: {RESTORE}")
    return m


def write_manifest(path, bits: int, n: int, info: dict, set_id: str | None = None) -> dict:
    """The manifest, written atomically and fsynced: a folder without one is no index.
    ``set_id`` names this set of shards; every shard records it with its position."""
    m = {"format": FORMAT, "bits": int(bits), "shards": int(n), "set": set_id or uuid.uuid4().hex,
         "rule": RULE, "info": info, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    m["checksum"] = _manifest_digest(m)
    tmp = Path(path) / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(m, indent=2))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, Path(path) / MANIFEST)
    return m


def shard_record(set_id: str, s: int, n: int) -> dict:
    """What a shard stores about itself (in its info): which set it belongs to, where."""
    return {"set": set_id, "position": int(s), "of": int(n)}


def shard_problem(path, m: dict, s: int, bits: int, info: dict, build: dict | None) -> str | None:
    """The first disagreement between shard ``s``'s own record and the manifest ``m``, as
    one line naming the shard and the field; None if they agree."""
    name = f"shard {s} ({shard_paths(path, m['shards'])[s]})"
    rec = info.get("shard") if isinstance(info, dict) else None
    if not isinstance(rec, dict):
        return f"{name} carries no shard record: it is not a shard of this index (replaced?); {RESTORE}"
    if rec.get("set") != m["set"]:
        return (f"{name} belongs to another sharded index (its set is {rec.get('set')!r}, the manifest's "
                f"{m['set']!r}); {RESTORE}")
    if rec.get("position") != s:
        return (f"{name} records position {rec.get('position')!r}: the shard folders were swapped or "
                f"renamed; {RESTORE}")
    if rec.get("of") != m["shards"]:
        return f"{name} records {rec.get('of')!r} shards, the manifest {m['shards']}; {RESTORE}"
    if bits != m["bits"]:
        return f"{name} holds {bits}-bit codes, the manifest says {m['bits']}; {RESTORE}"
    for field in CHECKED_INFO:
        if field in m["info"] and info.get(field) != m["info"][field]:
            return (f"{name}'s {field} is {info.get(field)!r}, the manifest's {m['info'][field]!r}: "
                    f"it is not a shard of this index; {RESTORE}")
    source = (build or {}).get("source")
    if isinstance(source, dict) and "shard" in source:
        if source["shard"] != [s, m["shards"]]:
            return f"{name}'s build source is shard {source['shard']!r}, not [{s}, {m['shards']}]; {RESTORE}"
        for field in ("modality", "model_fingerprint", "part"):
            if field in m["info"] and source.get(field) != m["info"][field]:
                return (f"{name}'s build source {field} is {source.get(field)!r}, the manifest's "
                        f"{m['info'][field]!r}; {RESTORE}")
    return None


def split_problem(path, counts: list, batch) -> str | None:
    """Whether the shards' row counts are those of whole batches (round-robin), given the
    journal's last record ``batch`` (a pending add is hidden, see :mod:`journal`)."""
    n = len(counts)
    visible = list(counts)
    if batch.pending and batch.op == "add":
        for s, c in enumerate(counts):
            if c not in (batch.before[s], batch.after[s]):
                return (f"shard {s} of {path} holds {c} rows; the pending batch {batch.seq} expects "
                        f"{batch.before[s]} (before it) or {batch.after[s]} (after it): {RESTORE}")
        visible = list(batch.before)
    total = sum(visible)
    expect = [(total - s + n - 1) // n for s in range(n)]
    if visible != expect:
        return (f"the shards of {path} hold {visible} rows, which do not split round-robin ({expect} for "
                f"{total}) and no pending batch explains it: {RESTORE}")
    return None


def interrupted_build(path, m: dict) -> dict | None:
    """For a sharded index written by ``build_index`` whose build did not finish: which shards
    are complete and the command that finishes it; None otherwise."""
    from hashret.index.store import LMDBStore, is_initialised

    info = m["info"]
    if info.get("sharded_by") is None or (Path(path) / "index.json").exists():
        return None
    done = []
    for s, p in enumerate(shard_paths(path, m["shards"])):
        if is_initialised(p):
            store = LMDBStore(p, readonly=True)
            try:
                build = store.read_meta()["build"]
            finally:
                store.close()
            if build is not None and build.get("state") == "complete":
                done.append(s)
    cmd = (f"hashret build-index --checkpoint {info.get('checkpoint')} --modality {info.get('modality')} "
           f"--split {info.get('part')} --shards {m['shards']} --resume --out {path}")
    if info.get("dataset_spec"):
        cmd += f" --dataset {info['dataset_spec']}"
    return {"state": "partial", "shards_complete": done, "shards": m["shards"], "resume": cmd}


def check_folder(path) -> list:
    """Every disagreement between the manifest, the shards' own records, their row counts
    and the batch journal of the sharded index in ``path``, one line each, without opening
    the shards' codes (``hashret verify`` adds each shard's own checksums)."""
    from hashret.index.store import LMDBStore, is_initialised

    path = Path(path)
    m = read_manifest(path)
    problems = []
    extra = sorted(p.name for p in path.glob("shard-*") if p.is_dir() and p not in shard_paths(path, m["shards"]))
    if extra:
        problems.append(f"{path} holds shard folders the manifest does not list ({', '.join(extra)}; it says "
                        f"{m['shards']} shards): {RESTORE}")
    counts, builds = [], []
    for s, p in enumerate(shard_paths(path, m["shards"])):
        if not is_initialised(p):
            build = interrupted_build(path, m)
            problems.append(f"shard {s} ({p}) was not created yet: the build was interrupted; finish it with "
                            f"'{build['resume']}'" if build else f"shard {s} of {path} is missing ({p}): {RESTORE}")
            continue
        store = LMDBStore(p, readonly=True)
        try:
            meta = store.read_meta()
        except HashretError as exc:
            problems.append(f"shard {s}: {exc}")
            continue
        finally:
            store.close()
        problem = shard_problem(path, m, s, meta["bits"], meta["info"], meta["build"])
        if problem:
            problems.append(problem)
        counts.append(meta["count"])
        builds.append(meta["build"])
    try:
        batch = journal.read(path, m["set"])
    except HashretError as exc:
        problems.append(str(exc))
        batch = None
    partial = any(b is not None and b.get("state") == "partial" for b in builds)
    if batch is not None and len(counts) == m["shards"] and not partial:
        problem = split_problem(path, counts, batch)
        if problem:
            problems.append(problem)
    return problems
