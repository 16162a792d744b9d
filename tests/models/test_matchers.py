import pytest
import torch

from hashret.data.scenes import make_scenes
from hashret.models.distill import HashHead, distill_loss, pairs_only_loss
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
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


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


def test_masked_softmax_ignores_masked_entries():
    x = torch.tensor([[1.0, 5.0, 2.0]])
    w = masked_softmax(x, torch.tensor([[True, False, True]]))
    assert w[0, 1] == 0 and torch.allclose(w.sum(), torch.tensor(1.0))


def test_tiny_training_run_recalls_well_above_chance():
    from hashret.models.distill import MatcherModel
    from hashret.training.matching import matcher_recall, train_matcher

    ds = make_scenes(n_train=400, n_dev=0, n_test=100, region_dim=24, n_objects=8, n_attributes=4,
                     min_objects=2, max_objects=3, background=1, twin_fraction=0.0, seed=0)
    mm = MatcherModel("han", 16, ds.region_dim, ds.vocab.words, embed=24, word_dim=16, epochs=5,
                      batch_size=32)
    before = matcher_recall(mm, ds, n_queries=100)
    train_matcher(mm, ds)
    after = matcher_recall(mm, ds, n_queries=100)
    chance = 100 * 5 / 100
    for d in ("i2t", "t2i"):
        assert after[d]["r5"] > 4 * chance, (before, after)
        assert after[d]["r5"] > before[d]["r5"] + 20
