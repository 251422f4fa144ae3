"""Benchmark: ``capcurate score`` images/s against a plain per-batch loop that decodes in the main process.

Both use the same tiny random open_clip CLIP, the same JPEGs (web-like sizes) and the same batch size;
both embed every image and its raw caption and compute the cosine. capcurate decodes (libjpeg-turbo
through torchvision) and resizes uint8 tensors in workers of one loader across all shards while the
model runs (torch keeps the remaining cores), normalises whole batches, and embeds each distinct
caption once. The --decode draft line lets libjpeg scale large JPEGs down while decoding (opt-in:
scores move by ~1e-3).

    .venv/bin/python benchmarks/score.py [--images 768] [--size 640x480] [--workers auto]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from photo_like import make_jpeg

os.environ.setdefault("CAPCURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build(root: Path, n: int, size: tuple[int, int], per_shard: int) -> Path:
    import pyarrow as pa

    from capcurate import atomic
    from capcurate.dataset import Dataset, samples_schema
    from capcurate.shards import TarShardWriter

    ds = Dataset.create(root / "ds")
    words = ["red", "blue", "cube", "ball", "dog", "on", "a", "table", "photo", "of", "the", "small", "big"]
    rnd = random.Random(0)
    jpegs = [make_jpeg(i, size) for i in range(64)]  # decoding cost does not depend on reuse
    for s in range(0, n, per_shard):
        sid = f"{s // per_shard:05d}"
        rows = []
        with TarShardWriter(ds.shard_path(sid)) as w:
            for i in range(s, min(n, s + per_shard)):
                key = f"{i:09d}"
                cap = " ".join(rnd.choice(words) for _ in range(rnd.randint(3, 12)))
                w.write(key, {"jpg": jpegs[i % len(jpegs)], "txt": cap.encode()})
                rows.append({"uid": f"{i:032x}", "key": key, "shard": sid, "url": f"http://x/{i}", "caption": cap,
                             "status": "success", "error_message": None, "width": size[0], "height": size[1],
                             "original_width": size[0], "original_height": size[1], "sha256": None})
        atomic.write_parquet(ds.samples_path(sid), pa.Table.from_pylist(rows, schema=samples_schema()))
    cfg = root / "bench-tiny-clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    import open_clip
    import torch

    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    weights = root / "bench-tiny-clip.pt"
    torch.save({"state_dict": open_clip.create_model(cfg.stem).state_dict()}, weights)
    return ds.root, cfg, weights


def plain_loop(ds_root: Path, cfg: Path, weights: Path, batch_size: int) -> int:
    """The obvious baseline: read, decode and preprocess each batch in this process, then embed it."""
    import torch
    from PIL import Image

    from capcurate.dataset import Dataset
    from capcurate.models.scorers import load_scorer
    from capcurate.shards import index_tar

    scorer = load_scorer(f"openclip:{cfg}", pretrained=str(weights))
    ds = Dataset(ds_root)
    n = 0
    for sid in ds.shard_ids():
        rows = ds.query(f"SELECT key, caption FROM manifest WHERE shard = '{sid}' ORDER BY key").to_pylist()
        idx = index_tar(ds.shard_path(sid))
        with open(idx.path, "rb") as fh:
            for b in range(0, len(rows), batch_size):
                batch = rows[b:b + batch_size]
                pixels = torch.stack([scorer.preprocess(Image.open(io.BytesIO(idx.read(r["key"], "jpg", fh)))
                                                        .convert("RGB")) for r in batch])
                img = scorer.encode_images(pixels)
                txt = scorer.encode_texts([r["caption"] for r in batch])
                (img * txt).sum(-1).tolist()
                n += len(batch)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="auto")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from capcurate.stages.score import score

    tmp = Path(tempfile.mkdtemp(prefix="capcurate-bench-score-"))
    try:
        ds_root, cfg, weights = build(tmp, args.images, size, args.per_shard)
        plain_loop(ds_root, cfg, weights, args.batch_size)  # warm the page cache and imports for both
        t = time.perf_counter()
        n = plain_loop(ds_root, cfg, weights, args.batch_size)
        base = time.perf_counter() - t
        t = time.perf_counter()
        s = score(ds_root, f"openclip:{cfg}", "bench", pretrained=str(weights), batch_size=args.batch_size,
                  workers=args.workers)
        ours = time.perf_counter() - t
        assert s.ok and s.counts["images_scored"] == n, s.counts
        t = time.perf_counter()
        score(ds_root, f"openclip:{cfg}", "draft", pretrained=str(weights), batch_size=args.batch_size,
              workers=args.workers, decode="draft")
        draft = time.perf_counter() - t
        print(f"images: {n} of {size[0]}x{size[1]} JPEG, batch {args.batch_size}, cpu cores: {os.cpu_count()}")
        print(f"plain loop (decode in main process): {n / base:8.1f} images/s  ({base:.2f} s)")
        print(f"capcurate score ({args.workers} workers):     {n / ours:8.1f} images/s  ({ours:.2f} s, incl. model load)")
        print(f"capcurate score --decode draft:   {n / draft:8.1f} images/s  ({draft:.2f} s)")
        print(f"ratio capcurate/plain: {base / ours:.2f}x   (with --decode draft: {base / draft:.2f}x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
