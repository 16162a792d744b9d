"""The first searches of a fresh environment: an empty kernel cache, then the CLI as a user runs it.

    python benchmarks/first_search.py                  # 10^6 random 64-bit codes
    python benchmarks/first_search.py --rows 100000 --bits 128

For each compile mode -- the default (a search too small to wait for numba runs on numpy
while a detached ``hashret warmup`` compiles) and ``HASHRET_COMPILE=foreground`` (compile in
the call) -- the wall time of three whole ``hashret query --index IDX --codes HEX`` processes:
the first, the next at once, and one after the background compile has ended; then
``hashret info``. Each mode starts from its own empty ``HASHRET_CACHE_DIR``, in one run.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from hashret.index import HashIndex  # noqa: E402


def timed(argv, env) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def compiling_behind(cache: Path) -> bool:
    """Whether a background warmup still holds its lock in ``cache`` (see hashret.index.cache)."""
    import fcntl

    for lock in cache.rglob("compiling-*.lock"):
        with open(lock, "a+b") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
    return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10**6)
    ap.add_argument("--bits", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index = HashIndex.create(Path(tmp) / "idx", a.bits)
        index.add(np.random.default_rng(0).integers(0, 256, (a.rows, a.bits // 8), dtype=np.uint8))
        code = index.packed_codes([3])[0].tobytes().hex()
        index.close()
        query = ["hashret", "query", "--index", str(Path(tmp) / "idx"), "--codes", code, "-k", "10"]
        print(f"{a.rows:,} random {a.bits}-bit codes, k=10; wall time of each whole process")
        for mode in ("background", "foreground"):
            cache = Path(tmp) / f"cache-{mode}"
            env = {**os.environ, "HASHRET_CACHE_DIR": str(cache), "HASHRET_COMPILE": mode}
            env.pop("NUMBA_CACHE_DIR", None)
            first, nxt = timed(query, env), timed(query, env)
            time.sleep(1)  # the warmup has taken its lock by now
            while compiling_behind(cache):
                time.sleep(0.5)
            after = timed(query, env)
            info = timed(["hashret", "info", "--index", str(Path(tmp) / "idx")], env)
            print(f"{mode:>10}: first {first:.2f} s, next {nxt:.2f} s, after the compile {after:.2f} s, "
                  f"info {info:.2f} s")


if __name__ == "__main__":
    main()
