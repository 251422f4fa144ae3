"""Benchmark: one recaption job (a tiny random BLIP) on the local engine, on a local Ray cluster at equal
cores, and with the dataset in a bucket (a local S3 server) instead of on local disk.

Rows, all on the same images, model and decoding (greedy, exactly ``--tokens`` new tokens):
  local        --engine local on this machine's cores (workers auto)
  ray 1x2      --engine ray, a private Ray instance with the same number of CPUs, one actor holding all
  ray 2x1      the same instance, one actor per CPU (each sized its decode workers from its 1 CPU)
  bucket       --engine local with the dataset at s3://bench/ds on moto's server (127.0.0.1)
Every output is checked equal to the local run's captions, row by row; a mismatch fails the run. The Ray
start-up (``ray.init``) is timed apart. "whole" is the recaption call (model loads included); "after
start-up" is the engine's work once the model is loaded (Ray: once every actor is set up, from
``EngineResult.setup_seconds``). Prints seconds, images/s and ratios to local, with the commit.
Target: Ray >= 0.8x local's throughput after start-up.

    .venv/bin/python benchmarks/engines.py [--images 1536] [--per-shard 64] [--size 256x192] [--tokens 8]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CAPCURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from photo_like import make_jpeg  # noqa: E402
from provenance import commit  # noqa: E402


def captions(ds: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted((ds / "captions" / "b").glob("*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1536)
    ap.add_argument("--per-shard", type=int, default=64)
    ap.add_argument("--size", default="256x192", help="JPEG size WxH")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    size = tuple(int(v) for v in args.size.split("x"))
    cpus = len(os.sched_getaffinity(0))

    from captioner_fixtures import build_tiny_blip
    from conftest import build_dataset
    from s3_fixtures import create_bucket, start_local_s3

    from capcurate import storage
    from capcurate.stages.recaption import recaption

    work = Path(tempfile.mkdtemp(prefix="capcurate-bench-engines-"))
    server = None
    try:
        model = build_tiny_blip(work / "model")
        samples = [{"caption": f"image {i}", "image": make_jpeg(i, size)} for i in range(args.images)]
        base = build_dataset(work / "base", samples, per_shard=args.per_shard)
        opts = dict(model=model, name="b", decoding="greedy", min_new_tokens=args.tokens,
                    max_new_tokens=args.tokens, batch_size=args.batch_size, device="cpu", precision="fp32")

        import capcurate.engines as engines

        original_run_job = engines.run_job
        timing: dict[str, float] = {}

        def timed_run_job(job, shard_ids, _engine_kw=None, **kw):
            """The engine's part of the stage, timed; Ray's actor set-up (model loads) reported apart."""
            t = time.perf_counter()
            result = original_run_job(job, shard_ids, **kw, **(_engine_kw or {}))
            timing.update(engine=time.perf_counter() - t, setup=result.setup_seconds)
            return result

        def run(label: str, dataset: str, engine_kw: dict | None = None, **kw) -> tuple[float, float]:
            """(whole recaption call, its engine part after start-up) in seconds."""
            # the actors' number and size are engine options recaption() does not expose: set them here
            engines.run_job = lambda job, ids, **k: timed_run_job(job, ids, engine_kw, **k)
            try:
                t = time.perf_counter()
                s = recaption(dataset, **opts, **kw)
                sec = time.perf_counter() - t
            finally:
                engines.run_job = original_run_job
            assert s.ok and s.counts["images_captioned"] == args.images, (label, s.counts)
            return sec, timing["engine"] - timing["setup"]

        def fresh(name: str) -> str:
            shutil.copytree(base, work / name)
            return str(work / name)

        run("warm-up", fresh("warm"))  # imports, page cache, torch's first-call costs: untimed
        seconds = {"local": run("local", fresh("local"))}
        want = captions(work / "local")

        import ray

        t = time.perf_counter()
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - t
        ray_rows = {"ray 1x2": dict(num_cpus=cpus, num_actors=1), "ray 2x1": dict(num_cpus=1, num_actors=cpus)}
        bad = []
        for label, engine_kw in ray_rows.items():
            ds = fresh(label.replace(" ", "_"))
            seconds[label] = run(label, ds, engine_kw, engine="ray")
            if captions(Path(ds)) != want:
                bad.append(label)
        ray.shutdown()

        server, _ = start_local_s3()
        bucket = create_bucket("bench")
        fs = storage.path(bucket).fs
        fs.put(str(base) + "/", f"{bucket}/ds", recursive=True)
        seconds["bucket"] = run("bucket", f"{bucket}/ds")
        got = storage.download_tree(f"{bucket}/ds/captions", work / "bucket_out" / "captions")
        if captions(got.parent) != want:
            bad.append("bucket")

        print(f"capcurate engines benchmark, commit {commit()}, {cpus} CPUs, {args.images} images of {args.size} "
              f"in {-(-args.images // args.per_shard)} shards, tiny random BLIP, greedy {args.tokens} tokens, "
              f"batch {args.batch_size}")
        print(f"ray start-up (ray.init, local instance of {cpus} CPUs): {ray_start:.1f} s, not in the rows below")
        print("whole: the recaption call (model loads included); after start-up: the engine's work once its "
              "model(s) are loaded (Ray: once every actor is set up)")
        print(f"{'run':10s} {'whole s':>8s} {'vs local':>9s} {'after start-up s':>17s} {'images/s':>9s} "
              f"{'vs local':>9s}  outputs")
        local_whole, local_steady = seconds["local"]
        for label, (whole, steady) in seconds.items():
            target = " (target >= 0.8x)" if label.startswith("ray") else ""
            same = "differ" if label in bad else "equal"
            print(f"{label:10s} {whole:8.2f} {local_whole / whole:8.2f}x {steady:17.2f} {args.images / steady:9.1f} "
                  f"{local_steady / steady:8.2f}x  {same}{target}")
        return 1 if bad else 0
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
