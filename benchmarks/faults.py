"""Fault injection, the long run: damaged checkpoints and indexes, bad input through the CLI
and the API, second writers, and SIGKILL during add / remove / compact / build-index with
--resume. Prints the outcome counts per family; exits 1 if any trial ended badly
(traceback, signal, silent wrong answer, a failing command that changed the index, an
unclear error, or lost data).

    python benchmarks/faults.py                      # ~300 trials, 120 kills, 60 sharded kills
    python benchmarks/faults.py --scale 1 --kills 20 --shard-kills 0  # the test suite's size

The sharded index's kill families (benchmarks/shard_faults.py): SIGKILL of a process writing a
ShardedIndex from Python, and of `hashret serve` on a 3-shard index under 8 writing clients;
each restart must keep every acknowledged batch, show no batch in part, and answer as one index.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hashret.eval.faults import BAD, run_faults  # noqa: E402
from shard_faults import run_shard_kills  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=3, help="Repeats of the randomised damage trials.")
    ap.add_argument("--kills", type=int, default=120, help="SIGKILL trials (2/3 index ops, 1/3 builds).")
    ap.add_argument("--shard-kills", type=int, default=30,
                    help="SIGKILL trials of the sharded index, from Python and of the server (each).")
    ap.add_argument("--out", default=None, help="Write every bad trial as JSON here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hashret-faults-") as tmp:
        res = run_faults(tmp, seed=args.seed, scale=args.scale, kills=args.kills)
        sharded = run_shard_kills(tmp, seed=args.seed, python=args.shard_kills, served=args.shard_kills)
    for r in sharded:
        outcome = "lost" if r["outcome"] == "lost" else "ok"
        fam = res["counts"].setdefault(r["family"], {})
        fam[outcome] = fam.get(outcome, 0) + 1
    res["bad"] += [r for r in sharded if r["outcome"] == "lost"]
    res["total"] += len(sharded)
    for fam in ("shard-kill-python", "shard-kill-served"):
        runs = [r for r in sharded if r["family"] == fam]
        if runs:
            mid = sum(1 for r in runs if r.get("pending"))
            print(f"{fam}: {len(runs)} kills, {mid} landed inside a batch (a pending journal record "
                  f"the restart completed), {sum(1 for r in runs if r['outcome'] == 'lost')} lost")
    outcomes = ["detected", "harmless", "ok", *BAD]
    print(f"\n{res['total']} trials in {res['seconds']} s (seed {args.seed})\n")
    print("| family | " + " | ".join(outcomes) + " |")
    print("|---|" + "---|" * len(outcomes))
    for fam, c in res["counts"].items():
        print(f"| {fam} | " + " | ".join(str(c.get(o, 0)) for o in outcomes) + " |")
    for r in res["bad"][:20]:
        print("BAD:", json.dumps(r)[:400])
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(1 if res["bad"] else 0)


if __name__ == "__main__":
    main()
