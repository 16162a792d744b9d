"""The field's standard mAP table: every method x {I->T, T->I} x code lengths.

    python benchmarks/mAP.py                       # Wikipedia, every method, 16/32/64 bits, seed 0
    python benchmarks/mAP.py --dataset wikipedia --bits 16,32,64 --seeds 0,1,2 --out results/wiki
    python benchmarks/mAP.py --dataset synthetic --bits 64 --set lr_schedule=constant   # GCH family: no decay
    python benchmarks/mAP.py --methods gch --no-tune --set gamma_label=0.1 --validation-only   # try, on validation

Writes table.md, results.csv, results.json, PR and P@N curves (CSV, PNG) and the split to --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from hashret.cli import benchmark, run_main  # noqa: E402

if __name__ == "__main__":
    # the same click command as `hashret benchmark`, so the script and the CLI cannot drift
    run_main(benchmark)
