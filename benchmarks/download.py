"""Benchmark: `capcurate download` vs `img2dataset.download` called directly with identical settings.

Serves N generated images (JPEG/PNG/WebP) on 127.0.0.1, downloads them both ways into fresh folders
and prints images/s of each and their ratio. capcurate's extra work is the header guard in front of
the resizer and the manifest build (img2dataset parquet -> samples/); it should cost under 5%.

    .venv/bin/python benchmarks/download.py [--images 2000] [--processes 1] [--threads 32] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("CAPCURATE_PROGRESS", "0")


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from http_fixtures import add_good_images, serve

    from capcurate.stages.download import download
    from capcurate.stages.download.runner import import_img2dataset, stdout_to_stderr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--samples-per-shard", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the best is reported")
    args = ap.parse_args()

    img2dataset = import_img2dataset()
    work = Path(tempfile.mkdtemp(prefix="capcurate-bench-download-"))
    try:
        with serve() as srv:
            rows = add_good_images(srv, args.images, size=(96, 72))
            urls = work / "urls.parquet"
            pq.write_table(pa.Table.from_pylist(rows), urls)

            def baseline(out: Path) -> None:
                with stdout_to_stderr():
                    img2dataset.download(
                        url_list=str(urls), input_format="parquet", output_folder=str(out),
                        output_format="webdataset", url_col="url", caption_col="caption",
                        image_size=args.image_size, resize_mode="border", processes_count=args.processes,
                        thread_count=args.threads, timeout=10, retries=0, distributor="multiprocessing",
                        number_sample_per_shard=args.samples_per_shard, encode_format="jpg", encode_quality=95,
                        incremental_mode="incremental", compute_hash="sha256", extract_exif=False,
                        enable_wandb=False)

            def ours(out: Path) -> None:
                s = download(urls, out, image_size=args.image_size, resize_mode="border",
                             processes=args.processes, threads=args.threads, timeout=10,
                             samples_per_shard=args.samples_per_shard)
                assert s.counts["ok"] == args.images, s.counts
                ours.manifest_seconds = s.details["manifest_seconds"]

            best = {"img2dataset.download": float("inf"), "capcurate download": float("inf")}
            for r in range(args.repeat):
                for name, fn in (("img2dataset.download", baseline), ("capcurate download", ours)):
                    out = work / f"{name.split()[0]}-{r}"
                    t = time.perf_counter()
                    fn(out)
                    best[name] = min(best[name], time.perf_counter() - t)
                    shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base, cap = best["img2dataset.download"], best["capcurate download"]
    print(f"images: {args.images}, processes: {args.processes}, threads: {args.threads}, "
          f"image size: {args.image_size}, best of {args.repeat}")
    print(f"img2dataset.download : {args.images / base:8.1f} images/s ({base:.2f} s)")
    print(f"capcurate download   : {args.images / cap:8.1f} images/s ({cap:.2f} s, "
          f"manifest build {ours.manifest_seconds:.3f} s = {100 * ours.manifest_seconds / cap:.1f}%)")
    print(f"ratio capcurate/img2dataset images/s: {base / cap:.3f}  (overhead {100 * (cap / base - 1):+.1f}%)")


if __name__ == "__main__":
    main()
