"""``capcurate dedup``: drop exact, near, caption and semantic duplicates; keep one member of each group.

Kinds run in this order, each over what the previous ones kept:

- exact: the same sha256 of the image bytes (recorded by download and ingest);
- near: crop-tolerant pHashes within ``hamming`` bits, confirmed by colour (resized, re-encoded,
  cropped and brightened copies; ``phash.py``);
- captions: the same alt-text after lower-casing and collapsing white space (boilerplate);
- semantic: SemDeDup on a scorer's saved image embeddings (``semantic.py``).

Writes ``selections/<name>.parquet`` (the kept rows, filter's schema: uid, caption, caption_source,
shard, key) and ``dedup/<name>.parquet`` (one row per member of a duplicate group: uid, group, kind,
kept, duplicate_of, similarity), so groups can be inspected with ``query`` or ``report``.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ... import atomic, storage
from ...dataset import Dataset, check_name
from ...errors import InputError, OutputExistsError
from ...summary import Summary
from .embeddings import EmbeddingStore
from .groups import Found, keep_largest, keep_largest_stars, label_digests
from .memory import AnonPeak, peak_rss_mb, release
from .pool import Pool, caption_digests, load_pool, sha256_digests
from .semantic import KEEPS, concat

DEFAULT_HAMMING = 8
DEFAULT_EPS = 0.05
ROWS_PER_CLUSTER = 1000   # --clusters auto: pairwise work grows with the cluster size
TRAIN_PER_CLUSTER = 50    # --train-size auto: faiss wants at least 39 training rows per centroid


def dedup_path(ds: Dataset, name: str) -> Path:
    return ds.root / "dedup" / f"{check_name(name, 'dedup name')}.parquet"


def dedup(dataset: str | Path, name: str, *, exact: bool = False, near: bool = False, captions: bool = False,
          semantic: str | None = None, hamming: int = DEFAULT_HAMMING, eps: float = DEFAULT_EPS,
          keep: str = "hard", clusters: int | str = "auto", train_size: int | str = "auto", seed: int = 0,
          workers: int | str = "auto", overwrite: bool = False) -> Summary:
    """Find duplicates of the chosen kinds; write the kept selection and the groups (module docstring)."""
    from ...devices import resolve_workers
    from ...progress import progress_bar

    t0 = time.time()
    ds = Dataset(dataset)
    check_name(name, "selection name")
    if not (exact or near or captions or semantic):
        raise InputError("choose at least one kind: --exact, --near, --captions or --semantic SCORER")
    if not 0 <= hamming < 32:
        raise InputError(f"--hamming must be between 0 and 31 bits (of 64), got {hamming}")
    if not 0 < eps < 1:
        raise InputError(f"--eps must be in (0, 1): duplicates are pairs above cosine 1 - eps; got {eps}")
    if keep not in KEEPS:
        raise InputError(f"--keep must be one of {', '.join(KEEPS)}, got {keep!r}")
    clusters, train_size = _auto_int(clusters, "--clusters"), _auto_int(train_size, "--train-size")
    n_workers = resolve_workers(workers)
    store = EmbeddingStore(ds, check_name(semantic, "scorer name")) if semantic else None
    sel_out, groups_out = ds.selection_path(name), dedup_path(ds, name)
    present = [rel for rel, p in ((f"selections/{name}.parquet", sel_out), (f"dedup/{name}.parquet", groups_out))
               if p.exists()]
    if present and not overwrite:
        raise OutputExistsError(f"{', '.join(present)} exist(s); choose another --name or pass --overwrite")

    # the peak of anonymous memory, sampled over the run (memory.py): mapped embedding pages not counted
    with AnonPeak() as memory:
        pool = load_pool(ds)
        removed = np.zeros(len(pool), bool)
        found: list[Found] = []
        counts: dict[str, Any] = {"pool": len(pool)}
        details: dict[str, Any] = {"name": name}
        timings: dict[str, float] = {}

        if exact:
            t = time.time()
            rows, labels = label_digests(*sha256_digests(ds, pool))
            found.append(keep_largest("exact", rows, labels, pool.pixels_of))
            timings["exact"] = time.time() - t
            details["sha256_computed_here"] = pool.sha256_computed
        if near:
            t = time.time()
            with progress_bar(int((~removed).sum()), f"dedup {name}: perceptual hashes", "images") as advance:
                found.append(_near(ds, pool, _removed(removed, found), hamming, n_workers, advance, counts))
            timings["near"] = time.time() - t
        if captions:
            t = time.time()
            rows, labels = label_digests(*caption_digests(pool, _removed(removed, found)))
            found.append(keep_largest("caption", rows, labels, pool.pixels_of))
            timings["captions"] = time.time() - t
        if store is not None:
            t = time.time()
            found.append(_semantic(store, pool, _removed(removed, found), eps, keep, clusters, train_size, seed,
                                   name, details, counts))
            timings["semantic"] = time.time() - t
        removed = _removed(removed, found)
        release()   # the phases' working memory, before the outputs are built

        for f in found:
            counts[f"{f.kind} duplicates"] = len(f.rows)
            details[f"{f.kind} groups"] = f.groups
        counts["kept"] = int((~removed).sum())
        params = {"exact": exact, "near": near, "captions": captions, "semantic": semantic,
                  "hamming": hamming if near else None, "eps": eps if semantic else None,
                  "keep": keep if semantic else None, "clusters": clusters if semantic else None,
                  "train_size": train_size if semantic else None, "seed": seed if semantic else None}
        # claimed under the card's lock just before writing (see filter): one writer per name at a time
        _mode, entry = ds.card.claim(stage="dedup", family="selections", name=name, params=params, overwrite=overwrite,
                                     exists=lambda: sel_out.exists() or groups_out.exists(), exclusive=True)
        atomic.clean_stale_temps(groups_out.parent)  # (the claim cleaned selections/)
        with ds.card.writing(entry):
            _write_outputs(pool, removed, found, sel_out, groups_out)

    details["seconds_by_kind"] = {k: round(v, 2) for k, v in timings.items()}
    details["peak_memory_mb"] = round(memory.peak_mb, 1)
    details["peak_rss_mb"] = round(peak_rss_mb(), 1)   # resident peak: mapped file pages included
    ds.card.finish_entry(entry, counts, dedup_groups=f"dedup/{name}.parquet")
    n, kept = len(pool), counts["kept"]
    pct = f" ({kept / n:.1%})" if n else ""
    return Summary(stage="dedup", counts=counts, details=details, seconds=time.time() - t0,
                   message=f"kept {kept:,} of {n:,}{pct} into selections/{name}; groups in dedup/{name}.parquet "
                           f"(peak anonymous memory {details['peak_memory_mb']:,.0f} MB)")


def _auto_int(value: int | str, option: str) -> int | None:
    from ...devices import positive_or_auto

    n = positive_or_auto(value, option)
    return None if n == "auto" else int(n)


def _removed(base: np.ndarray, found: list[Found]) -> np.ndarray:
    out = base.copy()
    for f in found:
        out[f.rows] = True
    return out


def _near(ds: Dataset, pool: Pool, removed: np.ndarray, threshold: int, workers: int, advance: Any,
          counts: dict[str, Any]) -> Found:
    from .phash import ROW_BYTES, hash_shards, near_pairs

    # rows to hash, grouped by shard (a shard's downloaded rows are one range of pool rows)
    todo = {}
    for k, sid in enumerate(pool.shard_ids):
        span = np.arange(pool.starts[k], pool.starts[k + 1])
        if len(span := span[~removed[span]]):
            todo[sid] = span
    sids = list(todo)
    cand = np.concatenate(list(todo.values())) if todo else np.zeros(0, np.int64)
    n = len(cand)
    del cand
    # the hash rows (ROW_BYTES an image) go to a temp file: only the candidates' rows are read back
    with tempfile.TemporaryDirectory(prefix="capcurate-near-") as tmp:
        hashes = np.lib.format.open_memmap(Path(tmp) / "rows.npy", mode="w+", dtype=np.uint8,
                                           shape=(max(n, 1), ROW_BYTES))
        rows, at = [], 0
        tasks = [(str(ds.shard_path(s)), pool.take(todo[s], ["key"]).column("key").to_pylist()) for s in sids]
        for s, (h, ok) in zip(sids, hash_shards(tasks, workers, advance), strict=True):
            hashes[at:at + int(ok.sum())] = h[ok]
            at += int(ok.sum())
            rows.append(todo[s][ok].astype(np.int64))
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        counts["near: images not hashed"] = n - at
        a, b, sim = near_pairs(hashes[:at], threshold)
        del hashes
    f = keep_largest_stars("near", rows, a, b, pool.pixels_of)
    # similarity of each removed row to its kept row: 1 - differing bits / 256 of the long hashes (matched window)
    pos = {(int(x), int(y)): float(s) for x, y, s in zip(rows[a], rows[b], sim, strict=True)}
    f.similarity = np.array([pos[(min(r, o), max(r, o))] for r, o in zip(f.rows.tolist(), f.of.tolist(), strict=True)],
                            np.float32)
    return f


def _semantic(store: EmbeddingStore, pool: Pool, removed: np.ndarray, eps: float, keep: str,
              clusters: int | None, train_size: int | None, seed: int, name: str, details: dict[str, Any],
              counts: dict[str, Any]) -> Found:
    from ...progress import progress_bar
    from .kmeans import CentroidIndex, gather_sample, train_kmeans
    from .semantic import assign, semdedup

    shards, masks, pool_rows = [], [], []
    for shard in store.shards():
        rows = pool.shard_rows.get(shard.shard_id)
        if rows is None or not _same_uids(pool, shard):
            raise InputError(f"embeddings/{store.name}/{shard.shard_id} does not follow the manifest's rows: "
                             f"re-run capcurate score --name {store.name} --save-embeddings")
        prow = np.where(rows >= 0, rows, 0)
        shards.append(shard)
        masks.append(shard.ok & (rows >= 0) & ~removed[prow])
        pool_rows.append(rows)
    n = int(sum(int(m.sum()) for m in masks))
    counts["semantic: images without embeddings"] = int((~removed).sum()) - n
    if n < 2:
        details["semantic clusters"] = 0
        return Found("semantic", *(np.zeros(0, np.int64),) * 2, np.zeros(0, np.float32), np.zeros(0, np.int64))
    k = min(n, clusters or max(1, math.ceil(n / ROWS_PER_CLUSTER)))
    size = train_size or max(k, min(n, TRAIN_PER_CLUSTER * k))
    t = time.time()
    sample = gather_sample(shards, masks, size, seed, store.dim)
    centroids = train_kmeans(sample, k, seed=seed)
    details["semantic clusters"], details["semantic k-means rows"] = k, len(sample)
    del sample
    release()
    cand = assign(shards, masks, pool_rows, CentroidIndex(centroids, "l2"))
    details["semantic k-means seconds"] = round(time.time() - t, 2)
    with progress_bar(n, f"dedup {name}: semantic", "images") as advance:
        return semdedup(shards, cand, eps=eps, keep=keep, seed=seed, advance=advance)


def _same_uids(pool: Pool, shard: Any) -> bool:
    """Do the embeddings' rows follow the manifest's rows of that shard (one uid column of each, read here)?"""
    import pyarrow as pa

    manifest = storage.read_table(pool.ds.samples_path(shard.shard_id), columns=["uid"]).column("uid")
    return manifest.combine_chunks().cast(pa.string()).equals(shard.uid_column().cast(pa.string()))


def _write_outputs(pool: Pool, removed: np.ndarray, found: list[Found], sel_out: Path, groups_out: Path) -> None:
    """The groups file (the rows of every group, their uids read here), then the selection, written shard by
    shard in manifest order: neither needs a column of the whole pool in memory."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows, group, kind, keep_flag, of, sim = [], [], [], [], [], []
    next_group = 0
    for k, f in enumerate(found):
        labels = np.concatenate([f.keeper_group, f.group])
        uniq, gid = np.unique(labels, return_inverse=True)
        gid = gid + next_group
        next_group += len(uniq)
        nk = len(f.keepers)
        rows += [f.keepers, f.rows]
        group.append(gid)
        kind.append(np.full(nk + len(f.rows), k, np.int8))
        keep_flag += [np.ones(nk, bool), np.zeros(len(f.rows), bool)]
        of += [np.full(nk, -1, np.int64), f.of]
        sim += [np.full(nk, np.nan, np.float32), f.similarity]
    r, o = concat(rows, np.int64), concat(of, np.int64)
    del rows, of
    need = np.unique(np.r_[r, o[o >= 0]])
    uids = pool.take(need, ["uid"]).column("uid").combine_chunks()
    at_r = np.searchsorted(need, r)
    # rows in the file's order (group, kept first, uid) ordered here, on integers: a sort of the built
    # table would hold it twice (groups are a tenth of a pool with many copies)
    uid_rank = np.empty(len(need), np.int64)
    uid_rank[pc.sort_indices(uids).to_numpy()] = np.arange(len(need))
    g, kept = concat(group, np.int64), concat(keep_flag, bool)
    order = np.lexsort((uid_rank[at_r], ~kept, g))
    del uid_rank, r
    o, s = o[order], concat(sim, np.float32)[order]
    groups = pa.table({
        "uid": uids.take(pa.array(at_r[order])),
        "group": pa.array(g[order]),
        "kind": pa.DictionaryArray.from_arrays(pa.array(concat(kind, np.int8)[order]),
                                               pa.array([f.kind for f in found], pa.string())).cast(pa.string()),
        "kept": pa.array(kept[order]),
        "duplicate_of": pc.if_else(pa.array(o >= 0), uids.take(pa.array(np.searchsorted(need, np.maximum(o, 0)))),
                                   pa.scalar(None, pa.string())),
        "similarity": pa.array(s, pa.float32(), mask=np.isnan(s)),
    })
    del at_r, order, g, kept, o, s, uids
    atomic.write_parquet(groups_out, groups)
    del groups
    release()

    schema = pa.schema([("uid", pa.string()), ("caption", pa.string()), ("caption_source", pa.string()),
                        ("shard", pa.string()), ("key", pa.string())])
    # last: the selection marks a finished run
    with atomic.atomic_path(sel_out) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as out:
        for _, start, t in pool.shards(["uid", "caption", "shard", "key"]):
            t = t.filter(pa.array(~removed[start:start + t.num_rows]))
            t = t.add_column(2, "caption_source", pa.array(["raw"] * t.num_rows, pa.string()))
            out.write_table(t.select(schema.names).cast(schema))
