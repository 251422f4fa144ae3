"""``capcurate download``, ``ingest``, ``query``, ``stats`` and ``doctor``: getting data in and asking about it."""

from __future__ import annotations

import json as _json
from typing import Any

import typer

from .app import ENGINE_HELP, JSON_HELP, MAX_RETRIES_HELP, app, part_option, run_command, stdout

FORCE_HELP = "Write into OUTPUT even though it exists, is not empty and is not a capcurate dataset."
OVERWRITE_HELP = ("Delete the dataset's shards and manifest and start again when a previous run used other "
                  "output options (otherwise refused; the same options resume).")


@app.command()
def download(
    urls: str = typer.Argument(None, help=(
        "URL list: a .parquet, .csv, .tsv, .jsonl or .txt file (one URL per line), optionally .gz, "
        "or a folder of such files. Not needed with --retry-failed.")),
    output: str = typer.Option(..., "--output", "-o", help="Dataset directory to create (or resume): a local path or a URL (s3://bucket/prefix, gs://, az://)."),
    url_col: str = typer.Option("url", "--url-col", help="Column holding the image URL."),
    caption_col: str = typer.Option(None, "--caption-col", help=(
        "Column holding the alt-text; default: 'caption' or 'text' when the input has one.")),
    uid_col: str = typer.Option("uid", "--uid-col", help=(
        "Column with a stable sample id (DataComp pools have 'uid'); used when present, otherwise "
        "uid = hash(url, caption).")),
    image_size: int = typer.Option(256, "--image-size", help="Resize images to this size (see --resize-mode)."),
    resize_mode: str = typer.Option("border", "--resize-mode", help=(
        "img2dataset resize mode: border (fit and pad to a square), keep_ratio (shorter side = size), "
        "keep_ratio_largest (longer side = size), center_crop, no (keep original pixels).")),
    encode_format: str = typer.Option("jpg", "--encode-format", help="Format images are stored in: jpg, png or webp."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard", help="URLs per shard (tar + manifest file)."),
    processes: int = typer.Option(1, "--processes", help="Download processes (each runs --threads threads)."),
    threads: int = typer.Option(64, "--threads", help="Download threads per process."),
    timeout: int = typer.Option(10, "--timeout", help="Seconds to wait for a server before giving up on a URL."),
    retries: int = typer.Option(0, "--retries", help="Extra attempts for a URL that failed to download."),
    distributor: str = typer.Option("multiprocessing", "--distributor", help=(
        "How img2dataset spreads shards: multiprocessing (this machine), pyspark or ray (a cluster).")),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", help=(
        "Refuse, without decoding, images whose header declares more pixels than this (decompression bombs).")),
    stall_timeout: float = typer.Option(0, "--stall-timeout", help=(
        "Seconds a single URL may take in all (--timeout bounds each read only); a slower one is abandoned "
        "and its row failed with reason 'stalled', so a server that trickles bytes cannot hang the run. "
        "0: off.")),
    retry_failed: bool = typer.Option(False, "--retry-failed", help=(
        "Download the failed rows of -o DATASET again (by uid) into new shards, with the dataset's own "
        "output options; each uid keeps one row, the latest attempt.")),
    only: str = typer.Option(None, "--only", help=(
        "With --retry-failed: only rows failed for these comma-separated reasons, as the summary names "
        "them (e.g. 'timeout,stalled,HTTP 503').")),
    scratch: str = typer.Option(None, "--scratch", help=(
        "With -o in object storage: local folder where img2dataset writes each shard before it is checked "
        "and uploaded (only shards in flight stay there); default: the system temp dir.")),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Download the images of a URL list into a dataset directory, with img2dataset.

    Writes shards/NNNNN.tar (images) and samples/NNNNN.parquet (one row per URL: uid, status, error, sizes, sha256, the input's extra columns), then prints attempted / ok / failed by reason / images per second. Running the same command again resumes: finished shards are kept, unfinished ones are downloaded again, and no row is ever duplicated.
    """
    def go():
        from ..stages.download import download as run

        return run(urls, output, url_col=url_col, caption_col=caption_col, uid_col=uid_col,
                   image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
                   timeout=timeout, retries=retries, distributor=distributor,
                   samples_per_shard=samples_per_shard, encode_format=encode_format, max_pixels=max_pixels,
                   force=force, overwrite=overwrite, stall_timeout=stall_timeout, retry_failed=retry_failed,
                   only=only, scratch=scratch)

    run_command(go, json_out=json)


@app.command()
def doctor(
    dataset: str = typer.Argument(..., help="Dataset directory to examine (a local path or a URL)."),
    repair: bool = typer.Option(False, "--repair", help=(
        "Fix what is safe: remove orphan temps and unfinished files, build missing manifests of whole "
        "shards, remove damaged shards with their manifests (the same download or ingest fetches them "
        "again), keep one row per uid (the newest shard's), move unreadable manifests, captions, scores, "
        "embeddings, selections and dedup files into .quarantine/ (their stages make them again), close "
        "lineage entries of runs that are gone.")),
    reset_card: bool = typer.Option(False, "--reset-card", help=(
        "When capcurate.json itself is unreadable: move it into .quarantine/ and write a fresh card "
        "(its lineage is lost), then repair as --repair does. Without it a damaged card is an error.")),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Report what crashes left in a dataset: orphan temp files, unfinished or truncated shards, shards
    without manifests and manifests without shards, duplicate uids, unreadable files of every kind
    (manifests, captions, scores, embeddings, selections, dedup outputs, the card), runs left unfinished;
    each with a count.

    Exits 1 when damage is found (or remains after --repair), 0 when the dataset is sound, 2 when the card
    is unreadable (see --reset-card).
    """
    from ..stages.doctor import doctor as run

    run_command(lambda: run(dataset, repair=repair, reset_card=reset_card), json_out=json)


@app.command()
def ingest(
    path: str = typer.Argument(..., help=(
        "What to adopt: an img2dataset output folder, a webdataset .tar (or a folder of them), or a "
        "folder of images with optional sidecar <name>.txt captions; local, or a URL prefix (s3://...).")),
    output: str = typer.Option(..., "--output", "-o", help="Dataset directory to create (or resume): a local path or a URL (s3://bucket/prefix, gs://, az://)."),
    kind: str = typer.Option("auto", "--kind", help="auto, img2dataset, webdataset or images."),
    samples_per_shard: int = typer.Option(10000, "--samples-per-shard", help=(
        "Images per output tar when packing an image folder (webdataset tars keep one output per input).")),
    uid_col: str = typer.Option("uid", "--uid-col", help=(
        "Field of the input's parquet / json members holding a stable id; otherwise uid = hash(url or "
        "source path, caption).")),
    link: bool = typer.Option(False, "--link", help=(
        "Hard-link img2dataset tars instead of copying them (same filesystem only; falls back to copy).")),
    max_pixels: int = typer.Option(64_000_000, "--max-pixels", help=(
        "Images whose header declares more pixels than this are counted as failed, never decoded.")),
    engine: str = typer.Option("local", "--engine", help=ENGINE_HELP),
    max_retries: int = typer.Option(2, "--max-retries", help=MAX_RETRIES_HELP),
    part: str = part_option(),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Adopt images already on disk into a dataset directory (same layout as download).

    Image bytes are copied without re-encoding; every sample gets a safe key (digits only; the original name is kept in the source_key column). Broken images, truncated tars and non-image members are counted, never fatal. Re-running resumes where it stopped.
    """
    def go():
        from ..stages.ingest import ingest as run

        return run(path, output, kind=kind, samples_per_shard=samples_per_shard, uid_col=uid_col, link=link,
                   max_pixels=max_pixels, engine=engine, part=part, force=force, overwrite=overwrite,
                   max_retries=max_retries)

    run_command(go, json_out=json)


@app.command()
def query(
    dataset: str = typer.Argument(..., help="Dataset directory, local or a URL (s3://bucket/prefix)."),
    sql: str = typer.Argument(..., help=(
        "DuckDB SQL over the views: samples (the wide join: manifest columns, cap_<name>, score_<...>), "
        "manifest, captions_<name>, scores_<name>, selection_<name>.")),
    fmt: str = typer.Option("table", "--format", "-f", help=(
        "table (the first --limit rows), csv, json (an array of objects) or parquet (needs -o).")),
    output: str = typer.Option(None, "--output", "-o", help=(
        "Write the whole result to this file (format from --format, else from the suffix).")),
    limit: int = typer.Option(50, "--limit", help="Rows shown by the table format."),
    json: bool = typer.Option(False, "--json", help=(
        "Print the rows as JSON on stdout (same as --format json); with -o, print a JSON summary.")),
) -> None:
    """Ask SQL questions about a dataset; no copy of the data is made.

    Example: capcurate query mydata "SELECT status, count(*) FROM samples GROUP BY 1"
    """
    from ..stages.query import FORMATS

    if fmt not in FORMATS:
        from .app import fail

        raise fail(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if output is not None:
        def export():
            from ..stages.query import export_query

            return export_query(dataset, sql, output, None if fmt == "table" else fmt)

        run_command(export, json_out=json)
        return
    if fmt == "parquet":
        from .app import fail

        raise fail("--format parquet writes a file: pass -o FILE.parquet")
    if json or fmt in ("csv", "json"):
        def stream():
            from ..stages.query import print_rows

            print_rows(dataset, sql, "json" if json else fmt)

        run_command(stream)
        return

    def preview():
        from ..stages.query import preview_query

        names, rows, more = preview_query(dataset, sql, limit)
        _print_table(names, rows, more, limit)

    run_command(preview)


def _cell(v: Any) -> str:
    if v is None:
        return "[dim]NULL[/]"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (bytes, bytearray)):
        return f"<{len(v)} bytes>"
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _print_table(names: list[str], rows: list[tuple], more: bool, limit: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(show_header=True, header_style="bold")
    for n in names:
        table.add_column(escape(n), overflow="fold")
    for r in rows:
        table.add_row(*(v if v.startswith("[dim]") else escape(v) for v in map(_cell, r)))
    stdout.print(table)
    if more:
        stdout.print(f"[dim]showing the first {limit} rows; use --limit, or -o FILE for all of them[/]")


@app.command()
def stats(
    dataset: str = typer.Argument(..., help="Dataset directory, local or a URL (s3://bucket/prefix)."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Summarise a dataset: counts, failures, caption and image size distributions, columns and lineage.

    Shows the status breakdown and failure reasons, quantiles of caption length and image size, and which caption, score and selection columns exist with the model and parameters that made them.
    """
    def go():
        from ..stages.query import stats as run

        return run(dataset)

    run_command(go, json_out=json, render=_render_stats)


def _render_stats(summary: Any) -> None:
    from rich.table import Table

    d = summary.details
    stdout.print(summary.message)
    top = Table(title="samples", show_header=False)
    for k, v in summary.counts.items():
        top.add_row(k, f"{v:,}")
    for k, v in d["status"].items():
        top.add_row(f"status {k}", f"{v:,}")
    for k, v in d["failed_by_reason"].items():
        top.add_row(f"  failed: {k}", f"{v:,}")
    stdout.print(top)

    dist = Table(title="distributions (successful images; captions of all rows)", header_style="bold")
    dist.add_column("column")
    for q in ("min", "p05", "p25", "p50", "p75", "p95", "max", "mean"):
        dist.add_column(q, justify="right")
    for name in ("caption_chars", "caption_words", "width", "height", "original_width", "original_height"):
        q = d.get(name)
        if q:
            dist.add_row(name, *(f"{q[k]:g}" for k in ("min", "p05", "p25", "p50", "p75", "p95", "max", "mean")))
    stdout.print(dist)

    cols = Table(title="caption, score and selection columns", header_style="bold")
    for c in ("column", "rows", "summary", "made by"):
        cols.add_column(c)

    def made_by(lin: dict | None) -> str:
        if not lin:
            return "(no lineage entry)"
        model = lin.get("model") or {}
        ref = model.get("ref") or model.get("reference") or model.get("name") if isinstance(model, dict) else model
        params = _json.dumps(lin.get("parameters") or {}, default=str)
        return f"{lin.get('stage')} {ref or ''} {params[:100]} finished={lin.get('finished')}"

    for col, info in d["caption_columns"].items():
        cols.add_row(col, f"{info['non_null']:,}", f"mean {info['mean_chars']} chars", made_by(info["lineage"]))
    for col, info in d["score_columns"].items():
        cols.add_row(col, f"{info['non_null']:,}", f"mean {info['mean']} median {info['median']}",
                     made_by(info["lineage"]))
    for name, info in d["selections"].items():
        cols.add_row(f"selection_{name}", f"{info['rows']:,}", _json.dumps(info["by_caption_source"]),
                     made_by(info["lineage"]))
    if cols.row_count:
        stdout.print(cols)
    else:
        stdout.print("[dim]no caption, score or selection columns yet (recaption, score, filter, mix add them)[/]")
