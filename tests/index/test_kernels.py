import numpy as np
import pytest

from hashret.index import HashIndex, kernels, pack_codes, sign_codes, unpack_codes


def brute_distances(db_packed, q_packed):
    x = np.unpackbits(db_packed[None, :, :] ^ q_packed[:, None, :], axis=2)
    return x.sum(axis=2).astype(np.int64)


def brute_topk(db_packed, q_packed, k, removed=()):
    d = brute_distances(db_packed, q_packed)
    alive = np.setdiff1d(np.arange(len(db_packed)), np.asarray(removed, dtype=int))
    k = min(k, len(db_packed))  # results have min(k, rows) columns
    out_d = np.full((len(q_packed), k), -1)
    out_r = np.full((len(q_packed), k), -1)
    for i, row in enumerate(d):
        order = alive[np.lexsort((alive, row[alive]))][:k]  # by distance, then row
        out_d[i, : len(order)] = row[order]
        out_r[i, : len(order)] = order
    return out_d, out_r


def test_bit_convention_is_pinned():
    # +1 -> bit 1, sign(0) -> +1, most significant bit first (np.packbits order)
    codes = np.array([[1, -1, -1, -1, -1, -1, -1, 0.0, -2, -1, -1, -1, -1, -1, -1, 3]])
    np.testing.assert_array_equal(pack_codes(codes), [[0b10000001, 0b00000001]])
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes)), sign_codes(codes))
    assert sign_codes(np.array([0.0, -0.0, 1e-30, -1e-30])).tolist() == [1, 1, 1, -1]


@pytest.mark.parametrize("bits", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("n,k", [(1, 4), (37, 10), (2049, 100), (5003, 7), (5003, 300)])  # 300: the small-block path
def test_topk_equals_brute_force(bits, n, k):
    rng = np.random.default_rng(bits * 7 + n)
    # few distinct codes -> many ties, which must resolve by row
    pool = rng.integers(0, 256, size=(max(3, n // 20), bits // 8), dtype=np.uint8)
    db = pool[rng.integers(0, len(pool), size=n)]
    q = rng.integers(0, 256, size=(9, bits // 8), dtype=np.uint8)
    index = HashIndex(bits)
    index.add(db)
    d, ids = index.search(q, k)
    bd, br = brute_topk(db, q, k)
    np.testing.assert_array_equal(d, bd)
    np.testing.assert_array_equal(ids, br)


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 128, 192, 256])
def test_a_lone_query_takes_its_own_path_and_equals_brute_force(bits):
    # one query walks each thread's rows in spans with its own minimum test (not the grouped
    # path): ties, removals (a span entirely removed too), k = 1, small and large-k spans
    import numba

    rng = np.random.default_rng(bits + 11)
    pool = rng.integers(0, 256, size=(40, bits // 8), dtype=np.uint8)
    db = pool[rng.integers(0, len(pool), size=20000)]
    index = HashIndex(bits)
    index.add(db)
    removed = np.concatenate([np.arange(3000, 4100), rng.choice(20000, 500, replace=False)])
    index.remove(removed)
    q = np.vstack([db[7], rng.integers(0, 256, size=bits // 8, dtype=np.uint8)])
    threads = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
    for qq in (q[:1], q[1:]):
        for t in threads:
            for k in (1, 10, 300):
                d, ids = index.search(qq, k, threads=t)
                bd, br = brute_topk(db, qq, k, removed)
                np.testing.assert_array_equal(d, bd)
                np.testing.assert_array_equal(ids, br)
            radius = bits // 3
            lims, dist, ids = index.range_search(qq, radius, threads=t)
            full = brute_distances(db, qq)[0]
            rows = np.setdiff1d(np.flatnonzero(full <= radius), removed)
            rows = rows[np.lexsort((rows, full[rows]))]
            np.testing.assert_array_equal(ids, rows)
            np.testing.assert_array_equal(dist, full[rows])


@pytest.mark.parametrize("bits", [8, 16, 32, 64, 128, 256])
def test_removed_rows_never_come_back(bits):
    rng = np.random.default_rng(bits)
    db = rng.integers(0, 256, size=(3001, bits // 8), dtype=np.uint8)
    q = np.vstack([db[:5], rng.integers(0, 256, size=(3, bits // 8), dtype=np.uint8)])
    index = HashIndex(bits)
    index.add(db)
    removed = np.concatenate([np.arange(0, 3001, 3), [1, 2, 4]])
    index.remove(removed)
    d, ids = index.search(q, 50)
    bd, br = brute_topk(db, q, 50, removed)
    np.testing.assert_array_equal(d, bd)
    np.testing.assert_array_equal(ids, br)
    assert len(index) == 3001 - len(np.unique(removed))


def test_k_larger_than_the_index_gives_every_row_and_minus_one_for_removed():
    db = np.array([[1], [2], [3]], dtype=np.uint8)
    index = HashIndex(8)
    index.add(db)
    index.remove([1])
    d, ids = index.search(np.array([[3]], dtype=np.uint8), 5)
    assert ids.tolist() == [[2, 0, -1]] and d.tolist() == [[0, 1, -1]]
    # a huge k costs O(queries x rows), not O(k): no 2**40-wide allocation
    d, ids = index.search(np.array([[3], [1]], dtype=np.uint8), 2**40)
    assert ids.shape == (2, 3) and ids[1].tolist() == [0, 2, -1]
    assert HashIndex(8).search(np.array([[3]], dtype=np.uint8), 10)[1].shape == (1, 0)


@pytest.mark.parametrize("bits", [8, 16, 32, 64, 128, 256])
@pytest.mark.parametrize("radius", [0, 3, 40])
def test_range_search_equals_brute_force(bits, radius):
    rng = np.random.default_rng(radius + bits)
    db = rng.integers(0, 256, size=(2500, bits // 8), dtype=np.uint8)
    db[::7] = db[0]  # exact duplicates
    q = np.vstack([db[:2], rng.integers(0, 256, size=(5, bits // 8), dtype=np.uint8)])
    index = HashIndex(bits)
    index.add(db)
    index.remove([7, 14])
    lims, dist, ids = index.range_search(q, radius)
    full = brute_distances(db, q)
    for i in range(len(q)):
        rows = np.array([r for r in np.flatnonzero(full[i] <= radius) if r not in (7, 14)], dtype=int)
        rows = rows[np.lexsort((rows, full[i][rows]))]
        np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
        np.testing.assert_array_equal(dist[lims[i]:lims[i + 1]], full[i][rows])


def test_real_valued_queries_are_packed_the_same_way():
    rng = np.random.default_rng(1)
    real = rng.standard_normal((200, 32))
    index = HashIndex(32)
    index.add(real)
    d1, i1 = index.search(real[:4], 10)
    d2, i2 = index.search(pack_codes(real[:4]), 10)
    np.testing.assert_array_equal(i1, i2)
    assert (d1[:, 0] == 0).all() and (i1[:, 0] == np.arange(4)).all()


@pytest.mark.parametrize("bits,word_bytes", [(8, 1), (16, 2), (24, 4), (32, 4), (40, 8), (64, 8), (128, 16)])
def test_short_codes_take_their_own_bytes_in_memory(bits, word_bytes, tmp_path):
    db = np.random.default_rng(bits).integers(0, 256, size=(1000, bits // 8), dtype=np.uint8)
    index = HashIndex(bits)
    index.add(db)
    assert index.info()["memory_bytes"] == 1000 * word_bytes
    np.testing.assert_array_equal(index.packed_codes(), db)
    with index.write(tmp_path / "ix") as on_disk, HashIndex.open(tmp_path / "ix") as back:
        # whole words are scanned in LMDB's map; codes that need padding are copied, padded
        assert back.info()["mapped"] == (word_bytes * 8 == bits)
        assert back.info()["memory_bytes"] == (0 if word_bytes * 8 == bits else 1000 * word_bytes)
        assert back.info()["code_bytes"] == 1000 * word_bytes
        np.testing.assert_array_equal(back.search(db[:5], 9)[1], brute_topk(db, db[:5], 9)[1])
        assert on_disk.n_rows == 1000


def test_threads_argument_gives_the_same_answer():
    db = np.random.default_rng(3).integers(0, 256, size=(20000, 8), dtype=np.uint8)
    index = HashIndex(64)
    index.add(db)
    one = index.search(db[:7], 25, threads=1)
    both = index.search(db[:7], 25, threads=2) if __import__("numba").config.NUMBA_NUM_THREADS >= 2 else one
    for a, b in zip(one, both):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(Exception, match="threads must be an integer"):
        index.search(db[:1], 3, threads=0)


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 128, 256])
def test_scan_in_lmdb_chunks_equals_brute_force(bits, tmp_path):
    # codes read where LMDB maps them: chunks of 1000 rows (not a multiple of a tile), some
    # small enough to sit inside a B-tree page (unaligned), a partial last chunk, removals
    import numba

    rng = np.random.default_rng(bits + 1)
    pool = rng.integers(0, 256, size=(300, bits // 8), dtype=np.uint8)
    db = pool[rng.integers(0, len(pool), size=5321)]
    q = np.vstack([db[:3], rng.integers(0, 256, size=(6, bits // 8), dtype=np.uint8)])
    with HashIndex.create(tmp_path / "ix", bits, chunk_size=1000) as index:
        index.add(db[:3])  # a 3-row chunk first: a value inside a leaf page
        index.add(db[3:])
        index.remove([5, 1000, 1001, 4321])
    removed = [5, 1000, 1001, 4321]
    threads = [1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]
    with HashIndex.open(tmp_path / "ix") as back:
        assert len(back._rows.snap.codes) == 6
        for t in threads:
            for k in (1, 10, 2500):
                for qq in (q, q[3:4]):  # the grouped path and a lone query's
                    d, ids = back.search(qq, k, threads=t)
                    bd, br = brute_topk(db, qq, k, removed)
                    np.testing.assert_array_equal(d, bd)
                    np.testing.assert_array_equal(ids, br)
            lims, dist, ids = back.range_search(q, bits // 4, threads=t)
            full = brute_distances(db, q)
            for i in range(len(q)):
                rows = np.array([r for r in np.flatnonzero(full[i] <= bits // 4) if r not in removed], dtype=int)
                rows = rows[np.lexsort((rows, full[i][rows]))]
                np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
        np.testing.assert_array_equal(back.packed_codes([0, 999, 1000, 5320]), db[[0, 999, 1000, 5320]])


def test_range_search_that_overflows_its_one_pass_buffers_is_still_exact():
    # radius 3 of 16-bit codes finds ~1/100 of 10^6 rows; radius 16 finds all 30,000 rows,
    # far past the per-thread buffer of the one-pass path: the exact two-pass path answers
    rng = np.random.default_rng(5)
    db = rng.integers(0, 256, size=(30000, 2), dtype=np.uint8)
    index = HashIndex(16)
    index.add(db)
    index.remove([0, 29999])
    q = db[:3]
    full = brute_distances(db, q)
    for radius in (3, 16):
        lims, dist, ids = index.range_search(q, radius)
        for i in range(len(q)):
            rows = np.array([r for r in np.flatnonzero(full[i] <= radius) if r not in (0, 29999)], dtype=int)
            rows = rows[np.lexsort((rows, full[i][rows]))]
            np.testing.assert_array_equal(ids[lims[i]:lims[i + 1]], rows)
            np.testing.assert_array_equal(dist[lims[i]:lims[i + 1]], full[i][rows])


def test_seeded_scans_equal_brute_force_and_fall_back_when_a_seed_is_too_tight(tmp_path):
    # k >= 64 with a batch over >= 65,536 rows: a 1/64 block sample seeds each query's
    # threshold; ties, removals (sampled rows among them) and LMDB chunks must not matter
    from hashret.index import kernels

    rng = np.random.default_rng(12)
    pool = rng.integers(0, 256, size=(500, 8), dtype=np.uint8)
    db = pool[rng.integers(0, len(pool), size=70000)]
    q = rng.integers(0, 256, size=(9, 8), dtype=np.uint8)
    removed = np.concatenate([np.arange(0, 70000, 97), np.arange(4096, 4096 + 64)])
    words = np.ascontiguousarray(db).view(np.uint64)
    assert kernels._seeds(kernels.Segments.of(words), q.view(np.uint64).ravel(), 100, 64,
                          np.zeros(1, np.uint8), False, 2) is not None  # the path is taken
    index = HashIndex(64)
    index.add(db)
    index.remove(removed)
    with HashIndex.create(tmp_path / "ix", 64, chunk_size=5000) as on_disk:
        on_disk.add(db)
        on_disk.remove(removed)
    with HashIndex.open(tmp_path / "ix") as back:
        for ix in (index, back):
            for qq, ks in ((q, (64, 100, 1000)), (q[:1], (64, 600))):  # a lone query seeds >= 64
                for k in ks:
                    d, ids = ix.search(qq, k)
                    bd, br = brute_topk(db, qq, k, removed)
                    np.testing.assert_array_equal(d, bd)
                    np.testing.assert_array_equal(ids, br)

    # a sample that is not like the rest: its k_s rows at distance 1 and nothing else near, so
    # the seed admits fewer than k rows, and so does the seed one higher: every query is
    # scanned a third time, without one
    far = np.full((140000, 8), 0xFF, dtype=np.uint8)
    qq = np.zeros((4, 8), dtype=np.uint8)
    k = 2000
    sampled = (np.arange(0, 140000 - 140000 % 4096, 4096)[:, None] + np.arange(64)).ravel()
    k_s = k // kernels.SAMPLE_EVERY + kernels.SEED_MARGIN
    near = sampled[:: len(sampled) // k_s][:k_s]
    far[near] = 0
    far[near, 0] = 1
    seed = kernels._seeds(kernels.Segments.of(far.view(np.uint64)), qq.view(np.uint64).ravel(), k,
                          64, np.zeros(1, np.uint8), False, 2)
    assert (seed == 2).all()  # the seed's guess: fewer than k rows lie under it
    index = HashIndex(64)
    index.add(far)
    d, ids = index.search(qq, k)
    bd, br = brute_topk(far, qq, k)
    np.testing.assert_array_equal(d, bd)
    np.testing.assert_array_equal(ids, br)


def test_a_lone_query_whose_own_sample_misleads_it_is_scanned_again():
    # a lone query's threads each sample one 1,024-row span per 65,536 of their own rows
    # (starting at their first row); near rows only there make every thread's seed too tight
    import numba

    from hashret.index import kernels

    n, k = 140000, 2000
    db = np.full((n, 8), 0xFF, dtype=np.uint8)
    for start in (0, 65536, 131072, 70000, 135536):  # sampled spans with 1 thread and with 2
        db[start:start + 40] = 0
        db[start:start + 40, 0] = 1
    q = np.zeros((1, 8), dtype=np.uint8)
    words = db.view(np.uint64)
    for t in ([1, 2] if numba.config.NUMBA_NUM_THREADS >= 2 else [1]):
        segs = kernels.Segments.of(words)
        _, _, exact = kernels.topk_kernel(segs.addrs, segs.seg_rows, n, 1, q.view(np.uint64).ravel(),
                                          k, 64, np.zeros(1, np.uint8), False, t,
                                          np.full(1, 65, np.int32),
                                          k // (kernels.SAMPLE_EVERY * t) + kernels.SEED_MARGIN,
                                          kernels._pools(t, 1, k))
        assert not exact[0]  # the seed admitted 200 rows: the check catches it
        index = HashIndex(64)
        index.add(db)
        d, ids = index.search(q, k, threads=t)
        bd, br = brute_topk(db, q, k)
        np.testing.assert_array_equal(d, bd)
        np.testing.assert_array_equal(ids, br)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64])
def test_one_word_vector_tests_equal_their_scalar_definition(dtype):
    # the first level's vector minima (_pass1/_pass4: per query, 16 lane bits, bit l for the
    # rows at offsets l mod 16) and the second level's 64-row masks (_below64, _set64) and
    # one-lane rows (_one_lane) are written by hand: each against its plain definition
    from numba import njit

    from hashret.index import intrinsics as kn
    from hashret.index import scans

    @njit
    def masks(arr, pos, q, t, dead):
        return kn.below64(arr, pos, q, t), kn.set64(dead, pos)

    @njit
    def one_lane(arr, lo, hi, lane, q, t):
        return scans._one_lane(arr, lo, hi, lane, q, t)

    @njit
    def passes(arr, pos, n, qs, ts):
        one = kn.pass1(arr, pos, n, qs[0], ts[0])
        return one, kn.pass4(arr, pos, n, qs[0], qs[1], qs[2], qs[3], ts[0], ts[1], ts[2], ts[3])

    bits = np.dtype(dtype).itemsize * 8
    rng = np.random.default_rng(bits)
    arr = rng.integers(0, 2**bits, size=3000, dtype=np.uint64).astype(dtype)
    dead = (rng.random(3000) < 0.3).astype(np.uint8)

    def dist(rows, q):
        x = (rows ^ dtype(q)).astype(np.uint64)
        return np.unpackbits(x.view(np.uint8)).reshape(len(rows), 64).sum(axis=1)

    ch = 1024 // bits
    for _ in range(40):
        pos = int(rng.integers(0, 3000 - 64 * 8))
        q = rng.integers(0, 2**bits, size=4, dtype=np.uint64).astype(dtype)
        t = int(rng.integers(0, bits + 2))
        m, dm = masks(arr, pos, q[0], t, dead)
        want = sum(1 << i for i, d in enumerate(dist(arr[pos:pos + 64], q[0])) if d < t)
        assert int(m) == want
        assert int(dm) == sum(1 << i for i in range(64) if dead[pos + i])
        n = int(rng.integers(0, (3000 - pos) // ch + 1))
        ts = rng.integers(0, bits + 2, size=4)
        one, four = passes(arr, pos, n, q, ts)
        rows = arr[pos:pos + n * ch]
        lanes = [sum(1 << lane for lane in {o % 16 for o, d in enumerate(dist(rows, q[j])) if d < ts[j]})
                 for j in range(4)]
        assert int(one) == lanes[0]
        assert int(four) == sum(lanes[j] << (16 * j) for j in range(4))
        lane, hi = int(rng.integers(0, 16)), pos + int(rng.integers(0, 513))
        got = one_lane(arr, pos, hi, lane, q[0], t)
        at = np.arange(pos + lane, hi, 16)
        assert int(got) == sum(1 << i for i, d in enumerate(dist(arr[at], q[0])) if d < t)


@pytest.mark.parametrize("n_words", [2, 3, 4])
def test_multi_word_vector_tests_equal_their_scalar_definition(n_words):
    # codes of 2-4 words: 8 rows a load split into their words by shuffles (_multiword), hand-
    # written IR like the one-word tests, each against distances from np.unpackbits
    from numba import njit

    from hashret.index import intrinsics as kn

    first1, first4, below64 = kn._multiword(n_words)

    @njit
    def run(arr, pos, n, queries, thr):
        return (first1(arr, pos, n, queries, 0, thr), first4(arr, pos, n, queries, 0, 1, 2, 3, thr),
                below64(arr, pos, queries, 0, thr[0]))

    rng = np.random.default_rng(n_words)
    rows = rng.integers(0, 2**63, size=(2000, n_words), dtype=np.uint64)
    rows[::3] &= np.uint64(0x00FF00FF00FF00FF)  # near rows, so thresholds cut both ways
    flat = rows.ravel()

    def dist(block, q):
        return np.unpackbits((block ^ q).view(np.uint8), axis=1).sum(axis=1)

    for _ in range(30):
        pos = int(rng.integers(0, 2000 - 64 - 8 * 8))
        queries = rows[rng.integers(0, 2000, size=4)] ^ rng.integers(0, 2**63, size=(4, n_words),
                                                                     dtype=np.uint64) & np.uint64(0x0101)
        n = int(rng.integers(0, (2000 - pos) // 8 + 1))
        near = [dist(rows[pos:pos + 8 * n], queries[j]) for j in range(4)]
        thr = np.array([(int(d.min()) if n else 0) + int(rng.integers(0, 2)) for d in near],
                       dtype=np.int64)
        one, four, mask = run(flat, pos, n, queries, thr)
        hit = [n > 0 and near[j].min() < thr[j] for j in range(4)]
        # loops and multi-word IR do not say which rows: all 16 lane bits of a query or none
        assert int(one) == 0xFFFF * hit[0]
        assert int(four) == sum(0xFFFF << (16 * j) for j in range(4) if hit[j])
        d64 = dist(rows[pos:pos + 64], queries[0])
        assert int(mask) == sum(1 << i for i, d in enumerate(d64) if d < thr[0])


@pytest.mark.parametrize("k", [2, 7, 100, 700])
def test_best_k_lists_keep_ties_by_row_through_compaction(k):
    # two threads' lists fed rows in order, as the scans feed them. Thread 0's rows make its
    # list fill up while its threshold sits at the final k-th distance (9) with rows there
    # still needed: j levels of k rows each, falling to 9, then k - 1 rows at 5; compaction
    # must keep the first rows at 9 and may drop the rest. Thread 1: random distances.
    from hashret.index import bestk

    bits, cap = 64, 2 * k + 16
    j = cap // k
    first = np.concatenate([np.full(k, 9 + 2 * (j - 1 - i)) for i in range(j)] + [np.full(k - 1, 5)])
    rng = np.random.default_rng(k)
    second = rng.binomial(bits, 0.5, size=3000)
    dist = np.concatenate([first, second]).astype(np.int32)
    n, split = len(dist), [np.arange(len(first)), np.arange(len(first), len(dist))]
    pool = np.full((2, 1, cap), -7, dtype=np.int64)
    fill = np.zeros((2, 1), dtype=np.int64)
    size = np.zeros((2, 1), dtype=np.int64)
    for t, rows in enumerate(split):
        thr = np.full(1, bits + 1, dtype=np.int32)
        below = np.zeros(1, dtype=np.int64)
        cnt = np.zeros((1, bits + 2), dtype=np.int32)
        for i in rows:
            if dist[i] < thr[0]:
                bestk.offer(i, dist[i], t, 0, k, thr, size, below, cnt, pool, fill)
        # the threshold is the thread's own k-th distance: nothing it turned away was needed
        assert thr[0] == np.sort(dist[rows])[k - 1]
    assert size[0, 0] > cap and fill[0, 0] < cap  # thread 0's list compacted
    out_d = np.empty((1, k), dtype=np.int32)
    out_r = np.empty((1, k), dtype=np.int64)
    bestk.merge_one(0, bits, pool, fill, np.empty(bits + 2, dtype=np.int64), out_d, out_r)
    order = np.lexsort((np.arange(n), dist))[:k]
    np.testing.assert_array_equal(out_r[0], order)
    np.testing.assert_array_equal(out_d[0], dist[order])


@pytest.mark.parametrize("bits", [8, 16, 24, 32, 64, 128, 256])
def test_picked_rows_equal_brute_force_wherever_they_lie(bits, tmp_path):
    # a filter's listed rows, in any order, read where LMDB maps them (chunks of 1000 rows,
    # a partial last one): distances, ties by row, fewer rows than k; their copy and a mask's rows
    rng = np.random.default_rng(bits + 7)
    pool = rng.integers(0, 256, size=(40, bits // 8), dtype=np.uint8)  # many ties
    db = pool[rng.integers(0, len(pool), size=3210)]
    q = np.vstack([db[:2], rng.integers(0, 256, size=(3, bits // 8), dtype=np.uint8)])
    with HashIndex.create(tmp_path / "ix", bits, chunk_size=1000) as index:
        index.add(db)
    with HashIndex.open(tmp_path / "ix") as back:
        segs = back.segments()
        words = back._query_words(q)
        full = brute_distances(db, q)
        for rows in (rng.permutation(3210)[:700], np.array([3209, 0, 1000, 999]), np.zeros(0, np.int64)):
            for k in (1, 10, 900):
                d, r = kernels.pick_topk(segs, words, rows, k, bits)
                assert d.shape == r.shape == (len(q), k)
                for i in range(len(q)):
                    order = rows[np.lexsort((rows, full[i][rows]))][:k]
                    np.testing.assert_array_equal(r[i, :len(order)], order)
                    np.testing.assert_array_equal(d[i, :len(order)], full[i][order])
                    assert (r[i, len(order):] == -1).all() and (d[i, len(order):] == -1).all()
            np.testing.assert_array_equal(kernels.gather(segs, rows, bits), segs.rows(rows))
            for k in (1, 10, 900):  # the same rows side by side (a list's copy): every distance, one thread
                d, r = kernels.span_topk(segs.rows(rows), words, k, bits, rows, 3210)
                for i in range(len(q)):
                    order = rows[np.lexsort((rows, full[i][rows]))][:k]
                    np.testing.assert_array_equal(r[i, :len(order)], order)
                    np.testing.assert_array_equal(d[i, :len(order)], full[i][order])
                    assert (r[i, len(order):] == -1).all() and (d[i, len(order):] == -1).all()
        keep = rng.random(3210) < 0.3
        np.testing.assert_array_equal(kernels.kept_rows(keep, bits), np.flatnonzero(keep))
        np.testing.assert_array_equal(kernels.kept_rows(keep, bits, threads=1), np.flatnonzero(keep))
        rows, words = kernels.kept_rows(keep, bits, segs=segs)
        np.testing.assert_array_equal(rows, np.flatnonzero(keep))
        np.testing.assert_array_equal(words, segs.rows(rows))
