"""The ``hashret`` command line: each command is a thin layer over one public function."""

from __future__ import annotations

import json
import sys

import click

from hashret.errors import HashretError


class _Group(click.Group):
    """Turns a HashretError into one 'error: ...' line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except HashretError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def run_main(command, args=None):
    """Run a click command (for scripts such as benchmarks/mAP.py) with the same error handling."""
    try:
        command.main(args=args, standalone_mode=False)
    except HashretError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="hashret")
def main():
    """hashret: cross-modal (image <-> text) hashing search."""


data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                                envvar="HASHRET_DATA",
                                help="Folder holding the datasets (default: packaged, then ../shared/data).")


@main.command()
@data_root_option
def datasets(data_root):
    """List the dataset names and whether their files are found."""
    from hashret.data import data_roots, dataset_names, load_dataset

    click.echo("searched: " + ", ".join(str(r) for r in data_roots(data_root)))
    for name in dataset_names():
        try:
            ds = load_dataset(name, data_root=data_root)
            s = ds.summary()
            mods = "+".join(m for m in ("image", "text") if ds.has(m))
            click.echo(f"  {name:32s} {s['items']:>7d} items  {mods:10s} "
                       f"{'SYNTHETIC' if ds.synthetic else 'real'}")
        except HashretError as exc:
            click.echo(f"  {name:32s} unavailable: {exc}")


@main.command()
@click.option("--dataset", required=True, help="Name or path (see 'hashret datasets').")
@data_root_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def describe(dataset, data_root, as_json):
    """Sizes, modalities, split and source of one dataset."""
    from hashret.data import load_dataset

    s = load_dataset(dataset, data_root=data_root).summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        for k, v in s.items():
            click.echo(f"{k:16s} {v}")


def benchmark_options(f):
    opts = [
        click.option("--dataset", default="wikipedia", show_default=True, help="Dataset name or path."),
        click.option("--methods", default=None, help="Comma list (default: every method)."),
        click.option("--bits", default="16,32,64", show_default=True, help="Code lengths."),
        click.option("--seeds", default="0", show_default=True, help="Seeds (comma list)."),
        click.option("--out", default="results/mAP", show_default=True, help="Output folder."),
        click.option("--topk", default="100,1000", show_default=True, help="K of mAP@K (comma list)."),
        click.option("--radius", default=2, show_default=True, type=int, help="Hamming radius for P/R."),
        click.option("--split", default=None, help="A saved split.npz to use instead of the dataset's."),
        click.option("--reuse", is_flag=True, help="Load trained models from OUT/models when configs match."),
        data_root_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@main.command()
@benchmark_options
def benchmark(dataset, methods, bits, seeds, out, topk, radius, split, reuse, data_root):
    """mAP table of every method (the same as python benchmarks/mAP.py)."""
    from hashret.eval.benchmark import run_benchmark

    run_benchmark(dataset=dataset, methods=methods, bits=bits, seeds=seeds, out=out, topk=topk,
                  radius=radius, split=split, reuse=reuse, data_root=data_root, log=click.echo)


if __name__ == "__main__":
    main()
