"""Fault injection, the long run: damaged checkpoints and indexes, bad input through the CLI
and the API, second writers, and SIGKILL during add / remove / compact / build-index with
--resume. Prints the outcome counts per family; exits 1 if any trial ended badly
(traceback, signal, silent wrong answer, a failing command that changed the index, an
unclear error, or lost data).

    python benchmarks/faults.py                      # ~300 trials, 120 kills
    python benchmarks/faults.py --scale 1 --kills 20 # what the test suite runs
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hashret.eval.faults import BAD, run_faults  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=3, help="Repeats of the randomised damage trials.")
    ap.add_argument("--kills", type=int, default=120, help="SIGKILL trials (2/3 index ops, 1/3 builds).")
    ap.add_argument("--out", default=None, help="Write every bad trial as JSON here.")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hashret-faults-") as tmp:
        res = run_faults(tmp, seed=args.seed, scale=args.scale, kills=args.kills)
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
