"""Assemble the quickstart's results: one row per strategy, written as results.md, results.json, results.png.

    python pipelines/results_table.py OUT [--top-fraction 0.3]

OUT is one quickstart run, or (``QUICKSTART_SEEDS=N``) a folder of runs ``OUT/seed_<k>/``. From each run it
reads evals/<strategy>.json (`capcurate eval --output`), shards/<strategy>/manifest.json (the selection's
size), runs/<strategy>/run.json (samples seen) and, for CapWorld, the dataset's truth columns: how often
each strategy's training captions, and the pool's raw and synthetic captions, name the image's true
colour and shape. With several runs each metric is their mean ± standard deviation; with one, the ± is the
binomial standard error of the eval set. The paper's key comparison (each mix minus raw top-k% by CLIP)
is reported with its spread. Only measured numbers go in; a missing file leaves a blank cell.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("raw", "raw_top", "synthetic", "raw_top_synthetic", "best_of")
MIXES = ("raw_top_synthetic", "best_of")  # the paper's mixes, each compared with raw filtering
BASELINE = "raw_top"
METRICS = ("zeroshot_top1", "zeroshot_top5", "i2t_r1", "t2i_r1")
PREMISE_RATIO = 2.0  # the synthetic captions should name the object at least this many times as often


def label(strategy: str, top_fraction: float) -> str:
    return {
        "raw": "raw (no filter)", "raw_top": f"raw top-{round(top_fraction * 100)}% by CLIP",
        "synthetic": "synthetic only", "raw_top_synthetic": "raw-top + synthetic", "best_of": "best-of",
    }[strategy]


def _json(path: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def stored(run: Path) -> Any:
    """Where a run's dataset, shards and runs live: ``run`` itself, or the URL in its ``store.txt``
    (``QUICKSTART_STORE``: they are in object storage; the world and the evals stay in ``run``)."""
    marker = run / "store.txt"
    if not marker.is_file():
        return run
    from capcurate import storage

    return storage.path(marker.read_text().strip())


def run_dirs(out: Path) -> list[Path]:
    """The runs under ``out``: its ``seed_<k>/`` folders in seed order, else ``out`` itself."""
    seeds = [p for p in out.glob("seed_*") if p.is_dir() and (p / "evals").is_dir()]
    return sorted(seeds, key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) or [out]


def eval_metrics(path: Path) -> dict[str, float | None]:
    records = _json(path) or []
    records = records if isinstance(records, list) else [records]
    by_task = {r.get("task"): r for r in records}
    zs, ret = by_task.get("zeroshot_classification", {}), by_task.get("zeroshot_retrieval", {})
    zm, rm = zs.get("metrics", {}), ret.get("metrics", {})
    return {"zeroshot_top1": zm.get("acc1"), "zeroshot_top5": zm.get("acc5"),
            "i2t_r1": rm.get("text_retrieval_recall@1"), "t2i_r1": rm.get("image_retrieval_recall@1"),
            "eval_images": zs.get("num_samples")}


def _names(col: str, attr: str) -> str:
    """SQL: the caption in ``col`` names the true value of ``attr`` (a shape also in the plural)."""
    suffix = "(s|es)?" if attr == "shape" else ""
    return f"regexp_matches(lower(coalesce({col}, '')), '\\b' || true_{attr} || '{suffix}\\b')"


def _mentions(col: str) -> str:
    """SQL: the caption in ``col`` names the true colour and shape."""
    return f"({_names(col, 'colour')} AND {_names(col, 'shape')})"


def caption_accuracy(run: Path) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Per strategy: share of training captions naming the true object; and, over the pool, how often
    the raw alt-texts and the CoCa captions name the true colour, shape and both."""
    import duckdb

    ds = stored(run) / "dataset"
    samples = ds / "samples"
    if not samples.is_dir():
        return {}, {}
    con = duckdb.connect()
    if ds is not run / "dataset":
        from capcurate import storage

        storage.register_duckdb(con, ds)
    con.execute(f"CREATE VIEW m AS SELECT * FROM read_parquet('{samples}/*.parquet', union_by_name=true)")
    truth = run / "world" / "urls.parquet"
    if "true_colour" in [r[0] for r in con.execute("DESCRIBE m").fetchall()]:
        con.execute("CREATE VIEW s AS SELECT * FROM m")  # download kept the world's truth columns
    elif truth.is_file():  # an ingested pool has the world's uids; its truth stays in urls.parquet
        con.execute(f"CREATE VIEW s AS SELECT m.*, t.* EXCLUDE (uid, url, caption) FROM m "
                    f"LEFT JOIN read_parquet('{truth}') t USING (uid)")
    else:
        return {}, {}  # not a CapWorld dataset: no truth to compare with
    per_strategy = {}
    for s in STRATEGIES:
        sel = ds / "selections" / f"{s}.parquet"
        if sel.is_file():
            q = f"SELECT avg(CASE WHEN {_mentions('sel.caption')} THEN 1 ELSE 0 END) FROM read_parquet('{sel}') sel JOIN s USING (uid)"
            per_strategy[s] = con.execute(q).fetchone()[0]

    def rates(col: str, source: str) -> dict[str, float]:
        q = (f"SELECT avg({_names(col, 'colour')}::INT), avg({_names(col, 'shape')}::INT), "
             f"avg({_mentions(col)}::INT), avg(({col} = s.true_caption)::INT) {source} WHERE s.status = 'success'")
        colour, shape, both, exact = con.execute(q).fetchone()
        return {"colour": colour, "shape": shape, "colour_and_shape": both, "exact": exact}

    pool = {"raw": rates("s.caption", "FROM s")}
    caps = ds / "captions" / "coca"
    if caps.is_dir():
        pool["synthetic"] = rates("c.caption", f"FROM read_parquet('{caps}/*.parquet') c JOIN s USING (uid)")
    return per_strategy, pool


def build_rows(run: Path, top_fraction: float) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """One run's rows (one per strategy) and its pool caption accuracy."""
    accuracy, pool = caption_accuracy(run)
    rows = []
    for s in STRATEGIES:
        manifest = _json(stored(run) / "shards" / s / "manifest.json") or {}
        cfg = _json(stored(run) / "runs" / s / "run.json") or {}
        seen = (cfg.get("config") or cfg).get("train_num_samples")
        rows.append({"strategy": label(s, top_fraction), "name": s, "samples": manifest.get("total_samples"),
                     "samples_seen": seen, "captions_naming_object": accuracy.get(s),
                     **eval_metrics(run / "evals" / f"{s}.json")})
    return rows, pool


def _binomial_se(p: float, n: int | None) -> float | None:
    return math.sqrt(p * (1 - p) / n) if n else None


def _spread(values: list[float], n_eval: int | None = None) -> tuple[float, float | None, str]:
    """Mean, its ± and what the ± is: the std over runs, or for one run the eval set's standard error."""
    mean = statistics.fmean(values)
    if len(values) > 1:
        return mean, statistics.stdev(values), "std"
    return mean, _binomial_se(mean, n_eval), "se"


def summarise(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per strategy, over runs: mean and ± of every metric, the values per run, and the caption stats."""
    out = []
    for i, first in enumerate(runs[0]):
        row = {k: first[k] for k in ("strategy", "name", "samples", "samples_seen")}
        per_run = [r[i] for r in runs]
        for m in (*METRICS, "captions_naming_object"):
            values = [r[m] for r in per_run if r[m] is not None]
            row[m] = statistics.fmean(values) if values else None
            row[f"{m}_runs"] = values
        top1 = row["zeroshot_top1_runs"]
        if top1:
            _, row["zeroshot_top1_pm"], row["pm_kind"] = _spread(top1, first.get("eval_images"))
        row["eval_images"] = first.get("eval_images")
        out.append(row)
    return out


def key_comparison(runs: list[list[dict[str, Any]]], top_fraction: float) -> list[dict[str, Any]]:
    """Each mix minus raw top-k% on zero-shot top-1: paired per run; the ± is the std of the paired
    differences over runs, or for one run the standard error of a difference of two independent proportions."""
    out = []
    for mix in MIXES:
        diffs, ses = [], []
        for rows in runs:
            by = {r["name"]: r for r in rows}
            if mix not in by or BASELINE not in by:
                continue
            a, b = by[mix]["zeroshot_top1"], by[BASELINE]["zeroshot_top1"]
            if a is None or b is None:
                continue
            diffs.append(a - b)
            n = by[mix].get("eval_images")
            if n:
                ses.append(math.sqrt(a * (1 - a) / n + b * (1 - b) / n))
        if not diffs:
            continue
        mean = statistics.fmean(diffs)
        pm, kind = (statistics.stdev(diffs), "std") if len(diffs) > 1 else (ses[0] if ses else None, "se")
        out.append({"mix": mix, "label": f"{label(mix, top_fraction)} - {label(BASELINE, top_fraction)}",
                    "diff": mean, "pm": pm, "pm_kind": kind, "diffs": diffs,
                    "wins": sum(d > 0 for d in diffs), "runs": len(diffs)})
    return out


def pool_summary(pools: list[dict[str, dict[str, float]]]) -> dict[str, Any]:
    """Pool caption accuracy averaged over runs, with the synthetic/raw ratio of colour-and-shape."""
    pools = [p for p in pools if p]
    if not pools:
        return {}
    out: dict[str, Any] = {}
    for source in ("raw", "synthetic"):
        have = [p[source] for p in pools if source in p]
        if have:
            out[source] = {k: statistics.fmean(h[k] for h in have if h[k] is not None) for k in have[0]}
            out[source]["colour_and_shape_runs"] = [h["colour_and_shape"] for h in have]
    if "synthetic" in out and out["raw"]["colour_and_shape"]:
        out["ratio"] = out["synthetic"]["colour_and_shape"] / out["raw"]["colour_and_shape"]
        # per run too: a mean over seeds could pass with one seed failing
        out["ratio_runs"] = [p["synthetic"]["colour_and_shape"] / p["raw"]["colour_and_shape"]
                             for p in pools if "synthetic" in p and p["raw"]["colour_and_shape"]]
        out["premise_holds"] = min(out["ratio_runs"]) >= PREMISE_RATIO
    return out


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct and isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _pm(mean: float | None, pm: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f} ± {100 * pm:.1f}" if pm is not None else f"{100 * mean:.1f}"


def markdown(rows: list[dict[str, Any]], pool: dict[str, Any], comparison: list[dict[str, Any]], n_runs: int) -> str:
    spread = (f"mean ± standard deviation over {n_runs} runs (seeds)" if n_runs > 1 else
              "one run; ± is the binomial standard error of the eval set")
    lines = ["| strategy | samples | zero-shot top-1 | zero-shot top-5 | retrieval R@1 i->t | retrieval R@1 t->i "
             "| captions naming the object |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {_fmt(r['samples'])} | {_pm(r['zeroshot_top1'], r.get('zeroshot_top1_pm'))} "
                     f"| {_fmt(r['zeroshot_top5'])} | {_fmt(r['i2t_r1'])} | {_fmt(r['t2i_r1'])} "
                     f"| {_fmt(r['captions_naming_object'])} |")
    if pool:  # the premise, every run: the captioner against the web, over the same pool images
        ratio = f" ({pool['ratio']:.2f}x the raw alt-texts)" if "ratio" in pool else ""
        lines.append(f"| *pool: raw alt-texts* | | | | | | {_fmt(pool['raw']['colour_and_shape'])} |")
        lines.append(f"| *pool: CoCa captions* | | | | | | "
                     f"{_fmt(pool.get('synthetic', {}).get('colour_and_shape'))}{ratio} |")
    lines += ["", f"All numbers in %, except samples (the selection's size); top-1 is {spread}. Every strategy's "
              f"CLIP saw the same number of samples ({_fmt(rows[0]['samples_seen'], pct=False)}), evaluated on "
              f"{_fmt(rows[0].get('eval_images'), pct=False)} held-out images. 'captions naming the object': share "
              "of the training captions that name the image's true colour and shape."]
    if comparison:
        lines += ["", "Key comparison (zero-shot top-1, percentage points; the paper finds mixes above raw filtering):", ""]
        for c in comparison:
            detail = (f"{c['wins']} of {c['runs']} runs above; per run: "
                      + ", ".join(f"{100 * d:+.1f}" for d in c["diffs"])) if c["runs"] > 1 else "one run"
            lines.append(f"- {c['label']}: {100 * c['diff']:+.1f} ± {100 * (c['pm'] or 0):.1f} ({c['pm_kind']}; {detail})")
    if pool:
        raw, syn = pool["raw"], pool.get("synthetic")
        lines += ["", "Over the whole pool (the premise: synthetic captions describe the image better than alt-text):", "",
                  "| captions | colour right | shape right | colour and shape | word for word |", "|---|---:|---:|---:|---:|"]
        for name, r in (("raw alt-text", raw), ("CoCa (synthetic)", syn)):
            if r:
                lines.append(f"| {name} | {_fmt(r['colour'])} | {_fmt(r['shape'])} | {_fmt(r['colour_and_shape'])} "
                             f"| {_fmt(r['exact'])} |")
        if "ratio" in pool:
            verdict = "holds" if pool["premise_holds"] else "does NOT hold"
            runs = pool["ratio_runs"]
            per_run = (f" (per run: {', '.join(f'{r:.2f}x' for r in runs)}; {sum(r >= PREMISE_RATIO for r in runs)} of "
                       f"{len(runs)} at least {PREMISE_RATIO:g}x)") if len(runs) > 1 else ""
            lines += ["", f"The CoCa captions name colour and shape {pool['ratio']:.2f}x as often as the raw alt-texts"
                      f"{per_run}: the premise (>= {PREMISE_RATIO:g}x in every run) {verdict}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["strategy"] for r in rows]
    metrics = [("zeroshot_top1", "zero-shot top-1"), ("i2t_r1", "R@1 image->text"), ("t2i_r1", "R@1 text->image")]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(metrics)
    for j, (key, title) in enumerate(metrics):
        err = [100 * (r.get("zeroshot_top1_pm") or 0) for r in rows] if key == "zeroshot_top1" else None
        ax.bar([i + j * width for i in range(len(rows))], [100 * (r[key] or 0) for r in rows], width, label=title,
               yerr=err, capsize=3)
    ax.set_xticks([i + width for i in range(len(rows))], names, rotation=15)
    ax.set_ylabel("%")
    ax.set_title("CapWorld: tiny CLIP trained on each caption strategy (same samples seen)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the quickstart's output folder (one run, or seed_<k>/ runs)")
    ap.add_argument("--top-fraction", type=float, default=0.3, help="the fraction the raw-top strategies kept")
    args = ap.parse_args(argv)
    built = [build_rows(run, args.top_fraction) for run in run_dirs(args.out)]
    keep = [s for s in STRATEGIES
            if any(r["name"] == s and (r["zeroshot_top1"] is not None or r["samples"] is not None)
                   for rows, _ in built for r in rows)]
    runs = [[r for r in rows if r["name"] in keep] for rows, _ in built]
    if not keep or all(r["zeroshot_top1"] is None for rows in runs for r in rows):
        print(f"error: no evals/<strategy>.json under {args.out}", file=sys.stderr)
        return 1
    rows = summarise(runs)
    pool = pool_summary([p for _, p in built])
    comparison = key_comparison(runs, args.top_fraction)
    text = markdown(rows, pool, comparison, len(runs))
    (args.out / "results.md").write_text("# CapWorld quickstart results\n\n" + text)
    (args.out / "results.json").write_text(json.dumps(
        {"runs": len(runs), "rows": rows, "per_run": runs, "key_comparison": comparison,
         "pool_caption_accuracy": pool}, indent=2) + "\n")
    try:
        plot(rows, args.out / "results.png")
    except ImportError:  # a machine with capcurate's pipeline but not matplotlib (a bare GPU box)
        print("note: matplotlib is not installed: results.md and results.json only", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
