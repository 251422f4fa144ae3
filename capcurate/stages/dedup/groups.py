"""Duplicate groups from labels: which member each group keeps, and the rows ``dedup/<name>.parquet`` gets.

Exact (same sha256), near (perceptual hashes within a Hamming distance, joined transitively) and caption
groups all keep one member: the largest image (the original before a resize is the best copy), then the
first in manifest order. Semantic groups follow SemDeDup's own rule (``semantic.py``).
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


def label_strings(values: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(rows with a value, a label per such row): equal strings get equal labels."""
    rows = np.array([i for i, v in enumerate(values) if v], np.int64)
    if not len(rows):
        return rows, rows
    _, labels = np.unique(np.array([values[i] for i in rows], dtype=object).astype(str), return_inverse=True)
    return rows, labels.astype(np.int64)


def components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes given edges a-b (scipy's union of pairs)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)
