"""Benchmark: ``capcurate filter`` on a generated 10-million-row pool against pandas doing the same.

The pool is Parquet only (no images): samples/*.parquet and scores/b32/*.parquet with a raw and two
synthetic-caption scores. Two filters are timed, each in a fresh process so its peak RSS is its own:
  1. --top-fraction 0.3 --score b32:raw   (pool-wide quantile threshold)
  2. --where "width >= 200 AND score_b32_blip > 0.25 AND caption NOT ILIKE '%stock%'"
pandas reads the same files, merges scores onto the manifest by uid, filters and writes the same
selection columns.

    .venv/bin/python benchmarks/filter.py [--rows 10000000] [--shards 20] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHERE = "width >= 200 AND score_b32_blip > 0.25 AND caption NOT ILIKE '%stock%'"
WORDS = ["a", "red", "blue", "cube", "dog", "photo", "of", "the", "on", "table", "stock", "image", "sunset",
         "beach", "city", "at", "night", "small", "big", "green"]


def generate(root: Path, rows: int, shards: int) -> None:
    """Write the pool with vectorised numpy/pyarrow (a Python loop over 10M rows would dominate)."""
    import numpy as np
    import pyarrow as pa

    from capcurate import atomic
    from capcurate.dataset import Dataset, samples_schema

    ds = Dataset.create(root)
    rng = np.random.default_rng(0)
    vocab = pa.array([" ".join(rng.choice(WORDS, size=rng.integers(2, 12))) for _ in range(5000)])
    statuses = pa.array(["success", "failed_to_download"])
    per = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        n = hi - lo
        sid = f"{s:05d}"
        ok = rng.random(n) < 0.9
        caption = pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, len(vocab), n)), vocab).cast(pa.string())
        size = rng.integers(64, 1600, (4, n)).astype(np.int32)
        uid = pa.array(np.char.mod("%032x", np.arange(lo, hi)))
        table = pa.table({
            "uid": uid, "key": pa.array(np.char.mod("%09d", np.arange(lo, hi))),
            "shard": pa.array([sid] * n), "url": pa.nulls(n, pa.string()), "caption": caption,
            "status": pa.DictionaryArray.from_arrays(pa.array((~ok).astype(np.int8)), statuses).cast(pa.string()),
            "error_message": pa.nulls(n, pa.string()),
            "width": pa.array(size[0], mask=~ok), "height": pa.array(size[1], mask=~ok),
            "original_width": pa.array(size[2], mask=~ok), "original_height": pa.array(size[3], mask=~ok),
            "sha256": pa.nulls(n, pa.string()),
        }, schema=samples_schema())
        atomic.write_parquet(ds.samples_path(sid), table)
        scores = {"uid": uid}
        for name, hi_v in (("raw", 0.45), ("blip", 0.55), ("coca", 0.5)):
            scores[f"score_b32_{name}"] = pa.array(rng.uniform(-0.05, hi_v, n).astype(np.float32), mask=~ok)
        atomic.write_parquet(ds.family_dir("scores", "b32") / f"{sid}.parquet", pa.table(scores))


CAPCURATE = """
import json, resource, sys, time
from capcurate.stages.filter import filter
root, mode, where = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if mode == "top":
    s = filter(root, "bench_top", top_fraction=0.3, score="b32:raw", overwrite=True)
else:
    s = filter(root, "bench_where", where=where, overwrite=True)
print(json.dumps({"seconds": time.perf_counter() - t, "kept": s.counts["kept"],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PANDAS = """
import json, resource, sys, time
import pandas as pd
root, mode, out = sys.argv[1], sys.argv[2], sys.argv[4]
t = time.perf_counter()
m = pd.read_parquet(f"{root}/samples", columns=["uid", "key", "shard", "caption", "status", "width"])
col = "score_b32_raw" if mode == "top" else "score_b32_blip"
sc = pd.read_parquet(f"{root}/scores/b32", columns=["uid", col])
df = m.merge(sc, on="uid", how="left")
if mode == "top":
    thr = df[col].quantile(0.7)
    keep = (df.status == "success") & (df[col] >= thr)
else:
    keep = ((df.status == "success") & (df.width >= 200) & (df[col] > 0.25)
            & ~df.caption.str.contains("stock", case=False, na=True))
sel = df.loc[keep, ["uid", "caption", "key", "shard"]].assign(caption_source="raw").sort_values("uid")
sel.to_parquet(out, index=False)
print(json.dumps({"seconds": time.perf_counter() - t, "kept": int(keep.sum()),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--keep", type=Path, help="generate into (or reuse) this folder and keep it")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="capcurate-bench-filter-")) / "pool"
    try:
        if not (root / "samples").is_dir():
            t = time.perf_counter()
            generate(root, args.rows, args.shards)
            print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f} s at {root}")
        for mode, label in (("top", "--top-fraction 0.3 --score b32:raw"), ("where", f'--where "{WHERE}"')):
            ours = run(CAPCURATE, str(root), mode, WHERE)
            base = run(PANDAS, str(root), mode, WHERE, str(root.parent / f"pandas_{mode}.parquet"))
            assert abs(ours["kept"] - base["kept"]) <= 1, (ours, base)
            print(f"\n{label}: kept {ours['kept']:,} of {args.rows:,}")
            print(f"  capcurate filter: {ours['seconds']:7.2f} s  peak RSS {ours['rss_mb']:8.0f} MB")
            print(f"  pandas:           {base['seconds']:7.2f} s  peak RSS {base['rss_mb']:8.0f} MB")
            print(f"  ratio: {base['seconds'] / ours['seconds']:.2f}x faster, "
                  f"{base['rss_mb'] / ours['rss_mb']:.2f}x less memory")
    finally:
        if not args.keep:
            shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("CAPCURATE_PROGRESS", "0")
    main()
