"""Where GCH's figures come from, on a trained checkpoint (a benchmark run's
``models/gch-BITS-seedS[-cK]`` or a ``hashret train`` folder) and the split saved beside it.

    python benchmarks/gch_diagnostics.py beacons --dataset synthetic:n_train=5000 --model RUN/models/gch-64-seed0-c0
    python benchmarks/gch_diagnostics.py t2i --dataset wikipedia --model RUN/models/gch-64-seed0

``beacons``: how good a target the beacons are. Over the rows the model was trained on, the
label mAP (relevance: a shared label) of each kind of code against its own kind -- the teacher's,
each student's, the beacons -- and of each student's codes against the teacher's and the
beacons; and the batch label graph the GCN averages over (neighbours per item, and the share of
the adjacency's weight on items with exactly the item's label set). A beacon below the
students' own codes pulls them towards a worse target.

``t2i`` (single-label data): what sets text->image mAP. The share of database image codes
nearest their own class's codeword (the teacher's code of the one-hot label); the test
queries' text codes against the class codewords: how often the nearest is the query's class,
and the mAP a database of perfect class clusters would give for that ranking of the
classes; text->image with the real database codes and with every database image replaced by
its class's codeword; and the same ranking bound for the best plain classifier of the text
features (softmax regression or a one-hidden-layer MLP, chosen on the validation rows, then
trained on the training and validation rows and scored once on the queries).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import click  # noqa: E402
import numpy as np  # noqa: E402

from hashret.cli import run_main  # noqa: E402


def _load(dataset, model_dir, data_root):
    from hashret.data import load_dataset
    from hashret.errors import check
    from hashret.models import load_checkpoint
    from hashret.models.checkpoint import read_checkpoint_info

    model_dir = Path(model_dir)
    check((model_dir / "split.npz").is_file(), f"{model_dir} has no split.npz: pass a folder written by "
          "benchmarks/mAP.py or hashret train")
    ds = load_dataset(dataset, data_root=data_root, split=str(model_dir / "split.npz"), seed=0)
    model = load_checkpoint(model_dir)
    check(model.name.startswith("gch"), f"{model_dir} holds a {model.name} model: pass a GCH checkpoint")
    trained_on = read_checkpoint_info(model_dir).get("trained_on")
    rows = ds.part("train")
    if trained_on is not None and trained_on != len(rows) and len(ds.split.validation):
        rows = ds.refit_rows()  # the refit: training and validation rows
    check(trained_on in (None, len(rows)), f"{model_dir} was trained on {trained_on} rows, the split gives "
          f"{len(rows)}: pass the dataset it was trained on")
    return ds, model, rows


def label_map(query_codes, db_codes, query_labels, db_labels):
    from hashret.metrics import map_all

    return round(float(map_all(query_codes, db_codes, query_labels, db_labels)), 4)


def graph_stats(labels, batch_size, batches=20, seed=0):
    """Neighbours per item in a random batch's label graph (A = L L^T, no self-loop), and the
    share of A's weight on neighbours with exactly the item's label set (over items with a
    neighbour)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels, dtype=np.float64)
    nb, same = [], []
    for _ in range(batches):
        b = labels[rng.choice(len(labels), min(batch_size, len(labels)), replace=False)]
        a = b @ b.T
        np.fill_diagonal(a, 0)
        eq = (b[:, None, :] == b[None, :, :]).all(-1)
        nb.append((a > 0).sum(1).mean())
        has = a.sum(1) > 0
        same.append(((a * eq).sum(1)[has] / a.sum(1)[has]).mean())
    return {"neighbours": round(float(np.mean(nb)), 1), "same_label_set_share": round(float(np.mean(same)), 3)}


@click.group()
def diagnostics():
    """Diagnose a trained GCH checkpoint."""


@diagnostics.command()
@click.option("--dataset", required=True, help="The dataset the model was trained on.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--data-root", default=None, help="Folder holding the dataset [default: the usual search].")
@click.option("--queries", type=int, default=500, show_default=True, help="Rows drawn (seeded) as queries.")
@click.option("--seed", type=int, default=0, show_default=True)
def beacons(dataset, model_dir, data_root, queries, seed):
    """Label mAP of the teacher's, the students' and the beacons' codes over the training rows."""
    import torch

    ds, m, rows = _load(dataset, model_dir, data_root)
    img, txt, lab = ds.features("image", rows), ds.features("text", rows), ds.labels[rows]
    codes = {"image": m.encode(img, "image"), "text": m.encode(txt, "text")}
    if m.config["use_teacher"]:
        codes["teacher"] = m._teacher_codes(torch.from_numpy(lab.astype(np.float32))).numpy()
    codes["beacon"] = m.beacon_codes(img, txt, lab, seed=seed)
    q = np.random.default_rng(seed).choice(len(rows), min(queries, len(rows)), replace=False)
    out = {"model": str(model_dir), "rows": len(rows), **graph_stats(lab, m.config["batch_size"], seed=seed)}
    for k, c in codes.items():
        out[f"map {k}->{k}"] = label_map(c[q], c, lab[q], lab)
    for s in ("image", "text"):
        for t in ("teacher", "beacon"):
            if t in codes:
                out[f"map {s}->{t}"] = label_map(codes[s][q], codes[t], lab[q], lab)
    print(json.dumps(out))


def _oracle_map(scores, query_class, sizes):
    """mAP of a database of perfect class clusters (``sizes`` items per class) ranked class by
    class in the order of ``scores`` (higher first): a query whose class comes after P items
    has AP = mean over j = 1..n of j / (P + j)."""
    aps = []
    for s, c in zip(scores, query_class):
        order = list(np.argsort(-s, kind="stable"))
        before = sizes[order[:order.index(c)]].sum()
        j = np.arange(1, sizes[c] + 1)
        aps.append(np.mean(j / (before + j)))
    return round(float(np.mean(aps)), 4)


def _best_text_classifier(x, y, tr, va, n_classes, seed):
    """Softmax regression or an MLP (64 or 256 hidden units) x weight decay, chosen by the
    ranking bound on the validation rows, then trained on training + validation rows."""
    import torch

    def fit(rows, hidden, wd):
        torch.manual_seed(seed)
        d = x.shape[1]
        net = (torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes))
               if hidden else torch.nn.Linear(d, n_classes))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=wd)
        xt, yt = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
        for _ in range(300):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xt), yt).backward()
            opt.step()
        return lambda r: net(torch.from_numpy(x[r])).detach().numpy()

    sizes = np.bincount(y[tr], minlength=n_classes)
    scored = []
    for hidden in (0, 64, 256):
        for wd in (0.0, 1e-3, 1e-2, 1e-1):
            scored.append((_oracle_map(fit(tr, hidden, wd)(va), y[va], sizes), hidden, wd))
    best = max(scored)
    return fit(np.concatenate([tr, va]), best[1], best[2]), {"hidden": best[1], "weight_decay": best[2],
                                                              "validation_bound": best[0]}


@diagnostics.command()
@click.option("--dataset", required=True, help="A single-label dataset the model was trained on.")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False))
@click.option("--data-root", default=None, help="Folder holding the dataset [default: the usual search].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the plain classifier.")
def t2i(dataset, model_dir, data_root, seed):
    """What sets text->image mAP on single-label data: the text queries' codes or the database."""
    import torch

    from hashret.errors import check
    from hashret.metrics import hamming_distances

    ds, m, _ = _load(dataset, model_dir, data_root)
    check((ds.labels.sum(1) == 1).all(), f"{ds.name} is not single-label: the t2i bound needs one class per item")
    check(m.config["use_teacher"], "the t2i diagnosis needs the teacher's class codewords: pass a gch checkpoint")
    check(len(ds.split.validation) > 0, "the split has no validation rows to choose the plain classifier on")
    q, tr, va = ds.part("query"), ds.part("train"), ds.split.validation
    db = ds.part("database")
    y, k = ds.labels.argmax(1), ds.labels.shape[1]
    words = m._teacher_codes(torch.eye(k)).numpy()  # class codewords: the teacher's codes of one-hot labels
    tq, idb = m.encode_rows(ds, "text", q), m.encode_rows(ds, "image", db)
    dist = hamming_distances(tq, words).astype(np.float32)
    # ties between codewords broken at random (seeded), as a ranking by distance would
    jitter = np.random.default_rng(seed).random(dist.shape) * 1e-3
    sizes = np.bincount(y[db], minlength=k)
    x = ds.features("text", np.arange(ds.n_items)).astype(np.float32)
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8
    predict, chosen = _best_text_classifier((x - mu) / sd, y, tr, va, k, seed)
    out = {"model": str(model_dir), "queries": len(q), "database": len(db),
           "text code accuracy": round(float((dist.argmin(1) == y[q]).mean()), 4),
           "text code ranking bound": _oracle_map(-dist + jitter, y[q], sizes),
           "database image codes nearest their class's codeword":
               round(float((hamming_distances(idb, words).argmin(1) == y[db]).mean()), 4),
           "t2i": label_map(tq, idb, ds.labels[q], ds.labels[db]),
           "t2i, database snapped to codewords": label_map(tq, words[y[db]], ds.labels[q], ds.labels[db]),
           "plain classifier": chosen}
    scores = predict(q)
    out["plain classifier accuracy"] = round(float((scores.argmax(1) == y[q]).mean()), 4)
    out["plain classifier ranking bound"] = _oracle_map(scores, y[q], sizes)
    print(json.dumps(out))


if __name__ == "__main__":
    run_main(diagnostics)
