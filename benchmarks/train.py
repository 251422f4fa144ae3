"""Training throughput: `capcurate train` vs open_clip's own trainer (`open_clip_train.main`), one run.

Both train the same model on the same webdataset shards with the same batch size, precision, workers,
epochs and checkpointing at each epoch end, one after the other in this run. Two figures per side:

- whole command: samples / wall-clock seconds of the whole command (start-up, data loading and the
  checkpoint writing count);
- steady state: the median of the samples/s each trainer logs every ``--log-every`` steps, first
  window left out (what a long run sees).

open_clip_train has no flag for a custom JSON config, so with the default tiny config its run registers
it with ``open_clip.add_model_config`` and then calls ``open_clip_train.main.main`` with the command line
``python -m open_clip_train.main`` would take. On the CPU (the default here) both run fp32: open_clip_train's
default ``amp`` there is bf16 autocast, about 10x slower.

    .venv/bin/python benchmarks/train.py                      # tiny ViT, 2048 96x96 JPEGs, CPU, fp32
    .venv/bin/python benchmarks/train.py --device cuda --precision bf16 --workers 12 --model ViT-B-32 \\
        --batch-size 512 --samples 65536 --image-size 256 --epochs 1   # the GPU comparison

``compare(...)`` returns the numbers as a dict (the old benchmarks/gpu.py imported it).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
COLOURS = ["red", "green", "blue", "yellow", "purple", "white", "black", "orange"]


def _write_shard(job: tuple[str, int, int, int]) -> None:
    import random

    from PIL import Image, ImageDraw

    from capcurate.shards import TarShardWriter

    path, first, count, size = job
    rng = random.Random(first)
    with TarShardWriter(Path(path)) as w:
        for j in range(count):
            c = rng.choice(COLOURS)
            img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
            d = ImageDraw.Draw(img)
            d.ellipse([size // 5, size // 5, size * 3 // 4, size * 3 // 4], fill=c)
            for _ in range(8):  # some texture, so JPEGs are of a realistic size
                x, y = rng.randrange(size), rng.randrange(size)
                d.line([x, y, rng.randrange(size), rng.randrange(size)],
                       fill=tuple(rng.randrange(256) for _ in range(3)), width=3)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            w.write(f"{first + j:09d}", {"jpg": buf.getvalue(), "txt": f"a {c} circle".encode()})


def write_shards(folder: Path, samples: int, per_shard: int, image_size: int = 96) -> str:
    """``samples`` JPEG + caption pairs in shards of ``per_shard``; returns the brace pattern."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (samples + per_shard - 1) // per_shard
    jobs = [(str(folder / f"{s:05d}.tar"), s * per_shard, min(per_shard, samples - s * per_shard), image_size)
            for s in range(n_shards)]
    with ProcessPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as ex:
        list(ex.map(_write_shard, jobs))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar")


def timed(cmd: list[str], env: dict[str, str], log: Path | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if log is not None:
        log.write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return dt


def _steady(rates: list[float]) -> float | None:
    rates = rates[1:] if len(rates) > 1 else rates  # the first window holds the warm-up
    return statistics.median(rates) if rates else None


def ours_steady(run: Path) -> float | None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return _steady([r["samples_per_s"] for r in rows if "samples_per_s" in r])


def theirs_steady(logs: Path) -> float | None:
    text = "\n".join(p.read_text(errors="replace") for p in logs.rglob("out.log"))
    return _steady([float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.eE+]+)/s", text)])


def compare(*, samples: int = 2048, per_shard: int = 256, batch_size: int = 64, epochs: int = 2,
            workers: int = 2, precision: str = "fp32", device: str | None = None, model: str | None = None,
            image_size: int = 96, decode: str | None = None, log_every: int = 10, theirs: bool = True,
            tmp: Path | None = None, pattern: str | None = None) -> dict[str, Any]:
    """Run both trainers (or only ours) at the same settings; samples/s and ratios as a dict.

    ``pattern``: shards written by an earlier call (its ``out["shards"]``) instead of new ones.
    """
    tmp = Path(tmp or tempfile.mkdtemp(prefix="capcurate-bench-train-"))
    pattern = pattern or write_shards(tmp / "shards", samples, per_shard, image_size)
    env = {**os.environ, "CAPCURATE_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if model is None:
        cfg = tmp / "bench_vit.json"
        cfg.write_text(json.dumps(MODEL))
        ours_model, their_model, register = ["--model-config", str(cfg)], cfg.stem, str(cfg)
    else:
        ours_model, their_model, register = ["--model", model], model, ""
    b, e, w = str(batch_size), str(epochs), str(workers)
    ours = [sys.executable, "-m", "capcurate", "train", pattern, "-o", str(tmp / "ours"), *ours_model,
            "--batch-size", b, "--epochs", e, "--workers", w, "--precision", precision,
            "--train-num-samples", str(samples), "--lr", "5e-4", "--warmup", "10", "--log-every", str(log_every),
            "--shuffle-buffer", "1000", "--overwrite"]
    if device:
        ours += ["--device", device]
    if decode:
        ours += ["--decode", decode]
    amp = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[precision]
    theirs_args = ["--train-data", pattern, "--train-num-samples", str(samples), "--dataset-type", "webdataset",
                   "--model", their_model, "--batch-size", b, "--epochs", e, "--workers", w, "--precision", amp,
                   "--lr", "5e-4", "--warmup", "10", "--logs", str(tmp / "theirs"), "--name", "bench",
                   "--report-to", "", "--log-every-n-steps", str(log_every), "--save-frequency", "1", "--seed", "0"]
    their_cmd = [sys.executable, "-c",
                 "import sys, open_clip\nif sys.argv[1]: open_clip.add_model_config(sys.argv[1])\n"
                 "from open_clip_train.main import main; main(sys.argv[2:])", register, *theirs_args]

    # warm the page cache and the import caches once so neither side pays for the first read
    timed([sys.executable, "-c", "import open_clip, capcurate.train.trainer"], env)
    out: dict[str, Any] = {"samples": samples, "epochs": epochs, "batch_size": batch_size, "workers": workers,
                           "precision": precision, "device": device or "auto", "model": model or MODEL,
                           "image_size": image_size, "decode": decode or "auto"}
    n = samples * epochs
    if theirs:
        t = timed(their_cmd, env, tmp / "theirs.log")
        out["open_clip_train"] = {"seconds": t, "samples_per_s": n / t, "steady_samples_per_s": theirs_steady(tmp / "theirs")}
    t = timed(ours, env, tmp / "ours.log")
    summary = json.loads((tmp / "ours" / "summary.json").read_text())
    run = json.loads((tmp / "ours" / "run.json").read_text())
    seen = summary["counts"]["samples_seen"]
    out["capcurate"] = {"seconds": t, "samples_per_s": seen / t, "samples": seen,
                        "steady_samples_per_s": ours_steady(tmp / "ours"), "image_path": run.get("image_path"),
                        "resolved": {k: run["config"][k] for k in ("device", "precision", "workers", "decode")
                                     if k in run["config"]}}
    if theirs:
        a, c = out["capcurate"], out["open_clip_train"]
        out["ratio"] = a["samples_per_s"] / c["samples_per_s"]
        if a["steady_samples_per_s"] and c["steady_samples_per_s"]:
            out["steady_ratio"] = a["steady_samples_per_s"] / c["steady_samples_per_s"]
    out["tmp"], out["shards"] = str(tmp), pattern
    return out


def report(r: dict[str, Any]) -> str:
    def fmt(x: float | None) -> str:
        return f"{x:8.1f}" if x else "     n/a"

    lines = [f"{r['samples']} samples x {r['epochs']} epochs, {r['image_size']}px JPEGs, model {r['model']}, "
             f"batch {r['batch_size']}, workers {r['workers']}, precision {r['precision']}, device {r['device']}, "
             f"decode {r['decode']}"]
    c = r.get("open_clip_train")
    if c:
        lines.append(f"open_clip_train.main: {c['seconds']:7.1f} s  {fmt(c['samples_per_s'])} samples/s whole command, "
                     f"{fmt(c['steady_samples_per_s'])} steady")
    a = r["capcurate"]
    lines.append(f"capcurate train:      {a['seconds']:7.1f} s  {fmt(a['samples_per_s'])} samples/s whole command, "
                 f"{fmt(a['steady_samples_per_s'])} steady  (images: {a['image_path']}, {a['resolved']})")
    if "ratio" in r:
        lines.append(f"ratio capcurate / open_clip_train (samples/s): {r['ratio']:.2f} whole command"
                     + (f", {r['steady_ratio']:.2f} steady" if "steady_ratio" in r else ""))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--model", default=None, help="an open_clip architecture, e.g. ViT-B-32 (default: a tiny ViT)")
    ap.add_argument("--image-size", type=int, default=96, help="side of the generated JPEGs")
    ap.add_argument("--decode", default=None, choices=["auto", "cpu", "gpu"], help="capcurate's --decode")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--only-ours", action="store_true", help="skip open_clip_train")
    ap.add_argument("--json", action="store_true", help="print the result as JSON too")
    args = ap.parse_args()
    r = compare(samples=args.samples, per_shard=args.per_shard, batch_size=args.batch_size, epochs=args.epochs,
                workers=args.workers, precision=args.precision, device=args.device, model=args.model,
                image_size=args.image_size, decode=args.decode, log_every=args.log_every, theirs=not args.only_ours)
    print(report(r))
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
