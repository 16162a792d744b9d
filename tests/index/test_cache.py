"""The compiled scan is kept per user: a process that compiles says so once on stderr, and
every later process -- whatever folder it runs from -- loads the kernels instead, silently."""

import os
import subprocess
import sys
import time

import hashret

SEARCH = """
import sys, time
import numpy as np
from hashret.index import HashIndex
ix = HashIndex(24)
ix.add(np.random.default_rng(0).integers(0, 256, (5000, 3), dtype=np.uint8))
t = time.perf_counter(); ix.search(ix.packed_codes([7]), 5); print(f"{time.perf_counter() - t:.3f}")
"""


def _run(cache, cwd):
    env = {**os.environ, "HASHRET_CACHE_DIR": str(cache)}
    env.pop("NUMBA_CACHE_DIR", None)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", SEARCH], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=600, check=True)
    return out, time.perf_counter() - t


def test_a_compile_is_said_once_and_kept_for_every_later_process(tmp_path):
    cache = tmp_path / "cache"
    first, _ = _run(cache, tmp_path)
    assert "compiling the Hamming scan for 24-bit codes (one query at a time), once" in first.stderr
    assert str(cache) in first.stderr
    assert any((cache / f"numba-{hashret.__version__}" / "scans").glob("*.nbi"))  # kept where it said
    (tmp_path / "elsewhere").mkdir()
    second, _ = _run(cache, tmp_path / "elsewhere")
    assert "compiling" not in second.stderr  # loaded: nothing to say
    assert float(second.stdout) < float(first.stdout) / 5


def test_numba_cache_dir_when_set_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHRET_CACHE_DIR", str(tmp_path / "ours"))
    from hashret.index.cache import cache_dir

    assert cache_dir() == tmp_path / "ours" / f"numba-{hashret.__version__}"
    monkeypatch.delenv("HASHRET_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "hashret" / f"numba-{hashret.__version__}"
