"""Make a held-aside two-view dataset from real tagged data: the tag vocabulary is split into
two disjoint random halves, one the "image" view and one the "text" view, so every item has
two real, different descriptions and its real labels. Nobody tuned on it, so it answers "does
GCH win with its defaults on data it has never seen?" without waiting for new downloads.

    python benchmarks/tag_views.py --dataset nuswide-tc10 --out /tmp/nus-views.npz
    python benchmarks/mAP.py --dataset /tmp/nus-views.npz --bits 32,64 --seeds 0

Items keep their dataset's split (queries stay queries); items with no tag on one side are
dropped. The .npz holds image, text, labels, query, train, database and ids.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import click  # noqa: E402
import numpy as np  # noqa: E402

from hashret.cli import run_main  # noqa: E402


@click.command()
@click.option("--dataset", default="nuswide-tc10", show_default=True, help="A tagged dataset.")
@click.option("--data-root", default=None, help="Folder holding the dataset [default: the usual search].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the vocabulary split.")
@click.option("--out", required=True, type=click.Path(dir_okay=False))
def tag_views(dataset, data_root, seed, out):
    """Split the tag vocabulary of DATASET into two views and write a generic .npz."""
    from hashret.data import load_dataset
    from hashret.errors import check

    ds = load_dataset(dataset, data_root=data_root, seed=0)
    check(ds.has("text"), f"{dataset} has no tag view to split")
    tags = np.asarray(ds.features("text", np.arange(ds.n_items)))
    rng = np.random.default_rng(seed)
    side = rng.permutation(tags.shape[1]) % 2 == 0
    a, b = tags[:, side], tags[:, ~side]
    keep = (a.sum(1) > 0) & (b.sum(1) > 0)
    new_row = np.full(len(keep), -1)
    new_row[keep] = np.arange(int(keep.sum()))
    parts = {k: new_row[np.asarray(getattr(ds.split, k))] for k in ("query", "train", "database")}
    parts = {k: v[v >= 0] for k, v in parts.items()}
    ids = ds.ids[keep]
    np.savez_compressed(out, image=a[keep].astype(np.float32), text=b[keep].astype(np.float32),
                        labels=ds.labels[keep], ids=ids, **parts)
    click.echo(f"{out}: {int(keep.sum())} of {len(keep)} items (both views non-empty), "
               f"views of {int(side.sum())} and {int((~side).sum())} tags, {ds.labels.shape[1]} labels; "
               + ", ".join(f"{k} {len(v)}" for k, v in parts.items()))


if __name__ == "__main__":
    run_main(tag_views)
