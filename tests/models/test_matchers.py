import math

import numpy as np
import pytest
import torch

from hashret.data.scenes import make_scenes
from hashret.models.distill import (HEAD_DEFAULTS, HEAD_PER_MATCHER, HEADS, LIST_FIRST_GAP, HashHead, distill_loss,
                                    head_loss, listwise_loss, pairs_only_loss, shuffled_rows, smoothing_loss,
                                    uses_matcher)
from hashret.models.matchers import (MATCHERS, build_matcher, hardest_triplet, masked_max, masked_softmax,
                                     softmax_triplet, sum_triplet)

SMALL = dict(embed=16, word_dim=8)
EXTRA = {"sgraf": dict(sim_dim=8, steps=2), "cgam": dict(heads=4, hidden=8)}


def _inputs(n_img=3, n_txt=4, n_o=5, d=12, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    regions = torch.rand(n_img, n_o, d, generator=g) * 3
    mask = torch.ones(n_img, n_o, dtype=torch.bool)
    mask[0, 3:] = False
    regions[~mask] = 0
    lengths = torch.tensor([5, 2, 4, 3][:n_txt])
    tokens = torch.randint(2, vocab, (n_txt, 5), generator=g)
    tokens[torch.arange(5)[None, :] >= lengths[:, None]] = 0
    return regions, mask, tokens, lengths


def _matcher(name, d=12, vocab=20):
    torch.manual_seed(0)
    return build_matcher(name, d, vocab, **SMALL, **EXTRA.get(name, {})).eval()


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_scores_shape_and_pairwise_consistency(name):
    m = _matcher(name)
    r, rm, t, tl = _inputs()
    with torch.no_grad():
        s = m(r, rm, t, tl)
        assert s.shape == (3, 4) and torch.isfinite(s).all()
        # one pair scored alone equals its entry in the full matrix
        one = m(r[1:2], rm[1:2], t[2:3], tl[2:3])
    assert torch.allclose(one[0, 0], s[1, 2], atol=1e-5)


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_region_order_padding_and_masks_change_nothing(name):
    m = _matcher(name)
    r, rm, t, tl = _inputs()
    with torch.no_grad():
        base = m(r, rm, t, tl)
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(m(r[:, perm], rm[:, perm], t, tl), base, atol=1e-5)
        # more padded regions holding garbage, and garbage tokens after each caption's end
        r2 = torch.cat([r, torch.randn(3, 4, 12) * 50], 1)
        rm2 = torch.cat([rm, torch.zeros(3, 4, dtype=torch.bool)], 1)
        r2[0, 3:5] = 77.0  # the masked slots of image 0 too
        t2 = torch.cat([t, torch.randint(2, 20, (4, 3))], 1)
        t2[1, 2:5] = 9
        assert torch.allclose(m(r2, rm2, t2, tl), base, atol=1e-5)
        # a caption alone, unpadded (the text encoder's unpacked path), scores as in the batch
        for j in range(len(tl)):
            alone = m(r, rm, t[j:j + 1, :tl[j]], tl[j:j + 1])
            assert torch.allclose(alone[:, 0], base[:, j], atol=1e-5)


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_gradients_reach_every_parameter(name):
    m = _matcher(name).train()
    r, rm, t, tl = _inputs(n_img=4)
    img, txt = m.encode_image(r, rm), m.encode_text(t, tl)
    terms = m.loss_terms(img, txt, epoch=0) if hasattr(m, "loss_terms") else [m.loss(m.pair_scores(img, txt), 0)]
    sum(terms).backward()
    # SAF's W_f feeds batch norm, which subtracts every constant, so its bias gets a gradient
    # of 0 in exact arithmetic (SGRAF's code has the bias too): rounding left it ~1e-9 on one
    # host and exactly 0 on another, so it is held to that instead of to "some gradient"
    by_norm = {n for n, _ in m.named_parameters() if n.endswith("saf.head.w_f.bias")}
    missing = [n for n, p in m.named_parameters()
               if n not in by_norm and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing, missing
    scale = max(float(p.grad.abs().max()) for p in m.parameters() if p.grad is not None)
    for n, p in m.named_parameters():
        if n in by_norm:
            assert p.grad is None or float(p.grad.abs().max()) <= 1e-6 * scale, n


def test_hash_head_ignores_region_order_and_padding():
    torch.manual_seed(0)
    head = HashHead(12, 20, bits=16, hidden=8, word_dim=4).eval()
    r, rm, t, tl = _inputs()
    with torch.no_grad():
        hi, ht = head.image(r, rm), head.text(t, tl)
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(2))
        assert torch.allclose(head.image(r[:, perm], rm[:, perm]), hi, atol=1e-5)
        r2 = torch.cat([r, torch.randn(3, 2, 12) * 9], 1)
        assert torch.allclose(head.image(r2, torch.cat([rm, torch.zeros(3, 2, dtype=torch.bool)], 1)), hi, atol=1e-5)
        t2 = torch.cat([t, torch.randint(2, 20, (4, 3))], 1)
        t2[1, 2:5] = 7
        assert torch.allclose(head.text(t2, tl), ht, atol=1e-5)


def test_masked_max_against_a_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, generator=g) - 5  # all negative: a max that saw padding would be wrong
    mask = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    got = masked_max(x, mask, -2)
    for i in range(3):
        kept = x[i][mask[i]]
        want = kept.max(0).values if len(kept) else torch.zeros(2)  # nothing kept -> 0
        assert torch.equal(got[i], want)


def test_hash_head_gradients_and_codes():
    head = HashHead(12, 20, bits=16, hidden=8, word_dim=4)
    r, rm, t, tl = _inputs(n_img=4)
    hi, ht = head.image(r, rm), head.text(t, tl)
    assert hi.shape == (4, 16) and ht.shape == (4, 16) and hi.abs().max() <= 1
    teacher = torch.randn(4, 4)
    distill_loss(teacher, hi, ht).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_triplet_losses_against_direct_sums():
    s = torch.tensor([[0.9, 0.8, 0.1], [0.95, 0.5, 0.2], [0.3, 0.6, 0.7]])
    m = 0.2
    hinges_rows = [[max(0.0, m + s[i, j].item() - s[i, i].item()) for j in range(3) if j != i] for i in range(3)]
    hinges_cols = [[max(0.0, m + s[j, i].item() - s[i, i].item()) for j in range(3) if j != i] for i in range(3)]
    total = sum(map(sum, hinges_rows)) + sum(map(sum, hinges_cols))
    hardest = sum(map(max, hinges_rows)) + sum(map(max, hinges_cols))
    assert sum_triplet(s, m).item() == pytest.approx(total, abs=1e-6)
    assert softmax_triplet(s, m, p=1.0).item() == pytest.approx(total, abs=1e-6)  # HAN, p = 1
    assert hardest_triplet(s, m).item() == pytest.approx(hardest, abs=1e-6)
    p = 3.0
    direct = sum(sum(h ** p for h in row) ** (1 / p) for row in hinges_rows + hinges_cols)
    assert softmax_triplet(s, m, p=p).item() == pytest.approx(direct, abs=1e-5)
    assert softmax_triplet(s, m, p=200.0).item() == pytest.approx(hardest, rel=0.02)  # p -> inf
    # a perfectly separated matrix costs nothing and its gradient is finite
    sep = torch.eye(3, requires_grad=True)
    softmax_triplet(sep, m, p=4.0).backward()
    assert torch.isfinite(sep.grad).all()


def test_distill_loss_is_zero_only_when_the_student_matches_the_teacher():
    teacher = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    good = distill_loss(teacher, h, h, tau_teacher=1.0, tau_student=0.05, quantization=0.0, hard_weight=0.0)
    bad = distill_loss(teacher, h, -h, tau_teacher=1.0, tau_student=0.05, quantization=0.0, hard_weight=0.0)
    assert good.item() < bad.item()
    # the KL of the rows against a direct computation
    t = (teacher - teacher.mean()) / teacher.std()
    s = h @ h.T / 2 / 0.05
    p_rows, q_rows = torch.softmax(t, 1), torch.log_softmax(s, 1)
    direct = (p_rows * (torch.log(p_rows) - q_rows)).sum(1).mean()
    p_cols, q_cols = torch.softmax(t, 0), torch.log_softmax(s, 0)
    direct = direct + (p_cols * (torch.log(p_cols) - q_cols)).sum(0).mean()
    assert good.item() == pytest.approx(direct.item(), rel=1e-5)
    assert pairs_only_loss(h, -h, quantization=0.0).item() > pairs_only_loss(h, h, quantization=0.0).item()
    both = distill_loss(teacher, h, -h, tau_teacher=1.0, quantization=0.0, hard_weight=0.5)
    assert both.item() == pytest.approx(bad.item() + 0.5 * pairs_only_loss(h, -h, quantization=0.0).item(), rel=1e-5)


def test_smoothing_at_one_half_is_the_loss_against_an_all_equal_teacher():
    """What the old "uniform teacher" control was: an all-equal teacher makes the KL terms
    KL(uniform || softmax(s)) per row and per column, on top of the pairs loss -- the smoothing
    head at eps = 1/2, up to the constant 2 log n."""
    g = torch.Generator().manual_seed(1)
    hi, ht = torch.randn(5, 8, generator=g).tanh(), torch.randn(5, 8, generator=g).tanh()
    got = distill_loss(torch.zeros(5, 5), hi, ht, tau_teacher=0.25, tau_student=0.05, quantization=0.1,
                       hard_weight=1.0)
    s = hi @ ht.T / 8 / 0.05
    smooth = sum((-math.log(5) - torch.log_softmax(x, 1).mean(1)).mean() for x in (s, s.T))
    assert got.item() == pytest.approx(smooth.item() + pairs_only_loss(hi, ht, 0.05, 0.1).item(), rel=1e-5)
    assert smoothing_loss(hi, ht, 0.5, 0.05, 0.1).item() == pytest.approx(got.item() + 2 * math.log(5), rel=1e-5)


def test_each_head_trains_on_its_own_target_and_no_other():
    # each head's loss against a direct transcription of its target, on inputs where all four
    # differ: a head wired to another's target fails here
    g = torch.Generator().manual_seed(3)
    n, b = 6, 8
    hi, ht = torch.randn(n, b, generator=g).tanh(), torch.randn(n, b, generator=g).tanh()
    teacher = 3 * torch.randn(n, n, generator=g)
    cfg = {**HEAD_DEFAULTS, "smoothing_eps": 0.3, "quantization": 0.0}
    s = hi @ ht.T / b / cfg["tau_student"]
    eye = torch.eye(n)

    def ce(target, logits):
        return -(target * torch.log_softmax(logits, 1)).sum(1).mean()

    def kl(teacher_logits, logits):
        p = torch.softmax(teacher_logits, 1)
        return (p * (torch.log(p) - torch.log_softmax(logits, 1))).sum(1).mean()

    def distilled(t):
        z = (t - t.mean()) / t.std() / cfg["tau_teacher"]
        return kl(z, s) + kl(z.T, s.T) + ce(eye, s) + ce(eye, s.T)

    smooth = (1 - 0.3) * eye + 0.3 / n
    shuffled = shuffled_rows(teacher, torch.Generator().manual_seed(0))
    want = {"pairs": ce(eye, s) + ce(eye, s.T), "smoothing": 2 * (ce(smooth, s) + ce(smooth, s.T)),
            "in-batch": distilled(teacher), "shuffled": distilled(shuffled)}
    got = {k: head_loss(k, cfg, shuffled if k == "shuffled" else teacher, hi, ht) for k in want}
    for k in want:
        assert got[k].item() == pytest.approx(want[k].item(), rel=1e-5), k
    values = sorted(v.item() for v in want.values())
    assert min(np.diff(values)) > 1e-3  # the four targets differ on these inputs
    # shuffled: each row keeps its own scores, in another order
    for i in range(n):
        assert torch.equal(shuffled[i].sort().values, teacher[i].sort().values)
    assert not torch.equal(shuffled, teacher)
    assert set(HEADS) == {"distilled", "in-batch", "pairs", "smoothing", "shuffled"}
    assert [h for h in HEADS if uses_matcher(h)] == ["distilled", "in-batch", "shuffled"]


def test_the_distilled_head_learns_the_matchers_batch_scores_and_its_ranking_of_each_list():
    # a direct transcription: the in-batch distillation of the batch's codes, plus per query
    # KL(softmax(z(t') / tau) || softmax(s)) + CE(s, 0), t' the matcher's list scores with the
    # true pair lifted above a candidate ranked higher
    g = torch.Generator().manual_seed(5)
    q, m, b = 4, 3, 8
    cfg = {**HEAD_DEFAULTS, "list_size": m, "quantization": 0.1, "list_weight": 0.7, "list_hard_weight": 0.4}
    h_img, h_txt = torch.randn(q + q * m, b, generator=g).tanh(), torch.randn(q + q * m, b, generator=g).tanh()
    teacher = {d: torch.randn(q, 1 + m, generator=g) for d in ("i2t", "t2i")}
    teacher["batch"] = 2 * torch.randn(q, q, generator=g)
    teacher["i2t"][0, 0] = -5.0  # the matcher misranks query 0's true pair
    in_batch = head_loss("in-batch", cfg, teacher["batch"], h_img[:q], h_txt[:q])
    # without its lists the distilled head is the in-batch head: they differ in that part alone
    assert head_loss("distilled", {**cfg, "list_weight": 0.0}, teacher, h_img, h_txt).item() == in_batch.item()
    total = 0.0
    for d in ("i2t", "t2i"):
        t = teacher[d].clone()
        gap = LIST_FIRST_GAP * t.std()
        for i in range(q):
            t[i, 0] = max(t[i, 0], t[i, 1:].max() + gap)
        assert (t.argmax(1) == 0).all()
        z = (t - t.mean()) / t.std() / cfg["tau_teacher"]
        for i in range(q):
            query = h_img[i] if d == "i2t" else h_txt[i]
            items = [h_txt[i] if d == "i2t" else h_img[i]] + [
                (h_txt if d == "i2t" else h_img)[q + i * m + j] for j in range(m)]
            s = torch.stack([query @ x for x in items]) / b / cfg["tau_student"]
            p = torch.softmax(z[i], 0)
            total += ((p * (torch.log(p) - torch.log_softmax(s, 0))).sum()
                      - cfg["list_hard_weight"] * torch.log_softmax(s, 0)[0]) / q
    got = head_loss("distilled", cfg, teacher, h_img, h_txt)
    assert got.item() == pytest.approx(in_batch.item() + cfg["list_weight"] * float(total), rel=1e-5)
    # where the matcher ranks the true pair first, its scores are the target as they are
    fine = torch.tensor([[3.0, 1.0, 0.5, -1.0]] * q)
    s = torch.randn(q, 1 + m, generator=g)
    z = (fine - fine.mean()) / fine.std() / 0.25
    kl = (torch.softmax(z, 1) * (torch.log_softmax(z, 1) - torch.log_softmax(s, 1))).sum(1).mean()
    assert listwise_loss(fine, s, 0.25, 0.0).item() == pytest.approx(kl.item(), rel=1e-5)


def test_masked_softmax_ignores_masked_entries():
    x = torch.tensor([[1.0, 5.0, 2.0]])
    w = masked_softmax(x, torch.tensor([[True, False, True]]))
    assert w[0, 1] == 0 and torch.allclose(w.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", sorted(MATCHERS))
def test_every_matcher_learns_to_recall_well_above_chance(name):
    from hashret.models.distill import MatcherModel
    from hashret.training.matching import matcher_recall, train_matcher

    ds = make_scenes(n_train=400, n_dev=0, n_test=100, region_dim=24, n_objects=8, n_attributes=4,
                     min_objects=2, max_objects=3, background=1, twin_fraction=0.0, seed=0)
    # every negative's hinge throughout (warm-up for all 8 epochs) and a larger step: on 400
    # pairs the hardest-negative loss gives too little signal to show learning in seconds
    mm = MatcherModel(name, 16, ds.region_dim, ds.vocab.words, embed=24, word_dim=16, epochs=8,
                      warmup_epochs=8, lr=3e-3, batch_size=32)
    before = matcher_recall(mm, ds, n_queries=100)
    train_matcher(mm, ds)
    after = matcher_recall(mm, ds, n_queries=100)
    chance = 100 * 5 / 100
    for d in ("i2t", "t2i"):
        assert after[d]["r5"] > 10 * chance, (before, after)
        assert after[d]["r5"] > before[d]["r5"] + 40


# -- the score functions against direct, loop-based transcriptions of the papers' equations --
# Each reference below takes one image's real region features and one caption's real word
# features (what the model's encoders give) and follows the paper's equations one fragment at
# a time with the model's own parameters. ``drop`` removes or changes one term; the tests also
# check that every such change moves the score, so a model missing that term cannot pass.

from hashret.models.matchers import MaskedBatchNorm  # noqa: E402


def _lin(layer, x):
    return layer.weight @ x + (layer.bias if layer.bias is not None else 0)


def _unit(x):
    return x / x.norm()


def _cos(a, b):
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def _softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [w / sum(e) for w in e]


def _bn(bn, x):
    return (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _mean(xs):
    return sum(xs) / len(xs)


def _sgraf_branch(branch, v, t, kind, lam, drop):
    head = branch["head"]
    pi, pt = head.pool_img, head.pool_txt

    def pool(p, xs, norm):   # VisualSA (norm) / TextSA
        g = _lin(p.glob, _mean(xs))
        g = _bn(p.bn_glob, g) if norm and "pool_bn" not in drop else g
        logits = []
        for x in xs:
            loc = _lin(p.local, x)
            loc = _bn(p.bn_local, loc) if norm and "pool_bn" not in drop else loc
            logits.append(float(p.common.weight[0] @ (torch.tanh(loc) * torch.tanh(g))))
        w = _softmax(logits)
        return _unit(sum(wi * x for wi, x in zip(w, xs)))

    vg, tg = pool(pi, v, True), pool(pt, t, False)
    d = [[float(vi @ tj) for tj in t] for vi in v]                       # region i, word j
    d = [[x if x > 0 or "leaky" in drop else 0.1 * x for x in row] for row in d]
    if "row_norm" not in drop:
        d = [[x / math.sqrt(sum(y * y for y in row)) for x in row] for row in d]
    nodes = [_unit(_lin(head.sim_global.w, (vg - tg) ** 2))]
    for j, tj in enumerate(t):
        alpha = _softmax([lam * d[i][j] for i in range(len(v))])
        a = sum(al * vi for al, vi in zip(alpha, v))
        a = a if "attn_norm" in drop else _unit(a)
        nodes.append(_unit(_lin(head.sim_local.w, (a - tj) ** 2)))
    if "local_nodes" in drop:
        nodes = nodes[:1]
    if kind == "sgr":
        for n in range(len(head.w_r)):
            s = 0 if "per_step" in drop else n
            w_in, w_out, w_r = head.w_in[s], head.w_out[s], head.w_r[s]
            new = []
            for sp in nodes:
                e = _softmax([float(_lin(w_in, sp) @ _lin(w_out, sq)) for sq in nodes])
                new.append(torch.relu(_lin(w_r, sum(ei * sq for ei, sq in zip(e, nodes)))))
            nodes = new
        fused = nodes[0]
    else:
        raw = [_lin(head.w_f, sp) for sp in nodes]
        beta = [torch.sigmoid(x if "saf_bn" in drop else _bn(head.bn_f, x)) for x in raw]
        fused = sum(b / sum(beta) * sp for b, sp in zip(beta, nodes))
        fused = fused if "saf_norm" in drop else _unit(fused)
    return float(torch.sigmoid(_lin(head.out, fused)))


def _sgraf_reference(m, v, t, drop=()):
    per = [_sgraf_branch(m.branches[k], v[k], t[k], k, m.branches[k]["head"].lam, drop) for k in m.branches]
    return sum(per) / len(per)


def _cgam_reference(m, v, t, drop=()):
    z = v + t
    n, no = len(z), len(v)
    q, k = [_lin(m.q, x) for x in z], [_lin(m.k, x) for x in z]
    wz = [m.wz.weight @ x for x in z]
    c = []
    for i in range(n):
        az = sum(float(q[i] @ k[j]) / n * wz[j] for j in range(n))
        inner = (0 if "attention" in drop else az) + (0 if "residual" in drop else z[i])
        c.append(_lin(m.concept, inner))
    lam = 1.0 if "lam" in drop else m.lam
    r = []
    for x in z:
        w = _softmax([lam * float(x @ cl) for cl in c])
        r.append(sum(wi * cl for wi, cl in zip(w, c)))
    size = z[0].shape[0] // m.heads
    groups = []
    for part in (range(no), range(no, n)):
        groups += [_mean([_cos(z[i][h * size:(h + 1) * size], r[i][h * size:(h + 1) * size]) for i in part])
                   for h in range(m.heads)]
    hidden = torch.tanh(_lin(m.fc1, torch.tensor(groups, dtype=z[0].dtype)))
    return float(_lin(m.fc2, hidden))


def _han_reference(m, v, t, drop=()):
    h = v + t
    blocks = m.blocks[:1] if "stack" in drop else m.blocks
    beta = 1 / m.beta if "beta_inverted" in drop else m.beta
    for b in blocks:
        q, k, val = [_lin(b.q, x) for x in h], [_lin(b.k, x) for x in h], [_lin(b.v, x) for x in h]
        new = []
        for i in range(len(h)):
            a = _softmax([beta * float(q[i] @ k[j]) for j in range(len(h))])
            hat = sum(aj * vj for aj, vj in zip(a, val))
            new.append(_lin(b.fc, hat) + (0 if "residual" in drop else q[i]))
        h = new
    o, w = h[:len(v)], h[len(v):]
    r = []
    for wi in w:
        alpha = _softmax([m.lam * _cos(wi, oj) for oj in o])
        r.append(_cos(wi, sum(al * oj for al, oj in zip(alpha, o))))
    return _mean(r)


def _pool_reference(p, xs):
    g = _lin(p.glob, _mean(xs))
    w = _softmax([float(p.w.weight[0] @ torch.tanh(_lin(p.local, x) + g)) for x in xs])
    return _unit(sum(wi * x for wi, x in zip(w, xs)))


def _shan_reference(m, v, t, drop=()):
    lam = m.lam
    pv, pt = [_unit(_lin(m.wv, x)) for x in v], [_unit(_lin(m.wt, x)) for x in t]
    A = [[float(a @ b) for b in pt] for a in pv]
    t_star = [sum(w * tj for w, tj in zip(_softmax([lam * A[i][j] for j in range(len(t))]), t))
              for i in range(len(v))]
    v_star = [sum(w * vi for w, vi in zip(_softmax([lam * A[i][j] for i in range(len(v))]), v))
              for j in range(len(t))]
    l2l = 0.5 * (_mean([_cos(a, b) for a, b in zip(v, t_star)]) + _mean([_cos(a, b) for a, b in zip(t, v_star)]))

    def fuse(gate, xs, stars):
        out = []
        for x, s in zip(xs, stars):
            g = torch.sigmoid(_lin(gate, torch.cat([x, s])))
            out.append(x if "gate" in drop else g * x + (1 - g) * s)
        return out

    vc_i, tc_j = fuse(m.gate_v, v, t_star), fuse(m.gate_t, t, v_star)
    vc, tc = _pool_reference(m.pool_v, vc_i), _pool_reference(m.pool_t, tc_j)
    keys_t, keys_v = (t, v) if "context_keys" in drop else (tc_j, vc_i)
    t_c_star = sum(w * x for w, x in zip(_softmax([lam * _cos(vc, x) for x in keys_t]), keys_t))
    v_c_star = sum(w * x for w, x in zip(_softmax([lam * _cos(tc, x) for x in keys_v]), keys_v))
    g2l = 0.5 * (_cos(vc, t_c_star) + _cos(tc, v_c_star))
    g2g = _cos(vc + t_c_star, tc + v_c_star)
    return sum(x for name, x in (("l2l", l2l), ("g2l", g2l), ("g2g", g2g)) if name not in drop)


REFERENCES = {
    "sgraf": (_sgraf_reference, ("pool_bn", "leaky", "row_norm", "attn_norm", "local_nodes", "per_step",
                                 "saf_bn", "saf_norm")),
    "cgam": (_cgam_reference, ("attention", "residual", "lam")),
    "han": (_han_reference, ("stack", "beta_inverted", "residual")),
    "shan": (_shan_reference, ("l2l", "g2l", "g2g", "gate", "context_keys")),
}


def _randomise_batch_norms(m, seed=3):
    # fresh batch norms are (nearly) the identity; random statistics make each one count
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, MaskedBatchNorm):
            c = mod.num_features
            mod.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            mod.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
            mod.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            mod.bias.data.copy_(torch.randn(c, generator=g) * 0.3)


def _fragments(m, name, r, rm, t, tl):
    """Per image and per caption, the real fragment vectors the score functions start from."""
    if name == "sgraf":
        img = {k: b["regions"](r, rm) for k, b in m.branches.items()}
        txt = {k: b["words"](t, tl)[0] for k, b in m.branches.items()}
        v = [{k: list(img[k][i][rm[i]]) for k in img} for i in range(len(r))]
        w = [{k: list(txt[k][j][:tl[j]]) for k in txt} for j in range(len(t))]
        return v, w
    img, (txt, _) = m.regions(r, rm), m.words(t, tl)
    return ([list(img[i][rm[i]]) for i in range(len(r))], [list(txt[j][:tl[j]]) for j in range(len(t))])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_score_function_matches_the_papers_equations(name):
    torch.manual_seed(0)
    m = build_matcher(name, 12, 20, **SMALL, **EXTRA.get(name, {})).double().eval()
    _randomise_batch_norms(m)
    r, rm, t, tl = _inputs()
    reference, terms = REFERENCES[name]
    with torch.no_grad():
        got = m(r.double(), rm, t, tl)
        v, w = _fragments(m, name, r.double(), rm, t, tl)
        want = torch.tensor([[reference(m, vi, wj) for wj in w] for vi in v], dtype=got.dtype)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got, want)
        for term in terms:  # the comparison above would catch a model without this term
            moved = torch.tensor([[reference(m, vi, wj, drop=(term,)) for wj in w] for vi in v])
            assert (moved - want).abs().max() > 1e-4, term  # ten times the tolerance


def test_masked_batch_norm_takes_its_statistics_from_the_real_entries_only():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 2, generator=g) * 3 + 1
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    bn = MaskedBatchNorm(2)
    real = torch.stack([x[i, j] for i in range(3) for j in range(5) if mask[i, j]])
    mean, var = real.mean(0), real.var(0, unbiased=False)
    out = bn.train()(x, mask)
    assert torch.allclose(out[mask], (real - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert torch.allclose(bn.running_mean, 0.1 * mean) and torch.allclose(bn.running_var, 0.9 + 0.1 * real.var(0))
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage in the padding changes nothing
    assert torch.allclose(MaskedBatchNorm(2).train()(x2, mask)[mask], out[mask])
    frozen = bn.eval()(x, mask)  # eval: the running statistics, whatever the batch
    assert torch.allclose(frozen, (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps))


def test_presets_build_the_papers_sizes_through_the_one_factory():
    from hashret.errors import HashretError
    from hashret.models.distill import MatcherModel
    from hashret.models.matchers import matcher_config

    paper = matcher_config("sgraf", "paper")
    assert (paper["embed"], paper["sim_dim"], paper["word_dim"], paper["lr"], paper["preset"]) == \
        (1024, 256, 300, 2e-4, "paper")
    assert matcher_config("han", "cpu")["embed"] == 64
    m = build_matcher("han", 12, 20, preset="paper", blocks=1)
    assert m.blocks[0].q.in_features == 1024 and len(m.blocks) == 1
    mm = MatcherModel("shan", 16, 12, ["<pad>", "<unk>", "a"], preset="paper", embed=32)
    assert mm.config["preset"] == "paper" and mm.config["word_dim"] == 300 and mm.config["embed"] == 32
    with pytest.raises(HashretError, match="unknown matcher preset 'huge'"):
        build_matcher("cgam", 12, 20, preset="huge")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_query_text_path_equals_torch_gru(dtype):
    """The numpy Bi-GRU that encodes a few captions at inference equals nn.GRU through a packed
    sequence (the training path), padding and short captions included, and follows a weight
    update (its cached weights are keyed on the parameters' versions)."""
    from hashret.models.matchers import TextEncoder

    torch.manual_seed(3)
    enc = TextEncoder(30, 6, 8).to(dtype).eval()
    tokens = torch.randint(2, 30, (5, 7))
    lengths = torch.tensor([7, 1, 4, 6, 2])
    tokens[torch.arange(7)[None, :] >= lengths[:, None]] = 0
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    for _ in range(2):
        with torch.inference_mode():
            fast, fast_mask = enc(tokens, lengths)
        slow, slow_mask = enc(tokens, lengths)          # grad enabled: torch's GRU
        assert fast.dtype == dtype and torch.equal(fast_mask, slow_mask)
        assert torch.allclose(fast, slow.detach(), atol=1e-6 if dtype == torch.float32 else 1e-12)
        assert (fast[~fast_mask] == 0).all()
        opt.zero_grad()
        slow.sum().backward()
        opt.step()                                       # the cached numpy weights must follow


def test_a_bad_head_setting_is_refused_before_any_training_and_old_configs_still_load():
    from hashret.errors import HashretError
    from hashret.models.distill import MatcherModel

    vocab = ["<pad>", "<unk>", "a"]
    # each matcher's default head and knob are its dev choice; a head asked for keeps the knob
    assert MatcherModel("shan", 16, 12, vocab, head="smoothing").config["tau_teacher"] == 1.0
    assert MatcherModel("shan", 16, 12, vocab, head="smoothing", tau_teacher=4.0).config["tau_teacher"] == 4.0
    for m in ("sgraf", "cgam", "han", "shan"):
        cfg = MatcherModel(m, 16, 12, vocab).config
        assert (cfg["head"], cfg["tau_teacher"], cfg["list_weight"], cfg["list_hard_weight"]) == ("distilled", 1.0, 1.0, 0.0)
        # HAN's heads train 16 epochs (its dev part's probe), the others 8; a setting still wins
        assert cfg["head_epochs"] == (16 if m == "han" else 8)
        assert MatcherModel(m, 16, 12, vocab, head="pairs", head_epochs=3).config["head_epochs"] == 3
    assert all(m in MATCHERS and set(f) <= set(HEAD_DEFAULTS) for m, f in HEAD_PER_MATCHER.items())
    with pytest.raises(HashretError, match="head must be one of distilled, in-batch, pairs, smoothing, shuffled"):
        MatcherModel("han", 16, 12, vocab, head="maybe")
    with pytest.raises(HashretError, match="smoothing_eps must be in"):
        MatcherModel("han", 16, 12, vocab, smoothing_eps=1.5)
    # a checkpoint's config from before the head field: distill true / false / uniform
    for old, new in ((True, "in-batch"), (False, "pairs"), ("uniform", "smoothing")):
        cfg = MatcherModel("han", 16, 12, vocab, distill=old).config
        assert cfg["head"] == new and "distill" not in cfg
    with pytest.raises(HashretError, match="distill must be true, false or 'uniform'"):
        MatcherModel("han", 16, 12, vocab, distill="maybe")