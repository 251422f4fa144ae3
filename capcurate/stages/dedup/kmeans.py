"""k-means on a sample of the pool, assignment of every row in streaming (faiss; a GPU when faiss has one).

Both DataComp's image-based clustering and SemDeDup cluster L2-normalised image embeddings with plain
Lloyd k-means; capcurate trains on a sample of at most ``train_size`` rows gathered from the memory
maps (the only pool-sized allocation is ``train_size x dim`` float32) and then assigns every row in
chunks of ``CHUNK`` rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from ...errors import InputError
from .embeddings import EmbeddingShard, as_float32

CHUNK = 16384   # rows per assignment step: 16384 x 768 float32 = 48 MiB
NITER = 20      # DataComp's and faiss's default number of Lloyd iterations


def faiss_gpus() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def sample_positions(counts: list[int], size: int, seed: int) -> list[np.ndarray]:
    """``size`` distinct eligible rows drawn uniformly: per shard, sorted positions among its eligible rows."""
    total = sum(counts)
    size = min(size, total)
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=size, replace=False)) if size < total \
        else np.arange(total)
    out, start = [], 0
    for n in counts:
        lo, hi = np.searchsorted(chosen, [start, start + n])
        out.append(chosen[lo:hi] - start)
        start += n
    return out


def gather_sample(shards: list[EmbeddingShard], masks: list[np.ndarray], size: int, seed: int, dim: int) -> np.ndarray:
    """Rows of a uniform sample of the eligible rows (``masks``), float32, in shard order."""
    picks = sample_positions([int(m.sum()) for m in masks], size, seed)
    out = np.empty((sum(len(p) for p in picks), dim), np.float32)
    at = 0
    for shard, mask, pick in zip(shards, masks, picks, strict=True):
        if len(pick):
            rows = np.flatnonzero(mask)[pick]
            out[at:at + len(rows)] = shard.matrix()[rows]
            at += len(rows)
    return out


def train_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int = NITER) -> np.ndarray:
    """Centroids (k x dim float32) of Lloyd k-means on ``x`` (faiss.Kmeans; on the GPU when faiss has one)."""
    import faiss

    if k < 1:
        raise InputError(f"--clusters must be at least 1, got {k}")
    if len(x) < k:
        raise InputError(f"k-means needs at least as many training rows as clusters: {len(x):,} rows, {k:,} clusters "
                         "(lower --clusters or raise --train-size/--sample-ratio)")
    # max_points_per_centroid: faiss would otherwise subsample to 256 rows per centroid; the sample is ours
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, gpu=faiss_gpus() > 0,
                      max_points_per_centroid=max(256, len(x) // k + 1), verbose=False)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return np.asarray(km.centroids, np.float32)


class CentroidIndex:
    """Nearest centroid: ``ip`` = largest dot product (DataComp's assignment), ``l2`` = smallest distance."""

    def __init__(self, centroids: np.ndarray, metric: str):
        import faiss

        dim = centroids.shape[1]
        self.index = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def nearest(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label, score) per row of ``x`` (any float dtype, e.g. a float16 memmap slice)."""
        labels = np.empty(len(x), np.int64)
        scores = np.empty(len(x), np.float32)
        for i in range(0, len(x), CHUNK):
            d, lab = self.index.search(as_float32(x[i:i + CHUNK]), 1)
            labels[i:i + CHUNK], scores[i:i + CHUNK] = lab[:, 0], d[:, 0]
        return labels, scores


def assign_shards(shards: Iterable[EmbeddingShard], index: CentroidIndex,
                  on_shard: Callable[[EmbeddingShard, np.ndarray], None]) -> None:
    """Call ``on_shard(shard, labels)`` for every shard (labels of failed rows are -1), one memmap at a time."""
    for shard in shards:
        mat = shard.matrix()
        labels = np.full(len(shard), -1, np.int64)
        rows = np.flatnonzero(shard.ok)
        for i in range(0, len(rows), CHUNK):
            chunk = rows[i:i + CHUNK]
            labels[chunk] = index.nearest(mat[chunk])[0]
        on_shard(shard, labels)
