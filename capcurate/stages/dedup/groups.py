"""Duplicate groups from labels: which member each group keeps, and the rows ``dedup/<name>.parquet`` gets.

Exact (same sha256), near (perceptual hashes within a Hamming distance) and caption groups all keep one
member: the largest image (the original before a resize is the best copy), then the first in manifest
order. Near groups are stars, not connected components: a row is removed only when its own hash is within
the distance of its group's kept row. Joined transitively, A~B and B~C would also remove C for A; in a
pool of look-alike layouts (same shape and place, other colours) such chains string different pictures
together. Semantic groups follow SemDeDup's own rule (``semantic.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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


def keep_largest(kind: str, rows: np.ndarray, labels: np.ndarray, pixels: np.ndarray) -> Found:
    """Per label with two or more rows: keep the most pixels (then the smallest row), the rest duplicate it."""
    rows = np.asarray(rows, np.int64)
    labels = np.asarray(labels, np.int64)
    order = np.lexsort((rows, -pixels[rows], labels))
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


def keep_largest_stars(kind: str, rows: np.ndarray, a: np.ndarray, b: np.ndarray, pixels: np.ndarray) -> Found:
    """Near-duplicate groups from pairs (a[k], b[k]) of positions in ``rows``: in keep order (most pixels,
    then the smallest row), each row still free keeps itself and removes its free direct neighbours."""
    from scipy.sparse import coo_matrix

    rows = np.asarray(rows, np.int64)
    n = len(rows)
    graph = coo_matrix((np.ones(2 * len(a), np.int8), (np.r_[a, b], np.r_[b, a])), shape=(n, n)).tocsr()
    linked = np.flatnonzero(np.diff(graph.indptr) > 0)
    order = linked[np.lexsort((rows[linked], -pixels[rows[linked]]))]
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


def label_strings(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a value, a label per such row): equal strings get equal labels."""
    rows = np.array([i for i, v in enumerate(values) if v], np.int64)
    if not len(rows):
        return rows, rows
    _, labels = np.unique(np.array([values[i] for i in rows], dtype=object).astype(str), return_inverse=True)
    return rows, labels.astype(np.int64)
