"""Duplicate groups from labels: which member each group keeps, and the rows ``dedup/<name>.parquet`` gets.

Exact (same sha256), near (perceptual hashes within a Hamming distance) and caption groups all keep one
member: the largest image (the original before a resize is the best copy), then the first in manifest
order. Near groups are stars, not connected components: a row is removed only when its own hash is within
the distance of its group's kept row. Joined transitively, A~B and B~C would also remove C for A; in a
pool of look-alike layouts (same shape and place, other colours) such chains string different pictures
together. Semantic groups follow SemDeDup's own rule (``semantic.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

PixelsOf = Callable[[np.ndarray], np.ndarray]   # pool rows -> their image sizes (``Pool.pixels_of``)


@dataclass
class Found:
    """Duplicates of one kind: ``rows`` (pool indices) removed, each pointing at ``of`` in group ``group``."""

    kind: str
    rows: np.ndarray                         # removed rows
    of: np.ndarray                           # the row each duplicates
    similarity: np.ndarray                   # float32
    group: np.ndarray                        # group label per removed row (local to this kind)
    keepers: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # kept rows, one per group
    keeper_group: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def groups(self) -> int:
        return len(self.keepers)


def keep_largest(kind: str, rows: np.ndarray, labels: np.ndarray, pixels_of: PixelsOf) -> Found:
    """Per label with two or more rows: keep the most pixels (then the smallest row), the rest duplicate it."""
    rows = np.asarray(rows, np.int64)
    labels = np.asarray(labels, np.int64)
    order = np.lexsort((rows, -pixels_of(rows), labels))
    rows, labels = rows[order], labels[order]
    first = np.ones(len(rows), bool)
    first[1:] = labels[1:] != labels[:-1]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(rows)))
    rep = np.repeat(rows[starts], sizes)
    multi = np.repeat(sizes > 1, sizes)
    removed = multi & ~first
    return Found(kind, rows[removed], rep[removed], np.ones(int(removed.sum()), np.float32), labels[removed],
                 rows[starts][sizes > 1], labels[starts][sizes > 1])


def keep_largest_stars(kind: str, rows: np.ndarray, a: np.ndarray, b: np.ndarray, pixels_of: PixelsOf) -> Found:
    """Near-duplicate groups from pairs (a[k], b[k]) of positions in ``rows``: in keep order (most pixels,
    then the smallest row), each row still free keeps itself and removes its free direct neighbours."""
    from scipy.sparse import coo_matrix

    rows = np.asarray(rows, np.int64)
    n = len(rows)
    graph = coo_matrix((np.ones(2 * len(a), np.int8), (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
    linked = np.flatnonzero(np.diff(graph.indptr) > 0)
    order = linked[np.lexsort((rows[linked], -pixels_of(rows[linked])))]
    free = np.ones(n, bool)
    removed: list[np.ndarray] = []
    keepers: list[int] = []
    for i in order:  # only rows with a neighbour: a few per cent of a pool
        if not free[i]:
            continue
        mates = graph.indices[graph.indptr[i]:graph.indptr[i + 1]]
        mates = mates[free[mates]]
        if not len(mates):
            continue
        free[i] = False
        free[mates] = False
        removed.append(mates)
        keepers.append(int(i))
    if not keepers:
        empty = np.zeros(0, np.int64)
        return Found(kind, empty, empty, np.zeros(0, np.float32), empty)
    sizes = np.array([len(m) for m in removed])
    local = np.concatenate(removed)
    kept = np.array(keepers, np.int64)
    group = np.repeat(np.arange(len(kept)), sizes)
    return Found(kind, rows[local], np.repeat(rows[kept], sizes), np.ones(len(local), np.float32), group,
                 rows[kept], np.arange(len(kept), dtype=np.int64))


def label_digests(has: np.ndarray, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, labels) of the rows whose digest (``(rows, k)`` uint8, k >= 8, where ``has``) another row
    shares: equal digests get equal labels. Rows with a digest of their own (most of a pool) are left out.

    Sorted on the first 8 bytes only (about 25 bytes a row at the peak; ``np.unique`` of the whole digests
    took 89), then the rows that share those are labelled on all k bytes."""
    head = digests[:, :8].view(np.uint64).reshape(-1)   # a strided view: no copy
    order = np.argsort(head, kind="stable")
    ordered = head[order]
    same = ordered[1:] == ordered[:-1]
    del ordered
    shared = np.zeros(len(order), bool)
    shared[1:] |= same
    shared[:-1] |= same
    cand = order[shared]
    del order, same, shared
    cand = np.sort(cand[has[cand]])
    keys = np.ascontiguousarray(digests[cand]).view(np.dtype((np.void, digests.shape[1]))).reshape(-1)
    _, labels, counts = np.unique(keys, return_inverse=True, return_counts=True)
    labels = labels.reshape(-1)
    keep = counts[labels] > 1
    return cand[keep].astype(np.int64), labels[keep].astype(np.int64)
