"""Training speed of every method's default training on Wikipedia, beside its floor.

    python benchmarks/train_speed.py                 # 64 bits, torch's default threads
    python benchmarks/train_speed.py --threads 1 --methods gch,dcmh-mlp
    python benchmarks/train_speed.py --main-job      # then the whole default mAP job, timed

For each method: the wall time of ``model.fit`` with the benchmark's protocol minus the
tuning grid (a tenth of the training part held out as validation, the epoch chosen on it),
and for the models trained by gradient steps the optimiser steps per second. Beside each, in
the same run, its *floor*: a plain PyTorch loop over the same networks -- every Linear layer
of each net, in order, on random batches of the net's input width and the training batch
size -- with a mean-square loss and the same optimiser (Adam, fused), for the same number
of updates per net, and nothing else: no likelihood over all pairs, no banks, no validation
scoring. "x floor" is the method's wall time over the floor's. Closed-form methods have no
steps and no floor. Time it on a quiet machine and say what else ran.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hashret.data import load_dataset  # noqa: E402
from hashret.models import build_for_dataset  # noqa: E402
from hashret.models.base import adam  # noqa: E402


def floor_seconds(nets: dict, updates: dict, batch: int, seed: int = 0) -> float:
    """The plain loop: each net's Linear layers, in order, ``updates[name]`` Adam steps."""
    gen = torch.Generator().manual_seed(seed)
    plans = []
    for name, n in updates.items():
        layers = [m for m in nets[name].modules() if isinstance(m, torch.nn.Linear)]
        if not layers or n == 0:
            continue
        # the hash net's layers as a chain (the label head reads the hash layer, as in training)
        plans.append((layers, n, adam([p for m in layers for p in m.parameters()], 1e-4)))
    t0 = time.perf_counter()
    for layers, n, opt in plans:
        x0 = torch.randn(batch, layers[0].in_features, generator=gen)
        for _ in range(n):
            x = x0
            for i, layer in enumerate(layers):
                x = layer(x) if i == len(layers) - 1 else torch.relu(layer(x))
            loss = (x ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="gch,gch-no-gcn,gch-no-teacher,dcmh-mlp,label-ridge,cca-itq")
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    ap.add_argument("--out", default=None, help="write results.json here")
    ap.add_argument("--main-job", action="store_true",
                    help="then time `python benchmarks/mAP.py` with its defaults (~15 min on 2 cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # torch imports its compiler stack (~1.3 s) when a process makes its first optimiser: once
    # per process, not per training, so it is paid here and not by the first method timed
    adam([torch.zeros(1, requires_grad=True)], 1e-3)
    ds = load_dataset("wikipedia")
    train = ds.part("train")
    rng = np.random.default_rng(0)
    perm = rng.permutation(train)
    n_val = len(perm) // 10
    val, fit = perm[:n_val], perm[n_val:]
    records = []
    print(f"Wikipedia, {args.bits} bits, {len(fit)} training + {n_val} validation rows, "
          f"{torch.get_num_threads()} torch threads")
    for method in args.methods.split(","):
        model = build_for_dataset(method, ds, bits=args.bits, seed=0)
        t0 = time.perf_counter()
        model.fit(ds.image[fit], ds.text[fit], ds.labels[fit],
                  validation=(ds.image[val], ds.text[val], ds.labels[val]))
        wall = time.perf_counter() - t0
        rec = {"method": method, "wall_s": round(wall, 2)}
        updates = getattr(model, "updates", None)
        nets = getattr(model, "nets", None)
        if updates and nets is not None:
            steps = sum(updates.values())
            floor = floor_seconds(nets, updates, model.config.get("batch_size", 128))
            rec.update(steps=steps, steps_per_s=round(steps / wall, 1), floor_s=round(floor, 2),
                       x_floor=round(wall / floor, 2))
            print(f"  {method:15s} {wall:7.1f} s  {steps:6d} steps  {steps / wall:7.1f} steps/s   "
                  f"floor {floor:6.1f} s  ({wall / floor:4.1f}x floor)", flush=True)
        elif nets is not None:
            print(f"  {method:15s} {wall:7.1f} s  (trained by steps it does not count: no floor yet)", flush=True)
        else:
            print(f"  {method:15s} {wall:7.1f} s  (closed form: no steps, no floor)", flush=True)
        records.append(rec)
    if args.main_job:
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(Path(__file__).with_name("mAP.py")), "--out", tmp],
                           check=True, stdout=subprocess.DEVNULL)
            main_s = time.perf_counter() - t0
        records.append({"method": "main job (benchmarks/mAP.py defaults)", "wall_s": round(main_s, 1)})
        print(f"  main job: {main_s / 60:.1f} min (python benchmarks/mAP.py, its defaults)")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps({"threads": torch.get_num_threads(),
                                                                  "bits": args.bits, "records": records},
                                                                 indent=1))


if __name__ == "__main__":
    main()
