"""Who may ask what: API keys with a scope, the Host and Origin a request comes with, and the
access log (one line per request, never a key or a body)."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import re
from pathlib import Path

from hashret.errors import HashretError

SCOPES = ("read", "write")  # a write key may also read
MIN_KEY = 16  # characters: shorter keys are guessable
access_log = logging.getLogger("hashret.access")


class Unauthorized(HashretError):
    """No key, or a key this server does not hold (HTTP 401)."""


class Forbidden(HashretError):
    """A key or an origin that may not do this (HTTP 403)."""


class BadMediaType(HashretError):
    """A body that is not sent as JSON (HTTP 415)."""


class Keys:
    """API keys read from a file whose lines are ``<scope> <key>`` (scope ``read`` or ``write``;
    blank lines and ``#`` comments are skipped). Only the keys' SHA-256 digests are kept, and a
    presented key is compared with every one of them in constant time."""

    def __init__(self, entries: list):
        self._entries = entries  # [(sha256 digest, scope)]

    @classmethod
    def load(cls, path) -> "Keys":
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise HashretError(f"cannot read the API key file {path} ({type(exc).__name__}): pass a text "
                               "file of '<scope> <key>' lines to --api-keys") from None
        entries = []
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            # the key itself is never repeated in a message: it may be half of a real one
            if len(parts) != 2 or parts[0] not in SCOPES:
                raise HashretError(f"{path} line {n} is not '<scope> <key>' with scope read or write: "
                                   "fix that line")
            if len(parts[1]) < MIN_KEY:
                raise HashretError(f"{path} line {n}: the key is shorter than {MIN_KEY} characters: use a "
                                   "long random key, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
            entries.append((hashlib.sha256(parts[1].encode()).digest(), parts[0]))
        if not entries:
            raise HashretError(f"{path} holds no keys: add '<scope> <key>' lines, or serve without --api-keys")
        return cls(entries)

    def scope_of(self, authorization: str | None) -> str:
        """The scope of the key in an ``Authorization: Bearer <key>`` header; Unauthorized if
        there is none or it is not one of this server's."""
        if not authorization:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        kind, _, key = authorization.partition(" ")
        if kind.lower() != "bearer" or not key.strip():
            raise Unauthorized("send the API key as 'Authorization: Bearer <key>'")
        digest = hashlib.sha256(key.strip().encode()).digest()
        scope = None
        for known, s in self._entries:  # every entry, match or not: the time says nothing
            if hmac.compare_digest(known, digest):
                scope = s
        if scope is None:
            raise Unauthorized("the API key is not one of this server's: check the key")
        return scope

    def check(self, authorization: str | None, need: str):
        scope = self.scope_of(authorization)
        if need == "write" and scope != "write":
            raise Forbidden("this key may only read: writes need a key of scope write")


def host_name(host: str) -> str:
    """The name part of a Host header (no port; IPv6 in brackets kept), lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_hosts(bind: str) -> set:
    """The names a server bound to ``bind`` answers to by default: the bind address and this
    machine's loopback names."""
    names = {"localhost", "127.0.0.1", "[::1]"}
    if bind not in ("0.0.0.0", "::", ""):
        names.add(f"[{bind}]" if ":" in bind else bind.lower())
    return names


def check_host(host: str | None, allowed: set):
    """Refuse a Host this server was not told it answers to (DNS rebinding reaches a loopback
    server under a foreign name)."""
    if "*" in allowed:
        return
    if not host or host_name(host) not in allowed:
        raise HashretError(f"Host {host!r} is not a name this server answers to: start it with "
                           f"--allowed-hosts {host_name(host or 'NAME')} to allow it")


def check_origin(origin: str | None, host: str | None, allowed: set) -> bool:
    """True for a cross-origin request that ``allowed`` admits (its reply carries CORS
    headers); False for a same-origin one or none; Forbidden for a foreign one (a page on
    another site would otherwise drive this server with its visitor's network position)."""
    if origin is None:
        return False
    netloc = origin.split("://", 1)[-1].rstrip("/").lower()
    if host is not None and netloc == host.strip().lower():
        return False
    if "*" in allowed or origin.rstrip("/").lower() in allowed:
        return True
    raise Forbidden(f"requests from origin {origin} are refused: start the server with --allow-origin "
                    f"{origin} to allow them")


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(header: str | None) -> str:
    """The caller's ``X-Request-ID`` if it is a plain token, else a new one (an id to find a
    request by, not a secret: random's generator, not the OS's, whose read costs ~20 us)."""
    return header if header is not None and _REQUEST_ID.match(header) else f"{random.getrandbits(64):016x}"


def log_request(fmt: str, method: str, route: str, status: int, seconds: float, rid: str):
    if not access_log.isEnabledFor(logging.INFO):
        return
    if fmt == "json":
        access_log.info(json.dumps({"method": method, "route": route, "status": status,
                                    "ms": round(seconds * 1e3, 3), "request_id": rid}))
    else:
        access_log.info(f"{method} {route} {status} {seconds * 1e3:.2f}ms id={rid}")
