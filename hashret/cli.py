"""The ``hashret`` command line: each command is a thin layer over one public function."""

from __future__ import annotations

import json
import logging
import sys

import click

from hashret.errors import HashretError, as_flags


# modules of the optional extras (setup.py's extras_require), for the line a missing one gets
_EXTRAS = {"uvicorn": "serve", "fastapi": "serve", "prometheus_client": "serve", "swagger_ui_bundle": "serve",
           "starlette": "serve", "pydantic": "serve", "ray": "distributed", "matplotlib": "plots"}


def _fail(exc: BaseException) -> int:
    """One line on stderr for any failure, and the exit status: 2 for a problem the user can
    fix (HashretError, an OS error such as a full disk), 130 for an interrupt, 3 for a bug --
    whose traceback HASHRET_DEBUG=1 shows."""
    import os

    from hashret.errors import os_problem

    if isinstance(exc, HashretError):  # the library names parameters; say them as flags
        click.echo(f"error: {as_flags(str(exc))}", err=True)
        return 2
    if isinstance(exc, (KeyboardInterrupt, click.exceptions.Abort)):
        click.echo("error: interrupted; an index being built keeps its committed batches "
                   "(finish it with build-index --resume)", err=True)
        return 130
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {os_problem(exc)}{where}", err=True)
        return 2
    if isinstance(exc, MemoryError):
        click.echo("error: out of memory: use a smaller batch or query", err=True)
        return 2
    extra = _EXTRAS.get((getattr(exc, "name", None) or "").split(".")[0]) if isinstance(exc, ImportError) else None
    if extra is not None:  # an optional part the install left out is not a bug
        click.echo(f"error: this needs {exc.name}, which hashret's '{extra}' extra installs: "
                   f'pip install -e ".[{extra}]" (in a checkout) or pip install "hashret[{extra}]"', err=True)
        return 2
    if os.environ.get("HASHRET_DEBUG"):
        raise exc
    click.echo(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''} "
               "(a bug in hashret: please report it; HASHRET_DEBUG=1 shows the traceback)", err=True)
    return 3


class _Echo(logging.Handler):
    """The library's progress messages (logger ``hashret``), one plain line each on stdout --
    on stderr for ``hashret serve``, whose stdout is left to the user."""

    err = False

    def emit(self, record):  # a warning (e.g. a one-time compile notice) never mixes into --json output
        click.echo(self.format(record), err=self.err or record.levelno >= logging.WARNING)


_ECHO = _Echo(logging.INFO)


def _log_to(err: bool = False):
    """Print the library's messages while a command runs (undone by :func:`_unlog`, so that a
    Python caller of the CLI keeps its own logging)."""
    logger = logging.getLogger("hashret")
    _ECHO.err = err
    if _ECHO not in logger.handlers:
        _ECHO.saved = (logger.level, logger.propagate)
        logger.addHandler(_ECHO)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _unlog():
    logger = logging.getLogger("hashret")
    if _ECHO in logger.handlers:
        logger.removeHandler(_ECHO)
        logger.level, logger.propagate = _ECHO.saved


class _Group(click.Group):
    """Turns any failure inside a command into one 'error: ...' line and a non-zero exit --
    click's own usage errors too (it writes them 'Error: ...')."""

    def main(self, *args, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            # without standalone mode click returns an exit code (ctx.exit, as _fail's) instead
            # of exiting; the commands themselves return None
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.ClickException as exc:
            if isinstance(exc, click.UsageError) and exc.ctx is not None:
                click.echo(f"{exc.ctx.get_usage()}\nTry '{exc.ctx.command_path} --help' for help.", err=True)
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        _log_to()
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 -- see _fail
            ctx.exit(_fail(exc))
        finally:
            _unlog()


def run_main(command, args=None):
    """Run a click command (for scripts such as benchmarks/mAP.py) with the same error handling."""
    _log_to()
    try:
        command.main(args=args, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (Exception, KeyboardInterrupt, click.exceptions.Abort) as exc:  # noqa: BLE001
        sys.exit(_fail(exc))
    finally:
        _unlog()


@click.group(cls=_Group)
@click.version_option(package_name="hashret")
def main():
    """hashret: cross-modal (image <-> text) hashing search."""


data_root_option = click.option("--data-root", type=click.Path(file_okay=False), default=None,
                                envvar="HASHRET_DATA",
                                help="Folder holding the datasets (default: packaged, then ../shared/data).")


ray_option = click.option(
    "--ray", "ray", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
    help="Run the shards on Ray: a local Ray (no value) or the cluster at ADDRESS (ray://host:10001).")


def _ray(value):
    return None if value is None else (True if value == "local" else value)


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
            click.echo(f"  {name:32s} unavailable: {as_flags(str(exc))}")


@main.command()
@click.argument("name", required=False)
@click.option("--dataset", default=None, help="Name or path (see 'hashret datasets'); or give it as NAME.")
@data_root_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def describe(name, dataset, data_root, as_json):
    """Sizes, modalities, split and source of one dataset (scene data too): describe NAME."""
    from hashret.data import load_dataset
    from hashret.errors import check

    check((name is None) != (dataset is None), "give the dataset once: hashret describe NAME "
          "(or --dataset NAME); 'hashret datasets' lists them")
    dataset = name or dataset
    from hashret.data.scenes import is_scene_spec, load_scenes

    s = (load_scenes(dataset) if is_scene_spec(dataset) else load_dataset(dataset, data_root=data_root)).summary()
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        for k, v in s.items():
            click.echo(f"{k:16s} {v}")


@main.command()
@click.option("--dataset", default="wikipedia", show_default=True, help="Dataset name or path.")
@click.option("--methods", default=None, help="Comma list (default: every method).")
@click.option("--bits", default="16,32,64", show_default=True, help="Code lengths.")
@click.option("--seeds", default="0", show_default=True, help="Seeds (comma list).")
@click.option("--out", default="results/mAP", show_default=True, help="Output folder.")
@click.option("--topk", default="100,1000", show_default=True, help="K of mAP@K (comma list).")
@click.option("--radius", default=2, show_default=True, type=int, help="Hamming radius for P/R.")
@click.option("--split", default=None, help="A saved split.npz to use instead of the dataset's.")
@click.option("--reuse", is_flag=True, help="Load trained models from OUT/models when configs match.")
@click.option("--set", "settings", multiple=True,
              help="Config field, key=value (repeatable); applied to every method that has it.")
@click.option("--validation", default=0.1, show_default=True, type=float,
              help="Share of the training part held out for every choice (0 = none).")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Try each method's settings grid (the same size for all) and keep the best on validation.")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Train the chosen setting again on every training row, validation included, before scoring.")
@click.option("--validation-only", is_flag=True,
              help="Stop after the choice on validation: report validation mAP, never score the test queries.")
@click.option("--workers", default=None, type=int,
              help="Processes training candidates side by side, one thread each [default: one per CPU; "
                   "1 = in this process with torch's threads].")
@data_root_option
def benchmark(dataset, methods, bits, seeds, out, topk, radius, split, reuse, settings, validation, tune,
              refit, validation_only, workers, data_root):
    """mAP table of every method (the same as python benchmarks/mAP.py)."""
    from hashret.experiments.benchmark import run_benchmark

    run_benchmark(dataset=dataset, methods=methods, bits=bits, seeds=seeds, out=out, topk=topk,
                  radius=radius, split=split, reuse=reuse, settings=parse_options(settings),
                  validation=validation, tune=tune, refit=refit, data_root=data_root,
                  test=not validation_only, workers=workers)


def parse_options(pairs) -> dict:
    """``--set key=value`` pairs as a dict; each value parsed as JSON where it is JSON."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise HashretError(f"--set {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


@main.command()
@click.option("--model", default=None, help="Model name (see 'hashret models').")
@click.option("--bits", type=int, default=64, show_default=True, help="Code length.")
@click.option("--dataset", default=None,
              help="Dataset name or path [default: wikipedia; scenes for the matchers].")
@click.option("--epochs", type=int, default=None, help="Epochs (models trained by epochs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--set", "settings", multiple=True, help="Config field, key=value (repeatable).")
@click.option("--distill-from", type=click.Path(), default=None,
              help="RUN_DIR of a trained matcher: train only its hash head.")
@click.option("--validation", default=0.1, show_default=True, type=float,
              help="Share of the training part held out to choose the epoch count on (0 = none).")
@click.option("--refit/--no-refit", default=True, show_default=True,
              help="Train the chosen epoch count again on every training row, validation included.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Checkpoint folder (RUN_DIR).")
@data_root_option
def train(model, bits, dataset, epochs, seed, device, settings, distill_from, validation, refit, out, data_root):
    """Train a model and write a checkpoint (weights.pt, config.json, split.npz).

    Matchers (sgraf, cgam, han, shan; global = the mean-pooled baseline) train on scene data
    (--dataset scenes[:k=v,...] or precomp:FOLDER), then their distilled hash head."""
    from hashret.training import train as train_model

    train_model(model=model, dataset=dataset, bits=bits, seed=seed, out=out, data_root=data_root,
                epochs=epochs, device=device, options=parse_options(settings),
                distill_from=distill_from, validation=validation, refit=refit)


@main.command()
def models():
    """List the model names the factory builds."""
    from hashret.models import REGISTRY

    from hashret.models.distill import head_config
    from hashret.models.matchers import MATCHERS, PRESETS, matcher_config

    for name, cls in sorted(REGISTRY.items()):
        kind = "supervised" if cls.supervised else "unsupervised"
        fields = ", ".join(f"{k}={v}" for k, v in cls.defaults.items())
        click.echo(f"{name:14s} {kind:12s} {fields}")
    for name in MATCHERS:
        for preset in PRESETS:
            fields = ", ".join(f"{k}={v}" for k, v in {**matcher_config(name, preset), **head_config(name)}.items())
            click.echo(f"{name:14s} {'matcher':12s} {fields}")
    click.echo("matchers: '--set preset=paper' picks the papers' sizes (for a GPU); the cpu preset is the default")


@main.command()
@click.option("--checkpoint", required=True, type=click.Path(), help="RUN_DIR written by 'hashret train'.")
@click.option("--modality", required=True, type=click.Choice(["image", "text"]))
@click.option("--split", "part", default="database", show_default=True,
              type=click.Choice(["query", "train", "database", "all"]))
@click.option("--features", type=click.Path(), default=None, help="Encode this .npy instead of the dataset.")
@click.option("--dataset", default=None, help="Another dataset than the checkpoint's.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="codes.npy (packed bits).")
@data_root_option
def encode(checkpoint, modality, part, features, dataset, out, data_root):
    """Encode features into packed codes (np.packbits order, +1 -> bit 1) with a student."""
    import numpy as np

    from hashret.engine import read_features
    from hashret.models.checkpoint import encode as encode_codes, read_checkpoint_info

    feats = None
    if features is not None:
        cfg = read_checkpoint_info(checkpoint)["config"]
        if cfg.get("kind") == "matcher":
            from hashret.engine import read_array

            feats = read_array(features, "region")
        else:
            feats = read_features(features, cfg[f"{modality}_dim"], modality)
    codes, rows = encode_codes(checkpoint, modality, features=feats, part=part, dataset=dataset,
                               data_root=data_root)
    np.save(out, codes)
    click.echo(f"wrote {len(codes)} codes ({codes.shape[1] * 8} bits, packed) to {out}")


@main.command("build-index")
@click.option("--checkpoint", required=True, type=click.Path(), help="RUN_DIR written by 'hashret train'.")
@click.option("--modality", required=True, type=click.Choice(["image", "text"]), help="Side to index.")
@click.option("--dataset", default=None, help="Dataset to index (default: the checkpoint's).")
@click.option("--split", "part", default="database", show_default=True,
              type=click.Choice(["query", "train", "database", "all"]))
@click.option("--append", is_flag=True, help="Add to an existing index of the same model.")
@click.option("--resume", is_flag=True, help="Finish a killed or failed build from its last committed batch.")
@click.option("--batch-size", type=int, default=65536, show_default=True, help="Items per transaction.")
@click.option("--out", required=True, type=click.Path(), help="Index folder (IDX_DIR).")
@click.option("--shards", type=int, default=None, help="Write a sharded index of N shards (item r -> shard r mod N).")
@ray_option
@data_root_option
def build_index_cmd(checkpoint, modality, dataset, part, append, resume, batch_size, out, shards, ray, data_root):
    """Encode a dataset's database side and write it to an LMDB index.

    Each batch commits with the build's progress; an interrupted build is marked partial
    (see 'hashret info') and --resume finishes it."""
    from hashret.engine import build_index
    from hashret.errors import check

    check(ray is None or shards is not None, "--ray builds the shards of a sharded index: add --shards N")
    build_index(checkpoint, modality, out, dataset=dataset, data_root=data_root, part=part,
                batch_size=batch_size, append=append, resume=resume,
                shards=shards, ray=_ray(ray))


@main.command()
@click.option("--index", "index_dir", default=None, type=click.Path(),
              help="IDX_DIR from build-index (with --server: the index's folder name on the server).")
@click.option("--checkpoint", default=None, type=click.Path(), help="The RUN_DIR the index was built with.")
@click.option("--server", default=None, help="Ask a running 'hashret serve' at this URL instead.")
@click.option("--text", default=None, help="Free-text query (tags), for an image index.")
@click.option("--text-file", type=click.Path(), default=None, help="File holding the text query.")
@click.option("--image-features", type=click.Path(), default=None, help=".npy image features (rows = queries).")
@click.option("--item", default=None, help="A dataset item (row number or key), seen through the other modality.")
@click.option("--codes", default=None,
              help="Codes to search for, hex of the packed bytes, comma-separated (no --checkpoint needed).")
@click.option("-k", "k", type=int, default=10, show_default=True, help="Results per query.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of {rank, id, distance, item}.")
@click.option("--dataset", default=None, help="Dataset for --item/--text (default: the checkpoint's).")
@click.option("--rerank", type=click.Path(), default=None,
              help="RUN_DIR of a matcher: re-score the Hamming candidates with it (cascade).")
@click.option("--candidates", type=int, default=None, help="Hamming candidates to re-rank [default: 10 x k].")
@click.option("--api-key", default=None, envvar="HASHRET_API_KEY",
              help="With --server: the key to send (or set HASHRET_API_KEY).")
@click.option("--filter", "filter_json", default=None, metavar="JSON",
              help='Only items that match, e.g. \'{"labels": {"any": ["sky"]}, "year": {"gte": 2000}}\' '
                   "(see docs/filters.md).")
@ray_option
@data_root_option
def query(index_dir, checkpoint, server, text, text_file, image_features, item, codes, k, as_json, dataset,
          rerank, candidates, api_key, filter_json, ray, data_root):
    """Search an index with a text, image-feature or item query (locally, or on a server)."""
    filter = None
    if filter_json is not None:
        from hashret.errors import HashretError

        try:
            filter = json.loads(filter_json)
        except ValueError as exc:
            raise HashretError(f"--filter is not JSON ({exc.msg} at character {exc.pos}): quote it, e.g. "
                               "--filter '{\"year\": {\"gte\": 2000}}'") from None
    if server is not None:
        from hashret.serve import query_server

        res = query_server(server, index=index_dir, text=text, text_file=text_file,
                           image_features=image_features, item=item, k=k,
                           codes=codes.split(",") if codes else None,
                           rerank=rerank is not None, candidates=candidates, api_key=api_key, filter=filter)
    else:
        from hashret.engine import query_index
        from hashret.errors import check

        check(index_dir is not None and (checkpoint is not None or codes is not None),
              "give --index IDX_DIR and --checkpoint RUN_DIR (or --server URL)")
        res = query_index(index_dir, checkpoint, text=text, text_file=text_file,
                          image_features=image_features, item=item, k=k, dataset=dataset,
                          codes=codes.split(",") if codes else None,
                          data_root=data_root, rerank=rerank, candidates=candidates, ray=_ray(ray),
                          filter=filter)
    for warning in res.get("warnings", ()):
        click.echo(f"warning: {warning}", err=True)
    if res["unknown_words"]:
        click.echo(f"words outside the vocabulary (ignored): {' '.join(res['unknown_words'])}", err=True)
    groups = res["results"]
    if as_json:
        if len(groups) == 1:
            click.echo(json.dumps(groups[0], indent=1))
        else:
            click.echo(json.dumps([dict(r, query=q) for q, g in enumerate(groups) for r in g], indent=1))
        return
    for q, group in enumerate(groups):
        if len(groups) > 1:
            click.echo(f"query {q}:")
        score = "score" in (group[0] if group else {})
        click.echo(f"{'rank':>4}  {'id':>8}  {'dist':>4}  " + ("  score  " if score else "") + "item")
        for r in group:
            item_text = json.dumps(r["item"], ensure_ascii=False) if r["item"] is not None else ""
            if r.get("attributes") and r["item"] is None:  # an index of one's own arrays: its attributes
                item_text = json.dumps(r["attributes"], ensure_ascii=False)
            sc = f"{r['score']:7.4f}  " if score else ""
            shown = item_text if len(item_text) <= 100 else item_text[:99] + "…"  # --json has it whole
            click.echo(f"{r['rank']:>4}  {r['id']:>8}  {r['distance']:>4}  {sc}{shown}")
    rr = f", re-rank {res['rerank_ms']:.2f} ms" if "rerank_ms" in res else ""
    click.echo(f"encode {res['encode_ms']:.2f} ms, search {res['search_ms']:.2f} ms{rr} "
               f"({res['query_modality']} query)", err=True)


@main.command()
@click.option("--index", "indexes", required=True, multiple=True, type=click.Path(),
              help="IDX_DIR to serve (repeat for several, e.g. an image and a text index).")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="The RUN_DIR the indexes were built with (without it: code queries only).")
@click.option("--rerank", type=click.Path(), default=None, help="RUN_DIR of a matcher for the cascade.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8765, show_default=True)
@click.option("--read-only", "readonly", is_flag=True,
              help="Write nothing; pick up what another writer commits (within --refresh-s).")
@click.option("--batch-window-ms", type=float, default=0.0, show_default=True,
              help="How long a search waits for others to share its scan (0: only those already waiting).")
@click.option("--max-batch", type=int, default=256, show_default=True,
              help="Queries per scan at most (1: one scan per request).")
@click.option("--refresh-s", type=float, default=0.5, show_default=True)
@click.option("--max-body-mb", type=float, default=16.0, show_default=True)
@click.option("--dataset", default=None, help="Dataset for item and text queries (default: the checkpoint's).")
@click.option("--api-keys", type=click.Path(dir_okay=False), default=None,
              help="File of '<scope> <key>' lines (scope read or write): callers must send "
                   "'Authorization: Bearer <key>'. Without it, anyone who reaches the port may search and write.")
@click.option("--allowed-hosts", default=None, metavar="NAMES",
              help="Comma-separated Host names to answer [default: the --host address and localhost; '*': any].")
@click.option("--allow-origin", "allow_origins", multiple=True, metavar="ORIGIN",
              help="A web origin (https://app.example) whose pages may call this server (repeatable; '*': any).")
@click.option("--max-results", type=int, default=10_000, show_default=True,
              help="Results one request may ask for (queries x k).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Access log lines on stderr: text, or one JSON object per request.")
@ray_option
@data_root_option
def serve(indexes, checkpoint, rerank, host, port, readonly, batch_window_ms, max_batch, refresh_s,
          max_body_mb, dataset, api_keys, allowed_hosts, allow_origins, max_results, log_format, ray, data_root):
    """Serve indexes over HTTP: POST /search, POST|DELETE /items, GET /health /info /metrics
    /openapi.json /docs /."""
    from hashret.serve import serve as run

    _log_to(err=True)
    run(indexes, checkpoint, rerank=rerank, host=host, port=port, readonly=readonly,
        window_ms=batch_window_ms, max_batch=max_batch, refresh_s=refresh_s, max_body_mb=max_body_mb,
        dataset=dataset, data_root=data_root, ray=_ray(ray), api_keys=api_keys,
        allowed_hosts=allowed_hosts.split(",") if allowed_hosts else None, allow_origins=allow_origins,
        max_results=max_results, log_format=log_format)


@main.command()
@click.option("--bits", default=None, help="Code lengths, comma-separated (e.g. 64,128) [default: 64].")
@click.option("--index", "indexes", multiple=True, type=click.Path(), help="Warm up for this index's code length.")
def warmup(bits, indexes):
    """Compile the scan for these code lengths now (kept per user: every later process loads it)."""
    from hashret.errors import check
    from hashret.index import HashIndex, index_info

    lengths = [index_info(i)["bits"] for i in indexes]
    if bits:
        try:
            lengths += [int(b) for b in bits.split(",")]
        except ValueError:
            check(False, f"--bits {bits!r} is not a comma-separated list of code lengths")
    for b in dict.fromkeys(lengths or [64]):
        click.echo(f"{b}-bit codes: ready in {HashIndex.warmup(b):.1f} s")


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(), help="IDX_DIR.")
def info(index_dir):
    """Size, code length, model, dataset and build state of an index."""
    from hashret.index import index_info

    click.echo(json.dumps(index_info(index_dir), indent=2, default=str))


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(), help="IDX_DIR.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(index_dir, as_json):
    """Check every checksum of an index; exit 1 naming the damaged chunks and rows."""
    from hashret.index import verify_index

    report = verify_index(index_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif report["ok"]:
        click.echo(f"ok: {index_dir}: {report['rows']} rows in {report['chunks']} code chunks, "
                   f"{report['ids']} ids and {report['items']} payloads verified")
    else:
        click.echo(f"corrupt: {index_dir}: {len(report['problems'])} problem(s)", err=True)
        for line in report["problems"]:
            click.echo(f"  {line}", err=True)
        click.echo("restore the folder from a copy, or rebuild it with 'hashret build-index'", err=True)
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
