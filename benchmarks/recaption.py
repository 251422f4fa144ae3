"""Benchmark: ``capcurate recaption`` images/s against the two obvious baselines, on the same images and model.

1. transformers' pipeline called once per image (``image-text-to-text``: transformers 5 folded the old
   ``image-to-text`` task into it), the way a newcomer would caption a folder;
2. a plain batched loop: read and decode images in the main process, run the processor on the batch,
   ``model.generate``; no worker decoding.

All three use a tiny random BLIP (the same class as Salesforce/blip-*; pass ``--model hf:<dir>`` for a
real one where weights are available), greedy decoding with exactly ``--tokens`` new tokens per caption
so every path does the same generation work, and the same web-like JPEGs stored in dataset shards.

    .venv/bin/python benchmarks/recaption.py [--images 256] [--size 512x384] [--batch-size 32] [--workers auto]

``--vlm qwen2_vl`` (or llava, idefics3, paligemma, florence2) measures the chat-template VLM path instead:
capcurate recaption (decoded images batched, the processor building each batch's chat-templated inputs
with left padding, one ``generate`` per batch) against a per-image loop with the same tiny random VLM
(processor + chat template + ``generate`` for one image at a time, as the model cards show).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from photo_like import make_jpeg

os.environ.setdefault("CAPCURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build(root: Path, n: int, size: tuple[int, int], per_shard: int) -> Path:
    from conftest import build_dataset

    samples = [{"caption": f"image {i}", "image": make_jpeg(i, size)} for i in range(n)]
    return build_dataset(root / "ds", samples, per_shard=per_shard)


def shard_images(ds: Path) -> list[tuple[str, bytes]]:
    out = []
    for tar in sorted((ds / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".jpg"):
                    out.append((m.name, tf.extractfile(m).read()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", default="512x384")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--model", default=None, help="hf:<dir> of a captioner; default: a tiny random BLIP")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--vlm", default=None, help="measure the VLM path with this tiny random family instead")
    ap.add_argument("--pipeline-images", type=int, default=64,
                    help="images for the per-image pipeline baseline (it is slow; images/s is what counts)")
    args = ap.parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    if args.vlm:
        return bench_vlm(args, (w, h))

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline


    tmp = Path(tempfile.mkdtemp(prefix="capcurate-bench-recaption-"))
    try:
        if args.model is None:
            from captioner_fixtures import build_tiny_blip

            ref = build_tiny_blip(tmp)
        else:
            ref = args.model
        directory = ref[len("hf:"):]
        ds = build(tmp, args.images, (w, h), per_shard=max(args.batch_size * 2, 64))
        gen = dict(do_sample=False, num_beams=1, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        print(f"{args.images} JPEGs {w}x{h}, model {ref}, greedy {args.tokens} tokens, device {args.device}, "
              f"torch threads {torch.get_num_threads()}")

        ours = capcurate_rate(ds, ref, args)
        model = AutoModelForImageTextToText.from_pretrained(directory).to(args.device).eval()
        processor = AutoProcessor.from_pretrained(directory)

        images = shard_images(ds)
        # plain batched loop, decoding in the main process
        t0 = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            batch = [Image.open(io.BytesIO(b)).convert("RGB") for _, b in images[i:i + args.batch_size]]
            px = processor(images=batch, return_tensors="pt")["pixel_values"].to(args.device)
            with torch.no_grad():
                out = model.generate(pixel_values=px, **gen)
            processor.batch_decode(out, skip_special_tokens=True)
        batched = len(images) / (time.perf_counter() - t0)

        # per-image pipeline
        pipe = pipeline("image-text-to-text", model=model, processor=processor, device=args.device)
        few = images[:args.pipeline_images]
        t0 = time.perf_counter()
        for _, b in few:
            pipe(images=Image.open(io.BytesIO(b)).convert("RGB"), text="", generate_kwargs=gen)
        per_image = len(few) / (time.perf_counter() - t0)

        print(f"capcurate recaption      : {ours:8.1f} images/s (batch {args.batch_size}, "
              f"{args.workers} decode workers; model load included)")
        print(f"plain batched loop       : {batched:8.1f} images/s (decode in main process)")
        print(f"pipeline, one per image  : {per_image:8.1f} images/s")
        print(f"ratio vs per-image pipeline: {ours / per_image:.2f}x")
        print(f"ratio vs plain batched loop: {ours / batched:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def capcurate_rate(ds: Path, ref: str, args: argparse.Namespace) -> float:
    """capcurate recaption images/s, timed end to end: model load and card writes included (the
    baselines get theirs free); greedy, exactly ``--tokens`` new tokens per caption."""
    from capcurate.stages.recaption import recaption

    t0 = time.perf_counter()
    s = recaption(ds, model=ref, name="bench", decoding="greedy", max_new_tokens=args.tokens,
                  min_new_tokens=args.tokens, batch_size=args.batch_size, workers=args.workers,
                  device=args.device)
    ours = args.images / (time.perf_counter() - t0)
    assert s.counts["images_captioned"] == args.images, s.counts
    return ours


def bench_vlm(args: argparse.Namespace, size: tuple[int, int]) -> None:
    import torch
    from captioner_fixtures import VLM_BUILDERS
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capcurate.models.captioners import DEFAULT_INSTRUCTIONS

    tmp = Path(tempfile.mkdtemp(prefix="capcurate-bench-vlm-"))
    try:
        ref = VLM_BUILDERS[args.vlm](tmp)
        directory = ref[len("hf:"):]
        ds = build(tmp, args.images, size, per_shard=max(args.batch_size * 2, 64))
        print(f"{args.images} JPEGs {size[0]}x{size[1]}, tiny random {args.vlm}, greedy {args.tokens} tokens, "
              f"device {args.device}, torch threads {torch.get_num_threads()}")
        ours = capcurate_rate(ds, ref, args)

        model = AutoModelForImageTextToText.from_pretrained(directory).to(args.device).eval()
        processor = AutoProcessor.from_pretrained(directory)
        prompt = DEFAULT_INSTRUCTIONS["short"]
        text = prompt
        if processor.chat_template:
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True, tokenize=False)
        gen = dict(do_sample=False, num_beams=1, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
        few = shard_images(ds)[:args.pipeline_images]
        t0 = time.perf_counter()
        for _, b in few:
            img = Image.open(io.BytesIO(b)).convert("RGB")
            inputs = processor(images=[[img]] if args.vlm == "idefics3" else [img], text=[text],
                               return_tensors="pt").to(args.device)
            inputs.pop("labels", None)
            with torch.no_grad():
                out = model.generate(**inputs, **gen)
            processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        per_image = len(few) / (time.perf_counter() - t0)
        print(f"capcurate recaption (VLM)  : {ours:8.1f} images/s (batch {args.batch_size}, "
              f"{args.workers} decode workers; model load included)")
        print(f"per-image generate loop    : {per_image:8.1f} images/s")
        print(f"ratio vs per-image loop: {ours / per_image:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
