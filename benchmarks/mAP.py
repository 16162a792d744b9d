"""The field's standard mAP table: every method x {I->T, T->I} x code lengths.

    python benchmarks/mAP.py                       # Wikipedia, every method, 16/32/64 bits, seed 0
    python benchmarks/mAP.py --dataset wikipedia --bits 16,32,64 --seeds 0,1,2 --out results/wiki

Writes table.md, results.csv, results.json, PR and P@N curves (CSV, PNG) and the split to --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import click  # noqa: E402

from hashret.cli import benchmark_options, run_main  # noqa: E402


@click.command()
@benchmark_options
def mAP(dataset, methods, bits, seeds, out, topk, radius, split, reuse, data_root):
    """mAP@all (and mAP@K, P/R within a radius, curves) for every method on one dataset."""
    from hashret.eval.benchmark import run_benchmark

    run_benchmark(dataset=dataset, methods=methods, bits=bits, seeds=seeds, out=out, topk=topk,
                  radius=radius, split=split, reuse=reuse, data_root=data_root, log=click.echo)


if __name__ == "__main__":
    run_main(mAP)
