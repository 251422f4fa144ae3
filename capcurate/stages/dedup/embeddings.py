"""Saved image embeddings (``score --save-embeddings``) read shard by shard as float16 memory maps.

``embeddings/<name>/<shard>.image.npy`` holds one float16 row per manifest row (zeros where the image
failed) and ``<shard>.uids.parquet`` the uid and error of each row. Nothing here loads a whole pool into
memory: shards are memory-mapped, a k-means training sample is gathered row by row, and any per-row
result (a cluster label) is 4 bytes a row.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...dataset import Dataset
from ...errors import InputError


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (file pages of memory maps included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class EmbeddingShard:
    shard_id: str
    uids: list[str]
    ok: np.ndarray          # bool per row: an embedding was made
    path: Path

    def matrix(self) -> np.ndarray:
        """The shard's float16 rows as a read-only memory map."""
        return np.load(self.path, mmap_mode="r")


class EmbeddingStore:
    """The image embeddings of one scorer over every shard, addressed by (shard position, row)."""

    def __init__(self, ds: Dataset, name: str):
        self.root = ds.root / "embeddings" / name
        self.name = name
        shard_ids = [sid for sid in ds.shard_ids()
                     if (self.root / f"{sid}.image.npy").exists() and (self.root / f"{sid}.uids.parquet").exists()]
        if not shard_ids:
            raise InputError(
                f"no saved image embeddings in embeddings/{name}: run capcurate score --name {name} --save-embeddings")
        self.shard_ids = shard_ids
        self.missing_shards = [sid for sid in ds.shard_ids() if sid not in shard_ids]
        first = np.load(self.root / f"{shard_ids[0]}.image.npy", mmap_mode="r")
        self.dim = int(first.shape[1])

    def shard(self, shard_id: str) -> EmbeddingShard:
        import pyarrow.parquet as pq

        t = pq.read_table(self.root / f"{shard_id}.uids.parquet")
        errors = t.column("error").to_pylist()
        return EmbeddingShard(shard_id, t.column("uid").to_pylist(),
                              np.array([e is None for e in errors], bool), self.root / f"{shard_id}.image.npy")

    def shards(self) -> Iterator[EmbeddingShard]:
        for sid in self.shard_ids:
            yield self.shard(sid)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """float16 rows -> contiguous float32, what faiss takes (not renormalised: DataComp's rule is not)."""
    return np.ascontiguousarray(rows, dtype=np.float32)
