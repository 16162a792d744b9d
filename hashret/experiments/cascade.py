"""The matcher benchmark behind ``benchmarks/cascade.py``: for each fine-grained matcher on
scene data, Recall@1/5/10 both ways and rSum for (a) the matcher ranking the whole gallery,
(b) each hash head -- the distilled one and its controls (the in-batch distillation alone,
pairs only, label smoothing, the matcher's scores shuffled within rows;
:data:`~hashret.models.distill.HEADS`),
trained on the same batches from the same initialisation -- by its codes alone, and at the
cascade's operating points: for K in 0.5, 1, 2 and 5% of the gallery, the *agreement* (the
share of the matcher's own exhaustive top 10 found in the Hamming top K) and the cascade's
Recall@1/10 (the Hamming top K re-ranked by the matcher); (c) the timed cascade of the
default head at K = 1% and 5%; and (d) a global mean-pooled embedding. Times are medians per
query (one query at a time, gallery encodings precomputed for every mode, query encoding
included)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hashret.errors import check
from hashret.metrics import recall_at_k
from hashret.index import HashIndex
from hashret.index.bits import pack_codes
from hashret.models.distill import HEADS, MatcherModel, exhaustive_ranking, head_config, rerank
from hashret.training.matching import (codes_recall, ground_truth, head_schedule, part_codes, train_head,
                                      train_matcher)

log = logging.getLogger(__name__)

DIRECTIONS = {"i2t": ("image", "text"), "t2i": ("text", "image")}
MODES = ("exhaustive", "head", "cascade-1%", "cascade-5%", "global")
OPERATING = ("0.5", "1", "2", "5")  # K, percent of the gallery: the cascade's operating points
DEFAULT_DATASET = "scenes"  # SYNTHETIC: 10,000 training images, a 5,000-image test gallery


def _query_inputs(part, modality, rows):
    return part.image_batch(rows) if modality == "image" else part.text_batch(rows)


# each head's knob, tried on the dev part (the same number of tries for every head; the
# default first, so a tie keeps it): agreement@1% with the matcher, mean of both directions
HEAD_TUNING = {"distilled": ("tau_teacher", (0.25, 1.0, 4.0)), "in-batch": ("tau_teacher", (0.25, 1.0, 4.0)),
               "shuffled": ("tau_teacher", (0.25, 1.0, 4.0)), "smoothing": ("smoothing_eps", (0.5, 0.1, 0.3)),
               "pairs": ("tau_student", (0.05, 0.025, 0.1))}


def _dev_scores(model, ds, n_queries):
    """(dev part, its queries, the matcher's scores of them against the dev gallery), or None
    where the dataset has no dev part (then every head keeps its defaults)."""
    if "dev" not in ds.parts:
        return None
    dev = ds.part("dev")
    queries = {d: np.arange(min(n_queries, dev.n_images if qm == "image" else dev.n_captions))
               for d, (qm, _) in DIRECTIONS.items()}
    gallery = {m: model.encode_rows_for_matching(dev, m, dev.rows(m)) for m in ("image", "text")}
    return dev, queries, _all_scores(model, dev, queries, gallery)


def _chosen_head(name, kind, model, ds, schedule, dev, bits, seed, options):
    """The head of kind ``kind`` trained on ``schedule``, its knob (HEAD_TUNING) chosen on the
    dev part by agreement@1%; with no dev part, its defaults. Returns (head, what was chosen)."""
    field, values = HEAD_TUNING[kind]
    if field in options:  # set by the caller: not tuned
        values = (options[field],)
    elif dev is None:  # nothing to choose on: the matcher's configured knob (not the first try)
        values = (head_config(name)[field],)
    tried, best, best_head = {}, None, None
    for value in values:
        head = MatcherModel(name, bits, ds.region_dim, ds.vocab.words, seed, **{**options, "head": kind, field: value})
        head.matcher = model.matcher
        train_head(head, ds, schedule)
        if dev is None or len(values) == 1:
            return head, {"chosen": {field: head.config[field]}, "dev_agreement": None}
        part, queries, scores = dev
        op = operating_points(scores, part_codes(head, part), part, queries)
        tried[str(value)] = round((op["agreement_i2t"]["1"] + op["agreement_t2i"]["1"]) / 2, 2)
        if best is None or tried[str(value)] > tried[str(best)]:
            best, best_head = value, head
    return best_head, {"chosen": {field: best}, "dev_agreement": {field: tried}}


def _record(matcher, mode, recalls, times, fraction, extra=None):
    rec = {"matcher": matcher, "mode": mode}
    for d in DIRECTIONS:
        for k in (1, 5, 10):
            rec[f"r{k}_{d}"] = round(recalls[d][k], 2)
    rec["rsum"] = round(sum(recalls[d][k] for d in DIRECTIONS for k in (1, 5, 10)), 2)
    all_times = np.concatenate([times[d] for d in DIRECTIONS])
    rec["ms_per_query"] = round(float(np.median(all_times)) * 1e3, 3)
    for d in DIRECTIONS:
        rec[f"ms_per_query_{d}"] = round(float(np.median(times[d])) * 1e3, 3)
    rec["fraction_scored"] = fraction
    rec.update(extra or {})
    return rec


def _rank_with_matcher(model, part, queries, gallery_enc, k_candidates=None, index=None):
    """Per direction: ranked ids (Q x 10) and per-query seconds, one query at a time.
    ``k_candidates``: Hamming candidates per gallery modality ({"image": k, "text": k})."""
    ranked, times = {}, {}
    for d, (qm, gm) in DIRECTIONS.items():
        out = np.full((len(queries[d]), 10), -1, dtype=np.int64)
        t = np.empty(len(queries[d]))
        for i, q in enumerate(queries[d]):
            t0 = time.perf_counter()
            x = _query_inputs(part, qm, [q])
            q_enc = model.encode_for_matching(x, qm)
            if index is None:
                out[i] = exhaustive_ranking(model, q_enc, gallery_enc[gm], d, 10)[0]
            else:
                code = pack_codes(model.encode(x, qm))
                _, cand = index[gm].search(code, k_candidates[gm])
                out[i] = rerank(model, q_enc, gallery_enc[gm], cand, d, 10)[0][0]
            t[i] = time.perf_counter() - t0
        ranked[d], times[d] = out, t
    return ranked, times


def _rank_with_codes(model, part, queries, index):
    ranked, times = {}, {}
    for d, (qm, gm) in DIRECTIONS.items():
        out = np.empty((len(queries[d]), 10), dtype=np.int64)
        t = np.empty(len(queries[d]))
        for i, q in enumerate(queries[d]):
            t0 = time.perf_counter()
            code = pack_codes(model.encode(_query_inputs(part, qm, [q]), qm))
            out[i] = index[gm].search(code, 10)[1][0]
            t[i] = time.perf_counter() - t0
        ranked[d], times[d] = out, t
    return ranked, times


def _recalls(ranked, part, queries):
    return {d: recall_at_k(ranked[d], ground_truth(part, d, queries[d])) for d in DIRECTIONS}


def _every_query(model, ds, codes):
    """rSum of the codes with every gallery item as a query (cheap for codes, and ~17x the
    queries of the matcher modes, so the heads' codes are not told apart by noise)."""
    r = codes_recall(model, ds, "test", n_queries=10 ** 12, codes=codes)
    return {"rsum_every_query": round(sum(r[d][f"r{k}"] for d in r for k in (1, 5, 10)), 2),
            "queries_every": len(codes["image"])}


def _candidates(pct: str, n_gallery: int) -> int:
    """K for a percentage of a gallery: at least 10 (what Recall@10 and the agreement need)."""
    return max(10, int(round(float(pct) / 100 * n_gallery)))


def _all_scores(model, part, queries, gallery_enc) -> dict:
    """Per direction, the matcher's scores of every query against the whole gallery (Q x G):
    what the exhaustive top 10 and every cascade's re-ranking read."""
    out = {}
    for d, (qm, gm) in DIRECTIONS.items():
        q_enc = model.encode_rows_for_matching(part, qm, queries[d])
        s = model.scores(q_enc, gallery_enc[gm]) if d == "i2t" else model.scores(gallery_enc[gm], q_enc).T
        out[d] = s.numpy()
    return out


def operating_points(scores: dict, codes: dict, part, queries) -> dict:
    """For each K of :data:`OPERATING`: ``agreement_{d}`` (the share of the matcher's own top
    10 -- by ``scores``, the matcher's Q x G scores per direction -- within the codes' Hamming
    top K, percent) and ``r1_{d}`` / ``r10_{d}`` (the cascade: that top K re-ranked by the
    matcher's scores), each a dict keyed by K's percentage."""
    out = {}
    for d, (qm, gm) in DIRECTIONS.items():
        s = scores[d]
        top10 = np.argsort(-s, axis=1, kind="stable")[:, :10]
        index = HashIndex(codes[gm].shape[1] * 8)
        index.add(codes[gm])
        agree, r1, r10 = {}, {}, {}
        for pct in OPERATING:
            k = _candidates(pct, s.shape[1])
            _, cand = index.search(codes[qm][queries[d]], k)
            agree[pct] = round(100.0 * float(np.mean([len(np.intersect1d(top10[i], cand[i])) / 10
                                                      for i in range(len(cand))])), 2)
            picked = np.take_along_axis(s, cand, axis=1)
            ranked = np.take_along_axis(cand, np.argsort(-picked, axis=1, kind="stable")[:, :10], axis=1)
            rec = recall_at_k(ranked, ground_truth(part, d, queries[d]), ks=(1, 10))
            r1[pct], r10[pct] = round(rec[1], 2), round(rec[10], 2)
        out.update({f"agreement_{d}": agree, f"r1_{d}": r1, f"r10_{d}": r10})
    return out


def _code_index(model, codes):
    out = {}
    for m, packed in codes.items():
        ix = HashIndex(model.bits)
        ix.add(packed)
        out[m] = ix
    return out


def run_cascade_benchmark(dataset: str = DEFAULT_DATASET, matchers=("sgraf", "cgam", "han", "shan"),
                          bits: int = 512, n_queries: int = 300, seeds=(0,), out="results/cascade",
                          options: dict | None = None, tune: bool = True, heads=None) -> list:
    """For each seed, train each matcher and its heads on ``dataset``'s train part, evaluate
    on its test part (the gallery, the same queries for every seed) -- each head's knob chosen
    on the first seed's dev part (``tune``, :data:`HEAD_TUNING`) and kept for the later
    seeds -- write table.md (with the
    heads' mean and sd over the seeds), results.json, the per-query timings and plots to
    ``out``. ``heads``: the hash heads to train (default: all of
    :data:`~hashret.models.distill.HEADS`; ``"default"``: each matcher's default head); the
    cascade is timed with the default head, or the first of ``heads`` without it. Returns the records."""
    from hashret.data.scenes import load_scenes
    from hashret.training import seed_everything

    check(n_queries > 0, "n_queries must be positive")
    heads = list(HEADS) if heads is None else list(heads)
    bad = [h for h in heads if h not in HEADS and h != "default"]
    check(heads and not bad, f"unknown head {', '.join(bad) or '(none given)'}: use {', '.join(HEADS)} or default")
    seeds = [int(x) for x in ([seeds] if isinstance(seeds, int) else seeds)]
    check(len(seeds) > 0 and len(set(seeds)) == len(seeds), "give one or more distinct seeds")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    ds = load_scenes(dataset)
    part = ds.part("test")
    rng = np.random.default_rng(seeds[0])
    queries = {d: np.sort(rng.choice(part.n_images if qm == "image" else part.n_captions,
                                     size=min(n_queries, part.n_images), replace=False))
               for d, (qm, _) in DIRECTIONS.items()}
    np.savez(out / "queries.npz", **queries)
    n_gallery = {m: len(part.rows(m)) for m in ("image", "text")}
    log.info(f"{'SYNTHETIC ' if ds.synthetic else ''}{ds.name}: {ds.part('train').n_images} training "
        f"images, gallery {part.n_images} images / {part.n_captions} captions, {n_queries} queries "
        f"per direction, {bits} bits, seeds {', '.join(map(str, seeds))}")
    options = dict(options or {})
    records = []
    tuned = {}  # (matcher, head) -> its knob as the first seed's dev part chose it

    def add(rec):
        records.append(rec)
        if rec["mode"] == "head":
            log.info(f"  {rec['matcher']:7s} head {rec['head']:9s} codes rSum {rec['rsum']:6.1f}  agreement@1% "
                     f"I→T {rec['agreement_i2t']['1']:5.1f} T→I {rec['agreement_t2i']['1']:5.1f}  cascade R@10 "
                     f"at 1% I→T {rec['r10_i2t']['1']:5.1f} T→I {rec['r10_t2i']['1']:5.1f}")
        else:
            log.info(f"  {rec['matcher']:7s} {rec['mode']:12s} rSum {rec['rsum']:6.1f}  R@10 I→T "
                     f"{rec['r10_i2t']:5.1f} T→I {rec['r10_t2i']:5.1f}  {rec['ms_per_query']:8.3f} ms/query  "
                     f"scores {rec['fraction_scored']:.3f} of the gallery")
        (out / "results.json").write_text(json.dumps(records, indent=1))

    for seed in seeds:
        for name in list(matchers) + ["global"]:
            seed_everything(seed)
            t0 = time.perf_counter()
            model = MatcherModel(name, bits, ds.region_dim, ds.vocab.words, seed, **options.get(name, {}))
            train_matcher(model, ds)
            fit_s = time.perf_counter() - t0
            gallery = {m: model.encode_rows_for_matching(part, m, part.rows(m)) for m in ("image", "text")}
            extra = {"bits": bits, "gallery": n_gallery["image"], "gallery_captions": n_gallery["text"],
                     "queries": n_queries, "seed": seed,
                     "train_seconds": round(fit_s, 1)}
            if name == "global":
                ranked, times = _rank_with_matcher(model, part, queries, gallery)
                add(_record("global", "global", _recalls(ranked, part, queries), times, 1.0, extra))
                continue
            ranked, times = _rank_with_matcher(model, part, queries, gallery)
            add(_record(name, "exhaustive", _recalls(ranked, part, queries), times, 1.0, extra))
            scores = _all_scores(model, part, queries, gallery)
            t0 = time.perf_counter()
            schedule = head_schedule(model, ds)  # every head of this matcher trains on these batches
            schedule_s = time.perf_counter() - t0
            default = options.get(name, {}).get("head", head_config(name)["head"])
            dev = _dev_scores(model, ds, n_queries) if tune and seed == seeds[0] else None
            kinds = [h for h in [default] + [h for h in HEADS if h != default]
                     if h in heads or (h == default and "default" in heads)]
            for kind in kinds:
                # the same initialisation (seed) and batches for every head: only the target
                # differs; each head's knob chosen on the dev part, the same number of tries each
                # the knob is chosen on the first seed's dev part and kept for the later seeds
                # (their spread is then the seeds', not the tuning's)
                t0 = time.perf_counter()
                head_options = {**options.get(name, {}), **tuned.get((name, kind), {})}
                head, chosen = _chosen_head(name, kind, model, ds, schedule, dev, bits, seed, head_options)
                if (name, kind) not in tuned:
                    tuned[name, kind] = {**chosen["chosen"]}
                    chosen["tuned_on_seed"] = seed
                else:
                    chosen = {**chosen, "dev_agreement": None, "tuned_on_seed": seeds[0]}
                extra_head = {**extra, "head": kind, "scenes": dataset, **chosen,
                              "head_seconds": round(time.perf_counter() - t0 + schedule_s, 1)}
                codes = part_codes(head, part)
                index = _code_index(head, codes)
                ranked, times = _rank_with_codes(head, part, queries, index)
                rec = _record(name, "head", _recalls(ranked, part, queries), times, 0.0,
                              {**extra_head, **_every_query(head, ds, codes)})
                for d in DIRECTIONS:  # the codes' own recall; r1 / r10 are the cascade's, by K
                    for k in (1, 5, 10):
                        rec[f"codes_r{k}_{d}"] = rec.pop(f"r{k}_{d}")
                add({**rec, **operating_points(scores, codes, part, queries)})
                if kind != kinds[0]:  # the default head's cascade (or the first head asked for)
                    continue
                for pct in (1, 5):  # the default head's cascade, timed one query at a time
                    # each direction's K from its own gallery: with five captions per image, image->text
                    # "1%" of the images would score 0.2% of the captions
                    k = {m: _candidates(str(pct), n_gallery[m]) for m in ("image", "text")}
                    frac = {d: round(k[gm] / n_gallery[gm], 4) for d, (_, gm) in DIRECTIONS.items()}
                    ranked, times = _rank_with_matcher(head, part, queries, gallery, k, index)
                    add(_record(name, f"cascade-{pct}%", _recalls(ranked, part, queries), times,
                                max(frac.values()), {**extra_head, "candidates_i2t": k["text"],
                                                     "candidates_t2i": k["image"],
                                                     "fraction_scored_i2t": frac["i2t"],
                                                     "fraction_scored_t2i": frac["t2i"]}))
    total = time.perf_counter() - t_start
    run = {"dataset": dataset, "name": ds.name, "synthetic": ds.synthetic, "bits": bits, "queries": n_queries,
           "matchers": list(matchers), "seeds": seeds, "tune": tune, "heads": heads, "minutes": round(total / 60, 1)}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    _write_report(records, out, run)
    log.info(f"wrote {out}/table.md, results.json and plots in {total / 60:.1f} min")
    return records


def _over_seeds(records) -> dict:
    """{matcher: {head: {measure: (mean, sd), "seeds": n}}} of the heads' records at K = 1%."""
    out: dict = {}
    for r in records:
        if r["mode"] == "head":
            out.setdefault(r["matcher"], {}).setdefault(r["head"], []).append(r)
    summary = {}
    for name, heads in out.items():
        summary[name] = {}
        for kind, rows in heads.items():
            m = {"seeds": len(rows)}
            for c in ("agreement_i2t", "agreement_t2i", "r10_i2t", "r10_t2i"):
                v = [r[c]["1"] for r in rows]
                m[c] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            v = [r["rsum_every_query"] for r in rows]
            m["rsum_every_query"] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            summary[name][kind] = m
    return summary


def cascade_lines(records) -> list:
    """One line per timed cascade (matcher, K, seed): its R@10 against the exhaustive
    matcher's of the same seed, and how many times faster per query; then, over the seeds,
    the mean R@10 differences and the smallest speed-up in each direction."""
    lines, groups = [], {}
    for r in records:
        if not r["mode"].startswith("cascade"):
            continue
        ex = next((x for x in records if x["matcher"] == r["matcher"] and x["mode"] == "exhaustive"
                   and x.get("seed") == r.get("seed")), None)
        if ex is None:
            continue
        d = {k: r[f"r10_{k}"] - ex[f"r10_{k}"] for k in DIRECTIONS}
        x = {k: ex[f"ms_per_query_{k}"] / max(r[f"ms_per_query_{k}"], 1e-9) for k in DIRECTIONS}
        groups.setdefault((r["matcher"], r["mode"], r["head"]), []).append((d, x))
        lines.append(f"- {r['matcher']} {r['mode']} ({r['head']} head), seed {r.get('seed')}: R@10 I→T "
                     f"{d['i2t']:+.1f}, T→I {d['t2i']:+.1f} points vs exhaustive; "
                     f"{ex['ms_per_query'] / max(r['ms_per_query'], 1e-9):.1f}x faster per query "
                     f"(I→T {x['i2t']:.1f}x, T→I {x['t2i']:.1f}x)")
    for (name, mode, kind), got in groups.items():
        if len(got) > 1:
            lines.append(f"- {name} {mode} ({kind} head), over {len(got)} seeds: R@10 I→T "
                         f"{np.mean([d['i2t'] for d, _ in got]):+.2f}, T→I {np.mean([d['t2i'] for d, _ in got]):+.2f} "
                         f"points vs exhaustive (means); at least {min(x['i2t'] for _, x in got):.1f}x faster I→T, "
                         f"{min(x['t2i'] for _, x in got):.1f}x T→I")
    return lines


def merge_runs(runs, out) -> list:
    """One report (table.md, results.json, plots in ``out``) of several runs of
    :func:`run_cascade_benchmark` on the same data and queries -- e.g. matchers run in
    separate processes, one core each. Returns the records."""
    runs = [Path(r) for r in runs]
    check(len(runs) > 0, "give the folders of one or more runs")
    for r in runs:
        check((r / "run.json").is_file() and (r / "results.json").is_file(),
              f"{r} holds no finished run (run.json, results.json): give folders benchmarks/cascade.py wrote")
    meta = [json.loads((r / "run.json").read_text()) for r in runs]
    for r, m in zip(runs[1:], meta[1:]):
        check(all(m[k] == meta[0][k] for k in ("dataset", "bits", "queries")),
              f"{r} ran on other data, code length or queries than {runs[0]}: merge runs of one setting")
        a, b = np.load(runs[0] / "queries.npz"), np.load(r / "queries.npz")
        check(all(np.array_equal(a[d], b[d]) for d in DIRECTIONS),
              f"{r} asked other queries than {runs[0]} (another first seed): merge runs of one setting")
    records = [x for r in runs for x in json.loads((r / "results.json").read_text())]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "queries.npz", **dict(np.load(runs[0] / "queries.npz")))
    (out / "results.json").write_text(json.dumps(records, indent=1))
    run = {**meta[0], "matchers": [m for x in meta for m in x["matchers"]],
           "minutes": round(sum(m["minutes"] for m in meta), 1), "merged": [str(r) for r in runs]}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    _write_report(records, out, run)
    return records


def dev_choice(records) -> dict:
    """{matcher: {"head", "knob", "dev_agreement"}}: for each matcher the head -- with its
    knob -- whose dev agreement@1% (the mean of both directions, on the first seed's dev
    part, the best of its tries) is highest: the default a first stage should take. Matchers
    whose heads were not tuned on a dev part are left out."""
    best: dict = {}
    for r in records:
        if r["mode"] != "head" or not r.get("dev_agreement"):
            continue
        (field, tried), = r["dev_agreement"].items()
        score = max(tried.values())
        if r["matcher"] not in best or score > best[r["matcher"]]["dev_agreement"]:
            best[r["matcher"]] = {"head": r["head"], "knob": dict(r["chosen"]), "dev_agreement": score}
    return best


def _margins(rows: dict) -> list:
    """For the distilled head against every control: per direction, its mean agreement@1%
    minus the best control's, and the larger of the two arms' sd (what the margin must beat)."""
    out = []
    if "distilled" not in rows:
        return out
    for d in DIRECTIONS:
        c = f"agreement_{d}"
        rival = max((h for h in rows if h != "distilled"), key=lambda h: rows[h][c][0], default=None)
        if rival is not None:
            margin = rows["distilled"][c][0] - rows[rival][c][0]
            out.append((d, rival, margin, max(rows["distilled"][c][1], rows[rival][c][1])))
    return out


def _write_report(records, out, run):
    merged = f", the sum of {len(run['merged'])} runs'" if run.get("merged") else ""
    head = (f"# Matchers, hash heads and the cascade on {'SYNTHETIC ' if run['synthetic'] else ''}"
            f"{run['name']}\n\n`{run['dataset']}`; Recall@K in percent; ms per query = median over single "
            f"queries (both directions); fraction scored = share of the gallery the matcher scores (the larger of the two directions, each "
            f"direction's K taken from its own gallery; per direction in results.json). "
            f"Run time {run['minutes']:.1f} min{merged}. "
            + ("Each head's knob chosen on the first seed's dev part and kept for the later seeds.\n\n"
               if run["tune"] else "Heads untuned (their defaults).\n\n"))
    cols = ["matcher", "seed", "mode", "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "rsum",
            "ms_per_query", "fraction_scored"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if r["mode"] != "head":
            lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    heads = ["", "Each head at the cascade's operating points (K = % of the gallery): agreement = the share "
             "of the matcher's own top 10 within the Hamming top K; cascade R@10 = that top K re-ranked by "
             "the matcher; codes rSum = the codes alone, every gallery item a query.", "",
             "| matcher | seed | head | codes rSum | " + " | ".join(f"agree I→T {p}%" for p in OPERATING) + " | "
             + " | ".join(f"agree T→I {p}%" for p in OPERATING) + " | R@10 I→T 1% | R@10 T→I 1% |",
             "|" + "---|" * (6 + 2 * len(OPERATING))]
    for r in records:
        if r["mode"] == "head":
            heads.append(f"| {r['matcher']} | {r['seed']} | {r['head']} | {r['rsum_every_query']} | "
                         + " | ".join(str(r["agreement_i2t"][p]) for p in OPERATING) + " | "
                         + " | ".join(str(r["agreement_t2i"][p]) for p in OPERATING)
                         + f" | {r['r10_i2t']['1']} | {r['r10_t2i']['1']} |")
    summary = ["", "The heads over the seeds (mean ± sd; sd over seeds, 0 with one), at K = 1%: the agreement decides "
               "which head a first stage should use (the best mean of the two directions in bold).", "",
               "| matcher | head | seeds | agree I→T 1% | agree T→I 1% | R@10 I→T 1% | R@10 T→I 1% | codes rSum |",
               "|---|---|---|---|---|---|---|---|"]
    for name, rows in _over_seeds(records).items():
        best = max(rows, key=lambda h: rows[h]["agreement_i2t"][0] + rows[h]["agreement_t2i"][0])
        for kind, m in rows.items():
            cells = [f"{m[c][0]:.2f} ± {m[c][1]:.2f}" for c in ("agreement_i2t", "agreement_t2i", "r10_i2t", "r10_t2i",
                                                               "rsum_every_query")]
            summary.append(f"| {name} | {'**' + kind + '**' if kind == best else kind} | {m['seeds']} | "
                           + " | ".join(cells) + " |")
    choice = dev_choice(records)
    if choice:
        summary += ["", "The dev part's choice of default head (agreement@1%, mean of both directions, first seed):", ""]
        for name, c in choice.items():
            ex = [r for r in records if r["matcher"] == name and r["mode"] == "exhaustive"]
            got = [r for r in records if r["matcher"] == name and r["mode"] == "head" and r["head"] == c["head"]]
            delta = ", ".join(f"{'I→T' if d == 'i2t' else 'T→I'} {np.mean([r[f'r10_{d}']['1'] for r in got]) - np.mean([r[f'r10_{d}'] for r in ex]):+.2f}"
                              for d in DIRECTIONS) if ex and got else "n/a"
            summary.append(f"- {name}: **{c['head']}** ({', '.join(f'{k} {v}' for k, v in c['knob'].items())}; dev "
                           f"agreement {c['dev_agreement']:.2f}); its cascade's R@10 at K = 1% against the "
                           f"exhaustive matcher's, test, means over the seeds: {delta}")
    verdicts = []
    for name, rows in _over_seeds(records).items():
        for d, rival, margin, sd in _margins(rows):
            verdicts.append(f"- {name} {'I→T' if d == 'i2t' else 'T→I'}: distilled {margin:+.2f} against the best "
                            f"control ({rival}); the larger sd {sd:.2f}: "
                            + ("beats it" if margin > sd else "does not beat it by more than the spread"))
    if verdicts:
        summary += ["", "The distilled head against every control, agreement@1% (means over the seeds):", ""] + verdicts
    speed = [""] + cascade_lines(records)
    (out / "table.md").write_text(head + "\n".join(lines + heads + summary + speed) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in MODES:
        pts = [r for r in records if r["mode"] == mode]
        if pts:
            ax.scatter([r["ms_per_query"] for r in pts], [r["rsum"] for r in pts], label=mode)
            for r in pts:
                ax.annotate(r["matcher"] + (f" {r['head']}" if mode == "head" else ""),
                            (r["ms_per_query"], r["rsum"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (median)")
    ax.set_ylabel("rSum")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rsum_vs_time.png", dpi=120)
    plt.close(fig)
    matchers = list(dict.fromkeys(r["matcher"] for r in records if r["mode"] == "head"))
    if not matchers:
        return
    fig, axes = plt.subplots(1, len(matchers), figsize=(4 * len(matchers), 3.6), squeeze=False)
    for ax, name in zip(axes[0], matchers):
        kinds = dict.fromkeys(x["head"] for x in records if x["mode"] == "head" and x["matcher"] == name)
        for kind in kinds:  # the mean over the seeds
            runs = [x for x in records if x["mode"] == "head" and x["matcher"] == name and x["head"] == kind]
            for d, style in (("i2t", "-"), ("t2i", "--")):
                ax.plot([float(p) for p in OPERATING], [np.mean([r[f"agreement_{d}"][p] for r in runs]) for p in OPERATING],
                        style, marker="o", label=f"{kind} {'I→T' if d == 'i2t' else 'T→I'}")
        ax.set_xscale("log")
        ax.set_xticks([float(p) for p in OPERATING], OPERATING, minor=False)
        ax.set_xticks([], minor=True)  # no 3x10^0 and 4x10^0 crowding the K asked for
        ax.set_title(name)
        ax.set_xlabel("K, % of the gallery")
        ax.set_ylabel("agreement with the matcher's top 10, %")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "agreement_at_k.png", dpi=120)
    plt.close(fig)
