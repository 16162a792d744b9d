"""Numba Hamming-scan kernels over codes stored as rows of unsigned words.

The codes need not be one array: the kernels take the addresses of *segments* -- every
segment but the last holding exactly ``seg_rows`` rows -- so an index scans LMDB's code
chunks where its memory map has them, without copying them (an in-memory index is one
segment). Tiles never cross a segment's end.

Exact top-k, ties broken by row number: the database is split into one contiguous row
range per thread; each thread walks its range in cache-sized tiles (a lone query: straight
through) and, for every query, first computes the minimum distance over each span of rows (a
vectorisable XOR + popcount + min loop), and only when that minimum beats the query's
running k-th distance goes back: a minimum per 64 rows of the span, then rows.

One-word codes (up to 64 bits, one uint8/16/32/64 word a row) have both levels written as
LLVM vector IR (``_pass1``/``_pass4``, ``_below64``): the first level keeps its minima in
vector lanes and ends a span with one vector compare, not a horizontal reduction, so its
spans can be half as long; the second level takes a 64-bit mask of the rows below the k-th
per 64 rows and visits only its set bits. The first level's compare also says which lanes
(row offsets mod 16) hold a row below the k-th; where only one does -- the usual case once
the k-th is tight -- the second level tests that lane's rows alone. Measured against the
loops numba compiles (10^7 64-bit codes, 2 threads, alternated): 100 queries at k=1000 86.7 -> 68.9 ms, one query at
k=1000 2.2-2.4 -> 2.0 ms; k=10 and 100 2-3% faster. Codes of 2-4 uint64 words take the same
two levels (``_multiword``: 8 rows a load, split into their words by shuffles): 10^6 codes, 100
queries, 128 bits 1.4-1.7x and 256 bits 1.8-1.9x faster than the loops, which codes of 5 or
more words keep. The running
best-k set of a (thread, query) is a list its rows are appended to -- rows arrive in
increasing order, so it stays in row order -- with a count per distance: a row enters only
below the query's threshold, which drops to the k-th's distance once k rows lie below it (a
later row at that distance loses its tie). The per-thread lists are merged at the end by a
counting sort on the distance.

Distances are integers in [0, bits]; a removed row gets a distance above ``bits`` and never
enters. ``cache=True`` keeps compilation out of every process after the first.

Wide vectors: Numba compiles for the host CPU with LLVM's tuning for it, which on AVX-512
server chips prefers 256-bit vectors, so popcount loops ran on ymm registers at half the
width the hardware has. ``_wide()`` marks the LLVM function it is inlined into with
``prefer-vector-width``/``min-legal-vector-width`` = 512: LLVM picks the subtarget per
function, so hashret's scan loops get zmm registers and a user's other Numba code compiles as
it always did (no NUMBA_CPU_FEATURES, nothing process-wide). On CPUs without AVX-512 the
attribute changes nothing.
"""

from __future__ import annotations

import threading
import time
import warnings

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.core.errors import NumbaIRAssumptionWarning
from numba.extending import intrinsic, overload

# numba's SSA pass runs a check it calls pedantic on the variables of an ``@overload`` inlined
# into a prange body (ours: ``_first``, ``_second``, ``_gather``) and asks for a bug report
# where they are missing from its scope bookkeeping; the compiled scans equal brute force for
# every word type (tests/index/test_kernels.py), so the notice is hidden for these names only
INLINED_NOTICE = r".*variable '_(first|second|gather)_"
warnings.filterwarnings("ignore", message=INLINED_NOTICE, category=NumbaIRAssumptionWarning)

TILE = 2048  # rows per tile: 16 KiB of 64-bit codes, stays in L1 while a batch's queries scan it
SPAN = 1024  # rows per first-level minimum (GROUP queries at once), codes of several words
VECTOR_SPAN = 512  # rows per first-level test on the vector IR path (a vector compare, no reduction)
SMALL_BLOCK = 64  # rows per second-level minimum, inside a span that passed, one query
GROUP = 4    # queries sharing one load of each database word
LANES = 16   # the first level's answer per query: a bit per row offset mod 16 (see _first)
ALL_LANES = (1 << LANES) - 1
SAMPLE_EVERY = 64  # the seeding sample: one block of SMALL_BLOCK rows in every SAMPLE_EVERY
SEED_MARGIN = 2  # a seed: the (k / SAMPLE_EVERY + SEED_MARGIN)-th nearest sampled row's distance + 1
LONE_SEED_K = 64  # a lone query seeds itself from k = 64 up


@intrinsic
def _popcount(typingctx, x):
    """LLVM's ctpop: vectorises to vpopcntq where the CPU has it (np.bitwise_count does
    not compile inside numba)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


def _prefer_wide(builder):
    attrs = builder.function.attributes
    # llvmlite validates attribute names against a fixed list without string attributes
    set.add(attrs, '"prefer-vector-width"="512"')
    set.add(attrs, '"min-legal-vector-width"="512"')


@intrinsic
def _wide(typingctx):
    """Prefer 512-bit vectors in the function this is inlined into (see the module's notes)."""
    def codegen(context, builder, signature, args):
        _prefer_wide(builder)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _at(typingctx, addr):
    """An int64 address as a pointer (numba.carray turns it into an array)."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())

    return types.voidptr(types.int64), codegen


def _splat(builder, value, n):
    """An <n x value's type> vector with every lane ``value``."""
    vty = ir.VectorType(value.type, n)
    one = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vty, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), n), [0] * n))


def _vector_fn(builder, name, vty, n_args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * n_args),
                                          f"llvm.{name}.v{vty.count}i{vty.element.width}")


def _data(context, builder, arr_type, arr, pos):
    """The address of arr[pos] (a 1-D array)."""
    return builder.gep(context.make_array(arr_type)(context, builder, arr).data, [pos])


# How far ahead a lone query's first level asks for the lines it will read. The hardware's
# prefetchers alone kept too few lines in flight for a loop with this much work per line: one
# query over 10^7 64-bit codes ran at 78-88% of a plain read, over 10^6 256-bit codes at
# 60-66% (the loop over cache-resident codes being 5x faster). Asked for one line each, 4 KiB
# ahead for one-word codes and 16 KiB for 2-4 words (best of 1-64 KiB, alternated, 1 and 2
# threads), they run at 86-93% and 88-100%.
PREFETCH_ONE_WORD = 4096
PREFETCH_WORDS = 16384


def _prefetch_ir(builder, ptr, ahead=0, nbytes=64):
    """llvm.prefetch, for reading, into L1, of each line of the ``nbytes`` that start
    ``ahead`` bytes past ``ptr``."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
    byte = builder.bitcast(ptr, i8p)
    for line in range(ahead, ahead + nbytes, 64):
        at = builder.gep(byte, [ir.Constant(ir.IntType(64), line)])
        builder.call(fn, [at, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


@intrinsic
def _prefetch(typingctx, arr, pos):
    """Ask for the cache line holding arr[pos] (a 1-D array), for reading."""
    def codegen(context, builder, signature, args):
        _prefetch_ir(builder, _data(context, builder, signature.args[0], args[0], args[1]))
        return context.get_dummy_value()

    return types.none(arr, types.intp), codegen


@intrinsic
def _below64(typingctx, arr, pos, q, thr):
    """Bit i set where popcount(arr[pos + i] ^ q) < thr, for the 64 one-word rows from
    ``pos`` of the 1-D array ``arr``: one <64 x word> XOR, popcount and compare that LLVM
    splits into the widest registers it may use, and no horizontal reduction."""
    sig = types.uint64(arr, types.intp, arr.dtype, types.intp)
    width = arr.dtype.bitwidth

    def codegen(context, builder, signature, args):
        a, p, qv, t = args
        ity = ir.IntType(width)
        vty = ir.VectorType(ity, 64)
        ptr = builder.bitcast(_data(context, builder, signature.args[0], a, p), vty.as_pointer())
        x = builder.xor(builder.load(ptr, align=width // 8), _splat(builder, qv, 64))
        t = builder.trunc(t, ity) if width < 64 else t
        below = builder.icmp_unsigned("<", builder.call(_vector_fn(builder, "ctpop", vty, 1), [x]),
                                      _splat(builder, t, 64))
        _prefer_wide(builder)
        return builder.bitcast(below, ir.IntType(64))

    return sig, codegen


@intrinsic
def _set64(typingctx, arr, pos):
    """Bit i set where the byte arr[pos + i] is not 0, i < 64 (the removed-rows mask)."""
    sig = types.uint64(arr, types.intp)

    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.IntType(8), 64)
        ptr = builder.bitcast(_data(context, builder, signature.args[0], *args), vty.as_pointer())
        nz = builder.icmp_unsigned("!=", builder.load(ptr, align=1), ir.Constant(vty, [0] * 64))
        return builder.bitcast(nz, ir.IntType(64))

    return sig, codegen


@intrinsic
def _lowest(typingctx, x):
    """The index of the lowest set bit of a non-zero uint64."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.intp(types.uint64), codegen


def _passes_codegen(nq):
    """Codegen of ``_pass1``/``_pass4``: bits 16j..16j+15 of the result are query j's lanes
    (see ``_first``): bit l set where a row at offset l mod 16 from ``pos``, over ``n``
    chunks of one-word rows, is below query j's threshold. The
    minima stay vertical (one vector per query) and end in one vector compare each instead of
    the horizontal reduction a loop's minimum ends in, which cost about as much as the
    popcounts of 64 rows -- so the first level can test shorter spans."""
    def codegen(context, builder, signature, args):
        width = signature.args[0].dtype.bitwidth
        ch = 1024 // width  # rows per chunk: two 512-bit registers
        ity = ir.IntType(width)
        vty = ir.VectorType(ity, ch)
        a, p, n = args[:3]
        qs, ts = args[3:3 + nq], args[3 + nq:3 + 2 * nq]
        base = _data(context, builder, signature.args[0], a, p)
        qv = [_splat(builder, q, ch) for q in qs]
        ctpop, umin = _vector_fn(builder, "ctpop", vty, 1), _vector_fn(builder, "umin", vty, 2)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [(1 << width) - 1] * ch))
                for _ in range(nq)]
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(loop.index.type, ch))
            at = builder.gep(base, [off])
            if nq == 1:  # a batch's tiles are asked for by its walk (``_prefetch_share``)
                _prefetch_ir(builder, at, PREFETCH_ONE_WORD, 128)
            x = builder.load(builder.bitcast(at, vty.as_pointer()), align=width // 8)
            for acc, q in zip(accs, qv):
                pc = builder.call(ctpop, [builder.xor(x, q)])
                builder.store(builder.call(umin, [builder.load(acc), pc]), acc)
        out = ir.Constant(ir.IntType(64), 0)
        i16 = ir.IntType(16)
        for j, (acc, t) in enumerate(zip(accs, ts)):
            tv = _splat(builder, builder.trunc(t, ity) if width < 64 else t, ch)
            below = builder.bitcast(builder.icmp_unsigned("<", builder.load(acc), tv), ir.IntType(ch))
            # lane l holds the rows l, l + ch, ...: folded to l mod 16, the row's offset mod 16
            lanes = builder.trunc(below, i16)
            for piece in range(1, ch // 16):
                lanes = builder.or_(lanes, builder.trunc(
                    builder.lshr(below, ir.Constant(below.type, 16 * piece)), i16))
            out = builder.or_(out, builder.shl(builder.zext(lanes, ir.IntType(64)),
                                               ir.Constant(ir.IntType(64), LANES * j)))
        _prefer_wide(builder)
        return out

    return codegen


@intrinsic
def _pass1(typingctx, arr, pos, n, q, t):
    """``q``'s lanes over n chunks of 1024 / (word bits) one-word rows from ``pos`` of
    ``arr``: bit l set where a row at offset l mod 16 is below ``t`` (``_passes_codegen``)."""
    return types.uint64(arr, types.intp, types.intp, arr.dtype, types.intp), _passes_codegen(1)


@intrinsic
def _pass4(typingctx, arr, pos, n, qa, qb, qc, qd, ta, tb, tc, td):
    """``_pass1`` for four queries sharing each load: query j's lanes in bits 16j..16j+15."""
    w, i = arr.dtype, types.intp
    return types.uint64(arr, i, i, w, w, w, w, i, i, i, i), _passes_codegen(4)


def _multiword(w):
    """(first1, first4, below64): ``_pass1``, ``_pass4`` and ``_below64`` for codes of ``w``
    uint64 words a row. A chunk of 8 rows is loaded as one <8w x i64> vector and split into
    its w words (each an <8 x i64> of one word of every row, a shuffle shared by the
    queries), so a row's distance is a sum of w popcounts in one lane. Queries come as rows
    of the 2-D ``queries``, thresholds as entries of ``thr``, both read once a call."""
    ch, i64, i32 = 8, ir.IntType(64), ir.IntType(32)
    vty, rty = ir.VectorType(i64, 8 * w), ir.VectorType(i64, 8)
    picks = [ir.Constant(ir.VectorType(i32, ch), [i + w * r for r in range(ch)]) for i in range(w)]

    def distances(builder, v, qv):
        """<8 x i64> distances of the 8 rows in ``v`` to the query whose words are ``qv``."""
        ctpop = _vector_fn(builder, "ctpop", rty, 1)
        s = None
        for pick, q in zip(picks, qv):
            word = builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), pick)
            pc = builder.call(ctpop, [builder.xor(word, q)])
            s = pc if s is None else builder.add(s, pc)
        return s

    def query_words(context, builder, q_t, qarr, row):
        qa = context.make_array(q_t)(context, builder, qarr)
        out = []
        for i in range(w):
            x = builder.load(cgutils.get_item_pointer(context, builder, q_t, qa,
                                                      [row, ir.Constant(row.type, i)]))
            # codes of several words are uint64 words; a narrower word type is widened
            out.append(builder.zext(x, i64) if x.type.width < 64 else x)
        return out

    def query(context, builder, q_t, qarr, row):
        return [_splat(builder, x, ch) for x in query_words(context, builder, q_t, qarr, row)]

    def threshold(context, builder, t_t, tarr, row):
        ta = context.make_array(t_t)(context, builder, tarr)
        t = builder.load(cgutils.get_item_pointer(context, builder, t_t, ta, [row]))
        return _splat(builder, context.cast(builder, t, t_t.dtype, types.int64), ch)

    def lanes_field(builder, acc, tv):
        """ALL_LANES where a row's minimum in ``acc`` is below ``tv``, else 0: which row it
        is, these lanes do not say (see ``_first``)."""
        below = builder.bitcast(builder.icmp_unsigned("<", acc, tv), ir.IntType(ch))
        hit = builder.icmp_unsigned("!=", below, ir.Constant(ir.IntType(ch), 0))
        return builder.select(hit, ir.Constant(i64, ALL_LANES), ir.Constant(i64, 0))

    def lone_codegen(context, builder, signature, args):
        """``first1`` for w = 2 or 4, with no shuffles before the popcounts: the query's
        words repeat along the vector, so XOR and popcount work on 8 rows as loaded (w
        vectors of 8 words), and a tree of even/odd picks from pairs of vectors and adds
        sums each row's w counts into one lane, rows in order (w = 4: 6 permutes, 3 adds
        and 1 minimum per 8 rows, where splitting the rows into words first took 8
        permutes, shared by nothing with one query)."""
        arr_t, q_t, t_t = signature.args[0], signature.args[3], signature.args[-1]
        a, p, n, qarr, row, tarr = args
        base = _data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
        words = query_words(context, builder, q_t, qarr, row)
        qpat = ir.Constant(rty, ir.Undefined)  # the query's words, repeated: w0 w1 .. w0 w1 ..
        for i in range(ch):
            qpat = builder.insert_element(qpat, words[i % w], ir.Constant(i32, i))
        tv = threshold(context, builder, t_t, tarr, row)
        ctpop, umin = _vector_fn(builder, "ctpop", rty, 1), _vector_fn(builder, "umin", rty, 2)
        evens = ir.Constant(ir.VectorType(i32, ch), list(range(0, 2 * ch, 2)))
        odds = ir.Constant(ir.VectorType(i32, ch), list(range(1, 2 * ch, 2)))
        acc = cgutils.alloca_once_value(builder, ir.Constant(rty, [2**64 - 1] * ch))
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(loop.index.type, 8 * w))
            parts = []
            _prefetch_ir(builder, builder.gep(base, [off]), PREFETCH_WORDS, 64 * w)
            for i in range(w):
                ptr = builder.gep(base, [builder.add(off, ir.Constant(off.type, ch * i))])
                v = builder.load(builder.bitcast(ptr, rty.as_pointer()), align=8)
                parts.append(builder.call(ctpop, [builder.xor(v, qpat)]))
            while len(parts) > 1:
                parts = [builder.add(builder.shuffle_vector(x, y, evens),
                                     builder.shuffle_vector(x, y, odds))
                         for x, y in zip(parts[::2], parts[1::2])]
            builder.store(builder.call(umin, [builder.load(acc), parts[0]]), acc)
        _prefer_wide(builder)
        return lanes_field(builder, builder.load(acc), tv)

    def first_codegen(nq):
        if nq == 1 and w in (2, 4):
            return lone_codegen

        def codegen(context, builder, signature, args):
            arr_t, q_t, t_t = signature.args[0], signature.args[3], signature.args[-1]
            a, p, n, qarr = args[:4]
            rows, tarr = args[4:4 + nq], args[4 + nq]
            base = _data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
            qvs = [query(context, builder, q_t, qarr, r) for r in rows]
            tvs = [threshold(context, builder, t_t, tarr, r) for r in rows]
            umin = _vector_fn(builder, "umin", rty, 2)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(rty, [2**64 - 1] * ch))
                    for _ in range(nq)]
            with cgutils.for_range(builder, n) as loop:
                off = builder.mul(loop.index, ir.Constant(loop.index.type, 8 * w))
                if nq == 1:
                    _prefetch_ir(builder, builder.gep(base, [off]), PREFETCH_WORDS, 64 * w)
                v = builder.load(builder.bitcast(builder.gep(base, [off]), vty.as_pointer()), align=8)
                for acc, qv in zip(accs, qvs):
                    builder.store(builder.call(umin, [builder.load(acc), distances(builder, v, qv)]), acc)
            out = ir.Constant(i64, 0)
            for j, (acc, tv) in enumerate(zip(accs, tvs)):
                field = lanes_field(builder, builder.load(acc), tv)
                out = builder.or_(out, builder.shl(field, ir.Constant(i64, LANES * j)))
            _prefer_wide(builder)
            return out

        return codegen

    def below_codegen(context, builder, signature, args):
        arr_t, q_t = signature.args[0], signature.args[2]
        a, p, qarr, qi, t = args
        base = _data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
        qv = query(context, builder, q_t, qarr, qi)
        tv = _splat(builder, t, ch)
        out = ir.Constant(i64, 0)
        for c in range(64 // ch):
            ptr = builder.bitcast(builder.gep(base, [ir.Constant(p.type, c * 8 * w)]), vty.as_pointer())
            below = builder.icmp_unsigned("<", distances(builder, builder.load(ptr, align=8), qv), tv)
            bits8 = builder.zext(builder.bitcast(below, ir.IntType(ch)), i64)
            out = builder.or_(out, builder.shl(bits8, ir.Constant(i64, c * ch)))
        _prefer_wide(builder)
        return out

    i = types.intp

    @intrinsic
    def first1(typingctx, arr, pos, n, queries, qa, thr):
        return types.uint64(arr, i, i, queries, i, thr), first_codegen(1)

    @intrinsic
    def first4(typingctx, arr, pos, n, queries, qa, qb, qc, qd, thr):
        return types.uint64(arr, i, i, queries, i, i, i, i, thr), first_codegen(4)

    @intrinsic
    def below64(typingctx, arr, pos, queries, qi, t):
        return types.uint64(arr, i, queries, i, i), below_codegen

    return first1, first4, below64


_first1_w2, _first4_w2, _below64_w2 = _multiword(2)
_first1_w3, _first4_w3, _below64_w3 = _multiword(3)
_first1_w4, _first4_w4, _below64_w4 = _multiword(4)
VECTOR_WORDS = 4  # codes of up to this many words take the vector IR path


@njit(inline="always", cache=True)
def _tile(addrs, seg_rows, n_rows, n_words, start, hi, like, rows):
    """(tile, end): rows start..end-1 (at most ``rows``, never past a segment's end) as a 1-D
    array of words, ``like``'s type."""
    s = start // seg_rows
    seg_lo = s * seg_rows
    end = min(start + rows, hi, seg_lo + seg_rows)
    seg = numba.carray(_at(addrs[s]), (min(seg_rows, n_rows - seg_lo)) * n_words, like.dtype)
    return seg[(start - seg_lo) * n_words:(end - seg_lo) * n_words], end


@njit(inline="always", cache=True)
def _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, like, tile):
    """The tile after the one that ends at ``end``, for ``_prefetch_share``; empty past
    ``hi``, and for codes of several words, whose tiles (32-64 KiB) leave no room in L1 for
    the next one (10^6 256-bit codes, 100 queries, k=1000: 3% slower with it)."""
    if like.ndim == 1 and end < hi:
        ahead, _ = _tile(addrs, seg_rows, n_rows, n_words, end, hi, like, TILE)
        return ahead
    return tile[:0]


@njit(inline="always", cache=True)
def _prefetch_share(ahead, gi, n_groups):
    """Query group gi's share of the next tile's cache lines, asked for while this tile is
    scanned: a batch reads each tile from memory in its first group's first level only, and
    the hardware's prefetchers, seeing 25 passes over one tile and then a jump, did not have
    the next one ready -- every tile the same L1-resident 16 KiB ran 1.4 ms (8%) faster than
    10^7 codes from memory (100 queries, k=1000, first level alone)."""
    step = 64 // ahead.itemsize  # words a cache line
    per = ((len(ahead) + step - 1) // step + n_groups - 1) // n_groups
    for w in range(gi * per * step, min(len(ahead), (gi + 1) * per * step), step):
        _prefetch(ahead, w)


@njit(inline="always", cache=True)
def _block_distances(blk, n_words, q, out):
    """out[i] = distance of row i of the 1-D slice ``blk`` of codes of several words
    (vectorised for 2 and 4 words)."""
    _wide()
    n = blk.shape[0] // n_words
    if n_words == 2:
        q0, q1 = q[0], q[1]
        for i in range(n):
            out[i] = np.int32(_popcount(blk[2 * i] ^ q0) + _popcount(blk[2 * i + 1] ^ q1))
    elif n_words == 4:
        q0, q1, q2, q3 = q[0], q[1], q[2], q[3]
        for i in range(n):
            out[i] = np.int32(_popcount(blk[4 * i] ^ q0) + _popcount(blk[4 * i + 1] ^ q1)
                              + _popcount(blk[4 * i + 2] ^ q2) + _popcount(blk[4 * i + 3] ^ q3))
    else:
        for i in range(n):
            acc = np.uint64(0)
            for w in range(n_words):
                acc += _popcount(blk[i * n_words + w] ^ q[w])
            out[i] = np.int32(acc)
    return n


@njit(inline="always", cache=True)
def _span_min(blk, n_words, q, dblk, has_deleted, penalty):
    """Minimum distance of ``q`` over the rows of the 1-D slice ``blk`` of codes of several
    words (removed rows count as ``penalty``): one vectorised pass, one horizontal reduction."""
    _wide()
    n = blk.shape[0] // n_words
    pen = np.uint64(penalty)  # minima stay in uint64 lanes: no narrowing in the hot loop
    m = pen
    if n_words == 2:
        a, b = q[0], q[1]
        if has_deleted:
            for i in range(n):
                m = min(m, _popcount(blk[2 * i] ^ a) + _popcount(blk[2 * i + 1] ^ b)
                        + np.uint64(dblk[i]) * pen)
        else:
            for i in range(n):
                m = min(m, _popcount(blk[2 * i] ^ a) + _popcount(blk[2 * i + 1] ^ b))
    elif n_words == 4:
        a, b, c, d = q[0], q[1], q[2], q[3]
        for i in range(n):
            x = (_popcount(blk[4 * i] ^ a) + _popcount(blk[4 * i + 1] ^ b)
                 + _popcount(blk[4 * i + 2] ^ c) + _popcount(blk[4 * i + 3] ^ d))
            if has_deleted:
                x += np.uint64(dblk[i]) * pen
            m = min(m, x)
    else:
        for i in range(n):
            x = np.uint64(0)
            for w in range(n_words):
                x += _popcount(blk[i * n_words + w] ^ q[w])
            if has_deleted:
                x += np.uint64(dblk[i]) * pen
            m = min(m, x)
    return np.int32(m)


DIST_BITS = 16  # a list entry: row << DIST_BITS | distance
DIST_MASK = (1 << DIST_BITS) - 1


@njit(cache=True)
def _compact(pool, t, qi, f, thr, keep):
    """(t, qi)'s full list without the rows that can no longer be among its k nearest: those
    above thr, and at thr all but the first ``keep`` (k less the rows below thr: the later
    ones lose their ties). Order is kept; the new length is at most k."""
    n = 0
    for j in range(f):
        e = pool[t, qi, j]
        d = np.int32(e & DIST_MASK)
        if d < thr or (d == thr and keep > 0):
            keep -= d == thr
            pool[t, qi, n] = e
            n += 1
    return n


@njit(inline="always", cache=True)
def _offer(i, d, t, qi, k, thr, size, below, cnt, pool, fill):
    """Row i at distance d (< thr[qi]) onto the best-k list of (thread t, query qi): appended
    (rows arrive in increasing order, so a list is in row order), counted per distance, and
    once k rows lie below thr, thr drops to the k-th's distance -- a later row there loses
    its tie. ``below[qi]``: the list's rows below thr; ``size``: rows ever appended. A full
    list (2k + 16 places) sheds the rows that lost (``_compact``), leaving at most k.
    (It replaced per-distance chains with eviction, where every append read and wrote a
    chain head: 100 queries, k=1000, 10^7 codes, 0-0.9 ms of ~22 faster.)"""
    f = fill[t, qi]
    if f == pool.shape[2]:
        f = _compact(pool, t, qi, f, thr[qi], k - below[qi])
    pool[t, qi, f] = (i << DIST_BITS) | d
    fill[t, qi] = f + 1
    size[t, qi] += 1
    cnt[qi, d] += 1
    b = below[qi] + 1
    if b >= k:  # the k-th is at w: the largest w with fewer than k rows below it
        w = thr[qi] - 1
        while b - cnt[qi, w] >= k:
            b -= cnt[qi, w]
            w -= 1
        b -= cnt[qi, w]
        thr[qi] = w
    below[qi] = b


# -- one walk, two kinds of codes --------------------------------------------------------------
# The walks below are written once; what differs between codes of one word (the queries come
# as a 1-D array of words) and codes of several (a 2-D array, a row per query) is chosen when
# numba types the call, by the ``@overload``s of ``_first``, ``_second`` and ``_gather``. So a
# kernel compiled for 8-, 16- or 32-bit words holds no multi-word loops, and one for 128-bit
# codes no vector IR: with both compiled into every kernel (a branch on ``n_words`` at run
# time), compiling the kernels once per word type took 710 s instead of ~400.

def _first(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted, penalty):
    """The first level, for queries g..g+ng-1 (ng <= GROUP) over rows s0..s1-1 of ``tile``:
    bits LANES*j..LANES*j+15 are query g + j's *lanes*, bit l set where a row s0 + l + 16i
    may be below thr[g + j] (zero: none is). The vector IR keeps its minima in lanes, so it
    says which rows (one-word codes); the loops set all 16 bits or none. Compiled code runs
    one of the two implementations below, chosen by the queries' type."""
    raise NotImplementedError("only compiled code calls _first")


def _first_one_word(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                    penalty):
    # removed rows count here: the second level skips them, the first only decides where to look
    ch = 128 // tile.itemsize
    nch = (s1 - s0) // ch
    if ng == 1:
        hits = _pass1(tile, s0, nch, queries[g], thr[g])
    else:
        ib, ic, id_ = g + 1, g + min(2, ng - 1), g + min(3, ng - 1)
        hits = _pass4(tile, s0, nch, queries[g], queries[ib], queries[ic], queries[id_],
                      thr[g], thr[ib], thr[ic], thr[id_])
    for r in range(s0 + nch * ch, s1):
        for j in range(ng):
            if np.int32(_popcount(np.uint64(tile[r] ^ queries[g + j]))) < thr[g + j]:
                hits |= np.uint64(1) << np.uint64(LANES * j + (r - s0) % LANES)
    return hits


def _first_words(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                 penalty):
    if 2 <= n_words <= VECTOR_WORDS:  # 8 rows a chunk, their w words split by shuffles
        nch = (s1 - s0) // 8
        ib, ic, id_ = g + min(1, ng - 1), g + min(2, ng - 1), g + min(3, ng - 1)
        if n_words == 2:
            if ng == 1:
                hits = _first1_w2(tile, s0, nch, queries, g, thr)
            else:
                hits = _first4_w2(tile, s0, nch, queries, g, ib, ic, id_, thr)
        elif n_words == 3:
            if ng == 1:
                hits = _first1_w3(tile, s0, nch, queries, g, thr)
            else:
                hits = _first4_w3(tile, s0, nch, queries, g, ib, ic, id_, thr)
        else:
            if ng == 1:
                hits = _first1_w4(tile, s0, nch, queries, g, thr)
            else:
                hits = _first4_w4(tile, s0, nch, queries, g, ib, ic, id_, thr)
        for r in range(s0 + nch * 8, s1):
            for j in range(ng):
                if _row_distance(tile, n_words, r, queries[g + j]) < thr[g + j]:
                    hits |= np.uint64(ALL_LANES) << np.uint64(LANES * j)
        return hits
    blk = tile[s0 * n_words:s1 * n_words]
    hits = np.uint64(0)
    for j in range(ng):
        if has_deleted:
            m = _span_min(blk, n_words, queries[g + j], deleted[start + s0:start + s1], True,
                          penalty)
        else:  # slicing the mask only where there is one: a slice is a new array either way
            m = _span_min(blk, n_words, queries[g + j], deleted, False, penalty)
        if m < thr[g + j]:
            hits |= np.uint64(ALL_LANES) << np.uint64(LANES * j)
    return hits


@overload(_first, inline="always")
def _first_typed(tile, s0, s1, n_words, queries, g, ng, thr, start, deleted, has_deleted,
                 penalty):
    return _first_one_word if queries.ndim == 1 else _first_words


@njit(inline="always", cache=True)
def _lanes(hits, j):
    """Query g + j's lanes in a first-level answer of queries g.. (see ``_first``)."""
    return (hits >> np.uint64(LANES * j)) & np.uint64(ALL_LANES)


@njit(inline="always", cache=True)
def _span_rows(queries, n_words, few_passes):
    """Rows per first-level test: a vector IR span ends in one vector compare, a loop's in a
    horizontal reduction that costs about the popcounts of 64 rows. Walks where few spans
    pass (a lone query, a radius) test one-word codes in spans twice as long: fewer span
    ends, longer lanes to re-read where one passes (10^7 codes, alternated A/B: one query
    k=1000 and radius 4-8% faster, 100 queries in a radius 3%; 100 queries at k=1000,
    where ~1,100 spans a query pass, 2% slower, so batched top-k keeps VECTOR_SPAN)."""
    if queries.ndim == 1:
        return 2 * VECTOR_SPAN if few_passes else VECTOR_SPAN
    return VECTOR_SPAN if n_words <= VECTOR_WORDS else SPAN


@njit(inline="always", cache=True)
def _row_distance(tile, n_words, r, q):
    """The distance of row r of ``tile`` (codes of several words) to ``q``."""
    acc = np.uint64(0)
    for w in range(n_words):
        acc += _popcount(np.uint64(tile[r * n_words + w] ^ q[w]))
    return np.int32(acc)


@njit(inline="always", cache=True)
def _below_mask(tile, s0, s_hi, q0, t, start, deleted, has_deleted):
    """Bit i set where row s0 + i (i < 64, below s_hi) of ``tile`` (one-word codes) is alive
    and at distance < t: ``_below64`` for a full block, a loop for the short one at a span's
    end."""
    if s0 + 64 <= s_hi:
        m = _below64(tile, s0, q0, t)
        if m != 0 and has_deleted:
            m &= ~_set64(deleted, start + s0)
        return m
    m = np.uint64(0)
    for i in range(s_hi - s0):
        if (np.int32(_popcount(np.uint64(tile[s0 + i] ^ q0))) < t
                and not (has_deleted and deleted[start + s0 + i] != 0)):
            m |= np.uint64(1) << np.uint64(i)
    return m


@njit(inline="always", cache=True)
def _one_lane(tile, s_lo, s_hi, lane, q0, t):
    """Bit i set where row s_lo + lane + 16i (below s_hi; i < 64) is at distance < t: the
    second level where the first named one lane of a span -- the usual case once the k-th
    is tight, one row in the span below it. Its 32 rows one by one cost less than the 8
    vector masks of the whole span (100 queries, k=1000, 10^7 codes: 24.4 -> 22.1 ms)."""
    m = np.uint64(0)
    i = 0
    for r in range(s_lo + lane, s_hi, LANES):
        below = np.int32(_popcount(np.uint64(tile[r] ^ q0))) < t
        m |= np.uint64(below) << np.uint64(i)
        i += 1
    return m


@njit(inline="always", cache=True)
def _below_mask_words(tile, n_words, s0, s_hi, queries, qi, t, start, deleted, has_deleted):
    """``_below_mask`` for codes of 2..VECTOR_WORDS words, query qi."""
    if s0 + 64 <= s_hi:
        if n_words == 2:
            m = _below64_w2(tile, s0, queries, qi, t)
        elif n_words == 3:
            m = _below64_w3(tile, s0, queries, qi, t)
        else:
            m = _below64_w4(tile, s0, queries, qi, t)
        if m != 0 and has_deleted:
            m &= ~_set64(deleted, start + s0)
        return m
    m = np.uint64(0)
    for i in range(s_hi - s0):
        if (_row_distance(tile, n_words, s0 + i, queries[qi]) < t
                and not (has_deleted and deleted[start + s0 + i] != 0)):
            m |= np.uint64(1) << np.uint64(i)
    return m


def _second(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted, penalty,
            t, k, thr, size, below, cnt, pool, fill, dbuf):
    """The second level: rows s_lo..s_hi-1 of ``tile`` (row ``start`` first), whose span
    passed query qi's first level with ``lanes`` (see ``_first``), offered to its best-k set
    where below its k-th."""
    raise NotImplementedError("only compiled code calls _second")


def _second_one_word(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                     penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    # every 64 rows give a mask of the rows below the k-th (``_below_mask``), and only its set
    # bits are looked at: no minima, no distances written out; with one lane, only its rows
    q0 = queries[qi]
    if lanes & (lanes - np.uint64(1)) == 0:  # one lane's rows are in row order on their own
        lane = _lowest(lanes)
        m = _one_lane(tile, s_lo, s_hi, lane, q0, thr[qi])
        while m != 0:
            j = s_lo + lane + LANES * _lowest(m)
            m &= m - np.uint64(1)
            if has_deleted and deleted[start + j] != 0:
                continue
            d = np.int32(_popcount(np.uint64(tile[j] ^ q0)))
            if d < thr[qi]:
                _offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)
        return
    for s0 in range(s_lo, s_hi, 64):
        m = _below_mask(tile, s0, s_hi, q0, thr[qi], start, deleted, has_deleted)
        while m != 0:
            j = s0 + _lowest(m)
            m &= m - np.uint64(1)
            d = np.int32(_popcount(np.uint64(tile[j] ^ q0)))
            if d < thr[qi]:  # the k-th may have tightened since the mask was taken
                _offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)


def _second_words(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    if 2 <= n_words <= VECTOR_WORDS:  # as for one word: 64-row masks, their set bits
        for s0 in range(s_lo, s_hi, 64):
            m = _below_mask_words(tile, n_words, s0, s_hi, queries, qi, thr[qi], start, deleted,
                                  has_deleted)
            while m != 0:
                j = s0 + _lowest(m)
                m &= m - np.uint64(1)
                d = _row_distance(tile, n_words, j, queries[qi])
                if d < thr[qi]:
                    _offer(start + j, d, t, qi, k, thr, size, below, cnt, pool, fill)
        return
    # each SMALL_BLOCK rows get their own minimum, and only blocks that beat the k-th too are
    # walked row by row
    q = queries[qi]
    for s0 in range(s_lo, s_hi, SMALL_BLOCK):
        s1 = min(s_hi, s0 + SMALL_BLOCK)
        blk = tile[s0 * n_words:s1 * n_words]
        if has_deleted:
            m = _span_min(blk, n_words, q, deleted[start + s0:start + s1], True, penalty)
        else:
            m = _span_min(blk, n_words, q, deleted, False, penalty)
        if m >= thr[qi]:
            continue
        nr = _block_distances(blk, n_words, q, dbuf)
        for jj in range(nr):
            d = dbuf[jj]
            if d < thr[qi] and not (has_deleted and deleted[start + s0 + jj] != 0):
                _offer(start + s0 + jj, d, t, qi, k, thr, size, below, cnt, pool, fill)


@overload(_second, inline="always")
def _second_typed(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, k, thr, size, below, cnt, pool, fill, dbuf):
    return _second_one_word if queries.ndim == 1 else _second_words


@njit(inline="always", cache=True)
def _lone_seed(addrs, seg_rows, n_rows, n_words, queries, lo, hi, need, bits, deleted,
               has_deleted, penalty, dbuf):
    """A lone query's seed for rows lo..hi-1: one more than the distance of the ``need``-th
    nearest row among one span of SPAN rows per SAMPLE_EVERY (``topk`` asks for about this
    thread's share of k rows in all); bits + 1 where the sample is short. The sample is
    walked like the rows proper (both levels, a best-``need`` set), so it costs about its
    1/64 of the reads: a histogram of its distances cost 0.1-0.2 ms at 10^7 codes."""
    cnt = np.zeros((1, bits + 2), dtype=np.int32)
    thr = np.full(1, bits + 1, dtype=np.int32)
    size = np.zeros((1, 1), dtype=np.int64)
    fill = np.zeros((1, 1), dtype=np.int64)
    below = np.zeros(1, dtype=np.int64)
    pool = np.empty((1, 1, 2 * need + 16), dtype=np.int64)
    span = _span_rows(queries, n_words, True)
    j = lo
    while j + SPAN <= hi:
        tile, end = _tile(addrs, seg_rows, n_rows, n_words, j, hi, queries, SPAN)
        for s0 in range(0, end - j, span):
            s1 = min(end - j, s0 + span)
            lanes = _first(tile, s0, s1, n_words, queries, 0, 1, thr, j, deleted, has_deleted,
                           penalty)
            if lanes != 0:
                _second(tile, n_words, queries, 0, s0, s1, lanes, j, deleted, has_deleted, penalty,
                        0, need, thr, size, below, cnt, pool, fill, dbuf)
        j += SPAN * SAMPLE_EVERY
    if size[0, 0] < need:
        return np.int32(bits + 1)
    return np.int32(thr[0] + 1)


@njit(parallel=True, nogil=True, cache=True)  # nogil: a server's event loop runs on during a scan
def _topk_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, used, pool, fill, size):
    """Each of ``n_parts`` threads fills its best-k sets over its contiguous rows, a tile at
    a time, GROUP queries at a time. One parallel region and nothing allocated outside it:
    with passive OpenMP threads (how a service sees them) every region costs a wake-up,
    ~0.1 ms here.

    A lone query has a kernel of its own (``_lone_parts``): with both walks in one function,
    100 queries at k=1000 over 10^7 codes took ~10% longer (113 vs 103 ms, alternated A/B);
    how LLVM optimises this loop nest depends on what else shares the function.

    ``used[t, q]``: the threshold thread t started from (its seed), for the exactness check."""
    n_q = queries.shape[0]
    nb = bits + 2  # distances 0..bits, plus the "removed" distance
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, False)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        cnt = np.zeros((n_q, nb), dtype=np.int32)
        below = np.zeros(n_q, dtype=np.int64)
        thr = seed.copy()  # accept d < thr
        used[t] = thr
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        found = np.empty(TILE // span + 1, dtype=np.uint64)  # the tile's spans' first levels
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, TILE)
            n = end - start
            n_spans = (n + span - 1) // span
            ahead = _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, queries, tile)
            for g in range(0, n_q, GROUP):
                ng = min(GROUP, n_q - g)
                _prefetch_share(ahead, g // GROUP, (n_q + GROUP - 1) // GROUP)
                # the first level over the whole tile before any second level: a branch on each
                # span's answer as it came, mispredicted, threw away the next span's work already
                # in flight (100 queries, k=1000, 10^7 codes: 25.0 -> 24.4 ms)
                passed = np.uint64(0)
                for si in range(n_spans):
                    hits = _first(tile, si * span, min(n, si * span + span), n_words,
                                  queries, g, ng, thr, start, deleted, has_deleted, penalty)
                    found[si] = hits
                    passed |= np.uint64(hits != 0) << np.uint64(si)
                while passed != 0:
                    si = _lowest(passed)
                    passed &= passed - np.uint64(1)
                    hits = found[si]
                    s0, s1 = si * span, min(n, si * span + span)
                    who = np.uint64(0)
                    for j in range(ng):
                        who |= np.uint64(_lanes(hits, j) != 0) << np.uint64(j)
                    while who != 0:
                        j = _lowest(who)
                        who &= who - np.uint64(1)
                        _second(tile, n_words, queries, g + j, s0, s1, _lanes(hits, j), start,
                                deleted, has_deleted, penalty, t, k, thr, size, below,
                                cnt, pool, fill, dbuf)
            start = end


@njit(parallel=True, nogil=True, cache=True)
def _lone_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, lone_need, used, pool, fill, size):
    """``_topk_parts`` for one query, which reads every code once: no tiles, each thread
    walks its share of each segment straight through; ``lone_need`` > 0: each thread
    first seeds itself from its own sample (``_lone_seed``)."""
    nb = bits + 2
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, True)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        cnt = np.zeros((1, nb), dtype=np.int32)
        below = np.zeros(1, dtype=np.int64)
        thr = seed.copy()
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        if lone_need > 0:
            thr[0] = min(thr[0], _lone_seed(addrs, seg_rows, n_rows, n_words, queries, lo, hi,
                                            lone_need, bits, deleted, has_deleted, penalty, dbuf))
        used[t, 0] = thr[0]
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, hi - start)
            n = end - start
            for s0 in range(0, n, span):
                s1 = min(n, s0 + span)
                lanes = _first(tile, s0, s1, n_words, queries, 0, 1, thr, start, deleted,
                               has_deleted, penalty)
                if lanes != 0:  # all lanes: the one-lane path measured 2-3% slower here
                    _second(tile, n_words, queries, 0, s0, s1, ALL_LANES, start, deleted,
                            has_deleted, penalty, t, k, thr, size, below, cnt, pool, fill,
                            dbuf)
            start = end


@njit(inline="always", cache=True)
def _merge_one(qi, bits, pool, fill, at, out_d, out_r):
    """Query qi's per-thread lists into out_d/out_r[qi], its k nearest by (distance, row):
    a counting sort on the distance, stable, and thread t's rows all precede thread
    t + 1's, so each distance's rows come out in row order. (Sorting the keys took ~140 us
    a query at k=1000.) ``at``: scratch of bits + 2. Places past the rows found get -1."""
    k = out_d.shape[1]
    n_parts = pool.shape[0]
    at[:] = 0
    for t in range(n_parts):
        for j in range(fill[t, qi]):
            at[(pool[t, qi, j] & DIST_MASK) + 1] += 1
    for d in range(1, bits + 2):
        at[d] += at[d - 1]
    for t in range(n_parts):
        for j in range(fill[t, qi]):
            e = pool[t, qi, j]
            d = e & DIST_MASK
            p = at[d]
            if p < k:
                out_d[qi, p] = d
                out_r[qi, p] = e >> DIST_BITS
            at[d] = p + 1
    for j in range(min(at[bits], k), k):
        out_d[qi, j] = -1
        out_r[qi, j] = -1


@njit(parallel=True, nogil=True, cache=True)
def _merge_parallel(bits, pool, fill, out_d, out_r):
    for qi in prange(out_d.shape[0]):
        _merge_one(qi, bits, pool, fill, np.empty(bits + 2, dtype=np.int64), out_d, out_r)


@njit(nogil=True, cache=True)
def topk_kernel(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted, n_parts,
                seed, lone_need, pool):
    """Top-k for each query. addrs: the segments' addresses (``seg_rows`` rows of n_words
    words each); queries: of the segments' word type, (Q,) for codes of one word, else
    (Q, n_words); seed: per query, only rows at distance < seed are taken (bits + 1: all);
    lone_need > 0: a lone query seeds each thread from its own sample (see ``_lone_seed``;
    0: no); pool: (n_parts, Q, 2k + 16) scratch for the best-k lists (``_pools``).
    Returns (distances, rows,
    exact): (Q, k) nearest first, ties by row, -1 where fewer than k rows qualify; exact[q]
    is False where a seed may have cut off one of query q's k nearest (see ``topk``)."""
    n_q = queries.shape[0]
    size = np.zeros((n_parts, n_q), dtype=np.int64)
    used = np.empty((n_parts, n_q), dtype=np.int32)
    fill = np.zeros((n_parts, n_q), dtype=np.int64)
    if n_q == 1:
        _lone_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                    n_parts, seed, lone_need, used, pool, fill, size)
    else:
        _topk_parts(addrs, seg_rows, n_rows, n_words, queries, k, bits, deleted, has_deleted,
                    n_parts, seed, used, pool, fill, size)
    out_d = np.empty((n_q, k), dtype=np.int32)  # the merge writes every entry
    out_r = np.empty((n_q, k), dtype=np.int64)
    if n_q * k * n_parts < 65536:  # a second parallel region costs more than this merge
        at = np.empty(bits + 2, dtype=np.int64)
        for qi in range(n_q):
            _merge_one(qi, bits, pool, fill, at, out_d, out_r)
    else:
        _merge_parallel(bits, pool, fill, out_d, out_r)
    # a thread whose set is not full lacks only rows at or above its seed: harmless exactly
    # when the answer's k-th lies below that seed (an unseeded thread lacks nothing)
    exact = np.ones(n_q, dtype=np.bool_)
    for qi in range(n_q):
        for t in range(n_parts):
            if size[t, qi] < k and used[t, qi] <= bits and not (
                    out_r[qi, k - 1] >= 0 and out_d[qi, k - 1] < used[t, qi]):
                exact[qi] = False
    return out_d, out_r, exact


def _gather(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted, penalty,
            t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    """``_second`` for a radius: rows s_lo..s_hi-1 within ``radius`` of query qi, counted and
    (``fill``) written at offsets[t, qi], at most ``cap`` of them (0: no cap)."""
    raise NotImplementedError("only compiled code calls _gather")


def _gather_one_word(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                     penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    q0 = queries[qi]
    if lanes & (lanes - np.uint64(1)) == 0:
        lane = _lowest(lanes)
        m = _one_lane(tile, s_lo, s_hi, lane, q0, radius + 1)
        while m != 0:
            j = s_lo + lane + LANES * _lowest(m)
            m &= m - np.uint64(1)
            if not (has_deleted and deleted[start + j] != 0):
                _record(start + j, np.int32(_popcount(np.uint64(tile[j] ^ q0))), t, qi, offsets,
                        out_rows, out_dist, fill, cap, counts)
        return
    for s0 in range(s_lo, s_hi, 64):
        m = _below_mask(tile, s0, s_hi, q0, radius + 1, start, deleted, has_deleted)
        while m != 0:
            j = s0 + _lowest(m)
            m &= m - np.uint64(1)
            _record(start + j, np.int32(_popcount(np.uint64(tile[j] ^ q0))), t, qi, offsets,
                    out_rows, out_dist, fill, cap, counts)


def _gather_words(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    if 2 <= n_words <= VECTOR_WORDS:
        for s0 in range(s_lo, s_hi, 64):
            m = _below_mask_words(tile, n_words, s0, s_hi, queries, qi, radius + 1, start,
                                  deleted, has_deleted)
            while m != 0:
                j = s0 + _lowest(m)
                m &= m - np.uint64(1)
                _record(start + j, _row_distance(tile, n_words, j, queries[qi]), t, qi, offsets,
                        out_rows, out_dist, fill, cap, counts)
        return
    q = queries[qi]
    for s0 in range(s_lo, s_hi, SMALL_BLOCK):
        s1 = min(s_hi, s0 + SMALL_BLOCK)
        blk = tile[s0 * n_words:s1 * n_words]
        dblk = deleted[start + s0:start + s1] if has_deleted else deleted
        if _span_min(blk, n_words, q, dblk, has_deleted, penalty) > radius:
            continue
        nr = _block_distances(blk, n_words, q, dbuf)
        for jj in range(nr):
            d = dbuf[jj]
            if d <= radius and not (has_deleted and dblk[jj] != 0):
                _record(start + s0 + jj, d, t, qi, offsets, out_rows, out_dist, fill, cap, counts)


@overload(_gather, inline="always")
def _gather_typed(tile, n_words, queries, qi, s_lo, s_hi, lanes, start, deleted, has_deleted,
                  penalty, t, radius, offsets, out_rows, out_dist, fill, cap, counts, dbuf):
    return _gather_one_word if queries.ndim == 1 else _gather_words


@njit(inline="always", cache=True)
def _record(i, d, t, qi, offsets, out_rows, out_dist, fill, cap, counts):
    if fill and (cap == 0 or counts[t, qi] < cap):
        p = offsets[t, qi] + counts[t, qi]
        out_rows[p] = i
        out_dist[p] = d
    counts[t, qi] += 1


@njit(parallel=True, nogil=True, cache=True)
def range_kernel(addrs, seg_rows, n_rows, n_words, queries, radius, bits, deleted, has_deleted,
                 n_parts, offsets, out_rows, out_dist, fill, cap, counts):
    """Counts (into ``counts``, zeros on entry; fill=False) or writes (fill=True, at
    ``offsets``) the rows within ``radius``; with ``cap`` > 0, at most ``cap`` rows per
    (thread, query) are written (counts go on). The walk is ``_topk_parts``' with a fixed
    threshold; a lone query walks its rows straight through, as in ``_lone_parts``."""
    n_q = queries.shape[0]
    penalty = np.int32(bits + 1)
    span = _span_rows(queries, n_words, True)
    chunk = (n_rows + n_parts - 1) // n_parts
    for t in prange(n_parts):
        lo = t * chunk
        hi = min(n_rows, lo + chunk)
        dbuf = np.empty(SMALL_BLOCK, dtype=np.int32)
        lim = np.full(n_q, radius + 1, dtype=np.int32)  # what the first level tests
        rows = hi - lo if n_q == 1 else TILE
        start = lo
        while start < hi:
            tile, end = _tile(addrs, seg_rows, n_rows, n_words, start, hi, queries, rows)
            n = end - start
            ahead = tile[:0]  # a lone query's walk is one stream, which the hardware follows
            if n_q > 1:
                ahead = _next_tile(addrs, seg_rows, n_rows, n_words, end, hi, queries, tile)
            for g in range(0, n_q, GROUP):
                ng = min(GROUP, n_q - g)
                _prefetch_share(ahead, g // GROUP, (n_q + GROUP - 1) // GROUP)
                for s0 in range(0, n, span):
                    s1 = min(n, s0 + span)
                    hits = _first(tile, s0, s1, n_words, queries, g, ng, lim, start, deleted,
                                  has_deleted, penalty)
                    for j in range(ng):
                        lanes = _lanes(hits, j)
                        if lanes != 0:
                            _gather(tile, n_words, queries, g + j, s0, s1, lanes, start,
                                    deleted, has_deleted, penalty, t, radius, offsets, out_rows,
                                    out_dist, fill, cap, counts, dbuf)
            start = end


def _parts(n_rows: int, threads: int) -> int:
    """Threads that get rows: no more than there are tiles."""
    return max(1, min(threads, (n_rows + TILE - 1) // TILE))


class threads_used:
    """``with threads_used(n):`` run the scan on n threads (numba's setting is per calling
    thread, so other threads' scans are unaffected); None keeps the current setting
    (NUMBA_NUM_THREADS unless changed). With ``rows``, no more threads than that many rows
    have tiles: an idle thread still has to be woken and joined (~0.07 ms here with passive
    OpenMP threads, more than a scan of a few thousand codes)."""

    def __init__(self, n, rows: int | None = None):
        from hashret.errors import check, is_integer

        top = numba.config.NUMBA_NUM_THREADS
        ok = n is None or (is_integer(n) and 1 <= n <= top)
        check(ok, f"threads must be an integer in [1, {top}] (NUMBA_NUM_THREADS), got {n!r}")
        self.n, self.rows = n, rows

    def __enter__(self) -> int:
        """The thread count in force. (numba's get/set_num_threads take a lock, ~5 us each,
        so neither is called more than needed.)"""
        self.prev = numba.get_num_threads()
        n = self.prev if self.n is None else int(self.n)
        if self.rows is not None:
            n = _parts(self.rows, n)
        if n != self.prev:
            numba.set_num_threads(n)
        self.set = n
        return n

    def __exit__(self, *exc):
        if self.set != self.prev:
            numba.set_num_threads(self.prev)


class Segments:
    """Codes as the kernels read them: ``arrays``, each (rows, n_words) C-contiguous words,
    all but the last holding ``seg_rows`` rows, ``n_rows`` rows in all. The arrays are kept
    here so that their memory outlives every scan given their addresses."""

    def __init__(self, arrays, seg_rows: int, n_rows: int):
        self.arrays = list(arrays)
        self.seg_rows = int(seg_rows)
        self.n_rows = int(n_rows)
        self.n_words = self.arrays[0].shape[1] if self.arrays else 1
        self.dtype = self.arrays[0].dtype if self.arrays else None
        for a in self.arrays:  # once per snapshot, not per scan (10^8 codes are 1,526 chunks)
            if a.dtype != self.dtype or not a.flags.c_contiguous or a.shape[1] != self.n_words:
                raise ValueError("internal: segments must be C-contiguous arrays of one word type")
        self.addrs = np.array([a.ctypes.data for a in self.arrays] or [0], dtype=np.int64)

    @classmethod
    def of(cls, words: np.ndarray, n_rows: int | None = None) -> "Segments":
        """One array (its first ``n_rows`` rows; all by default) as one segment."""
        words = np.ascontiguousarray(words)
        n = len(words) if n_rows is None else int(n_rows)
        return cls([words], max(len(words), 1), n)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The words of ``rows`` (a copy)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(self.arrays) == 1:
            return self.arrays[0][rows]
        out = np.empty((len(rows), self.n_words), dtype=self.arrays[0].dtype)
        seg = rows // self.seg_rows
        for s in np.unique(seg):
            at = seg == s
            out[at] = self.arrays[s][rows[at] - s * self.seg_rows]
        return out


def _scan_args(segs: Segments, queries, deleted):
    if segs.arrays and (queries.dtype != segs.dtype or queries.shape[1] != segs.n_words):
        raise ValueError("internal: queries must be words of the segments' type")
    has_del = deleted is not None
    dmask = deleted if has_del else np.zeros(1, dtype=np.uint8)
    queries = np.ascontiguousarray(queries)
    if queries.shape[1] == 1:  # one word a code: the kernels take the one-word walk (see _first)
        queries = queries.reshape(len(queries))
    return queries, dmask, has_del


_kept = threading.local()
POOLS_KEPT = 32 << 20  # bytes of best-k scratch a thread keeps between scans


def _pools(n_parts: int, n_q: int, k: int):
    """The best-k lists for ``topk_kernel``, (n_parts, n_q, 2k + 16): a view of a buffer
    the calling thread keeps between scans (up to POOLS_KEPT bytes). Fresh ones each scan
    were fresh pages each scan: 100 queries at k=1000 over 10^7 codes took ~750 page faults,
    ~1.3 ms of its 22 ms."""
    shape = (n_parts, n_q, 2 * k + 16)
    n = shape[0] * shape[1] * shape[2]
    pool = getattr(_kept, "pool", None)
    if pool is None or len(pool) < n:
        pool = np.empty(n, dtype=np.int64)
        if n * 8 <= POOLS_KEPT:
            _kept.pool = pool
    return pool[:n].reshape(shape)


def topk(segs: Segments, queries: np.ndarray, k: int, bits: int,
         deleted: np.ndarray | None = None, threads: int | None = None):
    """Exact top-k of ``queries`` ((Q, n_words), the segments' word type: uint8/16/32 for
    codes of up to 4 bytes, else uint64) over ``segs``.

    A scan's running k-th distance starts at "anything" and tightens only as rows arrive,
    so with a large k most of the early blocks are re-scanned and most of their rows inserted
    and evicted again. Where k is large (>= 64), a 1/64 sample first gives each query a
    *seed*: the distance below which about k rows lie -- for a batch, from a scan of a copy of
    the sample before the full scan; for a lone query, from each thread's walk of its own
    sampled rows inside the one scan (a second pass and parallel region cost a lone query
    more than they saved). The full scan then takes only rows under the seed. A seed is a
    guess, so the answer is checked: a thread that kept k rows under its seed kept its own k
    nearest, and one that kept fewer lacks only rows at or above its seed, which cannot
    matter when the merged k-th lies below it; a query where that fails is scanned again
    with its seed one higher, and, should that fail too, unseeded."""
    queries, dmask, has_del = _scan_args(segs, queries, deleted)
    with threads_used(threads, segs.n_rows) as parts:
        unseeded = np.full(len(queries), bits + 1, dtype=np.int32)
        seed = _seeds(segs, queries, k, bits, dmask, has_del, parts)
        # a lone query's own sample, walked with span minima, costs ~1/64 of its reads: it pays
        # from k=64 (10^7 codes, alternated A/B vs the unseeded walk: k=100 +2%, k=1000 +4%;
        # a histogram of the sample's distances had cost more than it saved below k=512)
        lone = len(queries) == 1 and k >= LONE_SEED_K and segs.n_rows >= 64 * k
        need = k // (SAMPLE_EVERY * parts) + SEED_MARGIN if lone else 0
        args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words)
        dist, rows, exact = topk_kernel(*args, queries, k, bits, dmask, has_del, parts,
                                        unseeded if seed is None else seed, need,
                                        _pools(parts, len(queries), k))
        again = np.flatnonzero(~exact)
        if len(again) and seed is not None:
            # a seed one too low (the sample over-counted its last distance) is the usual
            # miss: one step up is exact unless that distance is short of rows too
            up = np.minimum(seed[again] + 1, bits + 1).astype(np.int32)
            dist[again], rows[again], ok = topk_kernel(*args, queries[again], k, bits, dmask,
                                                       has_del, parts, up, 0,
                                                       _pools(parts, len(again), k))
            again = again[~ok]
        if len(again):
            dist[again], rows[again], _ = topk_kernel(*args, queries[again], k, bits, dmask,
                                                      has_del, parts, unseeded[again], 0,
                                                      _pools(parts, len(again), k))
        return dist, rows


def _seeds(segs: Segments, queries, k, bits, dmask, has_del, parts):
    """Per query, one more than the distance of the sample's (k / SAMPLE_EVERY +
    SEED_MARGIN)-th nearest row; None where seeding would not pay (small k, or too few rows)."""
    # a lone query's scan is bound by reading the codes, and its re-scans hit cache: the
    # sample's extra pass and parallel region cost it more than they save (measured: k=1000
    # at 10^7 codes, 4.5 ms seeded vs 3.5 ms not)
    if len(queries) < GROUP or k < 64 or segs.n_rows < max(64 * k, 16 * SMALL_BLOCK * SAMPLE_EVERY):
        return None
    span = SMALL_BLOCK * SAMPLE_EVERY
    spans = [min(len(a), segs.n_rows - s * segs.seg_rows) // span for s, a in enumerate(segs.arrays)]
    sample = np.empty((sum(spans) * SMALL_BLOCK, segs.n_words), dtype=segs.dtype)
    pos, rows = 0, []
    for s, (a, ns) in enumerate(zip(segs.arrays, spans)):
        # one strided copy straight into place (np.concatenate of the views took ~1 ms here)
        sample[pos:pos + ns * SMALL_BLOCK].reshape(ns, SMALL_BLOCK, segs.n_words)[:] = \
            a[:ns * span].reshape(ns, SAMPLE_EVERY, SMALL_BLOCK, segs.n_words)[:, 0]
        pos += ns * SMALL_BLOCK
        if has_del:
            local = (np.arange(0, ns * span, span)[:, None] + np.arange(SMALL_BLOCK)).ravel()
            rows.append(s * segs.seg_rows + local)
    k_s = k // SAMPLE_EVERY + SEED_MARGIN
    if len(sample) < 8 * k_s:  # segments shorter than a sample span
        return None
    smask = dmask[np.concatenate(rows)] if has_del else dmask
    sparts = _parts(len(sample), parts)
    d, _, _ = topk_kernel(np.array([sample.ctypes.data], dtype=np.int64), max(len(sample), 1),
                          len(sample), segs.n_words, queries, k_s, bits, smask, has_del, sparts,
                          np.full(len(queries), bits + 1, dtype=np.int32), 0,
                          _pools(sparts, len(queries), k_s))
    seed = d[:, -1] + 1
    seed[d[:, -1] < 0] = bits + 1  # too few sampled rows alive: no seed
    return seed.astype(np.int32)


def range_search(segs: Segments, queries, radius, bits, deleted=None, threads: int | None = None):
    """All rows within ``radius`` of each query: (lims, distances, rows), faiss' layout
    (query i's results are [lims[i], lims[i+1])), each query's results by (distance, row)."""
    queries, dmask, has_del = _scan_args(segs, queries, deleted)
    with threads_used(threads, segs.n_rows) as parts:
        return _range_search(segs, queries, radius, bits, dmask, has_del, parts)


def _range_search(segs, queries, radius, bits, dmask, has_del, parts):
    """One pass into per-(thread, query) buffers of ``cap`` rows; where one overflows (a
    radius that finds many rows), a second, exact pass: count, then fill at known offsets."""
    args = (segs.addrs, segs.seg_rows, segs.n_rows, segs.n_words, queries, radius, bits, dmask, has_del)
    nq = len(queries)
    cap = int(max(64, min(4096, (1 << 21) // (parts * nq))))
    offsets = (np.arange(parts * nq, dtype=np.int64) * cap).reshape(parts, nq)
    buf_rows = np.empty(parts * nq * cap, dtype=np.int64)
    buf_dist = np.empty(parts * nq * cap, dtype=np.int32)
    counts = np.zeros((parts, nq), dtype=np.int64)
    range_kernel(*args, parts, offsets, buf_rows, buf_dist, True, cap, counts)
    per_q = counts.sum(axis=0)
    lims = np.zeros(nq + 1, dtype=np.int64)
    lims[1:] = np.cumsum(per_q)
    rows = np.empty(lims[-1], dtype=np.int64)
    dist = np.empty(lims[-1], dtype=np.int32)
    if counts.max(initial=0) <= cap:
        _range_results(counts, offsets, buf_rows, buf_dist, lims, bits, rows, dist)
    else:
        exact = np.empty_like(counts)
        exact[0] = lims[:-1]
        if parts > 1:
            exact[1:] = lims[:-1] + np.cumsum(counts, axis=0)[:-1]
        buf_rows, buf_dist = np.empty_like(rows), np.empty_like(dist)
        range_kernel(*args, parts, exact, buf_rows, buf_dist, True, 0, np.zeros_like(counts))
        _range_results(counts, exact, buf_rows, buf_dist, lims, bits, rows, dist)
    return lims, dist, rows


@njit(nogil=True, cache=True)
def _range_results(counts, offsets, buf_rows, buf_dist, lims, bits, rows, dist):
    """Each query's rows, from its per-thread buffers (thread t's rows at offsets[t, q],
    ascending, threads in row order) into rows/dist[lims[q]:lims[q + 1]] by (distance, row):
    a counting sort on the distance, stable, so rows stay ascending within a distance. (The
    numpy gather and argsort this replaces cost ~50 us a call, 5% of one query's scan of
    10^6 256-bit codes.)"""
    n_parts, n_q = counts.shape
    at = np.zeros(bits + 2, dtype=np.int64)
    for qi in range(n_q):
        at[:] = 0
        for t in range(n_parts):
            for j in range(offsets[t, qi], offsets[t, qi] + counts[t, qi]):
                at[buf_dist[j] + 1] += 1
        at[0] = lims[qi]
        for d in range(1, bits + 2):
            at[d] += at[d - 1]
        for t in range(n_parts):
            for j in range(offsets[t, qi], offsets[t, qi] + counts[t, qi]):
                p = at[buf_dist[j]]
                rows[p] = buf_rows[j]
                dist[p] = buf_dist[j]
                at[buf_dist[j]] = p + 1


# -- the machine's limits, measured the way the scan runs (for benchmarks/search.py) ------------
def _xor_lines(ahead):
    """An intrinsic XOR-reducing ``n`` 128-byte chunks of a 1-D uint64 array from its
    start, as the one-word first level loads them; ``ahead`` > 0: asking for the line that
    many bytes on with each one, as the lone first level does."""
    @intrinsic
    def xor_lines(typingctx, arr, n):
        def codegen(context, builder, signature, args):
            vty = ir.VectorType(ir.IntType(64), 16)
            base = _data(context, builder, signature.args[0], args[0], ir.Constant(ir.IntType(64), 0))
            acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [0] * 16))
            with cgutils.for_range(builder, args[1]) as loop:
                at = builder.gep(base, [builder.mul(loop.index, ir.Constant(loop.index.type, 16))])
                if ahead:
                    _prefetch_ir(builder, at, ahead, 128)
                x = builder.load(builder.bitcast(at, vty.as_pointer()), align=8)
                builder.store(builder.xor(builder.load(acc), x), acc)
            v = builder.load(acc)
            out = builder.extract_element(v, ir.Constant(ir.IntType(32), 0))
            for i in range(1, 16):
                out = builder.xor(out, builder.extract_element(v, ir.Constant(ir.IntType(32), i)))
            _prefer_wide(builder)
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
    """``_pass4`` -- the scan's first level for one-word codes: XOR + popcount + running
    minimum, 4 queries per load -- over an L1-resident block, ``reps`` times on each thread:
    the scan's inner loop with nothing around it. ``lim``: thresholds read at run time, so
    that LLVM cannot fold the compares away."""
    n = block.shape[0] // (128 // block.itemsize)
    for t in prange(parts):
        acc = np.uint64(0)
        for r in range(reps):  # queries change per rep, so no rep can be hoisted
            q = queries[r % queries.shape[0]]
            acc += _pass4(block, 0, n, q[0], q[1], q[2], q[3], lim[0], lim[1], lim[2], lim[3])
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
