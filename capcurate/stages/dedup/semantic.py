"""SemDeDup (Abbas et al. 2023; NeMo Curator's ``SemDedup``) over saved float16 image embeddings.

1. k-means on a sample of the candidates' embeddings (``kmeans.py``), every candidate assigned to its
   nearest centroid (L2) in streaming;
2. within each cluster, members are ordered by the keep rule: ``hard`` puts the members farthest from
   the centroid first (the least prototypical are kept), ``easy`` the nearest, ``random`` a seeded
   shuffle; ties go to manifest order;
3. a member is a duplicate when its cosine similarity to any member before it exceeds ``1 - eps``; it
   points at the most similar earlier member. The first member of a cluster is always kept, and every
   chain of pointers ends at a kept member: that member names the group.

Memory: four numbers per candidate, plus one cluster's embeddings and a ``BLOCK x cluster size``
similarity block at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .embeddings import EmbeddingShard
from .groups import Found
from .kmeans import CentroidIndex

BLOCK = 2048   # rows of the similarity matrix computed at once
KEEPS = ("hard", "easy", "random")


@dataclass
class Candidates:
    """The candidates of one run: pool row, shard position, row in shard, cluster, squared distance."""

    pool_row: np.ndarray
    shard_pos: np.ndarray
    shard_row: np.ndarray
    label: np.ndarray
    dist: np.ndarray


def assign(shards: list[EmbeddingShard], masks: list[np.ndarray], pool_rows: list[np.ndarray],
           index: CentroidIndex) -> Candidates:
    """Nearest centroid of every masked row, shard by shard (``pool_rows``: the pool index of each shard row).

    The five columns are allocated once at their final size and filled shard by shard: gathering per-shard
    parts and concatenating them would hold every candidate twice (24 bytes an image more at the peak).
    """
    n = int(sum(int(m.sum()) for m in masks))
    c = Candidates(np.empty(n, np.int64), np.empty(n, np.int32), np.empty(n, np.int32), np.empty(n, np.int32),
                   np.empty(n, np.float32))
    at = 0
    for pos, (shard, mask, prow) in enumerate(zip(shards, masks, pool_rows, strict=True)):
        rows = np.flatnonzero(mask)
        if not len(rows):
            continue
        label, dist = index.nearest(shard.matrix()[rows])
        end = at + len(rows)
        c.pool_row[at:end], c.shard_pos[at:end], c.shard_row[at:end] = prow[rows], pos, rows
        c.label[at:end], c.dist[at:end] = label, dist
        at = end
    return c


def order_key(c: Candidates, keep: str, seed: int) -> np.ndarray:
    """Position of every candidate within its cluster: the first of a cluster is kept."""
    if keep == "hard":
        key = -c.dist
    elif keep == "easy":
        key = c.dist
    else:
        key = np.random.default_rng(seed).random(len(c.dist))
    return np.lexsort((c.pool_row, key, c.label))


def earlier_matches(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row j: the largest cosine similarity to a row i < j, and that i (-1 for row 0)."""
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    for b0 in range(1, n, BLOCK):
        b1 = min(n, b0 + BLOCK)
        sims = x[b0:b1] @ x[:b1].T                                   # (rows j) x (rows i < b1)
        sims[np.arange(b1 - b0)[:, None] <= np.arange(b1)[None, :] - b0] = -np.inf   # keep i < j only
        arg[b0:b1] = sims.argmax(axis=1)
        best[b0:b1] = sims[np.arange(b1 - b0), arg[b0:b1]]
    return best, arg


def semdedup(shards: list[EmbeddingShard], c: Candidates, *, eps: float, keep: str, seed: int,
             advance: Callable[[int], None] = lambda n: None) -> Found:
    """Duplicates of every cluster (see the module docstring); ``Found.of`` is the matched earlier member."""
    # ``c`` is consumed: its columns are put in cluster order one at a time (each old column is freed as the
    # next is made) and the distances dropped, so the loop takes slices and no order array stays
    order = order_key(c, keep, seed)
    c.dist = c.dist[:0]
    for col in ("label", "shard_pos", "shard_row", "pool_row"):
        setattr(c, col, getattr(c, col)[order])
    del order
    labels = c.label
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(labels)]
    removed, of, sim, group = [], [], [], []
    keepers, keeper_group = [], []
    mats = [s.matrix() for s in shards]
    for s0, s1 in zip(starts, ends, strict=True):
        advance(int(s1 - s0))
        if s1 - s0 < 2:
            continue
        members = slice(s0, s1)
        x = _gather(mats, c.shard_pos[members], c.shard_row[members])
        best, arg = earlier_matches(x)
        dup = best > 1 - eps
        if not dup.any():
            continue
        root = np.arange(s1 - s0)
        for j in np.flatnonzero(dup):   # pointers go to earlier members, so one forward pass resolves chains
            root[j] = root[arg[j]]
        rows = c.pool_row[members]
        removed.append(rows[dup])
        of.append(rows[arg[dup]])
        sim.append(best[dup])
        group.append(rows[root[dup]])
        roots = np.unique(root[dup])
        keepers.append(rows[roots])
        keeper_group.append(rows[roots])
    return Found("semantic", concat(removed, np.int64), concat(of, np.int64), concat(sim, np.float32),
                 concat(group, np.int64), concat(keepers, np.int64), concat(keeper_group, np.int64))


def _gather(mats: list[np.ndarray], shard_pos: np.ndarray, shard_row: np.ndarray) -> np.ndarray:
    """Rows from several memory-mapped shards, float32, in the given order (each shard read in row order)."""
    out = np.empty((len(shard_pos), mats[0].shape[1]), np.float32)
    by = np.lexsort((shard_row, shard_pos))
    sp = shard_pos[by]
    bounds = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        sel = by[a:b]
        out[sel] = mats[sp[a]][shard_row[sel]]
    return out


def concat(parts: list[np.ndarray], dtype: object) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
