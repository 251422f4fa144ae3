"""Assemble the quickstart's results: one row per strategy, written as results.md, results.json, results.png.

    python pipelines/results_table.py OUT [--top-fraction 0.3]

Reads what the quickstart left in OUT: evals/<strategy>.json (from `capcurate eval --output`),
shards/<strategy>/manifest.json (the selection's size), runs/<strategy>/run.json (samples seen), and,
for CapWorld, the dataset's truth columns, to say how often each strategy's training captions name
the image's true colour and shape. Only measured numbers go in; a missing file leaves a blank cell.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

STRATEGIES = ("raw", "raw_top", "synthetic", "raw_top_synthetic", "best_of")


def label(strategy: str, top_fraction: float) -> str:
    return {
        "raw": "raw (no filter)", "raw_top": f"raw top-{round(top_fraction * 100)}% by CLIP",
        "synthetic": "synthetic only", "raw_top_synthetic": "raw-top + synthetic", "best_of": "best-of",
    }[strategy]


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def eval_metrics(path: Path) -> dict[str, float | None]:
    records = _json(path) or []
    records = records if isinstance(records, list) else [records]
    by_task = {r.get("task"): r.get("metrics", {}) for r in records}
    zs, ret = by_task.get("zeroshot_classification", {}), by_task.get("zeroshot_retrieval", {})
    return {"zeroshot_top1": zs.get("acc1"), "zeroshot_top5": zs.get("acc5"),
            "i2t_r1": ret.get("text_retrieval_recall@1"), "t2i_r1": ret.get("image_retrieval_recall@1")}


def _mentions(col: str) -> str:
    """SQL: the caption in ``col`` names the true colour and shape (singular or plural)."""
    return (f"(regexp_matches(lower(coalesce({col}, '')), '\\b' || true_colour || '\\b') AND "
            f"regexp_matches(lower(coalesce({col}, '')), '\\b' || true_shape || '(s|es)?\\b'))")


def caption_accuracy(out: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Per strategy: share of training captions naming the true object; and raw vs synthetic over the pool."""
    import duckdb

    ds = out / "dataset"
    samples = ds / "samples"
    if not samples.is_dir():
        return {}, {}
    con = duckdb.connect()
    con.execute(f"CREATE VIEW s AS SELECT * FROM read_parquet('{samples}/*.parquet', union_by_name=true)")
    if "true_colour" not in [r[0] for r in con.execute("DESCRIBE s").fetchall()]:
        return {}, {}  # not a CapWorld dataset: no truth to compare with
    per_strategy = {}
    for s in STRATEGIES:
        sel = ds / "selections" / f"{s}.parquet"
        if sel.is_file():
            q = f"SELECT avg(CASE WHEN {_mentions('sel.caption')} THEN 1 ELSE 0 END) FROM read_parquet('{sel}') sel JOIN s USING (uid)"
            per_strategy[s] = con.execute(q).fetchone()[0]
    pool = {}
    q = f"SELECT avg(CASE WHEN {_mentions('caption')} THEN 1 ELSE 0 END) FROM s WHERE status = 'success'"
    pool["raw"] = con.execute(q).fetchone()[0]
    caps = ds / "captions" / "coca"
    if caps.is_dir():
        q = (f"SELECT avg(CASE WHEN {_mentions('c.caption')} THEN 1 ELSE 0 END), "
             f"avg(CASE WHEN c.caption = s.true_caption THEN 1 ELSE 0 END) "
             f"FROM read_parquet('{caps}/*.parquet') c JOIN s USING (uid) WHERE s.status = 'success'")
        pool["synthetic"], pool["synthetic_exact"] = con.execute(q).fetchone()
    return per_strategy, pool


def build_rows(out: Path, top_fraction: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    accuracy, pool = caption_accuracy(out)
    rows = []
    for s in STRATEGIES:
        manifest = _json(out / "shards" / s / "manifest.json") or {}
        run = _json(out / "runs" / s / "run.json") or {}
        seen = (run.get("config") or run).get("train_num_samples")
        rows.append({"strategy": label(s, top_fraction), "name": s, "samples": manifest.get("total_samples"),
                     "samples_seen": seen, "captions_naming_object": accuracy.get(s),
                     **eval_metrics(out / "evals" / f"{s}.json")})
    return rows, pool


def _fmt(v: Any, pct: bool = True) -> str:
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct and isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def markdown(rows: list[dict[str, Any]], pool: dict[str, float]) -> str:
    lines = ["| strategy | samples | zero-shot top-1 | zero-shot top-5 | retrieval R@1 i->t | retrieval R@1 t->i "
             "| captions naming the object |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {_fmt(r['samples'])} | {_fmt(r['zeroshot_top1'])} | {_fmt(r['zeroshot_top5'])} "
                     f"| {_fmt(r['i2t_r1'])} | {_fmt(r['t2i_r1'])} | {_fmt(r['captions_naming_object'])} |")
    lines.append("")
    lines.append("All numbers in %, except samples (the selection's size). Every strategy's CLIP saw the same number "
                 f"of samples ({_fmt(rows[0]['samples_seen'], pct=False)}). 'captions naming the object': share of the training "
                 "captions that name the image's true colour and shape.")
    if pool:
        lines.append("")
        lines.append(f"Over the whole pool, {_fmt(pool.get('raw'))}% of raw alt-texts and "
                     f"{_fmt(pool.get('synthetic'))}% of the CoCa captions name the true colour and shape; "
                     f"{_fmt(pool.get('synthetic_exact'))}% of the CoCa captions equal the true caption word for word.")
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
        ax.bar([i + j * width for i in range(len(rows))], [100 * (r[key] or 0) for r in rows], width, label=title)
    ax.set_xticks([i + width for i in range(len(rows))], names, rotation=15)
    ax.set_ylabel("%")
    ax.set_title("CapWorld: tiny CLIP trained on each caption strategy (same samples seen)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the quickstart's output folder")
    ap.add_argument("--top-fraction", type=float, default=0.3, help="the fraction the raw-top strategies kept")
    args = ap.parse_args(argv)
    rows, pool = build_rows(args.out, args.top_fraction)
    rows = [r for r in rows if r["zeroshot_top1"] is not None or r["samples"] is not None]
    if not rows or all(r["zeroshot_top1"] is None for r in rows):
        print(f"error: no evals/<strategy>.json under {args.out}", file=sys.stderr)
        return 1
    text = markdown(rows, pool)
    (args.out / "results.md").write_text("# CapWorld quickstart results\n\n" + text)
    (args.out / "results.json").write_text(json.dumps({"rows": rows, "pool_caption_accuracy": pool}, indent=2) + "\n")
    plot(rows, args.out / "results.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
