"""Where the compiled scan kernels are kept: one folder per user and hashret version
(``$HASHRET_CACHE_DIR``, else ``$XDG_CACHE_HOME/hashret`` or ``~/.cache/hashret``), so that
every later process -- the CLI, a server, Ray actors, test workers -- loads them instead of
compiling, wherever the package is installed (a read-only site-packages included), and a
reinstall of the same version keeps them: numba checks a kernel against its source file's
content, not its path or time.

Importing this module registers the folder with numba for hashret's own files only; a
user's other numba code caches where it always did, and ``NUMBA_CACHE_DIR``, when set, wins.
It must be imported before any ``@njit(cache=True)`` of hashret runs."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from hashret import __version__

HERE = Path(__file__).resolve().parent


def cache_dir() -> Path:
    """The folder hashret's compiled kernels are kept in."""
    root = os.environ.get("HASHRET_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hashret"
    return Path(root) / f"numba-{__version__}"


@contextmanager
def compiling(bits: int):
    """Held while a process compiles the kernels for ``bits``-bit codes into the cache (an
    advisory lock on a file there): a second process warming the same width up waits, then
    loads what the first compiled instead of compiling it too. Nothing is held where the
    folder cannot be written."""
    handle = None
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / f"compiling-{int(bits)}.lock", "a+b")
        fcntl.flock(handle, fcntl.LOCK_EX)
    except OSError:
        pass
    try:
        yield
    finally:
        if handle is not None:
            handle.close()  # closing releases the lock


def _register():
    try:
        from numba.core import caching

        class KernelCache(caching.UserProvidedCacheLocator):
            """numba's user-folder locator, pointed at :func:`cache_dir` for hashret's files."""

            def __init__(self, py_func, py_file):
                self._py_file = py_file
                self._lineno = py_func.__code__.co_firstlineno
                self._cache_path = str(cache_dir() / Path(py_file).stem)

            @classmethod
            def from_function(cls, py_func, py_file):
                if os.environ.get("NUMBA_CACHE_DIR") or Path(py_file).resolve().parent != HERE:
                    return None
                # the source-file mixin's: the file must exist and the folder be writable
                return super(caching.UserProvidedCacheLocator, cls).from_function(py_func, py_file)

        locators = caching.CacheImpl._locator_classes
        if not any(c.__name__ == "KernelCache" for c in locators):
            locators.insert(0, KernelCache)
    except (ImportError, AttributeError):  # another numba: its own locators (still cached)
        pass


_register()
