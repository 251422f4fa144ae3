"""``capcurate mix``: run one strategy's SQL over the views and write ``selections/<name>.parquet``."""

from __future__ import annotations

import time
from pathlib import Path

from ... import atomic
from ...dataset import Dataset, check_name
from ...errors import InputError
from ...summary import Summary
from ...views import ident, sql_string
from .columns import MixColumns
from .strategies import STRATEGIES, MixOptions


def default_name(strategy: str) -> str:
    """``raw-top+synthetic`` -> ``mix_raw_top_synthetic``: a valid selection name per strategy."""
    return "mix_" + strategy.replace("-", "_").replace("+", "_")


def mix(
    dataset: str | Path | Dataset,
    strategy: str,
    *,
    score: str | None = None,
    top_fraction: float | None = None,
    min_score: float | None = None,
    synthetic: str | list[str] | None = None,
    synthetic_min_score: float | None = None,
    p: float = 0.5,
    seed: int = 0,
    separator: str = " ",
    caption_probs: str | list[float] | None = None,
    from_selection: str | None = None,
    where: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
) -> Summary:
    """Mix raw and synthetic captions with ``strategy`` and write the selection ``name``.

    Returns a Summary whose ``details["by_source"]`` counts the rows per caption source.
    """
    t0 = time.time()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise InputError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    fn, needs_scorer, n_synthetic = STRATEGIES[strategy]
    name = check_name(name or default_name(strategy), "selection name")
    names = [s.strip() for s in synthetic.split(",")] if isinstance(synthetic, str) else list(synthetic or [])
    if caption_probs is not None and strategy != "sample":
        raise InputError("--caption-probs belongs to --strategy sample")
    opts = MixOptions(top_fraction=top_fraction, min_score=min_score,
                      synthetic_min_score=synthetic_min_score, p=p, seed=seed, separator=separator,
                      caption_probs=_probs(caption_probs))

    con = ds.connect()
    try:
        cols = MixColumns(
            columns=[r[0] for r in con.execute("DESCRIBE samples").fetchall()],
            scorers=ds.names("scores"), captioners=ds.names("captions"),
        )
        wants_scores = needs_scorer or score or min_score is not None or synthetic_min_score is not None \
            or top_fraction is not None
        if wants_scores:
            cols.scorer = cols.choose_scorer(score, needed_for=f"strategy {strategy}")
        if n_synthetic:
            cols.synthetic = cols.choose_synthetic(names, needed_for=f"strategy {strategy}",
                                                   many=n_synthetic == "many")
        base = _base_sql(ds, from_selection, where)
        query = f"WITH base AS ({base}) SELECT * FROM ({fn(cols, opts)}) ORDER BY uid, caption_source"
        con.execute(f"SELECT * FROM ({query}) LIMIT 0")  # a bad --where fails here, before any write
        considered = con.execute(f"WITH base AS ({base}) SELECT count(*) FROM base").fetchone()[0]

        params = {
            "strategy": strategy, "score": cols.scorer, "synthetic": cols.synthetic,
            "top_fraction": top_fraction, "min_score": min_score,
            "synthetic_min_score": synthetic_min_score, "from_selection": from_selection, "where": where,
        }
        if strategy == "random":
            params.update(p=p, seed=seed)
        if strategy == "concat":
            params["separator"] = separator
        if strategy == "sample":  # the recipe shard writes into the training shards
            sources = ["raw", *cols.synthetic]
            params.update(caption_keys=sources,
                          caption_probs=opts.caption_probs or [1.0 / len(sources)] * len(sources))
        out = ds.selection_path(name)
        mode, entry = ds.card.claim(stage="mix", family="selections", name=name, params=params,
                                    overwrite=overwrite, exists=out.exists, exclusive=True)
        with ds.card.writing(entry), atomic.atomic_path(out) as tmp:
            # DuckDB streams the result into Parquet: memory stays bounded however large the pool
            con.execute(f"COPY ({query}) TO {sql_string(tmp)} (FORMAT parquet, COMPRESSION zstd)")
        by_source = dict(con.execute(
            f"SELECT caption_source, count(*) FROM read_parquet({sql_string(out)}) GROUP BY 1 ORDER BY 1"
        ).fetchall())
        images = con.execute(
            f"SELECT count(DISTINCT uid) FROM read_parquet({sql_string(out)})"
        ).fetchone()[0]
    finally:
        con.close()

    rows = sum(by_source.values())
    counts = {"images_considered": considered, "rows": rows, "images": images}
    ds.card.finish_entry(entry, {**counts, "by_source": by_source})
    return Summary(
        stage="mix", counts=counts,
        details={"selection": name, "path": str(out), "strategy": strategy, "scorer": cols.scorer,
                 "synthetic": cols.synthetic, "by_source": by_source},
        seconds=time.time() - t0,
        message=f"{strategy}: {rows:,} samples from {images:,} of {considered:,} images -> selections/{name}",
    )


def _probs(value: str | list[float] | None) -> list[float] | None:
    if value is None or value == "":
        return None
    try:
        return [float(x) for x in value.split(",")] if isinstance(value, str) else [float(x) for x in value]
    except ValueError:
        raise InputError(f"--caption-probs must be comma-separated numbers, got {value!r}") from None


def _base_sql(ds: Dataset, from_selection: str | None, where: str | None) -> str:
    """The images a mix may use: downloaded ones, restricted to a filter selection and/or a predicate."""
    sql = "SELECT * FROM samples WHERE status = 'success'"
    if from_selection:
        if from_selection not in ds.selection_names():
            raise InputError(
                f"no selection named {from_selection!r}; selections present: "
                f"{', '.join(ds.selection_names()) or '(none)'}"
            )
        sql += f" AND uid IN (SELECT uid FROM {ident('selection_' + check_name(from_selection))})"
    if where:
        sql += f" AND ({where})"
    return sql
