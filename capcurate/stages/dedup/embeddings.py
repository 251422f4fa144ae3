"""Saved image embeddings (``score --save-embeddings``) read shard by shard as float16 memory maps.

``embeddings/<name>/<shard>.image.npy`` holds one float16 row per manifest row (zeros where the image
failed) and ``<shard>.uids.parquet`` the uid and error of each row. Nothing here loads a whole pool into
memory: shards are memory-mapped, a k-means training sample is gathered row by row, and any per-row
result (a cluster label) is 4 bytes a row.

A dataset in object storage: a memory map needs a local file, so each shard's ``.npy`` is downloaded
once (one GET) into a local temp folder when the shard is first opened and memory-mapped from there; the
folder goes when the store is garbage-collected or the process ends (disk: the size of
``embeddings/<name>/``, the same as a local dataset holds).
"""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ... import storage
from ...dataset import Dataset
from ...errors import InputError


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (file pages of memory maps included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class EmbeddingShard:
    shard_id: str
    ok: np.ndarray          # bool per row: an embedding was made
    path: Path              # a local file (a store's .npy is staged by EmbeddingStore)
    uids_path: Any          # the shard's <shard>.uids.parquet, local or a URL

    def __len__(self) -> int:
        return len(self.ok)

    def matrix(self) -> np.ndarray:
        """The shard's float16 rows as a read-only memory map."""
        return np.load(self.path, mmap_mode="r")

    def uid_column(self) -> Any:
        """The uid of each row as a pyarrow array, read from ``uids_path`` when asked: a run over every
        shard holds no uid lists (they were ~90 bytes an image as Python strings)."""
        return storage.read_table(self.uids_path, columns=["uid"]).column("uid").combine_chunks()

    @property
    def uids(self) -> list[str]:
        return self.uid_column().to_pylist()


class EmbeddingStore:
    """The image embeddings of one scorer over every shard, addressed by (shard position, row)."""

    def __init__(self, ds: Dataset, name: str):
        self.root = ds.root / "embeddings" / name
        self.name = name
        names = storage.list_names(self.root)  # one listing, not two existence checks per shard
        all_ids = ds.shard_ids()
        shard_ids = [sid for sid in all_ids if f"{sid}.image.npy" in names and f"{sid}.uids.parquet" in names]
        if not shard_ids:
            raise InputError(
                f"no saved image embeddings in embeddings/{name}: run capcurate score --name {name} --save-embeddings")
        self.shard_ids = shard_ids
        self.missing_shards = [sid for sid in all_ids if sid not in shard_ids]
        self._staged: str | None = None
        if storage.is_remote(self.root):  # memory maps need local files: .npy files are staged here
            self._staged = tempfile.mkdtemp(prefix="capcurate-embeddings-")
            weakref.finalize(self, shutil.rmtree, self._staged, True)
        first = np.load(self.local_npy(shard_ids[0]), mmap_mode="r")
        self.dim = int(first.shape[1])

    def local_npy(self, shard_id: str) -> Path:
        """A local path of the shard's image embeddings: the file itself, or a copy downloaded once."""
        src = self.root / f"{shard_id}.image.npy"
        if self._staged is None:
            return src
        dst = Path(self._staged) / f"{shard_id}.image.npy"
        if not dst.exists():
            tmp = dst.with_name(f".{dst.name}.part")
            src.fs.get_file(src.path, str(tmp))
            os.replace(tmp, dst)
        return dst

    def shard(self, shard_id: str) -> EmbeddingShard:
        uids_path = self.root / f"{shard_id}.uids.parquet"
        errors = storage.read_table(uids_path, columns=["error"]).column("error")
        return EmbeddingShard(shard_id, errors.is_null().to_numpy(zero_copy_only=False).astype(bool),
                              self.local_npy(shard_id), uids_path)

    def shards(self) -> Iterator[EmbeddingShard]:
        for sid in self.shard_ids:
            yield self.shard(sid)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """float16 rows -> contiguous float32, what faiss takes (not renormalised: DataComp's rule is not)."""
    return np.ascontiguousarray(rows, dtype=np.float32)
