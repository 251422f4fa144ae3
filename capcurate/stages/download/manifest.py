"""img2dataset's per-shard output -> capcurate's manifest (``samples/NNNNN.parquet``).

img2dataset writes, per shard, ``NNNNN.tar`` then ``NNNNN.parquet`` (one row per input URL with its
status) and last ``NNNNN_stats.json``. The stats file is its own "shard done" marker (its incremental
mode skips shards that have one), so it is ours too: a shard enters the manifest only once its stats
file is whole, and anything else a killed run left is removed before the next run.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from ... import storage
from ...dataset import samples_schema
from ...uid import make_uid

STATS_SUFFIX = "_stats.json"
SHARD_RE = re.compile(r"^(\d+)(?:_stats\.json|\.tar|\.parquet)$")

# columns img2dataset adds that the manifest does not keep
DROPPED = {"exif", "md5", "sha512"}


def read_stats(path: Any) -> dict[str, Any] | None:
    """A shard's stats, or None when the file is missing or was cut off mid-write."""
    try:
        return parse_stats(storage.path(path).read_bytes())
    except OSError:
        return None


def parse_stats(data: bytes | None) -> dict[str, Any] | None:
    try:
        stats = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return stats if isinstance(stats, dict) and "count" in stats else None


def finished_shards(folder: Any) -> dict[str, dict[str, Any]]:
    """Shard id -> stats for every shard img2dataset finished (whole stats, tar and parquet).

    One listing of ``folder``; on an object store the stats objects are then fetched concurrently.
    """
    folder = storage.path(folder)
    names = storage.list_names(folder)
    ids = sorted(n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX))
    ids = [s for s in ids if s.isdigit() and f"{s}.parquet" in names]
    if not storage.is_remote(folder):
        done = {}
        for sid in ids:
            stats = read_stats(folder / f"{sid}{STATS_SUFFIX}")
            if stats is not None and (folder / f"{sid}.parquet").is_file():
                done[sid] = stats
        return done
    if not ids:
        return {}
    keys = {f"{folder.path.rstrip('/')}/{sid}{STATS_SUFFIX}": sid for sid in ids}
    blobs = folder.fs.cat(list(keys), on_error="return")
    done = {}
    for key, sid in keys.items():
        blob = blobs.get(key)
        stats = parse_stats(blob) if isinstance(blob, bytes) else None
        if stats is not None:
            done[sid] = stats
    return dict(sorted(done.items()))


def clean_unfinished(folder: Path) -> list[str]:
    """Remove what a killed img2dataset left: its _tmp folder, broken stats, tars/parquets of unfinished
    shards. Returns the removed names. img2dataset writes tars in place (no temp name), so a tar
    without a stats file may be cut off anywhere."""
    removed: list[str] = []
    folder = storage.path(folder)
    if storage.is_remote(folder):  # a bucket: shards are committed tar, parquet, stats; no _tmp, no temps
        done = finished_shards(folder)
        for name in sorted(storage.list_names(folder)):
            m = SHARD_RE.match(name)
            if m and m.group(1) not in done:
                storage.remove(folder / name)
                removed.append(name)
        return removed
    if not folder.is_dir():
        return removed
    if (folder / "_tmp").exists():
        shutil.rmtree(folder / "_tmp", ignore_errors=True)
        removed.append("_tmp")
    done = finished_shards(folder)
    for p in sorted(folder.iterdir()):
        m = SHARD_RE.match(p.name)
        if m and m.group(1) not in done:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed.append(p.name)
    return removed


def build_samples(parquet_path: Any, shard_id: str, *, uid_col: str | None = "uid",
                  caption_col: str = "caption"):
    """The manifest table of one shard from img2dataset's per-shard parquet.

    uid: the input's uid column when it has one (cast to string), else make_uid(url, caption).
    Columns of the input that img2dataset carried through (save_additional_columns) are kept.
    """
    import pyarrow as pa

    src = storage.read_table(parquet_path)
    n = src.num_rows
    cols = set(src.column_names)

    def col(name: str, typ: pa.DataType) -> pa.Array:
        if name in cols:
            return src.column(name).cast(typ).combine_chunks()
        return pa.nulls(n, typ)

    url = col("url", pa.string())
    caption = col(caption_col, pa.string())
    if uid_col and uid_col in cols:
        given = src.column(uid_col).cast(pa.string()).to_pylist()
    else:
        given = [None] * n
    urls, caps = url.to_pylist(), caption.to_pylist()
    uids = [g if g not in (None, "") else make_uid(u, c) for g, u, c in zip(given, urls, caps, strict=True)]

    fixed = {
        "uid": pa.array(uids, pa.string()),
        "key": col("key", pa.string()),
        "shard": pa.array([shard_id] * n, pa.string()),
        "url": url,
        "caption": caption,
        "status": col("status", pa.string()),
        "error_message": col("error_message", pa.string()),
        "width": col("width", pa.int32()),
        "height": col("height", pa.int32()),
        "original_width": col("original_width", pa.int32()),
        "original_height": col("original_height", pa.int32()),
        "sha256": col("sha256", pa.string()),
    }
    extra_names = [c for c in src.column_names
                   if c not in fixed and c not in DROPPED and c != caption_col and c != uid_col]
    if uid_col and uid_col in cols and uid_col != "uid":
        extra_names.append(uid_col)  # keep the input's own id column under its name too
    schema = samples_schema({c: src.schema.field(c).type for c in extra_names})
    arrays = [*fixed.values(), *(src.column(c).combine_chunks() for c in extra_names)]
    return pa.Table.from_arrays(arrays, schema=schema)


_HEX = re.compile(r"0x[0-9a-fA-F]+")


def failure_reason(status: str | None, error_message: str | None) -> str:
    """A short, groupable reason for a failed row (error messages carry URLs and addresses)."""
    msg = (error_message or "").strip()
    low = msg.lower()
    m = re.search(r"http error (\d{3})", low)
    if m:
        return f"HTTP {m.group(1)}"
    if low.startswith("stalled"):
        return "stalled"
    for needle, reason in (
        ("timed out", "timeout"),
        ("timeout", "timeout"),
        ("too large", "image too large (not decoded)"),
        ("decompression bomb", "image too large (not decoded)"),
        ("truncated", "truncated image"),
        ("not an image", "not an image"),
        ("unidentified", "not an image"),
        ("decoding error", "image decoding error"),
        ("connection refused", "connection refused"),
        ("name or service not known", "DNS failure"),
        ("temporary failure in name resolution", "DNS failure"),
        ("ssl", "SSL error"),
        ("x-robots-tag", "disallowed by X-Robots-Tag"),
        ("hash mismatch", "hash mismatch"),
    ):
        if needle in low:
            return reason
    if not msg:
        return status or "unknown"
    return _HEX.sub("0x..", msg)[:80]
