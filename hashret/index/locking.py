"""Opening an index's LMDB environment once per process, and the one-writer lock
(``writer.lock``, flock: a second writer is refused in this process as in another, and a
dead writer's lock is free)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import lmdb

from hashret.errors import HashretError, check, os_problem

from hashret.index.pages import ALL_DBS, DBS, check_lmdb_file, fresh_problem

# virtual address space only (the file grows with the data); large, because LMDB cannot grow
# the map while a snapshot's read transaction is open in this process
MAP_SIZE = 1 << 40
# every open HashIndex holds one read transaction (its snapshot), i.e. one of LMDB's reader
# slots, for as long as it is open; LMDB's default of 126 is few for a process serving shards
MAX_READERS = 1024
LOCK_NAME = "writer.lock"


class WriterLock:
    """``writer.lock`` in the index folder, held with flock for as long as a writer is open.

    flock locks belong to an open file description, so a second open in this process is
    refused like one in another process; the kernel frees the lock when its holder dies."""

    def __init__(self, path: Path):
        self.file = path / LOCK_NAME
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise HashretError(f"cannot open the index at {path} for writing: {os_problem(exc)}; "
                               "open it read-only to search it") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            raise HashretError(f"the index at {path} already has a writer ({_describe_holder(holder)}): "
                               "one writer at a time; wait for it to finish or stop it, or open the "
                               "index read-only to search it meanwhile") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a
                                      for i, a in enumerate(sys.argv))[:200]}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:
            pass  # the lock is what counts; the note only names the holder
        self.fd = fd

    def release(self):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _describe_holder(h: dict) -> str:
    if not h:
        return "holder unknown"
    who = "this process" if h.get("pid") == os.getpid() and h.get("host") == socket.gethostname() \
        else f"pid {h.get('pid')} on {h.get('host')}"
    cmd = f", '{h['command']}'" if h.get("command") else ""
    return f"{who}{cmd}, since {h.get('since')}"


# -- environments: LMDB allows one open of an environment per process ------------------------
OPEN_ENVS: dict = {}  # real path -> [env, dbs, refcount, opened_readonly]


def open_env(path: Path, readonly: bool, create: bool):
    key = str(path.resolve())
    if key in OPEN_ENVS:
        entry = OPEN_ENVS[key]
        check(readonly or not entry[3], f"the index at {path} is open read-only in this process: "
              "close that HashIndex before opening it for writing")
        entry[2] += 1
        return entry[0], entry[1]
    if (path / "data.mdb").exists():
        check_lmdb_file(path)
    env = None
    try:
        try:
            env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(ALL_DBS), readonly=readonly,
                            create=create, lock=True, readahead=True, max_readers=MAX_READERS)
        except lmdb.Error as exc:
            # a reader on a read-only medium cannot write LMDB's reader table; with no writer
            # possible there, reading without it is safe
            if not readonly or os_problem(exc) not in ("read-only file system", "permission denied"):
                raise
            env = lmdb.open(str(path), map_size=MAP_SIZE, max_dbs=len(ALL_DBS), readonly=True,
                            create=False, lock=False, readahead=True)
        if readonly:
            dbs = {n.decode(): env.open_db(n, create=False) for n in ALL_DBS if has_db(env, n)}
        else:  # every table in one transaction: a kill leaves all of them or none
            with env.begin(write=True) as txn:
                dbs = {n.decode(): env.open_db(n, txn=txn, create=True) for n in ALL_DBS}
    except lmdb.Error as exc:
        if env is not None:
            env.close()
        problem = os_problem(exc)
        if problem.startswith(("no space", "disk quota", "file size", "read-only", "permission")):
            raise HashretError(f"cannot open the index at {path}: {problem}") from None
        raise fresh_problem(path, f"LMDB cannot open it ({problem})") from None
    if readonly and not set(dbs) >= {n.decode() for n in DBS}:
        env.close()
        raise HashretError(f"{path} holds no hashret index (its LMDB file lacks hashret's tables): "
                           "pass the folder written by build-index")
    OPEN_ENVS[key] = [env, dbs, 1, readonly]
    return env, dbs


def has_db(env, name: bytes) -> bool:
    with env.begin() as txn:
        return txn.get(name) is not None


def close_env(path: Path):
    key = str(path.resolve())
    entry = OPEN_ENVS.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2] == 0:
        entry[0].close()
        del OPEN_ENVS[key]
