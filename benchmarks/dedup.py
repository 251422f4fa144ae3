"""SemDeDup at pool scale: capcurate.dedup --semantic on synthetic float16 embeddings vs a plain script.

The baseline loads every embedding into memory (float32), trains faiss k-means on the same sample and
runs the same within-cluster rule with numpy; capcurate memory-maps each shard's float16 file. Both print
wall time and peak resident memory (measured in a fresh process each, so one does not inherit the other's
peak). Default: 100k embeddings of 256 dimensions (a few minutes on 2 cores); --full: 1M x 768 (ViT-L/14).

    python benchmarks/dedup.py [--n 100000] [--dim 256] [--full]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PER_SHARD = 10_000


def make_pool(root: Path, n: int, dim: int, seed: int = 0) -> Path:
    """A dataset of n rows (no images: dedup --semantic reads only the manifest and embeddings), 10% planted copies."""
    import pyarrow as pa

    from capcurate import atomic
    from capcurate.dataset import Dataset, samples_schema

    ds = Dataset.create(root / "ds")
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 1000), dim)).astype(np.float32)
    for s in range(0, n, PER_SHARD):
        sid = f"{s // PER_SHARD:05d}"
        m = min(PER_SHARD, n - s)
        x = centres[rng.integers(0, len(centres), m)] + rng.normal(scale=0.6, size=(m, dim)).astype(np.float32)
        copies = rng.random(m) < 0.1
        src = rng.integers(0, m, int(copies.sum()))
        x[copies] = x[src] + rng.normal(scale=0.01, size=(int(copies.sum()), dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        uids = [f"{s + i:032x}" for i in range(m)]
        rows = [{"uid": u, "key": u[-9:], "shard": sid, "status": "success"} for u in uids]
        atomic.write_parquet(ds.samples_path(sid), pa.Table.from_pylist(rows, schema=samples_schema()))
        emb = ds.root / "embeddings" / "emb"
        emb.mkdir(parents=True, exist_ok=True)
        np.save(emb / f"{sid}.image.npy", x.astype(np.float16))
        atomic.write_parquet(emb / f"{sid}.uids.parquet", pa.table({"uid": uids, "error": pa.nulls(m, pa.string())}))
    return ds.root


CAPCURATE = """
import json, sys, time
import capcurate
from capcurate.stages.dedup.embeddings import peak_memory_mb
t = time.time()
s = capcurate.dedup(sys.argv[1], "bench", semantic="emb", eps=0.05, overwrite=True)
print(json.dumps({"seconds": time.time() - t, "peak_mb": peak_memory_mb(), "removed": s.counts["semantic duplicates"]}))
"""

BASELINE = """
import glob, json, math, sys, time
import faiss, numpy as np
from capcurate.stages.dedup.embeddings import peak_memory_mb
t = time.time()
x = np.concatenate([np.load(f).astype(np.float32) for f in sorted(glob.glob(sys.argv[1] + "/embeddings/emb/*.image.npy"))])
n = len(x); k = math.ceil(n / 1000); size = min(n, 50 * k)
sample = x[np.sort(np.random.default_rng(0).choice(n, size, replace=False))]
km = faiss.Kmeans(x.shape[1], k, niter=20, seed=0, max_points_per_centroid=size // k + 1)
km.train(sample)
dist, label = km.index.search(x, 1)
label, dist = label[:, 0], dist[:, 0]
removed = 0
for c in range(k):
    m = np.flatnonzero(label == c)
    m = m[np.lexsort((m, -dist[m]))]
    e = x[m]
    sims = np.triu(e @ e.T, 1)
    removed += int((sims.max(axis=0) > 0.95).sum())
print(json.dumps({"seconds": time.time() - t, "peak_mb": peak_memory_mb(), "removed": removed}))
"""


def run(code: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(root)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="1M embeddings of 768 dimensions")
    args = ap.parse_args()
    n, dim = (1_000_000, 768) if args.full else (args.n, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        root = make_pool(Path(tmp), n, dim)
        print(f"pool: {n:,} x {dim} float16 embeddings ({n * dim * 2 / 2**20:,.0f} MiB) in {time.time() - t:.1f}s")
        ours, base = run(CAPCURATE, root), run(BASELINE, root)
    for label, r in (("capcurate dedup --semantic", ours), ("in-memory faiss + numpy", base)):
        print(f"{label:28s} {r['seconds']:8.1f} s   peak {r['peak_mb']:8,.0f} MB   removed {r['removed']:,}")
    print(f"time ratio (baseline / capcurate): {base['seconds'] / ours['seconds']:.2f}x; "
          f"peak memory ratio: {base['peak_mb'] / ours['peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
