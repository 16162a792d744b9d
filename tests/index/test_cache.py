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


# -- before the kernels are compiled: numpy answers, a detached warmup compiles ----------------

import logging  # noqa: E402
import threading  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from hashret.index import HashIndex, kernels  # noqa: E402
from tests.index.test_kernels import brute_distances, brute_topk  # noqa: E402


@pytest.fixture
def uncompiled(monkeypatch):
    """A process whose kernels are neither compiled nor cached, in the default mode: returns
    the list of widths a background compile was started for."""
    started = []
    monkeypatch.setenv("HASHRET_COMPILE", "background")
    monkeypatch.setattr(kernels, "_ready", lambda disp, args: False)
    monkeypatch.setattr(kernels, "_compile_behind", started.append)
    monkeypatch.setattr(kernels, "_said_behind", set())
    monkeypatch.setattr(kernels, "_known_ready", set())
    monkeypatch.setattr(kernels, "_picks_ready", set())
    return started


@pytest.mark.parametrize("bits", [8, 24, 64, 128, 200])
def test_a_first_search_before_the_compile_is_numpy_and_exact(bits, uncompiled, caplog):
    rng = np.random.default_rng(bits)
    pool = rng.integers(0, 256, size=(30, bits // 8), dtype=np.uint8)  # ties: by row
    db = pool[rng.integers(0, len(pool), size=3000)]
    q = rng.integers(0, 256, size=(5, bits // 8), dtype=np.uint8)
    index = HashIndex(bits)
    index.add(db)
    removed = rng.choice(3000, 400, replace=False)
    index.remove(removed)
    with caplog.at_level(logging.WARNING, logger="hashret"):
        for k in (1, 10, 2999, 5000):
            for qs in (q[:1], q):
                d, ids = index.search(qs, k)
                bd, br = brute_topk(db, qs, k, removed)
                np.testing.assert_array_equal(d, bd)
                np.testing.assert_array_equal(ids, br)
        lims, dist, ids = index.range_search(q, bits // 3)
    full = brute_distances(db, q)
    for i in range(len(q)):
        rows = np.setdiff1d(np.flatnonzero(full[i] <= bits // 3), removed)
        rows = rows[np.argsort(full[i][rows], kind="stable")]
        np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
        np.testing.assert_array_equal(dist[lims[i]:lims[i + 1]], full[i][rows])
    assert uncompiled == [bits]  # one background compile a width, however many searches
    said = [r.message for r in caplog.records if "not compiled yet" in r.message]
    assert len(said) == 1 and f"'hashret warmup --bits {bits}'" in said[0]


def test_a_first_filtered_search_before_the_compile_is_exact(uncompiled):
    # a small slice of a list's copy (every distance, side by side), and with removed rows
    # (picked through the list's positions): numpy answers until the kernels are compiled
    rng = np.random.default_rng(4)
    db = rng.integers(0, 256, size=(20, 8), dtype=np.uint8)[rng.integers(0, 20, 3000)]  # ties
    year = rng.integers(0, 100, 3000)
    q = rng.integers(0, 256, size=(2, 8), dtype=np.uint8)
    index = HashIndex(64)
    index.add(db, attributes={"year": year})
    full = brute_distances(db, q)
    alive = np.ones(3000, bool)
    for round_ in range(2):
        for expr, ok in (({"year": {"eq": 7}}, year == 7), ({"year": {"lt": 2}}, year < 2)):
            for k in (3, 80):
                d, ids = index.search(q, k, filter=expr)
                for i in range(len(q)):
                    rows = np.flatnonzero(ok & alive)
                    rows = rows[np.lexsort((rows, full[i][rows]))][:k]
                    np.testing.assert_array_equal(ids[i, :len(rows)], rows)
                    np.testing.assert_array_equal(d[i, :len(rows)], full[i][rows])
                    assert (ids[i, len(rows):] == -1).all()
        gone = rng.choice(3000, 500, replace=False)
        index.remove(gone)
        alive[gone] = False
    assert uncompiled == [64]


def test_a_large_first_search_or_foreground_mode_compiles_in_the_call(uncompiled, monkeypatch):
    index = HashIndex(64)
    index.add(np.random.default_rng(0).integers(0, 256, (500, 8), dtype=np.uint8))
    calls = []
    real = kernels.numpy_topk
    monkeypatch.setattr(kernels, "numpy_topk", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(kernels, "NUMPY_WORK", 499)
    index.search(index.packed_codes([1]), 5)
    monkeypatch.setattr(kernels, "NUMPY_WORK", 500)
    index.search(index.packed_codes([1]), 5)
    monkeypatch.setenv("HASHRET_COMPILE", "foreground")
    index.search(index.packed_codes([1]), 5)
    assert calls == [1]


def test_ready_sees_a_compiled_kernel_for_exactly_its_signature():
    index = HashIndex(64)
    index.add(np.random.default_rng(0).integers(0, 256, (500, 8), dtype=np.uint8))
    index.search(index.packed_codes([1]), 5)  # compiled (or loaded) here, in the foreground
    segs = index.segments()
    q = np.zeros(1, dtype=segs.dtype)
    args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, q, 5, 64, np.zeros(1, np.uint8), False,
            1, np.zeros(1, np.int32), 0, np.zeros((1, 1, 1), np.int64))
    assert kernels._ready(kernels.lone_kernel, args)
    kernels._behind.clear()
    odd = args[:4] + (np.zeros(1, dtype=np.float32),) + args[5:]  # a signature nobody compiles
    assert not kernels._ready(kernels.lone_kernel, odd)


def test_a_second_warmup_of_a_width_waits_for_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("HASHRET_CACHE_DIR", str(tmp_path))
    from hashret.index.cache import compiling

    entered = threading.Event()

    def second():
        with compiling(64):
            entered.set()

    with compiling(64):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.3)
        with compiling(128):  # another width is not held up
            pass
    assert entered.wait(10)
    t.join()
