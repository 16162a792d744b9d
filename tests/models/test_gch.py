import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hashret.cli import main
from hashret.data import make_synthetic
from hashret.errors import HashretError
from hashret.metrics import evaluate_codes
from hashret.models import build_for_dataset, build_model, load_checkpoint, save_checkpoint
from hashret.models.gch import _GCN, _HashNet, normalized_adjacency, semantic_fusion
from hashret.models.losses import pairwise_nll

SMALL = dict(hidden=64, gcn_hidden=64, epochs=12, batch_size=64)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_items=900, n_labels=10, labels_per_item=1.5, image_dim=32,
                          text_dim=80, n_query=100, n_train=500, noise=0.4, seed=2)


def _fit(name, ds, bits=16, seed=0, **kw):
    tr = ds.part("train")
    m = build_for_dataset(name, ds, bits, seed=seed, **{**SMALL, **kw})
    return m.fit(ds.features("image", tr), ds.features("text", tr), ds.labels[tr])


def _maps(m, ds):
    q, db = ds.part("query"), ds.part("database")
    return [evaluate_codes(m.encode(ds.features(a, q), a), m.encode(ds.features(b, db), b),
                           ds.labels[q], ds.labels[db])["map_all"] for a, b in (("image", "text"), ("text", "image"))]


def test_hash_net_shapes_and_gradients():
    net = _HashNet(12, 32, 3, 16, 5, 0.1, True, torch.nn.ReLU)
    f, h, p = net(torch.randn(7, 12))
    assert f.shape == (7, 32) and h.shape == (7, 16) and p.shape == (7, 5)
    assert h.abs().max() <= 1 and ((p > 0) & (p < 1)).all()
    (h.sum() + p.sum()).backward()
    for name, prm in net.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_gcn_shapes_and_gradients():
    gcn = _GCN(32, 24, 16, 5)
    labels = (torch.rand(9, 5) < 0.4).float()
    hb, p = gcn(torch.randn(9, 32), normalized_adjacency(labels))
    assert hb.shape == (9, 16) and p.shape == (9, 5)
    (hb.sum() + p.sum()).backward()
    for name, prm in gcn.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


def test_adjacency_normalisation_matches_direct_formula():
    rng = np.random.default_rng(0)
    lab = (rng.random((6, 4)) < 0.5).astype(np.float64)
    a = lab @ lab.T + np.eye(6)
    d = a.sum(1)
    direct = np.array([[a[i, j] / np.sqrt(d[i] * d[j]) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(normalized_adjacency(torch.from_numpy(lab)).numpy(), direct, atol=1e-12)
    # the Jaccard graph: shared labels over the labels either item has
    jac = np.array([[(lab[i] * lab[j]).sum() / max(np.maximum(lab[i], lab[j]).sum(), 1e-12)
                     for j in range(6)] for i in range(6)]) + np.eye(6)
    dj = jac.sum(1)
    direct_j = np.array([[jac[i, j] / np.sqrt(dj[i] * dj[j]) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(normalized_adjacency(torch.from_numpy(lab), "jaccard").numpy(), direct_j,
                               atol=1e-12)
    # the strong links only: 1 where the Jaccard overlap is at least 1/2
    strong = np.array([[1.0 if (lab[i] * lab[j]).sum() >= 0.5 * max(np.maximum(lab[i], lab[j]).sum(), 1e-12)
                        else 0.0 for j in range(6)] for i in range(6)]) + np.eye(6)
    assert 0 < strong.sum() - 6 < (jac > 0).sum() - 6  # it drops some links, not all
    ds = strong.sum(1)
    direct_s = np.array([[strong[i, j] / np.sqrt(ds[i] * ds[j]) for j in range(6)] for i in range(6)])
    np.testing.assert_allclose(normalized_adjacency(torch.from_numpy(lab), "strong").numpy(), direct_s,
                               atol=1e-12)
    # one label per item: the same graph every way
    one = np.eye(4)[[0, 1, 0, 2, 3, 1]]
    for graph in ("jaccard", "strong"):
        np.testing.assert_allclose(normalized_adjacency(torch.from_numpy(one), graph).numpy(),
                                   normalized_adjacency(torch.from_numpy(one)).numpy(), atol=1e-12)


def test_likelihood_matches_definition_and_stays_finite():
    theta = torch.tensor([[-3.0, 0.0, 2.5], [1.0, -0.5, 4.0]], dtype=torch.float64)
    s = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    direct = -(s * theta - torch.log(1 + torch.exp(theta)))
    assert torch.allclose(pairwise_nll(theta, s), direct.sum())
    assert torch.allclose(pairwise_nll(theta, s, "mean"), direct.mean())
    big = torch.tensor([500.0, -500.0, 500.0], requires_grad=True)
    loss = pairwise_nll(big, torch.tensor([1.0, 0.0, 0.0]))
    loss.backward()
    # the naive formula overflows (inf); softplus gives the exact 0 + 0 + 500
    assert torch.isfinite(loss) and abs(float(loss.detach()) - 500.0) < 1e-3
    assert torch.isfinite(big.grad).all()


def test_fusion_keeps_items_apart_and_follows_the_batch_order():
    fx, fy = torch.rand(8, 16), torch.rand(8, 16)
    fr = semantic_fusion(fx, fy)
    assert fr.shape == (8, 16)
    assert torch.cdist(fr, fr).fill_diagonal_(1.0).min() > 1e-4  # no collapse onto one vector
    perm = torch.randperm(8)
    assert torch.allclose(semantic_fusion(fx[perm], fy[perm]), fr[perm], atol=1e-6)


def test_tiny_training_rises_well_above_chance(data):
    rng = np.random.default_rng(0)
    q, db = data.part("query"), data.part("database")
    chance = evaluate_codes(rng.standard_normal((len(q), 16)), rng.standard_normal((len(db), 16)),
                            data.labels[q], data.labels[db])["map_all"]
    model = _fit("gch", data)
    for m in _maps(model, data):
        assert m > chance + 0.15 and m > 1.5 * chance, (m, chance)
    assert {"label", "image", "text", "gcn"} <= set(model.history[-1])


def test_ablations_switch_parts_off(data):
    assert "gcn" not in _fit("gch-no-gcn", data, epochs=2).history[-1]
    assert "label" not in _fit("gch-no-teacher", data, epochs=2).history[-1]


def test_checkpoint_round_trip_gives_identical_codes(data, tmp_path):
    model = _fit("gch", data, epochs=3)
    save_checkpoint(tmp_path / "run", model, dataset=data)
    back = load_checkpoint(tmp_path / "run")
    for mod in ("image", "text"):
        x = data.features(mod, data.part("query"))
        np.testing.assert_array_equal(back.encode(x, mod), model.encode(x, mod))
    state = torch.load(tmp_path / "run" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_seeded_training_is_repeatable(data):
    a, b = _fit("gch", data, epochs=2, seed=5), _fit("gch", data, epochs=2, seed=5)
    x = data.features("text", data.part("query"))
    np.testing.assert_array_equal(a.encode(x, "text"), b.encode(x, "text"))


def test_cosine_schedule_decays_the_learning_rate_and_constant_keeps_it(data):
    cos = [h["lr"] for h in _fit("gch", data, epochs=4, lr_schedule="cosine").history]
    np.testing.assert_allclose(cos, [1e-3 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(4)], rtol=1e-6)
    const = [h["lr"] for h in _fit("gch", data, epochs=3, lr_schedule="constant").history]
    assert const == [1e-3] * 3
    with pytest.raises(HashretError, match="unknown lr_schedule"):
        _fit("gch", data, epochs=1, lr_schedule="step")


def test_a_cosine_horizon_longer_than_the_run_follows_the_longer_runs_rates(data):
    # what a refit stopped at a chosen epoch uses: the first epochs of the candidate's schedule
    full = [h["lr"] for h in _fit("gch", data, epochs=6).history]
    short = [h["lr"] for h in _fit("gch", data, epochs=3, lr_horizon=6).history]
    assert short == full[:3] and full[-1] < short[-1] < full[0]
    with pytest.raises(HashretError, match="lr_horizon 2 is shorter than epochs 3"):
        _fit("gch", data, epochs=3, lr_horizon=2)


def test_the_label_graph_setting_reaches_the_gcn(data):
    # multi-label data: the Jaccard graph gives other beacons, hence other student codes
    # (the whole small run: after 2 epochs the students may still share one code)
    dot, jac = _fit("gch", data), _fit("gch", data, graph="jaccard")
    x = data.features("text", data.part("query"))
    assert (dot.encode(x, "text") != jac.encode(x, "text")).any()
    no_gcn = [_fit("gch-no-gcn", data, epochs=2, graph=g).encode(x, "text") for g in ("dot", "jaccard")]
    np.testing.assert_array_equal(*no_gcn)  # without a GCN the graph is unused
    with pytest.raises(HashretError, match="unknown graph 'knn'"):
        _fit("gch", data, epochs=1, graph="knn")


def test_dropout_reaches_the_students_while_they_train_and_never_the_codes(data):
    # the tuning grid's dropout: in the image and text students only (not the teacher's label
    # net), active in their training passes, off when encoding and when beacons are made
    m = _fit("gch", data, epochs=2, dropout=0.3)
    drops = {name: [mod.p for mod in net.modules() if isinstance(mod, torch.nn.Dropout)]
             for name, net in m.nets.items()}
    assert drops == {"label": [], "image": [0.3] * m.config["image_depth"],
                     "text": [0.3] * m.config["text_depth"], "gcn": []}
    x = data.features("image", data.part("query"))
    np.testing.assert_array_equal(m.encode(x, "image"), m.encode(x, "image"))
    plain = _fit("gch", data, epochs=2)
    assert (plain.encode(x, "image") != m.encode(x, "image")).any()  # it changed training


@pytest.mark.parametrize("bits", [16, 32, 64, 128])
def test_named_configs(bits):
    m = build_model(f"gch-{bits}", image_dim=5, text_dim=7, n_labels=3)
    assert m.bits == bits and m.config["alpha_likelihood"] == 1.0


def test_gpu_request_without_gpu_is_a_clear_error(data):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    tr = data.part("train")
    model = build_for_dataset("gch", data, 16, **SMALL)
    with pytest.raises(HashretError, match="no GPU"):
        model.fit(data.features("image", tr), data.features("text", tr), data.labels[tr], device="cuda")


def test_cli_train_then_encode(tmp_path):
    spec = "synthetic:n_items=400,n_labels=6,image_dim=16,text_dim=40,n_query=40,n_train=200"
    runner = CliRunner()
    res = runner.invoke(main, ["train", "--model", "gch", "--bits", "16", "--dataset", spec,
                               "--epochs", "2", "--seed", "1", "--set", "hidden=32",
                               "--set", "gcn_hidden=32", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["config"]["epochs"] == 2 and cfg["config"]["hidden"] == 32 and cfg["dataset_spec"] == spec
    assert "map_all" in cfg["eval"]
    res = runner.invoke(main, ["encode", "--checkpoint", str(tmp_path / "run"), "--modality", "text",
                               "--split", "query", "--out", str(tmp_path / "codes.npy")])
    assert res.exit_code == 0, res.output
    codes = np.load(tmp_path / "codes.npy")
    assert codes.shape == (40, 2) and codes.dtype == np.uint8
    res = runner.invoke(main, ["train", "--model", "gch", "--dataset", spec, "--set", "nosuch=1",
                               "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no config field nosuch" in res.output


def test_likelihood_over_every_training_item_against_a_double_loop():
    # the paper's NLL sums over all n training pairs: a batch's outputs are scored against the
    # latest outputs of every training item (its own rows as they are now)
    m = build_model("gch", 8, image_dim=4, text_dim=4, n_labels=3)
    g = torch.Generator().manual_seed(0)
    n, idx = 7, torch.tensor([4, 1, 5])
    lab = (torch.rand(n, 3, generator=g) < 0.5).double()
    m.banks = {"label": torch.randn(n, 8, generator=g, dtype=torch.float64).tanh()}
    h = torch.randn(3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    theta, s, w = m._scores("label", h, idx, lab)
    assert w is None
    loss = pairwise_nll(theta, s, "mean")
    total = 0.0
    for a, i in enumerate(idx.tolist()):
        for j in range(n):
            other = h.detach()[idx.tolist().index(j)] if j in idx.tolist() else m.banks["label"][j]
            theta = 0.5 * float(h.detach()[a] @ other)
            sij = 1.0 if float(lab[i] @ lab[j]) > 0 else 0.0
            total += math.log1p(math.exp(theta)) - sij * theta
    assert float(loss.detach()) == pytest.approx(total / (3 * n), rel=1e-12)
    loss.backward()
    # the gradient of the bank with the batch's rows swapped in, h reaching both sides
    h2 = h.detach().clone().requires_grad_(True)
    ref = m.banks["label"].index_copy(0, idx, h2)
    pairwise_nll(0.5 * h2 @ ref.T, s, "mean").backward()
    assert h.grad.abs().sum() > 0 and torch.allclose(h.grad, h2.grad, rtol=1e-12, atol=0)
    # likelihood=batch: only the batch's own pairs
    m.banks = None
    theta, s, _ = m._scores("label", h, idx, lab)
    assert theta.shape == (3, 3) and s.shape == (3, 3)


def test_the_likelihood_against_fixed_codes_scores_each_label_row_once_for_all_its_items():
    # the teacher's codes are a function of the label row: scoring each distinct row once,
    # weighted by its count, is the sum over all n pairs -- value and gradient
    from hashret.models.gch import _label_groups

    m = build_model("gch", 8, image_dim=4, text_dim=4, n_labels=3)
    g = torch.Generator().manual_seed(3)
    n, idx = 40, torch.tensor([7, 0, 33, 12, 5])
    lab = (torch.rand(n, 3, generator=g) < 0.4).double()
    m.nets = None
    m._build()
    m.nets.double()
    codes = m._teacher_codes(lab)
    rows, inverse, first, counts = _label_groups(lab)
    assert len(rows) < n and counts.sum() == n
    for r in range(n):  # rows with the same labels got exactly the same code
        same = (lab == lab[r]).all(dim=1)
        assert (codes[same] == codes[r]).all()
    m.banks, m._groups = {}, (rows, inverse, first, counts)
    h = torch.randn(len(idx), 8, generator=g, dtype=torch.float64).tanh().requires_grad_(True)
    theta, s, w = m._scores("image", h, idx, lab, fixed=codes)
    assert theta.shape == (len(idx), len(rows))
    grouped = pairwise_nll(theta, s, "mean", w)
    grouped.backward()
    h2 = h.detach().clone().requires_grad_(True)
    direct = sum(math.log1p(math.exp(0.5 * float(h2.detach()[a] @ codes[j])))
                 - (1.0 if float(lab[i] @ lab[j]) > 0 else 0.0) * 0.5 * float(h2.detach()[a] @ codes[j])
                 for a, i in enumerate(idx.tolist()) for j in range(n)) / (len(idx) * n)
    assert float(grouped.detach()) == pytest.approx(direct, rel=1e-12)
    full = pairwise_nll(0.5 * h2 @ codes.T, (lab[idx] @ lab.T > 0).double(), "mean")
    full.backward()
    assert torch.allclose(h.grad, h2.grad, rtol=1e-10, atol=1e-15)


def test_fair_ablations_get_the_same_student_updates(data):
    counts = {name: _fit(name, data, epochs=3).updates for name in ("gch", "gch-no-gcn", "gch-no-teacher")}
    batches = -(-len(data.part("train")) // SMALL["batch_size"])
    for name, c in counts.items():
        assert c["image"] == c["text"] == 2 * 3 * batches, (name, c)
    assert "gcn" not in counts["gch-no-gcn"] and "label" not in counts["gch-no-teacher"]


def test_each_student_is_pulled_towards_the_beacons_with_its_own_weight(data, monkeypatch):
    # beta_beacon_image sets the image student's beacon weight; unset, both take beta_beacon
    import hashret.models.gch as gch

    seen = []
    real = gch.gch_loss

    def spy(h, ref, s, pred, labels, alpha, gamma, beacons=None, beta=0.0, weights=None):
        if beacons is not None:
            seen.append(beta)
            # the students are pulled towards the beacons' sign codes, not the GCN's tanh outputs
            assert set(torch.unique(beacons).tolist()) <= {-1.0, 1.0}
        return real(h, ref, s, pred, labels, alpha, gamma, beacons, beta, weights)

    monkeypatch.setattr(gch, "gch_loss", spy)
    for image_beta, want in ((None, {3.0}), (0.25, {0.25, 3.0})):
        seen.clear()
        m = _fit("gch", data, epochs=1, beta_beacon=3.0, beta_beacon_image=image_beta)
        batches = -(-len(data.part("train")) // SMALL["batch_size"])
        assert len(seen) == 2 * batches  # both students, every batch of the beacon pass
        assert set(seen) == want
        if image_beta is not None:  # students alternate image, text within a batch
            assert seen[::2] == [image_beta] * batches
            assert seen[1::2] == [3.0] * batches
        assert m.config["beta_beacon_image"] == image_beta


def test_the_beacon_pass_ablations_drop_the_teacher_term_or_wait_the_warmup_epochs(data, monkeypatch):
    # beacon_pass_teacher="none": the beacon pass's likelihood weight is 0 (labels and beacons
    # stay); beacon_warmup=e: the first e epochs' second pass goes towards the teacher only
    import hashret.models.gch as gch

    calls = []
    real = gch.gch_loss

    def spy(h, ref, s, pred, labels, alpha, gamma, beacons=None, beta=0.0, weights=None):
        calls.append((alpha, gamma, beacons is not None, beta))
        return real(h, ref, s, pred, labels, alpha, gamma, beacons, beta, weights)

    monkeypatch.setattr(gch, "gch_loss", spy)
    batches = -(-len(data.part("train")) // SMALL["batch_size"])
    _fit("gch", data, epochs=1, alpha_likelihood=2.0, gamma_label=0.5, beta_beacon=3.0,
         beacon_pass_teacher="none")
    pulled = [c for c in calls if c[2]]
    assert pulled == [(0.0, 0.5, True, 3.0)] * (2 * batches)
    assert all(c[0] == 2.0 for c in calls if not c[2])  # teacher, GCN, first pass keep alpha
    calls.clear()
    _fit("gch", data, epochs=3, beacon_warmup=2)
    assert sum(c[2] for c in calls) == 2 * batches  # only the third epoch pulls
    calls.clear()
    _fit("gch", data, epochs=3)
    assert sum(c[2] for c in calls) == 3 * 2 * batches
    with pytest.raises(HashretError, match="beacon_pass_teacher"):
        _fit("gch", data, epochs=1, beacon_pass_teacher="beacons")


def test_the_gcn_scores_its_beacons_against_the_teacher_or_other_beacons(data, monkeypatch):
    # gcn_reference="teacher": the GCN's likelihood pairs each beacon with the teacher's sign
    # code of every training item (Gamma(H^l, H^b)); "beacons", the paper's: with other beacons
    import hashret.models.gch as gch

    calls = []
    real = gch.gch_loss

    def spy(h, theta, s, pred, labels, alpha, gamma, beacons=None, beta=0.0, weights=None):
        calls.append((h.detach().clone(), theta.detach().clone()))
        return real(h, theta, s, pred, labels, alpha, gamma, beacons, beta, weights)

    monkeypatch.setattr(gch, "gch_loss", spy)
    nb = -(-len(data.part("train")) // SMALL["batch_size"])
    lab = torch.from_numpy(data.labels[data.part("train")]).float()
    for reference in ("teacher", "beacons"):
        calls.clear()
        m = _fit("gch", data, epochs=1, gcn_reference=reference)
        gcn_calls = calls[3 * nb:4 * nb]  # per epoch: teacher, students, GCN, students
        with torch.no_grad():
            teacher = torch.where(m.nets["label"](lab)[1] >= 0, 1.0, -1.0)
        for h, theta in gcn_calls:
            if reference == "teacher":
                # each distinct label row of the training items once (weighted by its count)
                rows = torch.unique(lab, dim=0)
                assert theta.shape == (len(h), len(rows))
                codes = torch.stack([teacher[(lab == r).all(dim=1)][0] for r in rows])
                torch.testing.assert_close(theta, 0.5 * h @ codes.T)
            else:
                assert theta.shape == (len(h), len(lab))  # every training item (likelihood=all)
                assert not torch.allclose(theta, 0.5 * h @ teacher.T)
                # its own rows among the beacons scored against, as they are now
                own = 0.5 * h @ h[0]
                assert any(torch.allclose(theta[:, j], own) for j in range(len(lab)))
    with pytest.raises(HashretError, match="unknown gcn_reference"):
        _fit("gch", data, epochs=1, gcn_reference="labels")


def test_a_loss_that_goes_non_finite_stops_training_with_a_reason(data, monkeypatch):
    import hashret.models.gch as gch

    monkeypatch.setattr(gch, "pairwise_nll", lambda theta, s, reduction="sum", weights=None: theta.sum() * float("nan"))
    with pytest.raises(HashretError, match=r"the label loss became nan in epoch 1: training diverged; lower lr_label"):
        _fit("gch", data, epochs=2)


@pytest.mark.parametrize("name", ["gch", "dcmh-mlp"])
def test_epochs_are_chosen_on_validation_rows(data, name):
    split = data.split.carve_validation(0.2, seed=1)
    tr, val = split.train, split.validation
    m = build_for_dataset(name, data, 16, seed=0, **({**SMALL, "epochs": 12} if name == "gch" else {"epochs": 12}))
    m.fit(data.features("image", tr), data.features("text", tr), data.labels[tr],
          validation=(data.features("image", val), data.features("text", val), data.labels[val]))
    sel = m.selection
    assert [e for e, _ in sel["curve"]] == [5, 10, 12]
    assert sel["map_val"]["mean"] == max(v for _, v in sel["curve"])
    assert sel["epochs"] == next(e for e, v in sel["curve"] if v == sel["map_val"]["mean"])
    # the model kept is the chosen epoch's: its validation mAP recomputed from scratch
    again = [evaluate_codes(m.encode(data.features(a, val), a), m.encode(data.features(b, tr), b),
                            data.labels[val], data.labels[tr])["map_all"]
             for a, b in (("image", "text"), ("text", "image"))]
    assert again == pytest.approx([sel["map_val"]["i2t"], sel["map_val"]["t2i"]], abs=1e-6)


def _direct_gch_loss(h, ref, s, pred, labels, alpha, gamma, hb=None, beta=0.0, drop=()):
    """The paper's per-net objective, one element at a time."""
    nll = [math.log1p(math.exp(0.5 * float(h[i] @ ref[j]))) - float(s[i, j]) * 0.5 * float(h[i] @ ref[j])
           for i in range(len(h)) for j in range(len(ref))]
    lab = [(float(pred[i, c]) - float(labels[i, c])) ** 2 for i in range(len(h)) for c in range(labels.shape[1])]
    total = (0 if "likelihood" in drop else alpha * sum(nll) / len(nll)) + \
        (0 if "label" in drop else gamma * sum(lab) / len(lab))
    if hb is not None and "beacon" not in drop:
        bea = [(float(hb[i, k]) - float(h[i, k])) ** 2 for i in range(len(h)) for k in range(h.shape[1])]
        total += beta * sum(bea) / len(bea)
    return total


def test_each_loss_weight_against_the_papers_objective():
    from hashret.models.gch import gamma_pairs, gch_loss

    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 6, generator=g, dtype=torch.float64).tanh()
    ref = torch.randn(9, 6, generator=g, dtype=torch.float64).tanh()
    s = (torch.rand(4, 9, generator=g) < 0.4).double()
    pred = torch.rand(4, 3, generator=g, dtype=torch.float64)
    labels = (torch.rand(4, 3, generator=g) < 0.5).double()
    hb = torch.sign(torch.randn(4, 6, generator=g, dtype=torch.float64))
    w = dict(alpha=0.7, gamma=1.9, beta=2.3)
    theta = gamma_pairs(h, ref)
    got = float(gch_loss(h, theta, s, pred, labels, w["alpha"], w["gamma"], hb, w["beta"]))
    want = _direct_gch_loss(h, ref, s, pred, labels, w["alpha"], w["gamma"], hb, w["beta"])
    assert got == pytest.approx(want, rel=1e-12)
    for term in ("likelihood", "label", "beacon"):  # a model without the term could not pass
        assert abs(_direct_gch_loss(h, ref, s, pred, labels, w["alpha"], w["gamma"], hb, w["beta"],
                                    drop=(term,)) - want) > 1e-3, term
    assert float(gch_loss(h, theta, s, pred, labels, 0.7, 1.9)) == pytest.approx(
        _direct_gch_loss(h, ref, s, pred, labels, 0.7, 1.9), rel=1e-12)   # no beacon term for the teacher


def test_fusion_formula_against_a_loop():
    g = torch.Generator().manual_seed(2)
    fx, fy = torch.rand(5, 4, generator=g, dtype=torch.float64), torch.rand(5, 4, generator=g, dtype=torch.float64)

    def unit_centred(f):
        c = f - f.mean(0)
        return [c[i] / c[i].norm() for i in range(len(f))]

    cx, cy = unit_centred(fx), unit_centred(fy)
    w = [[float(cx[i] @ cy[j]) for j in range(5)] for i in range(5)]
    top = max(abs(v) for row in w for v in row)
    w = [[v / top for v in row] for row in w]
    for i in range(5):
        fx_sa = fx[i] + sum(w[i][j] * fy[j] for j in range(5))      # image re-weighted by text
        fy_sa = fy[i] + sum(w[j][i] * fx[j] for j in range(5))      # text by image (W transposed)
        assert torch.allclose(semantic_fusion(fx, fy)[i], (fx_sa + fy_sa) / 2, atol=1e-12)


def test_beacon_codes_are_the_gcn_over_each_batchs_label_graph(data):
    tr = data.part("train")
    img, txt, lab = data.features("image", tr), data.features("text", tr), data.labels[tr]
    m = _fit("gch", data, epochs=3)
    m.config["batch_size"] = len(tr)  # one batch: the whole label graph, checked by hand below
    got = m.beacon_codes(img, txt, lab)
    assert got.shape == (len(tr), 16) and set(np.unique(got)) <= {-1, 1}
    with torch.no_grad():
        fx = m.nets["image"].body(torch.from_numpy(m._standardise(img, "image")))
        fy = m.nets["text"].body(torch.from_numpy(m._standardise(txt, "text")))
        a = torch.from_numpy(lab) @ torch.from_numpy(lab).T + torch.eye(len(tr))
        d = torch.diag(a.sum(1) ** -0.5)
        adj = d @ a @ d
        # hashret's fusion, written out here (not the model's own function): centred cosine
        # affinity over the batch, normalised by its largest magnitude, plus a residual
        cx, cy = fx - fx.mean(0), fy - fy.mean(0)
        w = (cx / cx.norm(dim=1, keepdim=True)) @ (cy / cy.norm(dim=1, keepdim=True)).T
        w = w / w.abs().max()
        f = ((fx + w @ fy) + (fy + w.T @ fx)) / 2
        g = m.nets["gcn"]
        want = torch.tanh(adj @ g.w2(torch.relu(adj @ g.w1(f))))
    np.testing.assert_array_equal(got, np.where(want.numpy() >= 0, 1, -1))
    # in batches, a beacon depends on its batch: the seed picks them, and repeats them
    m.config["batch_size"] = 64
    b0 = m.beacon_codes(img, txt, lab, seed=0)
    np.testing.assert_array_equal(b0, m.beacon_codes(img, txt, lab, seed=0))
    assert (b0 != m.beacon_codes(img, txt, lab, seed=1)).any()
    with pytest.raises(HashretError, match="no GCN"):
        _fit("gch-no-gcn", data, epochs=1).beacon_codes(img, txt, lab)


def test_the_papers_fusion_against_the_seeds_equations():
    # seed 004: W~ = norm(f^x f^y^T) (the public code: divided by its largest magnitude),
    # f_r = (f^x_sa + f^y_sa) / 2 with each modality re-weighted through W~ -- written as loops
    g = torch.Generator().manual_seed(3)
    fx, fy = torch.rand(6, 4, generator=g, dtype=torch.float64), torch.rand(6, 4, generator=g, dtype=torch.float64)
    w = [[float(fx[i] @ fy[j]) for j in range(6)] for i in range(6)]
    top = max(abs(v) for row in w for v in row)
    for i in range(6):
        fx_sa = sum(w[j][i] / top * fx[j] for j in range(6))   # W~^T f^x
        fy_sa = sum(w[i][j] / top * fy[j] for j in range(6))   # W~ f^y
        assert torch.allclose(semantic_fusion(fx, fy, "paper")[i], (fx_sa + fy_sa) / 2, atol=1e-12)
    with pytest.raises(HashretError, match="unknown fusion"):
        semantic_fusion(fx, fy, "mean")


def test_gch_paper_is_the_papers_form_and_gch_states_each_deviation(data):
    paper = build_model("gch-paper-16", image_dim=5, text_dim=7, n_labels=3).config
    pinned = {"fusion": "paper", "gcn_reference": "beacons", "likelihood": "all", "beacon_pass_teacher": "teacher",
              "beacon_warmup": 0, "graph": "dot", "beta_beacon_image": None, "use_teacher": True, "use_gcn": True}
    assert {k: paper[k] for k in pinned} == pinned
    gch = build_model("gch-16", image_dim=5, text_dim=7, n_labels=3).config
    differ = {k for k in gch if gch[k] != paper[k]} - {"model"}
    assert differ == {"fusion", "gcn_reference"}  # hashret's two deviations, each a named switch
    no_teacher = build_model("gch-no-teacher-16", image_dim=5, text_dim=7, n_labels=3).config
    assert {k for k in gch if gch[k] != no_teacher[k]} - {"model"} == {"use_teacher", "gcn_reference"}
    with pytest.raises(HashretError, match="no teacher codes to score the beacons against"):
        _fit("gch-no-teacher", data, epochs=1, gcn_reference="teacher")
    m = _fit("gch-paper", data, epochs=6)  # trains, and learns
    assert min(_maps(m, data)) > 0.3


def test_the_fusion_switch_reaches_the_gcn(data, monkeypatch):
    import hashret.models.gch as gch

    forms = []
    real = gch.semantic_fusion
    monkeypatch.setattr(gch, "semantic_fusion", lambda fx, fy, form="centred": forms.append(form) or real(fx, fy, form))
    _fit("gch", data, epochs=1)
    _fit("gch-paper", data, epochs=1)
    assert set(forms) == {"centred", "paper"} and forms[0] == "centred" and forms[-1] == "paper"
