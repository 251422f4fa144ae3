"""Benchmark ``capcurate shard`` (byte copy) against decoding + re-encoding and against ``cat``.

    .venv/bin/python benchmarks/shard.py [--size-gb 2] [--work DIR] [--baseline-shards 2]

Generates a dataset of real JPEGs (a pool of distinct noisy photos-like images repeated, ~100 KB each)
in source shards of 1,000 samples, a selection of every sample, then measures on the same files:

  shard     capcurate shard --shuffle (plan in DuckDB, bytes copied, fsync per output shard)
  (a)       webdataset.ShardWriter loop that decodes each image with PIL and re-encodes it (JPEG q90),
            the usual "read with a loader, write again" script; run on --baseline-shards source shards
            only (it is slow) and reported as MB/s of source bytes, the same unit as the others
  (b)       cat of the source tars to /dev/null: the read ceiling
  (c)       cat of the source tars into one file + fsync: the ceiling of any durable copy (shard fsyncs
            every output shard, so this, not (b), is what the disk allows it)

All three run with the source tars in the page cache (each is read once before timing), so (b) is the
memory-speed ceiling, not the disk's: a ratio above 0.5 against it means sharding costs at most twice a
plain read. Prints MB/s for each and the two ratios (targets: > 10x (a), > 0.5x (b)).

Measured (--size-gb 1, 2 shared CPU cores): 435 MB/s, 12.4x (a), 0.06x (b), 0.5x (c); see docs/shard.md.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from capcurate import atomic
from capcurate.dataset import Dataset, samples_schema
from capcurate.shards import TarShardWriter

PER_SOURCE_SHARD = 1000


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """Distinct 512x384 JPEGs with gradients and noise (photo-like entropy, ~100 KB at q90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:384, 0:512]
    for _ in range(n):
        base = np.stack([(xx * rng.uniform(0.1, 0.5) + yy * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        img = np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_source(root: Path, size_bytes: int) -> tuple[Dataset, int]:
    pool = make_jpegs(64)
    n = max(PER_SOURCE_SHARD, int(size_bytes / (sum(map(len, pool)) / len(pool))))
    ds = Dataset.create(root, sources=[{"kind": "benchmark"}])
    sel = {"uid": [], "caption": [], "caption_source": []}
    for s in range(0, n, PER_SOURCE_SHARD):
        shard_id = f"{s // PER_SOURCE_SHARD:05d}"
        rows = []
        with TarShardWriter(ds.shard_path(shard_id)) as w:
            for i in range(s, min(n, s + PER_SOURCE_SHARD)):
                key, uid, caption = f"{shard_id}{i - s:04d}", f"uid{i:08d}", f"a generated photo {i}"
                img = pool[i % len(pool)]
                w.write(key, {"jpg": img, "txt": caption.encode()})
                rows.append({"uid": uid, "key": key, "shard": shard_id, "url": f"http://x/{i}.jpg",
                             "caption": caption, "status": "success", "error_message": None,
                             "width": 512, "height": 384, "original_width": 512, "original_height": 384,
                             "sha256": None})
                sel["uid"].append(uid)
                sel["caption"].append(caption)
                sel["caption_source"].append("raw")
        atomic.write_parquet(ds.samples_path(shard_id), pa.Table.from_pylist(rows, schema=samples_schema()))
    atomic.write_parquet(ds.selection_path("all"), pa.table(sel))
    return ds, n


def tar_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def time_cat(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def time_copy_fsync(paths: list[Path], dest: Path) -> float:
    """(c): cat the tars into one file and fsync it: what any writer of durable copies pays."""
    t0 = time.perf_counter()
    with open(dest, "wb") as f:
        subprocess.run(["cat", *map(str, paths)], stdout=f, check=True)
        f.flush()
        os.fsync(f.fileno())
    dt = time.perf_counter() - t0
    dest.unlink()
    return dt


def time_capcurate(ds: Dataset, out: Path) -> float:
    from capcurate.stages.shard import shard

    t0 = time.perf_counter()
    s = shard(ds, "all", out, samples_per_shard=PER_SOURCE_SHARD, shuffle=True, seed=0)
    dt = time.perf_counter() - t0
    assert s.counts["missing"] == 0, s.counts
    return dt


def time_reencode(paths: list[Path], out: Path) -> float:
    """The baseline: read with webdataset, decode, re-encode, write with ShardWriter."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    src = wds.WebDataset([str(p) for p in paths], shardshuffle=False).decode("pil")
    with wds.ShardWriter(str(out / "%05d.tar"), maxcount=PER_SOURCE_SHARD, verbose=0) as sink:
        for sample in src:
            buf = io.BytesIO()
            sample["jpg"].save(buf, format="JPEG", quality=90)
            sink.write({"__key__": sample["__key__"], "jpg": buf.getvalue(), "txt": sample["txt"]})
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of the generated source shards")
    ap.add_argument("--baseline-shards", type=int, default=2, help="source shards the slow baseline (a) runs on")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temp dir, removed after)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="capcurate-bench-shard-"))
    try:
        t0 = time.perf_counter()
        ds, n = build_source(work / "ds", int(args.size_gb * 1e9))
        tars = sorted(ds.shards_dir.glob("*.tar"))
        total = tar_bytes(tars)
        print(f"generated {n:,} JPEG samples in {len(tars)} source shards, {total / 1e9:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

        time_cat(tars)  # warm the page cache so every method reads from memory
        cat_s = time_cat(tars)
        copy_s = time_copy_fsync(tars, work / "copy.tar")
        shard_s = time_capcurate(ds, work / "out")
        base = tars[: args.baseline_shards]
        time_cat(base)
        reenc_s = time_reencode(base, work / "reencoded")

        mbps = {"capcurate shard --shuffle": total / shard_s / 1e6,
                "(a) webdataset decode+re-encode": tar_bytes(base) / reenc_s / 1e6,
                "(b) cat > /dev/null": total / cat_s / 1e6,
                "(c) cat > file + fsync": total / copy_s / 1e6}
        for k, v in mbps.items():
            print(f"{k:34s} {v:10.1f} MB/s")
        shard_mbps = mbps["capcurate shard --shuffle"]
        print(f"ratio vs (a) decode+re-encode: {shard_mbps / mbps['(a) webdataset decode+re-encode']:.1f}x "
              "(target > 10x)")
        print(f"ratio vs (b) cat:              {shard_mbps / mbps['(b) cat > /dev/null']:.2f}x (target > 0.5x)")
        print(f"ratio vs (c) cat+fsync copy:   {shard_mbps / mbps['(c) cat > file + fsync']:.2f}x "
              "(the bound for anything that writes its output durably)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
