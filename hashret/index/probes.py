"""The machine's limits, measured the way the scan runs: the memory read floor and the
popcount roof that ``benchmarks/search.py`` quotes the scan's speed against."""

from __future__ import annotations

import hashret.index.cache  # noqa: F401 -- before any cached kernel is defined
import time

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hashret.index.intrinsics import PREFETCH_ONE_WORD, TILE, array_data, pass4, prefer_wide, prefetch_ir
from hashret.index.kernels import threads_used


# -- the machine's limits, measured the way the scan runs (for benchmarks/search.py) ------------
def _xor_lines(ahead):
    """An intrinsic XOR-reducing ``n`` 128-byte chunks of a 1-D uint64 array from its
    start, as the one-word first level loads them; ``ahead`` > 0: asking for the line that
    many bytes on with each one, as the lone first level does."""
    @intrinsic
    def xor_lines(typingctx, arr, n):
        def codegen(context, builder, signature, args):
            vty = ir.VectorType(ir.IntType(64), 16)
            base = array_data(context, builder, signature.args[0], args[0], ir.Constant(ir.IntType(64), 0))
            acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [0] * 16))
            with cgutils.for_range(builder, args[1]) as loop:
                at = builder.gep(base, [builder.mul(loop.index, ir.Constant(loop.index.type, 16))])
                if ahead:
                    prefetch_ir(builder, at, ahead, 128)
                x = builder.load(builder.bitcast(at, vty.as_pointer()), align=8)
                builder.store(builder.xor(builder.load(acc), x), acc)
            v = builder.load(acc)
            out = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
            for i in range(1, 16):
                out = builder.xor(out, builder.extract_element(v, ir.Constant(ir.IntType(32), i)))
            prefer_wide(builder)
            return out

        return types.uint64(arr, types.intp), codegen

    return xor_lines


_xor_plain, _xor_ahead = _xor_lines(0), _xor_lines(PREFETCH_ONE_WORD)


@njit(parallel=True, cache=True)
def _read_kernel(lines, tail, parts, acc, ahead):
    """Every 128-byte chunk of ``lines`` (uint64) and every byte of ``tail``, read once on
    ``parts`` threads, one parallel region like the scan's."""
    per = (lines.shape[0] // 16 + parts - 1) // parts * 16
    for t in prange(parts):
        part = lines[t * per:min(lines.shape[0], (t + 1) * per)]
        if ahead:
            x = _xor_ahead(part, part.shape[0] // 16)
        else:
            x = _xor_plain(part, part.shape[0] // 16)
        if t == 0:
            for i in range(tail.shape[0]):
                x ^= np.uint64(tail[i])
        acc[t] = x


@njit(parallel=True, cache=True)
def _roof_kernel(block, queries, lim, reps, parts, out):
    """``pass4`` -- the scan's first level for one-word codes: XOR + popcount + running
    minimum, 4 queries per load -- over an L1-resident block, ``reps`` times on each thread:
    the scan's inner loop with nothing around it. ``lim``: thresholds read at run time, so
    that LLVM cannot fold the compares away."""
    n = block.shape[0] // (128 // block.itemsize)
    for t in prange(parts):
        acc = np.uint64(0)
        for r in range(reps):  # queries change per rep, so no rep can be hoisted
            q = queries[r % queries.shape[0]]
            acc += pass4(block, 0, n, q[0], q[1], q[2], q[3], lim[0], lim[1], lim[2], lim[3])
        out[t] = acc


def read_probe(words: np.ndarray, threads: int | None = None, ahead: bool | None = None):
    """A callable that reads every byte of ``words`` once on ``threads`` threads: the floor
    for one query, which must read every code once. ``ahead``: True asks for each line 4 KiB
    ahead, as the lone scan does, False is a plain read, and None (the floor) takes the
    faster of the two on this machine, timed alternately when the probe is made -- without
    the first the scan could beat its own floor (on this project's AMD host it read 10^7 x
    64-bit codes 8-12% faster than a plain read, 10^6 x 256-bit ones 28%)."""
    raw = np.ascontiguousarray(words).reshape(-1).view(np.uint8)
    n = len(raw) // 128 * 128
    lines, tail = raw[:n].view(np.uint64), raw[n:]
    acc = np.zeros(numba.config.NUMBA_NUM_THREADS, dtype=np.uint64)
    _read_kernel(lines[:1024], tail, 1, acc, False)  # compile or load outside any timing
    _read_kernel(lines[:1024], tail, 1, acc, True)

    def reader(ahead):
        def run():
            with threads_used(threads) as parts:
                _read_kernel(lines, tail, parts, acc, ahead)
        return run

    if ahead is not None:
        return reader(ahead)
    plain, early = reader(False), reader(True)
    spent = {plain: [], early: []}
    for _ in range(7):
        for f in spent:
            t0 = time.perf_counter()
            f()
            spent[f].append(time.perf_counter() - t0)
    return min(spent, key=lambda f: float(np.median(spent[f])))


def roof_probe(word_distances: float, threads: int | None = None, dtype=np.uint64):
    """A callable that does about ``word_distances`` XOR + popcount + minimum steps on words
    of ``dtype`` (4 queries per load, an L1-resident block) on ``threads`` threads: the
    scan's inner loop with nothing around it, the roof for batched queries (a code of w
    words costs w; a narrow word packs more codes per vector, so it has a roof of its own)."""
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 2**63, size=TILE, dtype=np.uint64).view(dtype)  # 16 KiB
    queries = rng.integers(0, 2**63, size=(64, 4), dtype=np.uint64).astype(dtype)
    lim = np.ones(4, dtype=np.int32)
    out = np.zeros(numba.config.NUMBA_NUM_THREADS, dtype=np.uint64)

    def run():
        with threads_used(threads) as parts:
            reps = max(1, int(round(word_distances / (parts * len(block) * 4))))
            _roof_kernel(block, queries, lim, reps, parts, out)

    _roof_kernel(block, queries, lim, 1, 1, out)
    return run
