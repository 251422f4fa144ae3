"""Atomic file writes: write to a hidden temp name in the same folder, then rename.

A file that exists under its final name is therefore complete; that is what makes every stage
resumable by skipping finished shards. Temp names start with '.' so globs like '*.parquet' never
see a half-written file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temp_path_for(path: Path) -> Path:
    """A unique hidden sibling of ``path`` to write into before the final rename."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path; on success it is fsynced and renamed to ``path``, on error removed."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_parquet(path: str | os.PathLike, table: Any, **kwargs: Any) -> None:
    """Write a pyarrow Table atomically (zstd by default: small and fast to read in DuckDB)."""
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def clean_stale_temps(folder: str | os.PathLike) -> int:
    """Remove temp files a killed run left behind in ``folder``; returns how many."""
    n = 0
    p = Path(folder)
    if not p.is_dir():
        return 0
    for f in p.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            n += 1
    return n
