"""Matchers vs their distilled codes vs the cascade, on synthetic scenes (or precomp data).

    python benchmarks/cascade.py                                   # all four matchers, ~40 min on 2 cores
    python benchmarks/cascade.py --matchers han --queries 200 --out results/han
    python benchmarks/cascade.py --dataset scenes:graded=0.5 --seeds 0,1,2   # graded relevance, 3 seeds
    python benchmarks/cascade.py --dataset precomp:/data/f30k_precomp --bits 128
    python benchmarks/cascade.py --merge results/a,results/b --out results/ab   # one report of runs

Writes table.md, results.json (records: matcher, mode, rsum, r{1,5,10}_{i2t,t2i},
ms_per_query, fraction_scored, ...; each head's record with head, seed, scenes and its
operating points agreement_{i2t,t2i} / r1_* / r10_*, dicts keyed by K's percentage of the
gallery), queries.npz, rsum_vs_time.png and agreement_at_k.png to --out.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import click  # noqa: E402

from hashret.cli import parse_options, run_main  # noqa: E402
from hashret.experiments.cascade import DEFAULT_DATASET  # noqa: E402


@click.command()
@click.option("--dataset", default=DEFAULT_DATASET, show_default=True,
              help="scenes[:k=v,...] (SYNTHETIC) or precomp:FOLDER.")
@click.option("--matchers", default="sgraf,cgam,han,shan", show_default=True)
@click.option("--bits", type=int, default=512, show_default=True,
              help="Code length; 512 so the 1% candidates hold ~99% of the true matches.")
@click.option("--queries", "n_queries", type=int, default=300, show_default=True,
              help="Queries per direction.")
@click.option("--seeds", default="0", show_default=True, help="Seeds (comma list): every matcher and head "
              "trained once per seed, the heads' mean and sd over them in table.md.")
@click.option("--set", "settings", multiple=True,
              help="Matcher or head field for every matcher, key=value (repeatable).")
@click.option("--heads", default=None, help="Hash heads to train (comma list; default all five): e.g. "
              "--heads default for each matcher's default head alone.")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Choose each head's knob (HEAD_TUNING, 3 tries each) on the dev part by agreement@1%.")
@click.option("--merge", default=None, metavar="DIR,DIR,...",
              help="Instead of running: one report of these runs' folders (same data and queries) in --out.")
@click.option("--out", default="results/cascade", show_default=True, type=click.Path(file_okay=False))
def cascade(dataset, matchers, bits, n_queries, seeds, settings, heads, tune, merge, out):
    """Recall@1/5/10, rSum, time per query and fraction scored for every mode."""
    from hashret.experiments.cascade import merge_runs, run_cascade_benchmark

    from hashret.errors import check
    if merge:
        merge_runs([d.strip() for d in merge.split(",") if d.strip()], out)
        return
    from hashret.models.distill import head_config
    from hashret.models.matchers import MATCHERS, matcher_config

    names = [m.strip() for m in matchers.split(",") if m.strip()]
    bad = [m for m in names if m not in MATCHERS or m == "global"]
    check(not bad, f"unknown matcher {', '.join(bad)}: use sgraf, cgam, han, shan")
    opts = parse_options(settings)
    fields = {m: {**matcher_config(m, opts.get("preset", "cpu")), **head_config(m)} for m in names + ["global"]}
    unknown = [k for k in opts if not any(k in f for f in fields.values())]
    check(not unknown, f"no matcher has the field {', '.join(unknown)}: see 'hashret models'")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        seed_list = []
    check(seed_list, f"--seeds must be a comma list of integers, got {seeds!r}")
    head_list = None if heads is None else [h.strip() for h in heads.split(",") if h.strip()]
    run_cascade_benchmark(dataset=dataset, matchers=names, bits=bits, n_queries=n_queries, seeds=seed_list, tune=tune,
                          heads=head_list,
                          out=out, options={m: {k: v for k, v in opts.items() if k in f}
                                            for m, f in fields.items()})


if __name__ == "__main__":
    run_main(cascade)
