"""Benchmark: ingest, score and shard with the dataset in a bucket vs on local disk, same data, same code.

Starts a local S3 server (moto's server mode, 127.0.0.1) and runs each stage twice on identical inputs:
once with every path local, once with the dataset (and the training shards) in the bucket. Each bucket
output is checked against the local one (manifest rows, score columns to 1e-5, training shard bytes and
sizes.json); a mismatch fails the row. Prints seconds per stage and the bucket/local ratio, with the commit.

    .venv/bin/python benchmarks/storage.py [--images 2000] [--per-shard 250] [--size 256x192]

The local server is a Python process on the same 2 cores, so it measures capcurate's protocol overhead
(listings, one PUT per committed file, ranged GETs, the card's conditional writes), not a real network.
Target: bucket within 1.5x of local for each stage. A second ratio divides by local + the time s3fs takes to move
the same bytes once (the floor of any tool on this server), to separate capcurate's overhead from the server's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CAPCURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))  # the local S3 server the tests start too

from photo_like import make_jpeg  # noqa: E402
from provenance import commit  # noqa: E402
from s3_fixtures import create_bucket, start_local_s3  # noqa: E402

from capcurate import storage  # noqa: E402

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def write_webdataset(folder: Path, n: int, per_shard: int, size: tuple[int, int]) -> None:
    """Input tars as img2dataset/webdataset write them: jpg + txt + json(url) per sample."""
    folder.mkdir(parents=True)
    rnd = random.Random(0)
    words = ["red", "blue", "cube", "ball", "dog", "on", "a", "table", "photo", "of", "the", "small", "big"]
    jpegs = [make_jpeg(i, size) for i in range(64)]
    for s in range(0, n, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                cap = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
                for ext, data in (("jpg", jpegs[i % len(jpegs)]), ("txt", cap.encode()),
                                  ("json", json.dumps({"url": f"http://x/{i}.jpg"}).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def tiny_clip(root: Path) -> tuple[Path, Path]:
    import open_clip
    import torch

    cfg = root / "bench-storage-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    weights = root / "bench-storage-clip.pt"
    torch.save({"state_dict": open_clip.create_model(cfg.stem).state_dict()}, weights)
    return cfg, weights


def run_chain(web: Path, ds: str, out: str, cfg: Path, weights: Path, batch_size: int) -> dict[str, float]:
    """ingest -> score -> shard on one dataset location; returns seconds per stage."""
    from capcurate.stages.ingest import ingest
    from capcurate.stages.mix import mix
    from capcurate.stages.score import score
    from capcurate.stages.shard import shard

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    ingest(str(web), ds, kind="webdataset")
    t["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = score(ds, f"openclip:{cfg}", "bench", pretrained=str(weights), batch_size=batch_size, device="cpu")
    t["score"] = time.perf_counter() - t0
    assert s.counts.get("shards_failed", 0) == 0, s.counts
    mix(ds, "raw", name="all")
    t0 = time.perf_counter()
    shard(ds, "all", out, samples_per_shard=500, shuffle=True, seed=0)
    t["shard"] = time.perf_counter() - t0
    return t


def check_same(local_ds: Path, local_out: Path, bucket_ds: Path, bucket_out: Path) -> list[str]:
    """Differences between the local run's outputs and the bucket run's (empty when they agree)."""
    import numpy as np
    import pyarrow.parquet as pq

    bad = []
    for sub in ("samples", "scores/bench"):
        a = pq.read_table(local_ds / sub).sort_by("uid")
        b = pq.read_table(bucket_ds / sub).sort_by("uid")
        if a.num_rows != b.num_rows or a.column_names != b.column_names:
            bad.append(f"{sub}: {a.num_rows} vs {b.num_rows} rows")
            continue
        for col in a.column_names:
            x, y = a.column(col).to_pylist(), b.column(col).to_pylist()
            if col.startswith("score_"):
                ok = np.allclose(np.array(x, dtype=float), np.array(y, dtype=float), atol=1e-5, equal_nan=True)
            else:
                ok = x == y or col == "source"
            if not ok:
                bad.append(f"{sub}.{col} differs")
    for f in sorted(local_out.glob("*")):
        if f.name == "manifest.json" or f.name.startswith("."):  # these name the dataset's path
            continue
        g = bucket_out / f.name
        if not g.exists() or g.read_bytes() != f.read_bytes():
            bad.append(f"training shard {f.name} differs")
    return bad


def transfer_seconds(work: Path) -> dict[str, float]:
    """The obvious baseline's extra cost on a bucket: moving each stage's bytes once with s3fs (what any tool
    pays on this server). ingest: upload the dataset's tars and manifests; score: download the tars, upload
    the scores; shard: download the source tars, upload the training shards."""
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)
    ds, out, tmp = work / "ds", work / "out", work / "xfer"

    def put(folder: Path, prefix: str) -> None:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                fs.put_file(str(f), f"bench/xfer/{prefix}/{f.relative_to(folder)}")

    def get(prefix: str) -> None:
        for key in fs.find(f"bench/{prefix}"):
            target = tmp / key.replace("/", "_")
            fs.get_file(key, str(target))
            target.unlink()

    tmp.mkdir(exist_ok=True)
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    put(ds / "shards", "ds/shards")
    put(ds / "samples", "ds/samples")
    t["ingest"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    get("ds/shards")
    put(ds / "scores", "ds/scores")
    t["score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    get("ds/shards")
    put(out, "out")
    t["shard"] = time.perf_counter() - t0
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--size", default="256x192", help="JPEG size WxH")
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))

    work = Path(tempfile.mkdtemp(prefix="capcurate-bench-storage-"))
    server, _ = start_local_s3()
    create_bucket("bench")
    try:
        write_webdataset(work / "web", args.images, args.per_shard, size)
        cfg, weights = tiny_clip(work)
        # warm imports, the model and the page cache once, untimed
        run_chain(work / "web", str(work / "warm"), str(work / "warm_out"), cfg, weights, args.batch_size)
        local = run_chain(work / "web", str(work / "ds"), str(work / "out"), cfg, weights, args.batch_size)
        bucket = run_chain(work / "web", "s3://bench/ds", "s3://bench/out", cfg, weights, args.batch_size)
        bad = check_same(work / "ds", work / "out", storage.download_tree("s3://bench/ds", work / "b_ds"),
                         storage.download_tree("s3://bench/out", work / "b_out"))
        print(f"capcurate storage benchmark, commit {commit()}, {args.images} images of {args.size} in "
              f"{-(-args.images // args.per_shard)} shards, local S3 server (moto) on 127.0.0.1")
        moved = transfer_seconds(work)
        print(f"{'stage':8s} {'local s':>9s} {'bucket s':>9s} {'bucket/local':>13s}  {'(target <= 1.5x)':16s} "
              f"{'transfer s':>10s} {'bucket/(local+transfer)':>24s} {'bucket/max(local,transfer)':>27s}")
        for stage in ("ingest", "score", "shard"):
            ratio = bucket[stage] / local[stage]
            serial = bucket[stage] / (local[stage] + moved[stage])
            overlap = bucket[stage] / max(local[stage], moved[stage])
            print(f"{stage:8s} {local[stage]:9.2f} {bucket[stage]:9.2f} {ratio:12.2f}x  "
                  f"{'met' if ratio <= 1.5 else 'NOT met':16s} {moved[stage]:10.2f} {serial:23.2f}x "
                  f"{overlap:26.2f}x")
        print("transfer: the same bytes moved once with s3fs get/put, one file after another (what any tool pays "
              "to move them on this server). bucket/(local+transfer): the local run plus moving its bytes; "
              "bucket/max(local,transfer): against perfect overlap of the work with the transfer (1x is the "
              "floor of any tool on this server)")
        if bad:
            print("OUTPUT CHECK FAILED: " + "; ".join(bad))
            return 1
        print("outputs: bucket == local (manifest rows, scores to 1e-5, training shard bytes, sizes.json)")
        return 0
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
