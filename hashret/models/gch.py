"""GCH: Graph Convolutional Network Hashing (Xu et al., IJCAI 2019), in PyTorch.

A label semantic encoder (teacher) learns codes from labels; an image and a text encoder
(students) learn to reproduce them from features; a GCN over the batch's label graph fuses
both students' features into *beacon* codes the students are then pulled towards. Query
codes are sign(student output), sign(0) -> +1.

Every loss term as the paper states it (``shared/design/models.md``), weights in the config:
- teacher:  alpha * NLL(S, Gamma(H^l, H^l)) + gamma * ||L^l - L||^2
- students: alpha * NLL(S, Gamma(H^l, H^*)) + beta * ||H^b - H^*||^2 + gamma * ||L^* - L||^2
  (one beta for both students, as in the paper, unless ``beta_beacon_image`` sets the image's)
- GCN:      alpha * NLL(S, Gamma(H^l, H^b)) + gamma * ||L^b - L||^2
with Gamma(A, B)_ij = <a_i, b_j> / 2 and the NLL the stable pairwise likelihood (the public
code's squared error stand-in is not used). One departure, a setting: the paper scores the
beacons against each other, Gamma(H^b, H^b) (``gcn_reference="beacons"``), which lets them
settle on a code per class unrelated to the teacher's (about b/2 bits away on Wikipedia), so
the students' two targets pull apart; by default they are scored against the teacher's codes,
as the students are, and the beacons land in the teacher's space. Each term is a mean per
element (pair, bit, label), so the weights mean the same at any batch size, code length or
label count.

The likelihood sums over all n training pairs, as the paper writes it: each batch is scored
against the latest outputs of every training item (``likelihood="all"``, the default; DCMH
keeps its F and G the same way); ``likelihood="batch"`` is the in-batch form of GCH's public
code.

The paper's fusion (seed 004) made every beacon of a batch nearly alike here: GCH fuses with
batch-centred cosines and a residual (``fusion="centred"``, see ``semantic_fusion``).
``gch-paper`` is GCH with the paper's value of each of these switches (its fusion, Gamma(H^b,
H^b)); what it still shares with GCH is stated on the class.

Training alternates per epoch: teacher; students towards the teacher's sign codes; GCN;
students towards the beacons (and still the teacher). Ablations: ``gch-no-gcn`` (no beacon
phases; its second student pass goes towards the teacher, so it gets as many student updates
as GCH) and ``gch-no-teacher`` (students trained on labels directly: the likelihood between
the two students' codes, as in DCMH, and no teacher; its GCN scores beacons against beacons,
there being no teacher's codes -- its config says so, ``gcn_reference="beacons"``). A loss that turns non-finite stops
training with the net and the learning rate to lower.

Settings and the epoch count are chosen on a validation part carved from the training rows
(``fit(validation=...)``, ``benchmarks/mAP.py``), never on the test queries.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from hashret.errors import HashretError, check
from hashret.models.base import TorchHashModel, adam, register
from hashret.models.losses import label_similarity, pairwise_nll


GRAPHS = ("dot", "jaccard", "strong")


def normalized_adjacency(labels: torch.Tensor, graph: str = "dot") -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 over the batch's label graph: A_ij = l_i . l_j (``dot``, the
    paper's), the Jaccard overlap J_ij = l_i . l_j / |l_i or l_j| (``jaccard``), or only the
    strong links, A_ij = 1 where J_ij >= 1/2 (``strong``: the items share at least half of the
    labels either has). With one label per item all three are the same graph; with several,
    dot products make the items with many labels hubs that every beacon averages over, and
    a batch of items with 3-4 labels each links nearly every pair (hence ``strong``)."""
    a = labels @ labels.T
    if graph in ("jaccard", "strong"):
        sizes = labels.sum(dim=1)
        union = sizes[:, None] + sizes[None, :] - a
        a = a / union.clamp_min(1e-12)
        if graph == "strong":
            a = (a >= 0.5).to(a.dtype)
    a = a + torch.eye(len(labels), dtype=a.dtype, device=a.device)
    d = a.sum(dim=1).rsqrt()
    return d[:, None] * a * d[None, :]


FUSIONS = ("centred", "paper")


def semantic_fusion(fx: torch.Tensor, fy: torch.Tensor, form: str = "centred") -> torch.Tensor:
    """Each modality's batch features re-weighted by the other's, then averaged.

    ``form="paper"``, the paper's (seed 004) as the public code normalises it: W = fx fy^T /
    max |fx fy^T|, f_r = (W^T fx + W fy) / 2.

    ``form="centred"``, hashret's (GCH's default), two departures, both because the paper's
    collapsed here: the affinity is the cosine of batch-centred features (the students' ReLU
    features are all positive, so raw products made every item look alike), normalised by
    its largest magnitude; and the re-weighted features are added to each item's own (a
    residual), since W^T fx alone averages the whole batch into nearly one vector and the
    GCN then gave every item the same beacon: f_r = ((fx + W fy) + (fy + W^T fx)) / 2."""
    check(form in FUSIONS, f"unknown fusion {form!r}: use centred (hashret's) or paper")
    if form == "paper":
        w = fx @ fy.T
        w = w / w.abs().max().clamp_min(1e-12)
        return 0.5 * (w.T @ fx + w @ fy)
    cx = nnf.normalize(fx - fx.mean(dim=0, keepdim=True), dim=1)
    cy = nnf.normalize(fy - fy.mean(dim=0, keepdim=True), dim=1)
    w = cx @ cy.T
    w = w / w.abs().max().clamp_min(1e-12)
    return 0.5 * ((fx + w @ fy) + (fy + w.T @ fx))


class _HashNet(nn.Module):
    """MLP body -> (features, tanh hash, sigmoid label prediction made from the hash)."""

    def __init__(self, d_in, hidden, depth, bits, n_labels, dropout, batchnorm, act):
        super().__init__()
        layers, d = [], d_in
        for _ in range(depth):
            layers.append(nn.Linear(d, hidden))
            if batchnorm:
                layers.append(nn.BatchNorm1d(hidden))
            layers.append(act())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = hidden
        self.body = nn.Sequential(*layers)
        self.hash = nn.Linear(d, bits)
        self.label = nn.Linear(bits, n_labels)

    def forward(self, x):
        f = self.body(x)
        h = torch.tanh(self.hash(f))
        return f, h, torch.sigmoid(self.label(h))


class _GCN(nn.Module):
    """Two graph convolutions over the batch graph: ReLU, then tanh -> beacon codes."""

    def __init__(self, d_in, hidden, bits, n_labels):
        super().__init__()
        self.w1 = nn.Linear(d_in, hidden)
        self.w2 = nn.Linear(hidden, bits)
        self.label = nn.Linear(bits, n_labels)

    def forward(self, f, adj):
        h = torch.relu(adj @ self.w1(f))
        hb = torch.tanh(adj @ self.w2(h))
        return hb, torch.sigmoid(self.label(hb))


def _sign(h):
    return torch.where(h >= 0, 1.0, -1.0).to(h.dtype)


def gch_loss(h, theta, s, pred, labels, alpha, gamma, beacons=None, beta=0.0, weights=None):
    """One net's GCH loss: alpha * NLL(S, Theta) + gamma * ||L_pred - L||^2 (+ beta * ||H^b -
    H||^2 for a student pulled towards the beacons), each term a mean per element (pair,
    label, bit), with Theta = Gamma(H, reference), Gamma(A, B)_ij = <a_i, b_j> / 2;
    ``weights``: how many pairs each column of Theta stands for (see ``GCH._scores``)."""
    loss = alpha * pairwise_nll(theta, s, "mean", weights) + gamma * ((pred - labels) ** 2).mean()
    if beacons is not None:
        loss = loss + beta * ((beacons - h) ** 2).mean()
    return loss


def _label_groups(lab):
    """The distinct label rows of ``lab``, each row's group, the first row of each group, and
    how many rows each has."""
    rows, inverse, counts = torch.unique(lab, dim=0, return_inverse=True, return_counts=True)
    first = torch.full((len(rows),), len(lab), dtype=torch.long, device=lab.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(lab), device=lab.device), "amin")
    return rows, inverse, first, counts.to(lab.dtype)


def gamma_pairs(a, b):
    """Gamma(A, B)_ij = <a_i, b_j> / 2."""
    return 0.5 * a @ b.T


@register
class GCH(TorchHashModel):
    name = "gch"
    defaults = {
        "epochs": 60, "batch_size": 128,
        "hidden": 512, "text_depth": 3, "image_depth": 1, "label_depth": 2,
        "dropout": 0.0, "gcn_hidden": 512,
        "lr_label": 1e-3, "lr_image": 1e-3, "lr_text": 1e-3, "lr_gcn": 1e-3, "weight_decay": 1e-5,
        # beacon weight 1: it beat 3 on Wikipedia validation, by far with dropout in the
        # students (benchmark.TUNING); the tuning grid varies the likelihood's form and
        # gamma_label (1 or 0.1: no one value serves every dataset)
        "alpha_likelihood": 1.0, "beta_beacon": 1.0, "gamma_label": 1.0,
        # the image student's own beacon weight (None: beta_beacon for both, the paper's):
        # an ablation knob -- on Wikipedia a weaker pull on the images lowered validation mAP
        # in both directions (README, "Beacon weights")
        "beta_beacon_image": None,
        # two more ablation knobs of the beacon pass, both below the default on Wikipedia
        # validation (README, "Beacon weights"): its teacher term ("teacher", the paper's, or
        # "none": beacons and labels only), and epochs whose second student pass still goes
        # towards the teacher, as gch-no-gcn's, while the GCN already trains
        "beacon_pass_teacher": "teacher", "beacon_warmup": 0,
        # what the GCN's likelihood scores the beacons against: "teacher" (Gamma(H^l, H^b), as
        # the students are scored; higher validation mAP on Wikipedia, README "Beacons in the
        # teacher's space") or "beacons" (the paper's Gamma(H^b, H^b)); see _fit
        "gcn_reference": "teacher",
        "use_teacher": True, "use_gcn": True,
        # cosine decay, not a constant rate: with a constant rate the beacon pass makes the
        # students' validation mAP zigzag between checkpoints (NUS-WIDE + synthetic image, 64
        # bits: mean |change| over 5 epochs 0.019 vs 0.005 with cosine), so the epoch validation
        # keeps is a spike that a refit on more rows does not land on (README, "Schedule")
        "lr_schedule": "cosine", "likelihood": "all", "graph": "dot",
        # the epoch count the cosine decays over (None: epochs); a refit that stops at the
        # epoch validation chose keeps the candidate's horizon, so it follows the same rates
        "lr_horizon": None,
        # how the GCN's input fuses the two students' features: "centred" (hashret's: centred
        # cosine affinity plus a residual; the paper's form gave every item of a batch nearly
        # the same beacon here, see semantic_fusion) or "paper"
        "fusion": "centred",
    }

    def _build(self):
        cfg = self.config
        torch.manual_seed(cfg["seed"])
        b, c, hid = self.bits, cfg["n_labels"], cfg["hidden"]
        leaky = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.nets = nn.ModuleDict({
            "label": _HashNet(c, hid, cfg["label_depth"], b, c, 0.0, True, leaky),
            "image": _HashNet(cfg["image_dim"], hid, cfg["image_depth"], b, c, cfg["dropout"], False, nn.ReLU),
            "text": _HashNet(cfg["text_dim"], hid, cfg["text_depth"], b, c, cfg["dropout"], False, nn.ReLU),
            "gcn": _GCN(hid, cfg["gcn_hidden"], b, c),
        })

    # -- training ------------------------------------------------------------------------
    def _fit(self, image, text, labels, progress=False, device="cpu"):
        from tqdm.auto import tqdm

        cfg = self.config
        check(cfg["lr_schedule"] in ("constant", "cosine"),
              f"unknown lr_schedule {cfg['lr_schedule']!r}: use constant or cosine")
        horizon = cfg["lr_horizon"] or cfg["epochs"]
        check(horizon >= cfg["epochs"], f"lr_horizon {horizon} is shorter than epochs {cfg['epochs']}: "
              "give lr_horizon >= epochs (or leave it unset to decay over the epochs)")
        check(cfg["graph"] in GRAPHS,
              f"unknown graph {cfg['graph']!r}: use dot (the paper's label graph), jaccard or strong")
        check(cfg["beacon_pass_teacher"] in ("teacher", "none"),
              f"unknown beacon_pass_teacher {cfg['beacon_pass_teacher']!r}: use teacher (the paper's) or none")
        check(cfg["gcn_reference"] in ("beacons", "teacher"),
              f"unknown gcn_reference {cfg['gcn_reference']!r}: use beacons (the paper's) or teacher")
        check(cfg["fusion"] in FUSIONS, f"unknown fusion {cfg['fusion']!r}: use centred (hashret's) or paper")
        check(cfg["use_teacher"] or not cfg["use_gcn"] or cfg["gcn_reference"] == "beacons",
              "without a teacher there are no teacher codes to score the beacons against: "
              "use gcn_reference='beacons' (the paper's)")
        check(cfg["likelihood"] in ("all", "batch"),
              f"unknown likelihood {cfg['likelihood']!r}: use all (every training pair, the paper's) or batch")
        self._build()
        nets = self.nets.to(device)
        gen = torch.Generator().manual_seed(cfg["seed"])
        x = {"image": torch.from_numpy(image).to(device), "text": torch.from_numpy(text).to(device)}
        lab = torch.from_numpy(labels).to(device)
        n, bs = len(lab), cfg["batch_size"]
        # an optimiser for each net this variant trains (the ablations skip the teacher or the GCN)
        trained = [n for n, on in (("label", cfg["use_teacher"]), ("image", True), ("text", True),
                                   ("gcn", cfg["use_gcn"])) if on]
        opt = {name: adam(nets[name].parameters(), cfg[f"lr_{name}"], cfg["weight_decay"])
               for name in trained}
        # cosine decay of every net's learning rate, reaching 0 at the horizon
        sched = ([torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=horizon) for o in opt.values()]
                 if cfg["lr_schedule"] == "cosine" else [])
        self.updates = {name: 0 for name in trained}
        self.banks = self._initial_banks(nets, x, lab) if cfg["likelihood"] == "all" else None
        self._groups = _label_groups(lab)
        epoch = 0

        def step(name, loss):
            if not torch.isfinite(loss):
                raise HashretError(
                    f"gch: the {name} loss became {float(loss.detach())} in epoch {epoch + 1}: training diverged; "
                    f"lower lr_{name} (now {cfg[f'lr_{name}']}) or check the features for extreme values")
            opt[name].zero_grad()
            loss.backward()
            opt[name].step()
            self.updates[name] += 1
            return float(loss.detach())

        history = []
        bar = tqdm(range(cfg["epochs"]), desc="gch", disable=not progress, leave=False)
        for epoch in bar:
            perm = torch.randperm(n, generator=gen).to(device)
            batches = [perm[s:s + bs] for s in range(0, n, bs) if len(perm[s:s + bs]) > 1]
            losses = {}
            # 1. teacher: codes from labels
            if cfg["use_teacher"]:
                nets.train()
                for idx in batches:
                    l_b = lab[idx]
                    _, h, pred = nets["label"](l_b)
                    theta, s, w = self._scores("label", h, idx, lab)
                    losses["label"] = step("label", gch_loss(h, theta, s, pred, l_b, *self._weights, weights=w))
                    self._remember("label", idx, h)
            # the teacher is fixed from here to the end of the epoch
            teacher_codes = self._teacher_codes(lab, self._groups) if cfg["use_teacher"] else None
            # 2. students towards the teacher's codes (or, without a teacher, towards each other)
            self._student_phase(batches, x, lab, step, teacher_codes, beacons=False, losses=losses)
            if cfg["use_gcn"]:
                # 3. GCN over the batch graph, on the students' (fixed) features. Scored against
                # other beacons (the paper's), the beacons settle on a code of their own for each
                # class, about b/2 bits from the teacher's (measured on Wikipedia), and the students
                # are then pulled towards two unrelated targets; scored against the teacher's codes
                # they are made in the teacher's space
                target = teacher_codes if self._gcn_scored_by_teacher else None
                for idx in batches:
                    hb, pred = self._beacons(x, lab, idx, grad=True)
                    theta, s, w = self._scores("gcn", hb, idx, lab, fixed=target)
                    losses["gcn"] = step("gcn", gch_loss(hb, theta, s, pred, lab[idx], *self._weights,
                                                         weights=w))
                    self._remember("gcn", idx, hb)
                # 4. students towards the beacons (and still the teacher)
                self._student_phase(batches, x, lab, step, teacher_codes,
                                    beacons=epoch >= cfg["beacon_warmup"], losses=losses)
            else:
                # the ablation gets the same number of student updates as full GCH: a second
                # pass towards the teacher where GCH's second pass goes towards the beacons
                self._student_phase(batches, x, lab, step, teacher_codes, beacons=False, losses=losses)
            losses["lr"] = opt["image"].param_groups[0]["lr"]
            history.append(losses)
            for sc in sched:
                sc.step()
            # the rate in 2 significant digits: rounded to 3 decimals, a cosine-decayed 4e-4 read 0
            bar.set_postfix({k: f"{v:.2g}" if k == "lr" else round(v, 3) for k, v in losses.items()})
            self._epoch_done(epoch, cfg["epochs"])
        self.history = history
        self.banks = self._groups = None
        self.nets.to("cpu").eval()

    def stopped_config(self) -> dict:
        # stopped early, the run keeps the candidate's cosine horizon, hence the same rates
        cfg = super().stopped_config()
        if cfg:
            cfg["lr_horizon"] = self.config["lr_horizon"] or self.config["epochs"]
        return cfg

    @property
    def _gcn_scored_by_teacher(self):
        return self.config["use_teacher"] and self.config["gcn_reference"] == "teacher"

    @property
    def _weights(self):
        return self.config["alpha_likelihood"], self.config["gamma_label"]

    def _initial_banks(self, nets, x, lab):
        """For every training item, the latest output of each net whose codes the others are
        scored against: the paper's likelihood sums over all n training pairs, so a batch is
        scored against the whole training set (as DCMH keeps its F and G)."""
        cfg, banks = self.config, {}
        with torch.no_grad():
            nets.eval()
            if cfg["use_teacher"]:
                banks["label"] = nets["label"](lab)[1]
            else:
                banks["image"] = nets["image"](x["image"])[1]
                banks["text"] = nets["text"](x["text"])[1]
            if cfg["use_gcn"] and not self._gcn_scored_by_teacher:  # else: the teacher's codes
                banks["gcn"] = torch.zeros(len(lab), self.bits, device=lab.device)
                order = torch.arange(len(lab), device=lab.device)
                for s in range(0, len(lab), cfg["batch_size"]):
                    idx = order[s:s + cfg["batch_size"]]
                    banks["gcn"][idx] = self._beacons(x, lab, idx, grad=False)[0]
        return banks

    def _similarity(self, idx, lab):
        """Label similarities of a batch to what it is scored against: every training item
        (likelihood=all) or the batch itself."""
        return label_similarity(lab[idx], lab if self.banks is not None else lab[idx])

    def _scores(self, name, h, idx, lab, fixed=None):
        """Theta = Gamma(h, reference) for a batch's outputs ``h`` of net ``name``, the label
        similarities S, and the weight of each reference column (None: 1 each): the reference
        is every training item's latest outputs, or (likelihood=batch) the batch's own -- or,
        given ``fixed`` codes of every training item that are a function of its label row
        (the teacher's), those.

        Fixed codes over all n items repeat: items with the same label row have the same code
        and the same S with any item. Each distinct label row is then scored once and weighted
        by its count -- the same sum over all n pairs (the same mean, the same gradient, up to
        floating-point order), over 10 columns instead of 1,956 on Wikipedia."""
        if fixed is not None:
            if self.banks is None:
                return gamma_pairs(h, fixed[idx]), self._similarity(idx, lab), None
            rows, _, first, counts = self._groups
            return gamma_pairs(h, fixed[first]), label_similarity(lab[idx], rows), counts
        if self.banks is None:
            return gamma_pairs(h, h), self._similarity(idx, lab), None
        # the batch's own rows as they are now (with their gradient), the others as last seen:
        # scored against the bank, the batch's columns then replaced by Gamma(h, h) -- the same
        # Theta as the bank with the batch's rows swapped in, without a gradient for all n rows
        return (gamma_pairs(h, self.banks[name]).index_copy(1, idx, gamma_pairs(h, h)),
                self._similarity(idx, lab), None)

    def _remember(self, name, idx, h):
        if self.banks is not None and name in self.banks:
            self.banks[name][idx] = h.detach()

    def _beacons(self, x, lab, idx, grad, features=None):
        """The GCN's beacons (and label predictions) for batch ``idx``, from the students'
        features as they are now (``features``: those, already computed)."""
        nets = self.nets
        if features is None:
            with torch.no_grad():
                nets["image"].eval()
                nets["text"].eval()
                features = nets["image"](x["image"][idx])[0], nets["text"](x["text"][idx])[0]
        fx, fy = features
        with torch.set_grad_enabled(grad):
            fused = semantic_fusion(fx, fy, self.config["fusion"])
            return nets["gcn"](fused, normalized_adjacency(lab[idx], self.config["graph"]))

    def _teacher_codes(self, lab, groups=None):
        """The teacher's sign codes of every row of ``lab`` (fixed while others learn), made
        once per distinct label row, so rows with the same labels have exactly the same code
        (what the likelihood's grouping in ``_scores`` relies on); ``groups``: ``lab``'s
        ``_label_groups``, when made already."""
        rows, inverse = (groups[0], groups[1]) if groups is not None else torch.unique(
            lab, dim=0, return_inverse=True)
        with torch.no_grad():
            self.nets["label"].eval()
            return _sign(self.nets["label"](rows)[1])[inverse]

    def _student_phase(self, batches, x, lab, step, teacher_codes, beacons, losses):
        cfg, nets = self.config, self.nets
        beta = {"image": cfg["beta_beacon"] if cfg.get("beta_beacon_image") is None
                else cfg["beta_beacon_image"], "text": cfg["beta_beacon"]}
        alpha, gamma = self._weights
        if beacons and cfg["beacon_pass_teacher"] == "none":
            alpha = 0.0
        for idx in batches:
            l_b = lab[idx]
            # both students' forward passes first: the text student's does not depend on the
            # image student's update that comes before its own
            out = {}
            for m in ("image", "text"):
                nets[m].train()
                out[m] = nets[m](x[m][idx])
            hb = None
            if beacons:
                nets["gcn"].eval()
                # the beacons are made from the students as they are now; without dropout the
                # training passes just made give exactly those features (with dropout, the
                # beacons take the features without it, in a pass of their own)
                reuse = (out["image"][0].detach(), out["text"][0].detach()) if cfg["dropout"] == 0 else None
                hb = _sign(self._beacons(x, lab, idx, grad=False, features=reuse)[0])
            for m in ("image", "text"):
                _, h, pred = out[m]
                if teacher_codes is not None:
                    theta, s, w = self._scores(m, h, idx, lab, fixed=teacher_codes)
                else:  # DCMH-style: each student against the other's codes
                    other = "text" if m == "image" else "image"
                    if self.banks is not None:
                        ref = self.banks[other]
                    else:
                        with torch.no_grad():
                            ref = nets[other](x[other][idx])[1]
                    theta, s, w = gamma_pairs(h, ref), self._similarity(idx, lab), None
                losses[m] = step(m, gch_loss(h, theta, s, pred, l_b, alpha, gamma, hb, beta[m], weights=w))
                self._remember(m, idx, h)

    # -- encoding ------------------------------------------------------------------------
    def beacon_codes(self, image, text, labels, seed: int = 0) -> np.ndarray:
        """The trained GCN's beacon codes ({-1, +1}, int8) for items given both modalities and
        their labels -- the targets the students were pulled towards. A beacon depends on the
        label graph of its batch, so the items go through in seeded random batches of the
        training batch size, as in training. For diagnosis: how good a target the beacons are
        beside the students' own codes (``benchmarks/gch_diagnostics.py beacons``)."""
        check(self.fitted, f"the {self.name} model is not trained: fit it or load a checkpoint")
        check(self.config["use_gcn"], f"{self.name} has no GCN, hence no beacons: use gch or gch-no-teacher")
        image, text, labels = self._checked_part(image, text, labels, "beacon")
        x = {"image": torch.from_numpy(self._standardise(image, "image")),
             "text": torch.from_numpy(self._standardise(text, "text"))}
        lab = torch.from_numpy(labels)
        out = np.empty((len(lab), self.bits), dtype=np.int8)
        perm = torch.randperm(len(lab), generator=torch.Generator().manual_seed(seed))
        self.nets.eval()
        for s in range(0, len(lab), self.config["batch_size"]):
            idx = perm[s:s + self.config["batch_size"]]
            out[idx.numpy()] = _sign(self._beacons(x, lab, idx, grad=False)[0]).numpy().astype(np.int8)
        return out

    def _project(self, x, modality):
        net = self.nets[modality]
        net.eval()
        dev = next(net.parameters()).device  # also called mid-training, for validation scores
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x)).to(dev))[1].cpu().numpy()



@register
class GCHNoGCN(GCH):
    """Ablation: no GCN, no beacon codes."""

    name = "gch-no-gcn"
    defaults = {**GCH.defaults, "use_gcn": False}


@register
class GCHNoTeacher(GCH):
    """Ablation: no label encoder; the students learn from labels directly (their likelihood
    is taken against each other's codes). Everything else is GCH's, but for what cannot stay:
    GCH scores its beacons against the teacher's codes, and without a teacher they are scored
    against each other, Gamma(H^b, H^b) -- the paper's form, stated here, not implied."""

    name = "gch-no-teacher"
    defaults = {**GCH.defaults, "use_teacher": False, "gcn_reference": "beacons"}


@register
class GCHPaper(GCH):
    """GCH as the paper writes it: its fusion (``fusion="paper"``), the GCN's likelihood over
    beacons, Gamma(H^b, H^b) (``gcn_reference="beacons"``), the likelihood over all n
    training pairs (``likelihood="all"``), the beacon pass with its teacher term, the label
    dot-product graph, one beacon weight for both students. What stays hashret's, stated:
    each loss term is a mean per element (pair, bit, label) where the paper sums (the weights
    then mean the same at any batch size, code length and label count; the paper gives no
    values for them), and the optimiser settings (Adam, the cosine schedule), which the paper
    leaves open."""

    name = "gch-paper"
    defaults = {**GCH.defaults, "fusion": "paper", "gcn_reference": "beacons", "likelihood": "all",
                "beacon_pass_teacher": "teacher", "beacon_warmup": 0, "graph": "dot",
                "beta_beacon_image": None}
