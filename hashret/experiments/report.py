"""Writers for benchmark results: the markdown table, CSV files and PNG plots."""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

DIRECTIONS = {"i2t": "I→T", "t2i": "T→I"}


def _atomic_text(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def summarise(records, metric="map_all"):
    """{(method, direction, bits): (mean, std, n)} over seeds."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["method"], r["direction"], r["bits"])].append(r[metric])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}


def format_table(records, header: str, metric="map_all") -> str:
    """Markdown: one row per method, columns I→T and T→I per code length, mean ± std."""
    if not records:
        return header + "\n\n(no results)\n"
    stats = summarise(records, metric)
    methods = list(dict.fromkeys(r["method"] for r in records))
    bits = sorted({r["bits"] for r in records})
    cols = [(d, b) for d in DIRECTIONS for b in bits]
    best = {}
    for col in cols:
        vals = [stats[(m, *col)][0] for m in methods if (m, *col) in stats]
        best[col] = max(vals) if vals else None
    lines = [header, "", "| method | " + " | ".join(f"{DIRECTIONS[d]} {b}" for d, b in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for m in methods:
        cells = []
        for col in cols:
            if (m, *col) not in stats:
                cells.append("–")
                continue
            mean, std, n = stats[(m, *col)]
            cell = f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}"
            cells.append(f"**{cell}**" if mean == best[col] and len(methods) > 1 else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_records(out: Path, records):
    _atomic_text(out / "results.json", json.dumps(records, indent=1))
    keys = list(dict.fromkeys(k for r in records for k in r))
    tmp = out / "results.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(records)
    os.replace(tmp, out / "results.csv")


def write_curves(out: Path, curves):
    """curves: {(method, bits, direction): {"p_at_n": [...], "precision": [...], "recall": [...]}}
    (already averaged over seeds). Writes p_at_n.csv and pr_curve.csv."""
    with open(out / "p_at_n.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "bits", "direction", "n", "precision"])
        for (m, b, d), c in sorted(curves.items()):
            for n, p in enumerate(c["p_at_n"], start=1):
                w.writerow([m, b, d, n, f"{p:.6f}"])
    with open(out / "pr_curve.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "bits", "direction", "radius", "precision", "recall"])
        for (m, b, d), c in sorted(curves.items()):
            for r, (p, rc) in enumerate(zip(c["precision"], c["recall"])):
                w.writerow([m, b, d, r, f"{p:.6f}", f"{rc:.6f}"])


def plot_curves(out: Path, curves, title: str) -> list:
    """PR (over Hamming radius) and P@N plots, one PNG per code length and kind.
    Returns the files written; nothing when matplotlib is missing (``pip install hashret[plots]``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for b in sorted({k[1] for k in curves}):
        for kind in ("pr", "p_at_n"):
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for ax, d in zip(axes, DIRECTIONS):
                for (m, bb, dd), c in sorted(curves.items()):
                    if bb != b or dd != d:
                        continue
                    if kind == "pr":
                        ax.plot(c["recall"], c["precision"], marker=".", label=m)
                        ax.set_xlabel("recall")
                    else:
                        ax.plot(np.arange(1, len(c["p_at_n"]) + 1), c["p_at_n"], label=m)
                        ax.set_xlabel("N (top-N retrieved)")
                    ax.set_ylabel("precision")
                ax.set_title(f"{DIRECTIONS[d]}, {b} bits")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            fig.suptitle(title + (" — precision-recall over Hamming radius" if kind == "pr"
                                  else " — precision@top-N"))
            fig.tight_layout()
            path = out / f"{kind}_{b}bits.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
