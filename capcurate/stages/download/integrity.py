"""What makes a downloaded shard whole, and one row per uid across the manifest.

Used by ``download`` (before a shard enters the manifest, after ``--retry-failed``) and by
``capcurate doctor`` (which reports and repairs the same conditions on any dataset).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any

from ... import atomic, storage
from .manifest import STATS_SUFFIX


def shard_problem(folder: Any, sid: str, stats: dict[str, Any]) -> str | None:
    """Why a shard img2dataset marked finished must not enter the manifest, or None when it is whole:
    its tar is missing or cut off, or holds fewer images than its stats count as successes."""
    from ...shards import index_tar

    tar = storage.path(folder) / f"{sid}.tar"
    try:
        idx = index_tar(tar)
    except FileNotFoundError:
        return "tar missing"
    except Exception as e:  # unreadable header blocks
        return f"tar unreadable ({type(e).__name__})"
    images = sum(1 for k in idx.samples if idx.image_ext(k))
    if idx.truncated:
        return f"tar truncated after {images} images"
    want = int(stats.get("successes", 0))
    if images < want:
        return f"tar holds {images} images, its stats count {want} successes"
    return None


def remove_shard_files(folder: Any, sid: str) -> list[str]:
    """Remove one img2dataset shard (stats first: a half-removed shard reads as unfinished)."""
    folder = storage.path(folder)
    removed = []
    for name in (f"{sid}{STATS_SUFFIX}", f"{sid}.parquet", f"{sid}.tar"):
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
            removed.append(name)
    return removed


def duplicate_uids(samples_dir: Any) -> tuple[dict[str, int], int]:
    """(manifest file -> rows to drop, distinct uids that repeat) so each uid keeps one row.

    The row kept is the one in the highest shard id (a ``--retry-failed`` shard supersedes the shard
    the row first failed in), and the first of repeats within one shard.
    """
    plan, repeated = _drop_plan(samples_dir)
    return {p.name: len(rows) for p, rows in plan.items()}, repeated


def drop_duplicate_uids(samples_dir: Any) -> int:
    """Rewrite (atomically) the manifest files that hold superseded copies of a uid; returns rows dropped."""
    import pyarrow as pa

    plan, _ = _drop_plan(samples_dir)
    dropped = 0
    for path, rows in sorted(plan.items(), key=lambda kv: kv[0].name):
        table = storage.read_table(path)
        keep = [i for i in range(table.num_rows) if i not in rows]
        atomic.write_parquet(path, table.take(pa.array(keep, pa.int64())))
        dropped += len(rows)
    return dropped


def _drop_plan(samples_dir: Any) -> tuple[dict[Any, set[int]], int]:
    """One DuckDB query over every manifest file's uid column (a hash aggregate in bounded memory, not a
    Python dict of every uid): the (file, row) of each superseded copy, and how many uids repeat."""
    import duckdb

    from ...views import sql_string

    samples_dir = storage.path(samples_dir)
    names = sorted(storage.list_names(samples_dir, ".parquet"))  # one listing; ids sort in shard order
    if len(names) == 0:
        return {}, 0
    files = {str(samples_dir / n): samples_dir / n for n in names}
    rank = {f: i for i, f in enumerate(files)}  # the file's position: higher is newer
    con = duckdb.connect()
    try:
        storage.register_duckdb(con, samples_dir)
        con.execute("CREATE TEMP TABLE rank (filename VARCHAR, pos INTEGER)")
        con.executemany("INSERT INTO rank VALUES (?, ?)", list(rank.items()))
        listing = ", ".join(sql_string(f) for f in files)
        rows = con.execute(f"""
            WITH copies AS (
                SELECT c.uid, c.filename, c.file_row_number AS row, r.pos,
                       count(*) OVER (PARTITION BY c.uid) AS n,
                       -- kept: the newest shard's copy, the first one within it
                       row_number() OVER (PARTITION BY c.uid ORDER BY r.pos DESC, c.file_row_number) AS k
                FROM read_parquet([{listing}], filename = true, file_row_number = true) c
                JOIN rank r USING (filename)
                WHERE c.uid IN (SELECT uid FROM read_parquet([{listing}]) GROUP BY uid HAVING count(*) > 1)
            )
            SELECT filename, row, k FROM copies WHERE n > 1""").fetchall()
    finally:
        con.close()
    plan: dict[Any, set[int]] = defaultdict(set)
    repeated = 0
    for filename, row, k in rows:
        if k == 1:
            repeated += 1
        else:
            plan[files[filename]].add(int(row))
    return dict(plan), repeated
