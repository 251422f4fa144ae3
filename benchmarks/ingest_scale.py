"""Benchmark: ingest 10, 100 and 1,000 small webdataset shards; time per shard should stay flat.

Each tar holds a few tiny JPEG samples whose json names a uid; one sample in four repeats a uid of an
earlier tar, so the cross-shard uid check does real work. Runs ingest twice per size: one process over
all shards (the common case) and ``--part 1/2`` alone (a part must read the uids of the shards the other
part writes, so its input reads are the costly path). Prints seconds per shard, and how much of it
``IngestJob.uids_before`` took (reading earlier shards' uids; the old code also rebuilt its set there, the
new code's per-row index lookups happen while the shard is written and are in ms/shard only), with the commit.

    .venv/bin/python benchmarks/ingest_scale.py [--sizes 10,100,1000] [--per-shard 8]

The old code rebuilt a Python set of every earlier shard's uids for each shard (quadratic in shards);
the on-disk index (capcurate/uid_index.py) adds each shard's uids once and answers each uid with one
lookup, so the per-shard time should not grow with the number of shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CAPCURATE_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).parent))

from photo_like import make_jpeg  # noqa: E402
from provenance import commit  # noqa: E402

from capcurate.stages.ingest import IngestJob, ingest  # noqa: E402


def write_shards(src: Path, n: int, per_shard: int) -> None:
    src.mkdir(parents=True)
    img = make_jpeg(0, (32, 24))
    for t in range(n):
        with tarfile.open(src / f"{t:05d}.tar", "w") as tf:
            for r in range(per_shard):
                # every fourth sample repeats a uid of an earlier tar
                uid = f"u{t - 1:05d}-{r - 1}" if t and r % 4 == 3 else f"u{t:05d}-{r}"
                for ext, data in (("jpg", img), ("json", json.dumps({"uid": uid}).encode())):
                    info = tarfile.TarInfo(f"s{r:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def timed_uid_check() -> tuple[list[float], object]:
    """Wrap IngestJob.uids_before so its share of the time is measured."""
    spent: list[float] = []
    original = IngestJob.uids_before

    def wrapper(self, shard_id):
        t = time.perf_counter()
        try:
            return original(self, shard_id)
        finally:
            spent.append(time.perf_counter() - t)

    IngestJob.uids_before = wrapper
    return spent, original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,100,1000")
    ap.add_argument("--per-shard", type=int, default=8)
    args = ap.parse_args()
    print(f"commit {commit()}, {os.cpu_count()} CPUs, {args.per_shard} samples per shard")
    print(f"{'shards':>7} {'run':>9} {'seconds':>8} {'ms/shard':>9} {'uids_before ms':>15} {'duplicates':>11}")
    spent, _ = timed_uid_check()
    for n in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "wds"
            write_shards(src, n, args.per_shard)
            for label, part in (("whole", None), ("part 1/2", "1/2")):
                spent.clear()
                t = time.perf_counter()
                s = ingest(src, Path(tmp) / f"ds-{label[:4]}", part=part)
                sec = time.perf_counter() - t
                done = s.counts["shards_processed"]
                assert s.ok and done == (n if part is None else n // 2), s.counts
                want = (n - 1) * (args.per_shard // 4) if part is None else None
                assert want is None or s.counts["duplicate_uids"] == want, s.counts
                print(f"{n:>7} {label:>9} {sec:>8.2f} {1000 * sec / done:>9.1f} "
                      f"{1000 * sum(spent) / done:>15.2f} {s.counts['duplicate_uids']:>11}")


if __name__ == "__main__":
    main()
