"""dedup's own memory per image: no per-image Python objects (the uid lists were held twice, ~520 bytes an
image in all), Arrow's buffers counted too, and the printed peak is anonymous memory, not mapped embedding
pages."""

from __future__ import annotations

import hashlib
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

from capcurate import atomic
from capcurate.dataset import Dataset, samples_schema

PER_SHARD = 10_000
DIM = 8


def make_pool(root: Path, n: int, seed: int = 0) -> Path:
    """n manifest rows in shards of PER_SHARD with float16 embeddings (no images: --semantic reads neither)."""
    ds = Dataset.create(root)
    rng = np.random.default_rng(seed)
    emb = ds.root / "embeddings" / "e"
    emb.mkdir(parents=True)
    for s in range(0, n, PER_SHARD):
        sid, m = f"{s // PER_SHARD:05d}", min(PER_SHARD, n - s)
        uids = [f"{s + i:032x}" for i in range(m)]
        # every 20th image repeats the bytes and the caption of the one before it (--exact, --captions)
        same = [i - (i % 20 == 19) for i in range(s, s + m)]
        rows = pa.table({"uid": uids, "key": [u[-9:] for u in uids], "shard": [sid] * m, "status": ["success"] * m,
                         "caption": [f"caption {j}" for j in same],
                         "sha256": [hashlib.sha256(str(j).encode()).hexdigest() for j in same]})
        atomic.write_parquet(ds.samples_path(sid), rows.cast(pa.schema([samples_schema().field(c) for c in rows.column_names])))
        x = rng.normal(size=(m, DIM)).astype(np.float32)
        copies = rng.random(m) < 0.1   # a tenth are near copies: the groups file and its uids cost memory too
        x[copies] = x[rng.integers(0, m, int(copies.sum()))] + rng.normal(scale=1e-3, size=(int(copies.sum()), DIM))
        np.save(emb / f"{sid}.image.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        atomic.write_parquet(emb / f"{sid}.uids.parquet", pa.table({"uid": uids, "error": pa.nulls(m, pa.string())}))
    return ds.root


def heap_peak(root: Path, **kinds: object) -> tuple[int, int, dict]:
    """Peak bytes Python and numpy (tracemalloc sees both) and, apart, Arrow (a proxy of its default pool)
    allocated during dedup --semantic. Both are exact counts: the resident anonymous memory that
    benchmarks/dedup.py prints also holds what the allocators keep, and moves by megabytes run to run."""
    import capcurate

    arrow = pa.proxy_memory_pool(pa.default_memory_pool())
    previous = pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s = capcurate.dedup(root, "m", workers=0, overwrite=True, **(kinds or {"semantic": "e", "eps": 0.01}))
        return tracemalloc.get_traced_memory()[1] - base, arrow.max_memory(), s
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)


def test_semantic_dedup_holds_under_100_bytes_an_image_beyond_the_kmeans_sample(tmp_path):
    small, big = 10_000, 60_000
    roots = {n: make_pool(tmp_path / str(n), n) for n in (small, big)}
    heap_peak(roots[small])   # warm: imports and one-time caches are not per-image memory
    (h_small, a_small, s_small), (h_big, a_big, s_big) = heap_peak(roots[small]), heap_peak(roots[big])
    assert s_big.counts["semantic duplicates"] > 0.08 * big   # the planted copies were found: groups were written
    sample = 4 * DIM * (s_big.details["semantic k-means rows"] - s_small.details["semantic k-means rows"])  # float32
    # the two peaks are added (an upper bound: they need not fall at the same moment)
    per_image = (h_big - h_small + a_big - a_small - sample) / (big - small)
    assert per_image <= 100, per_image   # 55 here; 103 before its output was sorted as integers and its
    # columns permuted in place, 262 before that (the uid lists held twice)
    # the printed peak is anonymous memory, next to the resident one that counts mapped pages
    assert 0 < s_big.details["peak_memory_mb"] and s_big.details["peak_rss_mb"] > 0


def test_exact_and_caption_dedup_hold_under_100_bytes_an_image(tmp_path):
    """Both kinds compare 16-byte digests held in one array, not the pool's hex strings or captions."""
    small, big = 10_000, 60_000
    roots = {n: make_pool(tmp_path / str(n), n) for n in (small, big)}
    heap_peak(roots[small], exact=True, captions=True)
    (h_small, a_small, _), (h_big, a_big, s) = (heap_peak(roots[n], exact=True, captions=True) for n in (small, big))
    assert s.counts["exact duplicates"] == big // 20 and s.counts["caption duplicates"] == 0  # exact took them
    per_image = (h_big - h_small + a_big - a_small) / (big - small)
    assert per_image <= 100, per_image


def test_anon_peak_sees_an_allocation_and_not_a_mapped_file(tmp_path):
    from capcurate.stages.dedup.memory import AnonPeak, anon_mb, release

    if anon_mb() is None:
        import pytest

        pytest.skip("no /proc/self/status RssAnon on this system")
    f = tmp_path / "big.npy"
    np.save(f, np.ones(64 * 2**20 // 8))        # 64 MiB on disk
    # memory this process freed but glibc kept (earlier tests', the array just saved) would serve the
    # allocation below without the resident set growing: handed back first, as dedup does between phases
    release()
    with AnonPeak() as mapped:
        m = np.load(f, mmap_mode="r")
        assert float(m.sum()) > 0               # every page of the map read in: resident, not anonymous
    with AnonPeak() as allocated:
        a = np.ones(64 * 2**20 // 8)
        a += 1
    del a, m
    assert allocated.grown_mb > 40 and mapped.grown_mb < 16, (allocated.grown_mb, mapped.grown_mb)
