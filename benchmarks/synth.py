"""Benchmark ``capcurate synth``: images per second with worker processes vs the one-process baseline.

    python benchmarks/synth.py [--n-images 4000] [--workers 2]

Both runs write the same world (the outputs are compared byte for byte), so the ratio is the speedup
the process pool buys on this machine. Prints one line per run and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

from capcurate.stages.synth import synth


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.parent.name != "models":  # model configs name the folder by absolute path
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=4000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--image-size", type=int, default=64)
    args = ap.parse_args()
    total = args.n_images + 200 + 200
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers in (("1 process (baseline)", 1), (f"{args.workers} processes", args.workers)):
            out = Path(tmp) / f"w{workers}"
            t0 = time.perf_counter()
            synth(out, n_images=args.n_images, seed_size=200, eval_size=200, image_size=args.image_size,
                  workers=workers)
            dt = time.perf_counter() - t0
            results[workers] = (dt, digest(out))
            print(f"{label:>22}: {total} images in {dt:6.2f} s = {total / dt:7.0f} images/s")
    (base, d1), (fast, d2) = results[1], results[args.workers]
    print(f"identical outputs: {d1 == d2}")
    print(f"speedup of {args.workers} processes over 1: {base / fast:.2f}x")
    print(f"projected time for 20,000 + 3,000 images: {23000 / (total / fast):.1f} s")


if __name__ == "__main__":
    main()
