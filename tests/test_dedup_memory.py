"""dedup's own memory per image: no per-image Python objects (the uid lists were held twice, ~520 bytes an
image in all), and the printed peak is anonymous memory, not mapped embedding pages."""

from __future__ import annotations

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
        rows = pa.table({"uid": uids, "key": [u[-9:] for u in uids], "shard": [sid] * m, "status": ["success"] * m,
                         "caption": [f"caption {s + i}" for i in range(m)]})
        atomic.write_parquet(ds.samples_path(sid), rows.cast(pa.schema([samples_schema().field(c) for c in rows.column_names])))
        x = rng.normal(size=(m, DIM)).astype(np.float32)
        np.save(emb / f"{sid}.image.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        atomic.write_parquet(emb / f"{sid}.uids.parquet", pa.table({"uid": uids, "error": pa.nulls(m, pa.string())}))
    return ds.root


def heap_peak(root: Path) -> tuple[int, dict]:
    """Peak bytes Python and numpy allocated during dedup --semantic (tracemalloc sees both)."""
    import capcurate

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        s = capcurate.dedup(root, "m", semantic="e", eps=0.01, workers=0, overwrite=True)
        return tracemalloc.get_traced_memory()[1] - base, s.details
    finally:
        tracemalloc.stop()


def test_semantic_dedup_holds_under_100_bytes_an_image_beyond_the_kmeans_sample(tmp_path):
    small, big = 10_000, 60_000
    roots = {n: make_pool(tmp_path / str(n), n) for n in (small, big)}
    heap_peak(roots[small])   # warm: imports and one-time caches are not per-image memory
    (p_small, d_small), (p_big, d_big) = heap_peak(roots[small]), heap_peak(roots[big])
    sample = 4 * DIM * (d_big["semantic k-means rows"] - d_small["semantic k-means rows"])  # float32 rows
    per_image = (p_big - p_small - sample) / (big - small)
    assert per_image <= 100, per_image   # 76 here; 262 before (the uid lists held twice), Arrow columns besides
    # the printed peak is anonymous memory, next to the resident one that counts mapped pages
    assert 0 < d_big["peak_memory_mb"] and d_big["peak_rss_mb"] > 0


def test_anon_peak_sees_an_allocation_and_not_a_mapped_file(tmp_path):
    from capcurate.stages.dedup.memory import AnonPeak, anon_mb

    if anon_mb() is None:
        import pytest

        pytest.skip("no /proc/self/status RssAnon on this system")
    f = tmp_path / "big.npy"
    np.save(f, np.ones(64 * 2**20 // 8))        # 64 MiB on disk
    with AnonPeak() as mapped:
        m = np.load(f, mmap_mode="r")
        assert float(m.sum()) > 0               # every page of the map read in: resident, not anonymous
    with AnonPeak() as allocated:
        a = np.ones(64 * 2**20 // 8)
        a += 1
    del a, m
    assert allocated.peak_mb - mapped.peak_mb > 40, (allocated.peak_mb, mapped.peak_mb)
