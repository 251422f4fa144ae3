"""Benchmark: image input per CPU core, and batched nvJPEG on a GPU, against the obvious baselines.

One core, one process, the same photo-like JPEGs: what each path costs to turn a 512x384 JPEG into
the 384x384 tensor a BLIP-large captioner takes (and a 224x224 CLIP tensor with --size 224).

- baseline: PIL decode + the model's own image processor called per image (what a plain loop does,
  and what capcurate did before the shared input pipeline);
- PIL decode alone (a floor for any PIL-based path);
- capcurate's worker path: header check + libjpeg-turbo decode through torchvision + antialiased
  resize of the uint8 tensor (``ImageSpec.resize_crop``), plus the batched normalisation per image;
- with CUDA: ``torchvision.io.decode_jpeg(device="cuda")`` in batches + resize + normalise on the GPU.

    .venv/bin/python benchmarks/inputs.py [--images 300] [--size 512x384] [--target 384]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rate(n: int, fn) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def measure(images: int = 300, size: tuple[int, int] = (512, 384), target: int = 384,
            gpu_batch: int = 256) -> dict[str, float]:
    import torch
    from photo_like import make_jpeg
    from PIL import Image
    from transformers import BlipImageProcessor

    from capcurate.inputs import decode_cpu, decode_jpegs_gpu, from_hf, read_header

    torch.set_num_threads(1)
    datas = [make_jpeg(i, size) for i in range(images)]
    processor = BlipImageProcessor(size={"height": target, "width": target})
    try:  # transformers >= 5 ships the PIL processor separately; it is what older versions ran
        from transformers.models.blip import BlipImageProcessorPil

        pil_processor = BlipImageProcessorPil(size={"height": target, "width": target})
    except ImportError:
        pil_processor = processor
    spec = from_hf(processor)
    out: dict[str, float] = {}

    def baseline(proc):
        def run():
            for d in datas:
                proc(images=Image.open(io.BytesIO(d)).convert("RGB"), return_tensors="pt")
        return run

    def pil_only():
        for d in datas:
            Image.open(io.BytesIO(d)).convert("RGB").load()

    def ours():
        batch = []
        for d in datas:
            batch.append(spec.resize_crop(decode_cpu(d, header=read_header(d))))
            if len(batch) == 64:
                spec.normalize(torch.stack(batch))
                batch = []
        if batch:
            spec.normalize(torch.stack(batch))

    out["pil_plus_pil_processor"] = rate(images, baseline(pil_processor))
    out["pil_plus_default_processor"] = rate(images, baseline(processor))
    out["pil_decode_only"] = rate(images, pil_only)
    out["capcurate_worker_path"] = rate(images, ours)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]

        def gpu():
            for i in range(0, len(tensors), gpu_batch):
                imgs = decode_jpegs_gpu(tensors[i:i + gpu_batch], dev)
                spec.normalize(torch.stack([spec.resize_crop(x) for x in imgs]), torch.bfloat16)
            torch.cuda.synchronize()

        out["gpu_nvjpeg_batch"] = rate(images, gpu)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", default="512x384")
    ap.add_argument("--target", type=int, default=384)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    r = measure(args.images, (w, h), args.target)
    print(f"{args.images} JPEGs {w}x{h} -> {args.target}x{args.target} tensor, one CPU core")
    for k, v in r.items():
        print(f"  {k:28s} {v:9.1f} images/s")
    print(f"ratio capcurate / PIL + PIL processor:     {r['capcurate_worker_path'] / r['pil_plus_pil_processor']:.2f}x")
    print(f"ratio capcurate / PIL + default processor: {r['capcurate_worker_path'] / r['pil_plus_default_processor']:.2f}x")
    if "gpu_nvjpeg_batch" in r:
        print(f"ratio GPU batch / capcurate per core:     {r['gpu_nvjpeg_batch'] / r['capcurate_worker_path']:.1f}x")


if __name__ == "__main__":
    main()
