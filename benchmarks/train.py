"""Training throughput: `capcurate train` vs open_clip's own trainer (`open_clip_train.main`), one run.

Both train the same model config on the same webdataset shards with the same batch size, precision
(fp32: on CPU open_clip_train's default `amp` is bf16 autocast, about 10x slower), workers, epochs and
checkpointing at each epoch end. Throughput is samples / wall-clock seconds of the whole command, so
start-up, data loading and checkpoint writing count for both. open_clip_train has no flag for a custom
JSON config, so its run registers the config with ``open_clip.add_model_config`` and then calls
``open_clip_train.main.main`` with the same command line ``python -m open_clip_train.main`` would take.

    .venv/bin/python benchmarks/train.py [--samples 2048] [--batch-size 64] [--epochs 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}


def write_shards(folder: Path, samples: int, per_shard: int) -> str:
    import random

    from PIL import Image, ImageDraw

    from capcurate.shards import TarShardWriter

    rng = random.Random(0)
    colours = ["red", "green", "blue", "yellow", "purple", "white", "black", "orange"]
    n_shards = (samples + per_shard - 1) // per_shard
    for s in range(n_shards):
        with TarShardWriter(folder / f"{s:05d}.tar") as w:
            for j in range(min(per_shard, samples - s * per_shard)):
                c = rng.choice(colours)
                img = Image.new("RGB", (96, 96), tuple(rng.randrange(256) for _ in range(3)))
                ImageDraw.Draw(img).ellipse([20, 20, 70, 70], fill=c)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                w.write(f"{s:05d}{j:04d}", {"jpg": buf.getvalue(), "txt": f"a {c} circle".encode()})
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capcurate-bench-train-"))
    (tmp / "shards").mkdir()
    pattern = write_shards(tmp / "shards", args.samples, args.per_shard)
    cfg = tmp / "bench_vit.json"
    cfg.write_text(json.dumps(MODEL))
    env = {**os.environ, "CAPCURATE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    common = dict(batch=str(args.batch_size), epochs=str(args.epochs), workers=str(args.workers))

    ours = [sys.executable, "-m", "capcurate", "train", pattern, "-o", str(tmp / "ours"), "--model-config", str(cfg),
            "--batch-size", common["batch"], "--epochs", common["epochs"], "--workers", common["workers"],
            "--precision", args.precision, "--train-num-samples", str(args.samples), "--lr", "5e-4",
            "--warmup", "10", "--log-every", "10", "--shuffle-buffer", "1000"]
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[args.precision]
    theirs_args = ["--train-data", pattern, "--train-num-samples", str(args.samples), "--dataset-type", "webdataset",
                   "--model", cfg.stem, "--batch-size", common["batch"], "--epochs", common["epochs"],
                   "--workers", common["workers"], "--precision", precision, "--lr", "5e-4", "--warmup", "10",
                   "--logs", str(tmp / "theirs"), "--name", "bench", "--report-to", "", "--log-every-n-steps", "10",
                   "--save-frequency", "1", "--seed", "0"]
    theirs = [sys.executable, "-c",
              "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
              "from open_clip_train.main import main; main(sys.argv[2:])", str(cfg), *theirs_args]

    # warm the page cache and the import caches once so neither side pays for the first read
    timed([sys.executable, "-c", "import open_clip, capcurate.train.trainer"], env)
    t_theirs = timed(theirs, env)
    t_ours = timed(ours, env)
    seen = json.loads((tmp / "ours" / "summary.json").read_text())["counts"]["samples_seen"]
    n = args.samples * args.epochs
    print(f"shards: {pattern} ({args.samples} samples), model {MODEL['vision_cfg']}, batch {args.batch_size}, "
          f"epochs {args.epochs}, workers {args.workers}, precision {args.precision}")
    print(f"open_clip_train.main: {t_theirs:7.1f} s  {n / t_theirs:8.1f} samples/s")
    print(f"capcurate train:      {t_ours:7.1f} s  {seen / t_ours:8.1f} samples/s  ({seen} samples)")
    print(f"ratio capcurate / open_clip_train (samples/s): {(seen / t_ours) / (n / t_theirs):.2f}")


if __name__ == "__main__":
    main()
