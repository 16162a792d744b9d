"""The one exception type hashret raises for problems a user can fix.

Library code raises :class:`HashretError` with a one-line message that names the
problem and the fix; the CLI and the benchmark scripts turn it into ``error: ...``
on stderr and a non-zero exit instead of a traceback.

A message names a parameter as Python spells it, in backticks -- `append=True`, `out`,
`rerank=RUN_DIR` -- and the command line and the service, whose users set flags, say the
same through :func:`as_flags`: --append, --out, --rerank RUN_DIR.
"""

import re


class HashretError(ValueError):
    """Bad input, a missing or corrupt file, or a mismatch between artefacts."""


class CorruptError(HashretError):
    """A file hashret wrote no longer holds what it wrote (truncated, bit-flipped, edited)."""


class NotFoundError(HashretError):
    """An id or item the index or dataset does not hold (the service answers 404)."""


class ConflictError(HashretError):
    """A request that contradicts the artefacts, e.g. a query for an index built by another
    model (the service answers 409)."""


# parameters whose command-line flag has another name
_FLAG_NAMES = {"part": "split"}
_PARAM = re.compile(r"`([a-z_]+)(?:=([^`]+))?`")


def as_flags(message: str) -> str:
    """``message`` as the command line says it: `name=True` -> --name, `name=VALUE` ->
    --name VALUE, `name` -> --name (underscores as hyphens; `part` is --split)."""
    def flag(m):
        opt = "--" + _FLAG_NAMES.get(m.group(1), m.group(1)).replace("_", "-")
        return opt if m.group(2) in (None, "True") else f"{opt} {m.group(2)}"

    return _PARAM.sub(flag, message)


def is_integer(value) -> bool:
    """A true integer (Python or numpy), not a bool, float or string."""
    import numpy as np

    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check(condition, message):
    """Raise :class:`HashretError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise HashretError(message)


def os_problem(exc: BaseException) -> str:
    """A short, user-facing name for an OS-level failure (disk full, read-only, ...)."""
    import errno

    text = str(exc)
    code = getattr(exc, "errno", None)
    named = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
             errno.EFBIG: "file size limit reached", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied",
             errno.EIO: "input/output error"}
    if code in named:
        return named[code]
    for needle, name in (("No space left", "no space left on device"),
                         ("Disk quota", "disk quota exceeded"), ("File too large", "file size limit reached"),
                         ("Read-only file system", "read-only file system"),
                         ("Permission denied", "permission denied"), ("Input/output", "input/output error")):
        if needle in text:
            return name
    return f"{type(exc).__name__}: {text}".strip()
