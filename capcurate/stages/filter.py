"""``capcurate filter``: keep the samples that pass SQL rules, evaluated by DuckDB over the Parquet views.

The pool is the wide ``samples`` view (or, with ``from_selection``, the rows of an earlier selection
joined to it) with two more columns: ``train_caption`` (the text a selected row trains on: the raw
caption, or the earlier selection's caption) and ``caption_source``. Each option adds one or more
named rules; a row is kept when every rule is true (a NULL counts as false). One pass counts every
rule's own passes and the combined count, a second pass writes ``selections/<name>.parquet``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from .. import atomic
from ..dataset import Dataset, check_name
from ..errors import InputError, OutputExistsError
from ..summary import Summary
from ..views import ident, sql_string
from .basic_filter import BasicFilter, register_language_table
from .cluster_filter import ClusterFilter, target_clusters

POOL = "__capcurate_pool"


def score_column_for(columns: list[str], score: str | None) -> str:
    """``SCORER:SOURCE`` -> ``score_SCORER_SOURCE``, checked against the columns that exist."""
    existing = [c for c in columns if c.startswith("score_")]
    if not score:
        if len(existing) == 1:
            return existing[0]
        raise InputError(
            "--min-score/--top-fraction need --score SCORER:SOURCE; score columns: "
            + (", ".join(existing) or "none (run capcurate score first)")
        )
    scorer, sep, source = score.partition(":")
    col = f"score_{scorer}_{source}" if sep else (score if score.startswith("score_") else "")
    if col not in columns:
        raise InputError(
            f"no score column for {score!r} (looked for {col or 'SCORER:SOURCE'}); score columns: "
            + (", ".join(existing) or "none (run capcurate score first)")
        )
    return col


def _pool_sql(ds: Dataset, con: Any, from_selection: str | None) -> str:
    if from_selection is None:
        return "SELECT s.*, s.caption AS train_caption, 'raw' AS caption_source FROM samples s"
    if from_selection not in ds.selection_names():
        raise InputError(
            f"no selection named {from_selection!r}; selections: {', '.join(ds.selection_names()) or 'none'}"
        )
    view = ident("selection_" + from_selection)
    sel_cols = [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]
    source = "sel.caption_source" if "caption_source" in sel_cols else "'raw'"
    return (f"SELECT s.*, sel.caption AS train_caption, {source} AS caption_source "
            f"FROM {view} sel JOIN samples s ON s.uid = sel.uid")


def _size_exprs(columns: list[str]) -> tuple[str, str]:
    """Image size for size rules: the original size when the manifest has it, else the stored one."""
    def pick(orig: str, stored: str) -> str:
        have = [c for c in (orig, stored) if c in columns]
        if not have:
            raise InputError(f"--basic needs {orig} or {stored} in the manifest; columns: {', '.join(columns)}")
        return f"coalesce({', '.join(have)})"
    return pick("original_width", "width"), pick("original_height", "height")


def _cluster_rules(ds: Dataset, con: Any, cluster: ClusterFilter, details: dict[str, Any], *,
                   language_done: bool) -> list[tuple[str, str]]:
    """DataComp's image-based clustering (``cluster_filter.py``): its caption rules, then the target clusters."""
    if cluster.language and not language_done:
        register_language_table(con, f"SELECT train_caption FROM {POOL} WHERE status = 'success'")
    caption_rules = cluster.caption_rules("train_caption")
    passing = " AND ".join(f"coalesce(({p}), false)" for _, p in caption_rules)
    eligible = con.sql(f"SELECT DISTINCT uid FROM {POOL} WHERE status = 'success' AND {passing}").to_arrow_table()
    kept, info = target_clusters(ds, cluster, eligible.column("uid").combine_chunks())
    con.register("__capcurate_cluster", kept)
    details["cluster"] = info
    return caption_rules + [(f"cluster: image in one of {info['target_clusters']} target clusters of {info['clusters']}",
                             "uid IN (SELECT uid FROM __capcurate_cluster)")]


def filter(dataset: str | Path, name: str, *, min_score: float | None = None, score: str | None = None,
           top_fraction: float | None = None, where: str | None = None, from_selection: str | None = None,
           basic: bool | BasicFilter = False, cluster: ClusterFilter | None = None, overwrite: bool = False,
           threads: int | None = None, memory_limit: str | None = None) -> Summary:
    """Write ``selections/<name>.parquet`` with the rows that pass every rule; count passes per rule."""
    t0 = time.time()
    ds = Dataset(dataset)
    out = ds.selection_path(name)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"selections/{name} exists; choose another --name or pass --overwrite")
    if top_fraction is not None and not 0 < top_fraction <= 1:
        raise InputError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    if basic is True:
        basic = BasicFilter()
    if basic and basic.language and not re.fullmatch(r"[a-z]{2,3}", basic.language):
        raise InputError(f"--language must be an ISO 639-1 code such as 'en', got {basic.language!r}")
    if from_selection is not None:
        check_name(from_selection, "selection name")
    if cluster is not None:
        cluster.check()
        check_name(cluster.scorer, "scorer name")

    con = ds.connect(threads=threads, memory_limit=memory_limit)
    try:
        con.execute(f"CREATE TEMP VIEW {POOL} AS {_pool_sql(ds, con, from_selection)}")
        columns = [r[0] for r in con.execute(f"DESCRIBE {POOL}").fetchall()]
        rules: list[tuple[str, str]] = [("image downloaded", "status = 'success'")]
        details: dict[str, Any] = {"name": name}
        keep_cols = ["uid", "train_caption AS caption", "caption_source", "shard", "key"]

        score_col = None
        if min_score is not None or top_fraction is not None:
            score_col = score_column_for(columns, score)
            keep_cols.append(ident(score_col))
            details["score_column"] = score_col
        if min_score is not None:
            rules.append((f"{score_col} >= {min_score:g}", f"{ident(score_col)} >= {float(min_score)!r}"))
        if top_fraction is not None:
            threshold, scored = con.execute(
                f"SELECT quantile_cont({ident(score_col)}, {1 - float(top_fraction)!r}), "
                f"count({ident(score_col)}) FROM {POOL}").fetchall()[0]
            if threshold is None:
                raise InputError(f"{score_col} has no scores in the pool: run capcurate score first")
            details["top_fraction_threshold"] = threshold
            details["top_fraction_pool"] = scored
            rules.append((f"top {top_fraction:g} of {score_col} (>= {threshold:.6g})",
                          f"{ident(score_col)} >= {float(threshold)!r}"))
        if basic:
            width, height = _size_exprs(columns)
            if basic.language:
                details["distinct_captions_language_checked"] = register_language_table(
                    con, f"SELECT train_caption FROM {POOL} WHERE status = 'success'")
            rules += basic.rules("train_caption", width, height)
            details["basic"] = basic.to_dict()
        if cluster is not None:
            rules += _cluster_rules(ds, con, cluster, details, language_done=bool(basic and basic.language))
        if where:
            rules.append((f"where: {where}", where))

        preds = [f"coalesce(({p}), false)" for _, p in rules]
        combined = " AND ".join(preds)
        row = con.execute(
            f"SELECT count(*), {', '.join(f'count_if({p})' for p in preds)}, count_if({combined}) FROM {POOL}"
        ).fetchall()[0]
        total, per_rule, kept = row[0], row[1:-1], row[-1]

        # claimed under the card's lock just before writing: a second run of this name is refused while
        # this one writes, and the lineage entry always describes the file on disk
        params = {"min_score": min_score, "score": score_col, "top_fraction": top_fraction, "where": where,
                  "from_selection": from_selection, "basic": basic.to_dict() if basic else None,
                  "cluster": cluster.to_dict() if cluster else None}
        _mode, entry = ds.card.claim(stage="filter", family="selections", name=name, params=params,
                                     overwrite=overwrite, exists=out.exists, exclusive=True)
        with ds.card.writing(entry), atomic.atomic_path(out) as tmp:
            con.execute(
                f"COPY (SELECT {', '.join(keep_cols)} FROM {POOL} WHERE {combined} "
                f"ORDER BY uid, caption_source) TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd)"
            )
    finally:
        con.close()

    counts: dict[str, Any] = {"pool": total}
    counts.update({f"passes {label}": n for (label, _), n in zip(rules, per_rule, strict=True)})
    counts["kept"] = kept
    details["rules"] = {label: pred for label, pred in rules}
    ds.card.finish_entry(entry, counts, **({"threshold": details["top_fraction_threshold"]}
                                            if "top_fraction_threshold" in details else {}))
    pct = f" ({kept / total:.1%})" if total else ""
    return Summary(stage="filter", counts=counts, details=details, seconds=time.time() - t0,
                   message=f"kept {kept:,} of {total:,}{pct} into selections/{name}")
