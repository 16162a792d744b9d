"""LLVM intrinsics the scans are built of: popcount, loads by address, prefetch, and the
one-word and multi-word first and second levels written as vector IR; and the scan's
geometry (tile, span and block sizes).

Wide vectors: Numba compiles for the host CPU with LLVM's tuning for it, which on AVX-512
server chips prefers 256-bit vectors, so popcount loops ran on ymm registers at half the
width the hardware has. ``wide()`` marks the LLVM function it is inlined into with
``prefer-vector-width``/``min-legal-vector-width`` = 512: LLVM picks the subtarget per
function, so hashret's scan loops get zmm registers and a user's other Numba code compiles as
it always did (no NUMBA_CPU_FEATURES, nothing process-wide). On CPUs without AVX-512 the
attribute changes nothing.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


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
def popcount(typingctx, x):
    """LLVM's ctpop: vectorises to vpopcntq where the CPU has it (np.bitwise_count does
    not compile inside numba)."""
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)])
        return builder.call(fn, args)

    return sig, codegen


def prefer_wide(builder):
    attrs = builder.function.attributes
    # llvmlite validates attribute names against a fixed list without string attributes
    set.add(attrs, '"prefer-vector-width"="512"')
    set.add(attrs, '"min-legal-vector-width"="512"')


@intrinsic
def wide(typingctx):
    """Prefer 512-bit vectors in the function this is inlined into (see the module's notes)."""
    def codegen(context, builder, signature, args):
        prefer_wide(builder)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def load_at(typingctx, addr):
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


def array_data(context, builder, arr_type, arr, pos):
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


def prefetch_ir(builder, ptr, ahead=0, nbytes=64):
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
def prefetch(typingctx, arr, pos):
    """Ask for the cache line holding arr[pos] (a 1-D array), for reading."""
    def codegen(context, builder, signature, args):
        prefetch_ir(builder, array_data(context, builder, signature.args[0], args[0], args[1]))
        return context.get_dummy_value()

    return types.none(arr, types.intp), codegen


@intrinsic
def below64(typingctx, arr, pos, q, thr):
    """Bit i set where popcount(arr[pos + i] ^ q) < thr, for the 64 one-word rows from
    ``pos`` of the 1-D array ``arr``: one <64 x word> XOR, popcount and compare that LLVM
    splits into the widest registers it may use, and no horizontal reduction."""
    sig = types.uint64(arr, types.intp, arr.dtype, types.intp)
    width = arr.dtype.bitwidth

    def codegen(context, builder, signature, args):
        a, p, qv, t = args
        ity = ir.IntType(width)
        vty = ir.VectorType(ity, 64)
        ptr = builder.bitcast(array_data(context, builder, signature.args[0], a, p), vty.as_pointer())
        x = builder.xor(builder.load(ptr, align=width // 8), _splat(builder, qv, 64))
        t = builder.trunc(t, ity) if width < 64 else t
        below = builder.icmp_unsigned("<", builder.call(_vector_fn(builder, "ctpop", vty, 1), [x]),
                                      _splat(builder, t, 64))
        prefer_wide(builder)
        return builder.bitcast(below, ir.IntType(64))

    return sig, codegen


@intrinsic
def set64(typingctx, arr, pos):
    """Bit i set where the byte arr[pos + i] is not 0, i < 64 (the removed-rows mask)."""
    sig = types.uint64(arr, types.intp)

    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.IntType(8), 64)
        ptr = builder.bitcast(array_data(context, builder, signature.args[0], *args), vty.as_pointer())
        nz = builder.icmp_unsigned("!=", builder.load(ptr, align=1), ir.Constant(vty, [0] * 64))
        return builder.bitcast(nz, ir.IntType(64))

    return sig, codegen


@intrinsic
def lowest(typingctx, x):
    """The index of the lowest set bit of a non-zero uint64."""
    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, [i64, ir.IntType(1)]),
                                            "llvm.cttz.i64")
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return types.intp(types.uint64), codegen


def _passes_codegen(nq):
    """Codegen of ``pass1``/``pass4``: bits 16j..16j+15 of the result are query j's lanes
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
        base = array_data(context, builder, signature.args[0], a, p)
        qv = [_splat(builder, q, ch) for q in qs]
        ctpop, umin = _vector_fn(builder, "ctpop", vty, 1), _vector_fn(builder, "umin", vty, 2)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(vty, [(1 << width) - 1] * ch))
                for _ in range(nq)]
        with cgutils.for_range(builder, n) as loop:
            off = builder.mul(loop.index, ir.Constant(loop.index.type, ch))
            at = builder.gep(base, [off])
            if nq == 1:  # a batch's tiles are asked for by its walk (``_prefetch_share``)
                prefetch_ir(builder, at, PREFETCH_ONE_WORD, 128)
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
        prefer_wide(builder)
        return out

    return codegen


@intrinsic
def pass1(typingctx, arr, pos, n, q, t):
    """``q``'s lanes over n chunks of 1024 / (word bits) one-word rows from ``pos`` of
    ``arr``: bit l set where a row at offset l mod 16 is below ``t`` (``_passes_codegen``)."""
    return types.uint64(arr, types.intp, types.intp, arr.dtype, types.intp), _passes_codegen(1)


@intrinsic
def pass4(typingctx, arr, pos, n, qa, qb, qc, qd, ta, tb, tc, td):
    """``pass1`` for four queries sharing each load: query j's lanes in bits 16j..16j+15."""
    w, i = arr.dtype, types.intp
    return types.uint64(arr, i, i, w, w, w, w, i, i, i, i), _passes_codegen(4)


def _multiword(w):
    """(first1, first4, below64): ``pass1``, ``pass4`` and ``below64`` for codes of ``w``
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
        base = array_data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
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
            prefetch_ir(builder, builder.gep(base, [off]), PREFETCH_WORDS, 64 * w)
            for i in range(w):
                ptr = builder.gep(base, [builder.add(off, ir.Constant(off.type, ch * i))])
                v = builder.load(builder.bitcast(ptr, rty.as_pointer()), align=8)
                parts.append(builder.call(ctpop, [builder.xor(v, qpat)]))
            while len(parts) > 1:
                parts = [builder.add(builder.shuffle_vector(x, y, evens),
                                     builder.shuffle_vector(x, y, odds))
                         for x, y in zip(parts[::2], parts[1::2])]
            builder.store(builder.call(umin, [builder.load(acc), parts[0]]), acc)
        prefer_wide(builder)
        return lanes_field(builder, builder.load(acc), tv)

    def first_codegen(nq):
        if nq == 1 and w in (2, 4):
            return lone_codegen

        def codegen(context, builder, signature, args):
            arr_t, q_t, t_t = signature.args[0], signature.args[3], signature.args[-1]
            a, p, n, qarr = args[:4]
            rows, tarr = args[4:4 + nq], args[4 + nq]
            base = array_data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
            qvs = [query(context, builder, q_t, qarr, r) for r in rows]
            tvs = [threshold(context, builder, t_t, tarr, r) for r in rows]
            umin = _vector_fn(builder, "umin", rty, 2)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(rty, [2**64 - 1] * ch))
                    for _ in range(nq)]
            with cgutils.for_range(builder, n) as loop:
                off = builder.mul(loop.index, ir.Constant(loop.index.type, 8 * w))
                if nq == 1:
                    prefetch_ir(builder, builder.gep(base, [off]), PREFETCH_WORDS, 64 * w)
                v = builder.load(builder.bitcast(builder.gep(base, [off]), vty.as_pointer()), align=8)
                for acc, qv in zip(accs, qvs):
                    builder.store(builder.call(umin, [builder.load(acc), distances(builder, v, qv)]), acc)
            out = ir.Constant(i64, 0)
            for j, (acc, tv) in enumerate(zip(accs, tvs)):
                field = lanes_field(builder, builder.load(acc), tv)
                out = builder.or_(out, builder.shl(field, ir.Constant(i64, LANES * j)))
            prefer_wide(builder)
            return out

        return codegen

    def below_codegen(context, builder, signature, args):
        arr_t, q_t = signature.args[0], signature.args[2]
        a, p, qarr, qi, t = args
        base = array_data(context, builder, arr_t, a, builder.mul(p, ir.Constant(p.type, w)))
        qv = query(context, builder, q_t, qarr, qi)
        tv = _splat(builder, t, ch)
        out = ir.Constant(i64, 0)
        for c in range(64 // ch):
            ptr = builder.bitcast(builder.gep(base, [ir.Constant(p.type, c * 8 * w)]), vty.as_pointer())
            below = builder.icmp_unsigned("<", distances(builder, builder.load(ptr, align=8), qv), tv)
            bits8 = builder.zext(builder.bitcast(below, ir.IntType(ch)), i64)
            out = builder.or_(out, builder.shl(bits8, ir.Constant(i64, c * ch)))
        prefer_wide(builder)
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


first1_w2, first4_w2, below64_w2 = _multiword(2)
first1_w3, first4_w3, below64_w3 = _multiword(3)
first1_w4, first4_w4, below64_w4 = _multiword(4)
