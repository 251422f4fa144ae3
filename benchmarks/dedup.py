"""dedup benchmarks: SemDeDup at pool scale, and near duplicates against imagehash and imagededup.

Semantic (default): capcurate.dedup --semantic on synthetic float16 embeddings vs a plain script that
loads every embedding into memory (float32), trains faiss k-means on the same sample and runs the same
within-cluster rule with numpy; capcurate memory-maps each shard's float16 file. Each prints wall time,
peak anonymous memory (RssAnon, sampled: what the process allocated) and peak resident memory (which also
counts the mapped embedding pages the page cache holds), each in a fresh process. capcurate also runs on
a pool of a fifth the size, so its anonymous memory per image is printed (beyond the k-means sample).
Default: 500k embeddings of 256 dimensions (about two minutes on 2 cores: at 100k the growth per image is
a few MB against run-to-run moves of the allocators of a few MB); --full: 1M x 768 (ViT-L/14).

Near (--near): tests/dedup_fixtures.py's set (scikit-image photographs, drawn look-alikes, each with
resized, re-encoded, 5%-cropped and +-15/30%-brightened copies): recall per edit, pair precision and time
per image for capcurate dedup --near (the CLI's path: a dataset of tar shards, --workers 2), imagehash's
64-bit phash and imagededup's PHash (``pip install imagededup``; skipped without it) at their usual
radius of 10 bits.

    python benchmarks/dedup.py [--n 500000] [--dim 256] [--full]
    python benchmarks/dedup.py --near
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
t = time.time()
s = capcurate.dedup(sys.argv[1], "bench", semantic="emb", eps=0.05, overwrite=True)
print(json.dumps({"seconds": time.time() - t, "anon_mb": s.details["peak_memory_mb"],
                  "rss_mb": s.details["peak_rss_mb"], "removed": s.counts["semantic duplicates"],
                  "sample_rows": s.details["semantic k-means rows"]}))
"""

BASELINE = """
import glob, json, math, sys, time
import faiss, numpy as np
from capcurate.stages.dedup.memory import AnonPeak, peak_rss_mb
t = time.time()
memory = AnonPeak().__enter__()
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
memory.__exit__(None, None, None)
print(json.dumps({"seconds": time.time() - t, "anon_mb": memory.peak_mb, "rss_mb": peak_rss_mb(), "removed": removed}))
"""


def run(code: str, root: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, str(root)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def semantic(n: int, dim: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        root = make_pool(Path(tmp) / "big", n, dim)
        small = make_pool(Path(tmp) / "small", n // 5, dim)
        print(f"pool: {n:,} x {dim} float16 embeddings ({n * dim * 2 / 2**20:,.0f} MiB) in {time.time() - t:.1f}s")
        # twice each, the larger peak kept: a 10 ms sampler can only miss a peak, never invent one
        ours = max((run(CAPCURATE, root) for _ in range(2)), key=lambda r: r["anon_mb"])
        fifth = max((run(CAPCURATE, small) for _ in range(2)), key=lambda r: r["anon_mb"])
        base = run(BASELINE, root)
    for label, r in (("capcurate dedup --semantic", ours), ("in-memory faiss + numpy", base)):
        print(f"{label:28s} {r['seconds']:8.1f} s   anonymous peak {r['anon_mb']:8,.0f} MB   "
              f"resident peak {r['rss_mb']:8,.0f} MB   removed {r['removed']:,}")
    rows = n - n // 5
    per_image = (ours["anon_mb"] - fifth["anon_mb"]) * 2**20 / rows
    sample = 4 * dim * (ours["sample_rows"] - fifth["sample_rows"]) / rows
    # the peak is either the k-means phase (the sample held) or a later one: "beyond" is exact only if the
    # peak is the k-means phase in both runs, and negative when the sample phase sets the big run's peak only
    print(f"capcurate anonymous peak per image: {per_image:,.0f} bytes (pools of {n // 5:,} and {n:,}: "
          f"{fifth['anon_mb']:,.0f} and {ours['anon_mb']:,.0f} MB); the k-means sample alone grows "
          f"{sample:,.0f} bytes an image, so beyond it: {per_image - sample:,.0f}")
    print(f"time ratio (baseline / capcurate): {base['seconds'] / ours['seconds']:.2f}x; "
          f"anonymous peak ratio: {base['anon_mb'] / ours['anon_mb']:.2f}x")


def near(hamming: int, workers: int) -> None:
    """capcurate --near, imagehash and imagededup on the same set (module docstring)."""
    import io

    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from dedup_fixtures import near_duplicate_set, score_pairs

    import capcurate
    from capcurate.shards import TarShardWriter

    items = near_duplicate_set()
    print(f"{len(items)} images: {sum(it.edit is None for it in items)} originals and their edited copies")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        with TarShardWriter(Path(tmp) / "set.tar") as w:
            for i, it in enumerate(items):
                w.write(f"s{i:06d}", {"png" if it.edit is None else "jpg": it.data, "txt": it.name.encode()})
        capcurate.ingest(Path(tmp) / "set.tar", Path(tmp) / "ds")
        t = time.time()
        s = capcurate.dedup(Path(tmp) / "ds", "near", near=True, hamming=hamming, workers=workers)
        seconds = s.details["seconds_by_kind"]["near"]
        import pyarrow.parquet as pq

        groups = pq.read_table(Path(tmp) / "ds" / "dedup" / "near.parquet").to_pylist()
        index = {it.name: k for k, it in enumerate(items)}
        captions = {r["uid"]: r["caption"] for r in pq.read_table(Path(tmp) / "ds" / "selections" / "near.parquet")
                    .to_pylist()}
        manifest = {r["uid"]: r["caption"] for p in sorted((Path(tmp) / "ds" / "samples").glob("*.parquet"))
                    for r in pq.read_table(p).to_pylist()}
        del captions
        pairs = [(index[manifest[g["uid"]]], index[manifest[g["duplicate_of"]]]) for g in groups if not g["kept"]]
        results[f"capcurate --near (hamming {hamming}, {workers} workers)"] = (
            score_pairs(items, *np.array(pairs, np.int64).reshape(-1, 2).T), seconds / len(items), time.time() - t)

    import imagehash
    from PIL import Image

    t = time.time()
    hashes = [imagehash.phash(Image.open(io.BytesIO(it.data))) for it in items]
    seconds = time.time() - t
    bits = np.array([h.hash.reshape(-1) for h in hashes])
    d = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    i, j = np.nonzero(np.triu(d <= 10, 1))
    results["imagehash phash (<= 10 bits, 1 process)"] = (score_pairs(items, i, j), seconds / len(items), seconds)
    try:
        from imagededup.methods import PHash
    except ImportError:
        print("imagededup is not installed (pip install imagededup): skipped")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for k, it in enumerate(items):
                (Path(tmp) / f"{k:05d}.{'png' if it.edit is None else 'jpg'}").write_bytes(it.data)
            t = time.time()
            ph = PHash(verbose=False)
            enc = ph.encode_images(image_dir=tmp, num_enc_workers=workers)
            dup = ph.find_duplicates(encoding_map=enc, max_distance_threshold=10)
            seconds = time.time() - t
        pairs = {(min(int(a[:5]), int(b[:5])), max(int(a[:5]), int(b[:5]))) for a, bs in dup.items() for b in bs}
        i, j = np.array(sorted(pairs), np.int64).reshape(-1, 2).T
        results[f"imagededup PHash (<= 10 bits, {workers} workers)"] = (score_pairs(items, i, j), seconds / len(items),
                                                                         seconds)
    edits = sorted(k for k in next(iter(results.values()))[0] if k.startswith("recall "))
    print(f"{'method':44s} {'ms/img':>7s} {'prec':>6s} {'recall':>6s} " + " ".join(f"{e[7:]:>10s}" for e in edits))
    for label, (sc, per, _) in results.items():
        print(f"{label:44s} {1000 * per:7.1f} {sc['precision']:6.3f} {sc['recall']:6.3f} "
              + " ".join(f"{sc[e]:10.3f}" for e in edits))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--full", action="store_true", help="1M embeddings of 768 dimensions")
    ap.add_argument("--near", action="store_true", help="near duplicates vs imagehash and imagededup instead")
    ap.add_argument("--hamming", type=int, default=8, help="--near: capcurate's --hamming")
    ap.add_argument("--workers", type=int, default=2, help="--near: hashing processes")
    args = ap.parse_args()
    if args.near:
        near(args.hamming, args.workers)
    else:
        n, dim = (1_000_000, 768) if args.full else (args.n, args.dim)
        semantic(n, dim)


if __name__ == "__main__":
    main()
