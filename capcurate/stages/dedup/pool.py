"""The pool dedup works on: every downloaded row of the manifest, in manifest order, as Arrow columns."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ... import storage
from ...dataset import Dataset
from ...errors import InputError

COLUMNS = ["uid", "key", "shard", "caption", "status", "sha256", "width", "height", "original_width",
           "original_height"]


@dataclass
class Pool:
    table: object                 # pyarrow Table: uid, key, shard, caption, sha256 of downloaded rows
    pixels: np.ndarray            # int64 per row: original size when known, else stored size
    shard_ids: list[str]
    shard_rows: dict[str, np.ndarray]   # shard -> pool row of each manifest row (-1: not downloaded)
    shard_uids: dict[str, list[str]]
    sha256_computed: int = 0

    def __len__(self) -> int:
        return self.table.num_rows


def load_pool(ds: Dataset) -> Pool:
    import pyarrow as pa
    import pyarrow.compute as pc

    shard_ids = ds.shard_ids()
    if not shard_ids:
        raise InputError(f"{ds.root} has no manifest shards (samples/*.parquet): download or ingest first")
    tables, shard_rows, shard_uids, start = [], {}, {}, 0
    for sid in shard_ids:
        t = storage.read_table(ds.samples_path(sid))
        for c in COLUMNS:
            if c not in t.column_names:
                t = t.append_column(c, pa.nulls(t.num_rows, pa.string() if c in ("sha256", "caption") else pa.int32()))
        ok = pc.equal(t.column("status"), "success").to_numpy(zero_copy_only=False)
        rows = np.full(t.num_rows, -1, np.int64)
        rows[ok] = np.arange(start, start + int(ok.sum()))
        start += int(ok.sum())
        shard_rows[sid] = rows
        shard_uids[sid] = t.column("uid").to_pylist()
        t = t.filter(pa.array(ok)).select(COLUMNS)
        tables.append(t.cast(pa.schema([(c, pa.string()) if c in ("uid", "key", "shard", "caption", "status", "sha256")
                                        else (c, pa.int64()) for c in COLUMNS])))
    table = pa.concat_tables(tables)
    sizes = [np.nan_to_num(table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64)
             for c in ("original_width", "original_height", "width", "height")]
    original, stored = sizes[0] * sizes[1], sizes[2] * sizes[3]
    pool = Pool(table, np.where(original > 0, original, stored), shard_ids, shard_rows, shard_uids)
    return pool


def sha256_column(ds: Dataset, pool: Pool) -> list[str | None]:
    """The manifest's sha256 per row; rows without one (an adopted folder made without hashes) are hashed
    here from the bytes in the shard."""
    from ...shards import index_tar

    values = pool.table.column("sha256").to_pylist()
    missing = [i for i, v in enumerate(values) if not v]
    if not missing:
        return values
    keys, shards = pool.table.column("key").to_pylist(), pool.table.column("shard").to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i in missing:
        by_shard.setdefault(shards[i], []).append(i)
    for sid, rows in by_shard.items():
        # a tar in object storage is downloaded once (one GET) rather than read member by member
        with storage.local_copy(ds.shard_path(sid)) as local, open(local, "rb") as fh:
            index = index_tar(local)
            for i in rows:
                ext = index.image_ext(keys[i])
                if ext is not None:
                    values[i] = hashlib.sha256(index.read(keys[i], ext, fh)).hexdigest()
                    pool.sha256_computed += 1
    return values
