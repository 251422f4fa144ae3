"""``capcurate query`` and ``capcurate stats``: SQL over a dataset's views, and a summary of what is in it.

Query results stream from DuckDB in record batches, so writing a billion-row CSV or Parquet file
takes bounded memory; the table format shows the first rows only.

``query`` is read-only SQL over the views, held twice: only SELECT-like statements (SELECT, WITH,
FROM, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) are accepted, and the connection runs them with DuckDB's
``enable_external_access`` off, so no function (``read_csv``, ``COPY``, ``ATTACH``) reaches a file
outside the dataset. The dataset itself stays readable through ``allowed_directories`` (writing there
is what the statement check refuses: DuckDB's setting allows writes as well as reads).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from .. import atomic, lineage, storage
from ..dataset import Dataset
from ..errors import InputError
from ..summary import Summary
from ..views import ident

FORMATS = ("table", "csv", "json", "parquet")
BATCH_ROWS = 65_536
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
QUANTILE_NAMES = ("min", "p05", "p25", "p50", "p75", "p95", "max")


# statement types that only read: DESCRIBE, SHOW and SUMMARIZE parse as SELECT
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def check_read_only(sql: str) -> None:
    """Refuse SQL that could change anything (COPY, ATTACH, INSTALL, CREATE, SET, PRAGMA, ...), by the
    statement types DuckDB's own parser gives, before a connection is opened."""
    import duckdb

    statements = duckdb.extract_statements(sql)
    if not statements:
        raise InputError("the SQL is empty: expected a SELECT statement")
    for st in statements:
        kind = st.type.name
        if kind not in READ_ONLY_STATEMENTS:
            raise InputError(f"query is read-only SQL over the views: a {kind} statement is refused "
                             "(use SELECT, DESCRIBE, SHOW, SUMMARIZE or EXPLAIN; -o writes a result to a file)")


def read_only_connect(ds: Dataset, sql: str):
    """The dataset's views on a connection that can read nothing outside the dataset and write nothing."""
    check_read_only(sql)
    con = ds.connect()
    try:
        # after the views are defined: they read the dataset's files when a query runs
        root = str(ds.root) if ds.remote else str(Path(ds.root).resolve())
        con.execute("SET allowed_directories = [?]", [root.rstrip("/") + "/"])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")  # no statement may switch it back
    except Exception:
        con.close()
        raise
    return con


def query(dataset: str | Path | Dataset, sql: str):
    """Run read-only SQL over the dataset's views and return a pyarrow Table (the whole result in memory)."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    con = read_only_connect(ds, sql)
    try:
        return con.sql(sql).to_arrow_table()
    finally:
        con.close()


def _batches(ds: Dataset, sql: str):
    """(schema, iterator of RecordBatches) for ``sql``; the connection closes when the iterator ends."""
    con = read_only_connect(ds, sql)
    try:
        # the relation API streams; an execute() result would be copied whole before the first batch
        rel = con.sql(sql)
        if rel is None:
            raise InputError("the SQL statement returns no rows (use SELECT, DESCRIBE, SHOW ...)")
        reader = rel.to_arrow_reader(BATCH_ROWS)
    except Exception:
        con.close()
        raise

    def gen():
        try:
            yield from reader
        finally:
            con.close()

    return reader.schema, gen()


def _json_default(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    return str(v)


def write_rows(ds: Dataset, sql: str, fmt: str, stream: IO[bytes]) -> int:
    """Stream the result of ``sql`` as csv or json (an array of objects) into a binary stream."""
    import pyarrow.csv as pacsv

    schema, batches = _batches(ds, sql)
    n = 0
    if fmt == "csv":
        with pacsv.CSVWriter(stream, schema) as writer:
            for b in batches:
                writer.write_batch(b)
                n += b.num_rows
        return n
    if fmt != "json":
        raise InputError(f"format {fmt!r} cannot be streamed; expected csv or json")
    stream.write(b"[")
    for b in batches:
        for row in b.to_pylist():
            stream.write((b"," if n else b"") + b"\n" + json.dumps(row, default=_json_default).encode())
            n += 1
    stream.write(b"\n]\n" if n else b"]\n")
    return n


def export_query(dataset: str | Path | Dataset, sql: str, output: str | Path, fmt: str | None = None) -> Summary:
    """Write the result of ``sql`` to a csv/json/parquet file (atomically; format from the suffix if None)."""
    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    check_read_only(sql)  # before the output is touched
    output = storage.path(output)
    storage.check_writable(output)
    fmt = fmt or output.suffix.lstrip(".").lower()
    if fmt not in ("csv", "json", "parquet"):
        raise InputError(f"cannot tell the output format of {output}: pass --format csv, json or parquet")
    with atomic.atomic_path(output) as tmp:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            schema, batches = _batches(ds, sql)
            n = 0
            with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
                for b in batches:
                    writer.write_batch(b)
                    n += b.num_rows
        else:
            with open(tmp, "wb") as fh:
                n = write_rows(ds, sql, fmt, fh)
    return Summary(stage="query", counts={"rows": n}, details={"output": str(output), "format": fmt},
                   seconds=time.perf_counter() - t0, message=f"wrote {n:,} rows to {output}")


def preview_query(dataset: str | Path | Dataset, sql: str, limit: int = 50):
    """(column names, the first ``limit`` rows, whether more rows follow) for the table format."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    con = read_only_connect(ds, sql)
    try:
        cur = con.execute(sql)
        names = [d[0] for d in cur.description] if cur.description else []
        rows = cur.fetchmany(limit + 1)
    finally:
        con.close()
    return names, rows[:limit], len(rows) > limit


def print_rows(dataset: str | Path | Dataset, sql: str, fmt: str, stream: IO[bytes] | None = None) -> int:
    """Stream csv/json rows to stdout (the CLI's ``--format csv|json`` without ``-o``)."""
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    out = stream or sys.stdout.buffer
    n = write_rows(ds, sql, fmt, out)
    out.flush()
    return n


# -- stats -----------------------------------------------------------------------------------------

def _quantiles(con, expr: str, where: str = "true") -> dict[str, float] | None:
    qs = ", ".join(str(q) for q in QUANTILES)
    row = con.execute(
        f"SELECT quantile_cont({expr}, [{qs}]), avg({expr}), count({expr}) FROM samples WHERE {where}"
    ).fetchone()
    if not row or not row[2]:
        return None
    out = {k: round(float(v), 2) for k, v in zip(QUANTILE_NAMES, row[0], strict=True)}
    out["mean"] = round(float(row[1]), 2)
    return out


def _lineage(ds: Dataset, family: str, name: str) -> dict[str, Any] | None:
    entries = ds.card.lineage(family, name)
    if not entries:
        return None
    e = entries[-1]
    return {k: e.get(k) for k in ("stage", "model", "parameters", "started", "finished", "capcurate_version")}


def stats(dataset: str | Path | Dataset) -> Summary:
    """Counts, status breakdown, caption length and image size distributions, and the caption, score and
    selection columns present with their lineage from the card."""
    from .download import failure_counts

    t0 = time.perf_counter()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    con = ds.connect()
    try:
        n, ok, uids, with_caption = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'success'), count(DISTINCT uid), "
            "count(*) FILTER (WHERE caption IS NOT NULL AND trim(caption) <> '') FROM manifest"
        ).fetchone()
        status = dict(con.execute(
            "SELECT coalesce(status, 'unknown'), count(*) FROM manifest GROUP BY 1 ORDER BY 2 DESC").fetchall())
        cols = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
        ok_only = "status = 'success'"
        details: dict[str, Any] = {
            "status": status,
            "failed_by_reason": failure_counts(ds) if n else {},
            "caption_chars": _quantiles(con, "length(caption)", "caption IS NOT NULL"),
            "caption_words": _quantiles(
                con, "len(string_split(trim(caption), ' '))", "caption IS NOT NULL AND trim(caption) <> ''"),
        }
        for c in ("width", "height", "original_width", "original_height"):
            if c in cols:
                details[c] = _quantiles(con, ident(c), ok_only)
        captions = {}
        for name in ds.names("captions"):
            col = f"cap_{name}"
            filled, chars = con.execute(
                f"SELECT count({ident(col)}), avg(length({ident(col)})) FROM samples").fetchone()
            captions[col] = {"non_null": filled, "mean_chars": round(chars or 0.0, 1),
                             "lineage": _lineage(ds, "captions", name)}
        details["caption_columns"] = captions
        scores = {}
        for name in ds.names("scores"):
            for col in (c for c in cols if c.startswith(f"score_{name}_")):
                filled, mean, median = con.execute(
                    f"SELECT count({ident(col)}), avg({ident(col)}), median({ident(col)}) FROM samples"
                ).fetchone()
                scores[col] = {"non_null": filled, "mean": None if mean is None else round(mean, 4),
                               "median": None if median is None else round(median, 4),
                               "lineage": _lineage(ds, "scores", name)}
        details["score_columns"] = scores
        selections = {}
        for name in ds.selection_names():
            view = ident(f"selection_{name}")
            rows = con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
            sel_cols = [r[0] for r in con.execute(f"DESCRIBE {view}").fetchall()]
            by_source = (dict(con.execute(
                f"SELECT caption_source, count(*) FROM {view} GROUP BY 1 ORDER BY 2 DESC").fetchall())
                if "caption_source" in sel_cols else {})
            selections[name] = {"rows": rows, "by_caption_source": by_source,
                                "lineage": _lineage(ds, "selections", name)}
        details["selections"] = selections
    finally:
        con.close()
    # which caption and score columns were made from inputs that changed since (capcurate.lineage)
    stale = {}
    for col, fresh in lineage.staleness(ds).items():
        target = captions.get(col) if col.startswith("cap_") else scores.get(col)
        if target is not None:
            target.update(fresh)
        if fresh["stale_shards"]:
            stale[col] = len(fresh["stale_shards"])
    details["stale_columns"] = stale
    card = ds.card.read()
    details["sources"] = card.get("sources", [])
    details["stages_run"] = [
        {k: e.get(k) for k in ("stage", "family", "name", "finished")} for e in card.get("lineage", [])
    ]
    counts = {
        "samples": n,
        "success": ok,
        "failed": n - ok,
        "shards": len(ds.shard_ids()),
        "with_caption": with_caption,
        "duplicate_uids": n - uids,
    }
    message = f"{ds.root}: {n:,} samples, {ok:,} images"
    if stale:
        message += "; stale (made from inputs that changed since; re-run their stage): " + ", ".join(
            f"{c} ({k} shard{'s' if k != 1 else ''})" for c, k in stale.items())
    return Summary(stage="stats", counts=counts, details=details, seconds=time.perf_counter() - t0,
                   message=message)
