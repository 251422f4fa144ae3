"""The pool dedup works on: every downloaded row of the manifest, in manifest order.

Memory: per pool row the pool holds 8 bytes (its manifest position, ``shard_rows``); image sizes are read
for the members of duplicate groups only (``pixels_of``). Columns (uid, key, caption, sha256) are read from
``samples/*.parquet`` when a kind or an output needs them, one column or one shard at a time, and are
not kept: a pool of 10M rows is not 10M Python strings (the uid lists were held twice before, ~520 bytes
an image in all).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ... import storage
from ...dataset import Dataset
from ...errors import InputError

STRINGS = ("uid", "key", "shard", "caption", "status", "sha256")
SIZES = ("original_width", "original_height", "width", "height")


@dataclass
class Pool:
    ds: Dataset
    shard_ids: list[str]
    shard_rows: dict[str, np.ndarray]   # shard -> pool row of each manifest row (-1: not downloaded)
    starts: np.ndarray                  # pool row of each shard's first downloaded row; last: the pool size
    sha256_computed: int = 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, sid: str, columns: list[str]) -> Any:
        """The downloaded rows of one shard's manifest, ``columns`` only (missing ones as nulls)."""
        import pyarrow as pa

        t = storage.read_table(self.ds.samples_path(sid), columns=columns, missing_ok=True)
        out = {}
        ok = pa.array(self.shard_rows[sid] >= 0)
        for c in columns:
            if c in t.column_names:
                col = t.column(c).filter(ok)
                out[c] = col.cast(pa.string() if c in STRINGS else pa.int64())
            else:
                out[c] = pa.nulls(int(ok.true_count), pa.string() if c in STRINGS else pa.int64())
        return pa.table(out)

    def shards(self, columns: list[str]) -> Iterator[tuple[str, int, Any]]:
        """(shard, its first pool row, its downloaded rows' ``columns``) for every shard with such rows."""
        for k, sid in enumerate(self.shard_ids):
            if self.starts[k + 1] > self.starts[k]:
                yield sid, int(self.starts[k]), self.read(sid, columns)

    def take(self, rows: np.ndarray, columns: list[str]) -> Any:
        """``columns`` of the given pool rows, in the given order (read shard by shard)."""
        import pyarrow as pa

        rows = np.asarray(rows, np.int64)
        order = np.argsort(rows, kind="stable")
        parts = []
        for k, sid in enumerate(self.shard_ids):
            lo, hi = np.searchsorted(rows[order], [self.starts[k], self.starts[k + 1]])
            if hi > lo:
                parts.append(self.read(sid, columns).take(pa.array(rows[order[lo:hi]] - self.starts[k])))
        if not parts:
            return pa.table({c: pa.array([], pa.string() if c in STRINGS else pa.int64()) for c in columns})
        back = np.empty(len(rows), np.int64)
        back[order] = np.arange(len(rows))
        return pa.concat_tables(parts).take(pa.array(back))

    def pixels_of(self, rows: np.ndarray) -> np.ndarray:
        """int64 per given pool row: the original size when known, else the stored size. Read for the rows
        asked (the members of duplicate groups), not held for the whole pool."""
        t = self.take(rows, list(SIZES))
        ow, oh, w, h = (np.nan_to_num(t.column(c).to_numpy(zero_copy_only=False).astype(np.float64)).astype(np.int64)
                        for c in SIZES)
        return np.where(ow * oh > 0, ow * oh, w * h)


def load_pool(ds: Dataset) -> Pool:
    """Which manifest rows are downloaded, shard by shard (of each manifest only its status is kept)."""
    import pyarrow.compute as pc

    shard_ids = ds.shard_ids()
    if not shard_ids:
        raise InputError(f"{ds.root} has no manifest shards (samples/*.parquet): download or ingest first")
    shard_rows, starts, start = {}, [0], 0
    for sid in shard_ids:
        t = storage.read_table(ds.samples_path(sid), columns=["status"], missing_ok=True)  # one GET on a store
        ok = (pc.fill_null(pc.equal(t.column("status"), "success"), False).to_numpy(zero_copy_only=False)
              if "status" in t.column_names else np.zeros(t.num_rows, bool))
        rows = np.full(t.num_rows, -1, np.int64)   # (num_rows is known with no column read)
        rows[ok] = np.arange(start, start + int(ok.sum()))
        start += int(ok.sum())
        shard_rows[sid] = rows
        starts.append(start)
    return Pool(ds, shard_ids, shard_rows, np.array(starts, np.int64))


DIGEST = 16   # bytes of a value's digest that dedup compares: 128 bits, no chance collision at 1.28B rows


def sha256_digests(ds: Dataset, pool: Pool) -> tuple[np.ndarray, np.ndarray]:
    """(has, digests): per pool row, whether it has a sha256 and its first ``DIGEST`` bytes. Rows without one
    in the manifest (an adopted folder made without hashes) are hashed here from the bytes in the shard.

    Read shard by shard into one ``(rows, 16)`` array: 17 bytes a row where the hex strings of the whole
    pool as Python objects took ~120."""
    from ...shards import index_tar

    has = np.zeros(len(pool), bool)
    digests = np.zeros((len(pool), DIGEST), np.uint8)
    for sid, start, t in pool.shards(["sha256", "key"]):
        missing = []
        for i, (h, key) in enumerate(zip(t.column("sha256").to_pylist(), t.column("key").to_pylist(), strict=True)):
            if h:
                digests[start + i] = np.frombuffer(bytes.fromhex(h[:2 * DIGEST]), np.uint8)
                has[start + i] = True
            else:
                missing.append((start + i, key))
        if not missing:
            continue
        # a tar in object storage is downloaded once (one GET) rather than read member by member
        with storage.local_copy(ds.shard_path(sid)) as local, open(local, "rb") as fh:
            index = index_tar(local)
            for row, key in missing:
                ext = index.image_ext(key) if key else None
                if ext is not None:
                    digests[row] = np.frombuffer(hashlib.sha256(index.read(key, ext, fh)).digest()[:DIGEST], np.uint8)
                    has[row] = True
                    pool.sha256_computed += 1
    return has, digests


def caption_digests(pool: Pool, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(has, digests) of each row's caption, whitespace runs made one space, trimmed and lower-cased; rows
    already removed or without a caption have none. Shard by shard, 17 bytes a row kept (not the strings)."""
    has = np.zeros(len(pool), bool)
    digests = np.zeros((len(pool), DIGEST), np.uint8)
    for _, start, t in pool.shards(["caption"]):
        for i, c in enumerate(t.column("caption").to_pylist()):
            if c is None or removed[start + i] or not (text := re.sub(r"\s+", " ", c).strip().lower()):
                continue
            digests[start + i] = np.frombuffer(hashlib.blake2b(text.encode(), digest_size=DIGEST).digest(), np.uint8)
            has[start + i] = True
    return has, digests
