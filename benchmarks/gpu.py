"""GPU benchmark: every GPU stage of capcurate against the model alone and against the card's FLOP bound.

One command, under 5 minutes on one H100/H200 (16 cores), random weights of the real shapes, no network:

    python3 benchmarks/gpu.py [--json-out gpu.json] [--only recaption,score,train,input] [--budget 290]
    python3 benchmarks/gpu.py --smoke      # tiny models, 64 images, CPU: checks the script end to end

Stages (each in its own try/except and time limit, so one failure still prints the others):

recaption  BLIP-large shape (ViT-L/16 at 384 px + BERT-base decoder, vocab 30,524) on 4,096 photo-like
           512x384 JPEGs: ``capcurate.recaption`` with its defaults except greedy decoding of exactly 20
           new tokens; vs ``model.generate`` on ready bf16 CUDA tensors at the batch capcurate chose and
           at 512; and the vision tower alone.
score      ViT-L-14 (``openclip:ViT-L-14 --pretrained random``: random weights) on the same JPEGs:
           ``capcurate.score`` with its defaults (and, when the default device is not CUDA, once more
           with ``device='cuda', precision='bf16'``); vs the image tower alone, bf16, batch 512.
train      ViT-B-32, batch 512, bf16, 12 workers, one epoch over 65,536 256x256 JPEGs in webdataset
           shards: ``capcurate.train`` vs ``open_clip_train.main`` with the same settings, and the
           train step alone (bf16 autocast, AdamW) on ready tensors.
input      decode + preprocess a 512x384 JPEG into a 384 px BLIP tensor on one CPU core (PIL + the
           BLIP image processors, capcurate's worker path), and torchvision.io.decode_jpeg on the GPU.
vlm        (opt-in: ``--only vlm`` or add it to the list; with the four above it would pass the 290 s
           budget) a random Qwen2-VL-2B-shaped model (ViT 32 x 1280 -> 28-layer 1536-wide decoder, vocab
           151,936) on 1,024 of the same JPEGs: ``capcurate.recaption`` with its defaults except greedy
           decoding of exactly 20 new tokens and ``max_pixels=448*448`` (~256 image tokens per image);
           images/s and generated tokens/s, vs ``model.generate`` on the processor's inputs for one ready
           batch of the same size.

How the numbers are taken:

- capcurate runs in a child process (a fresh interpreter, as a user's command would), with the
  defaults of the Python API (``capcurate.recaption(ds, model=..., name=...)``). A tiny hook on
  ``capcurate.inputs.ImageStream.__iter__`` (the older ``capcurate.imageloader.iter_image_batches``
  where that is what the stage uses) logs a timestamp each time the stage takes its next batch. **steady** images/s = images of batches 2..k / (end of batch k - start of batch 2): start-up,
  model load, the batch-size search and the first batch are left out. **e2e** images/s = images /
  wall-clock seconds of the whole child process (interpreter start, imports, model build, everything).
- train: **steady** samples/s from each trainer's own per-step log (capcurate ``metrics.jsonl``
  ``samples_per_s``, open_clip_train's ``Batch (t)``), steps after the first 10; **e2e** = samples /
  wall-clock of the whole command (start-up, worker spawn, checkpoint writing included).
- model alone: warm-up call(s), then timed calls with ``torch.cuda.synchronize()`` at the end.
- FLOP bound: a bf16 8192x8192x8192 ``torch.matmul`` measured in the same run (TFLOP/s = 2*n^3/t).
  FLOPs per image/sample are counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
  convolutions and attention; 2 FLOPs per multiply-add) on one image's real call (``generate`` of 20
  tokens, ``encode_image``, forward+backward), and stated next to an analytic count of the same.
  % of bound = images/s x FLOPs/image / bound.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO / "tests"), str(REPO), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

for _k, _v in {"CAPCURATE_PROGRESS": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "NO_ALBUMENTATIONS_UPDATE": "1"}.items():
    os.environ.setdefault(_k, _v)

from photo_like import make_jpeg  # noqa: E402  (benchmarks/photo_like.py)

BERT_VOCAB = 30524  # Salesforce/blip-image-captioning-large: bert-base-uncased + [DEC] + [ENC]
TOKENS = 20         # greedy, exactly this many new tokens per caption


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class Cfg:
    smoke: bool
    device: str
    images: int = 4096
    score_images: int = 16384       # score runs fast: more images (the JPEGs cycled) for a steadier window
    image_size: tuple[int, int] = (512, 384)
    per_shard: int = 1024
    blip: str = "large"
    clip_ref: str = "openclip:ViT-L-14"
    clip_arch: str = "ViT-L-14"
    tower_batch: int = 512
    gen_batch: int = 512
    train_model: str = "ViT-B-32"
    train_samples: int = 65536
    train_unique: int = 8192        # distinct JPEGs, cycled (decode cost does not depend on reuse)
    train_size: int = 256
    train_per_shard: int = 512
    train_batch: int = 512
    train_workers: int = 12
    train_precision: str = "bf16"
    train_skip_steps: int = 10
    matmul_n: int = 8192
    input_images: int = 256         # per-core decode + preprocess loop
    gpu_decode_batch: int = 256
    vlm: str = "qwen2-vl-2b"
    vlm_images: int = 1024
    vlm_batch: int = 64
    score_variants: bool = False    # --score-variants: also decode=cpu and batch 512, same run
    vlm_compile: bool = False       # --vlm-compile: the VLM row also with --compile (static KV cache)
    vlm_plain: bool = True          # --vlm-compile-only: skip the plain VLM run (measured before)


def make_cfg(smoke: bool) -> Cfg:
    if not smoke:
        return Cfg(smoke=False, device="cuda")
    return Cfg(smoke=True, device="cpu", images=192, per_shard=64, blip="tiny", clip_ref="", clip_arch="",
               score_images=192, tower_batch=16, gen_batch=16, train_model="", train_samples=256, train_unique=64,
               train_size=96, train_per_shard=64, train_batch=32, train_workers=2, train_precision="fp32",
               train_skip_steps=2, matmul_n=512, input_images=32, gpu_decode_batch=16, vlm="tiny",
               vlm_images=32, vlm_batch=8)


# -- small helpers ---------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rate(fn, per_call: int, device: str, *, warmup: int = 1, min_iters: int = 2, target_s: float = 3.0,
         max_iters: int = 50) -> dict[str, float]:
    """Calls ``fn`` (warm-up first) until ``target_s`` seconds or ``max_iters``; items/s."""
    for _ in range(warmup):
        fn()
    sync(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        fn()
        iters += 1
        if iters >= min_iters:
            sync(device)
            el = time.perf_counter() - t0
            if el >= target_s or iters >= max_iters:
                break
    return {"per_s": iters * per_call / el, "seconds": el, "iters": iters, "batch": per_call}


def count_flops(fn) -> float | None:
    """FLOPs of ``fn()`` by FlopCounterMode. Run with autograd on: without it nn.MultiheadAttention takes
    its fused fast path (open_clip's ViTs), whose projections the counter does not see (-36% on ViT-L-14)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), FlopCounterMode(display=False) as fc:
        fn()
    total = fc.get_total_flops()
    return float(total) if total else None


def vit_flops(tokens: int, width: int, layers: int, mlp: int, patch_in: int = 0, patches: int = 0) -> float:
    """Matmul FLOPs of a ViT/transformer encoder forward: 2 per MAC; attention scores and mixing included."""
    per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
    return layers * per_layer + 2 * patches * patch_in * width


def blip_generate_flops(v: dict, t: dict, new_tokens: int) -> dict[str, float]:
    """Analytic FLOPs of one BLIP caption: ViT encoder + BERT decoder with KV cache (cross K/V once)."""
    n_img = (v["image_size"] // v["patch_size"]) ** 2 + 1
    vision = vit_flops(n_img, v["hidden_size"], v["num_hidden_layers"], v["intermediate_size"],
                       3 * v["patch_size"] ** 2, n_img - 1)
    h, m, L, V = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    enc = v["hidden_size"]
    cross_kv = L * 2 * 2 * n_img * enc * h
    dec = 0.0
    for s in range(1, new_tokens + 1):  # one forward per new token; s = tokens attended to in self-attn
        per_layer = 2 * (4 * h * h) + 4 * s * h + 2 * (2 * h * h) + 4 * n_img * h + 2 * (2 * h * m)
        dec += L * per_layer + 2 * h * h + 2 * h * V  # + LM head transform and vocabulary projection
    return {"vision": vision, "decoder": cross_kv + dec, "total": vision + cross_kv + dec}


def clip_image_flops(cfg: dict) -> float:
    v = cfg["vision_cfg"]
    size, patch, width, layers = v["image_size"], v["patch_size"], v["width"], v["layers"]
    mlp = int(width * v.get("mlp_ratio", 4.0))
    n = (size // patch) ** 2 + 1
    return vit_flops(n, width, layers, mlp, 3 * patch * patch, n - 1) + 2 * width * cfg["embed_dim"]


def clip_train_flops(cfg: dict) -> float:
    t = cfg["text_cfg"]
    mlp = int(t["width"] * t.get("mlp_ratio", 4.0))
    text = vit_flops(t["context_length"], t["width"], t["layers"], mlp) + 2 * t["width"] * cfg["embed_dim"]
    return 3 * (clip_image_flops(cfg) + text)  # forward + backward (2x forward)


def pct(per_s: float | None, flops: float | None, bound: float | None) -> float | None:
    if not per_s or not flops or not bound:
        return None
    return 100.0 * per_s * flops / (bound * 1e12)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _g(x: float | None) -> float | None:
    return x / 1e9 if x else None


def fmt(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


# -- data ------------------------------------------------------------------------------------------
def _jpeg(args: tuple[int, tuple[int, int]]) -> bytes:
    return make_jpeg(*args)


def make_jpegs(n: int, size: tuple[int, int], seed0: int = 0) -> list[bytes]:
    import multiprocessing as mp

    procs = max(1, min(os.cpu_count() or 1, 32))
    jobs = [(seed0 + i, size) for i in range(n)]
    if procs == 1 or n < 64:
        return [_jpeg(j) for j in jobs]
    with mp.get_context("fork").Pool(procs) as pool:  # before any CUDA use in this process
        return pool.map(_jpeg, jobs, chunksize=max(1, n // (procs * 8)))


def build_inference_dataset(root: Path, jpegs: list[bytes], per_shard: int) -> Path:
    try:
        import pytest  # noqa: F401  (tests/conftest.py imports it for its fixtures)
    except ImportError:
        stub = types.ModuleType("pytest")
        stub.fixture = lambda *a, **k: (a[0] if a and callable(a[0]) else (lambda f: f))
        sys.modules["pytest"] = stub
    from conftest import build_dataset

    samples = [{"caption": f"a photo number {i}", "image": b} for i, b in enumerate(jpegs)]
    return build_dataset(root, samples, per_shard=per_shard)


TRAIN_WORDS = ["red", "blue", "green", "photo", "of", "a", "small", "big", "dog", "cat", "car", "tree", "on",
               "the", "table", "in", "street", "with", "light", "dark"]


def train_caption(i: int) -> str:
    """Caption of train sample i: 3 to 11 words (what both trainers and the step-alone baseline tokenise)."""
    return " ".join(TRAIN_WORDS[(i * 7 + k * 3) % len(TRAIN_WORDS)] for k in range(3 + i % 9))


def write_train_shards(folder: Path, jpegs: list[bytes], samples: int, per_shard: int) -> tuple[str, int]:
    """webdataset shards (KEY.jpg + KEY.txt) and open_clip's sizes.json; returns (brace pattern, shards)."""
    from capcurate.shards import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (samples + per_shard - 1) // per_shard
    sizes = {}
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        count = min(per_shard, samples - s * per_shard)
        with TarShardWriter(folder / name) as w:
            for j in range(count):
                i = s * per_shard + j
                cap = train_caption(i)
                w.write(f"{s:05d}{j:05d}", {"jpg": jpegs[i % len(jpegs)], "txt": cap.encode()})
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar"), n_shards


# -- models ----------------------------------------------------------------------------------------
BLIP_SHAPES = {
    "large": dict(vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=384, patch_size=16),
                  text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=512), vocab=BERT_VOCAB),
    "tiny": dict(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=8),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=64), vocab=512),
}


def build_blip(root: Path, shape: str, device: str) -> tuple[str, dict]:
    """A random BLIP of ``shape`` + BlipProcessor saved with save_pretrained; returns (hf:<dir>, configs)."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import BlipImageProcessorFast as BlipImageProcessor
    spec = BLIP_SHAPES[shape]
    d = root / f"blip-{shape}"
    tok_dir = d / "tok-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words = "a an the photo of picture image red green blue big small dog cat car tree on in with".split()
    fill = [f"w{i}" for i in range(spec["vocab"] - len(specials) - len(words))]
    (tok_dir / "vocab.txt").write_text("\n".join(specials + words + fill) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tok_dir))  # BertTokenizerFast(vocab_file=...) ignores it
    assert len(tok) == spec["vocab"], f"tokenizer has {len(tok)} tokens, expected {spec['vocab']}"
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as Salesforce/blip-*: generation starts from [DEC]
    size = spec["vision"]["image_size"]
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": size, "width": size}),
                         tokenizer=tok)
    text = dict(spec["text"], vocab_size=len(tok), encoder_hidden_size=spec["vision"]["hidden_size"],
                bos_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id,
                sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id)
    cfg = BlipConfig(vision_config=dict(spec["vision"]), text_config=text, projection_dim=256)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes a second, on the CPU a minute
        model = BlipForConditionalGeneration(cfg)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)  # capcurate loads bf16 on CUDA anyway; half the file to write
    model.save_pretrained(str(d))
    proc.save_pretrained(str(d))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return f"hf:{d}", {"vision": spec["vision"], "text": text}


QWEN2_VL_2B = {  # Qwen/Qwen2-VL-2B-Instruct's config.json shapes
    "text": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, max_position_embeddings=32768,
                 rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, rope_theta=1000000.0),
    "vision": dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2),
    "vocab": 151936,
}


def build_vlm(root: Path, shape: str, device: str) -> str:
    """A random Qwen2-VL of ``shape`` ("qwen2-vl-2b", or "tiny": the test fixture) saved with its processor."""
    import torch

    if shape == "tiny":
        from captioner_fixtures import build_tiny_qwen2_vl

        return build_tiny_qwen2_vl(root)
    from captioner_fixtures import QWEN_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = QWEN2_VL_2B
    d = root / f"vlm-{shape}"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>", "<unk>"]
    # the model's full vocabulary, so every id a random model emits decodes (the text is not read)
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(spec["vocab"] - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:7]})
    assert len(tok) == spec["vocab"], f"tokenizer has {len(tok)} tokens, expected {spec['vocab']}"
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tok,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen2VLConfig(
        text_config=dict(spec["text"], vocab_size=spec["vocab"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(spec["vision"]), image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, on the CPU minutes
        model = Qwen2VLForConditionalGeneration(cfg)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(d))
    proc.save_pretrained(str(d))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return f"hf:{d}"


def register_tiny_clip(root: Path, cfg: dict, name: str) -> Path:
    import open_clip

    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path


# -- child processes -------------------------------------------------------------------------------
RUNNER = r'''
import json, os, sys, time
spec = json.load(open(sys.argv[1]))
events = open(spec["events"], "a", buffering=1)
def ev(kind, n=0):
    events.write(f"{kind} {time.time():.6f} {n}\n")
ev("start")
for p in reversed(spec.get("sys_path", [])):
    sys.path.insert(0, p)
import capcurate

def count(b):
    # images in one batch, whatever the pipeline's batch type
    for attr in ("items", "uids"):
        v = getattr(b, attr, None)
        if isinstance(v, (list, tuple)):
            return len(v)
    px = getattr(b, "pixels", None)
    if px is not None and hasattr(px, "shape"):
        return int(px.shape[0])
    if isinstance(b, (list, tuple)) and b and hasattr(b[0], "shape"):
        return int(b[0].shape[0])
    return 0

def wrap(orig):
    def logged(*a, **k):
        for b in orig(*a, **k):
            ev("batch", count(b))  # the stage takes batch k when it is done with batch k-1
            yield b
        ev("end")
    return logged

# where the stage takes its batches: capcurate.inputs.ImageStream (one stream across shards), else the
# older per-shard capcurate.imageloader.iter_image_batches
hook = "none"
try:
    from capcurate.inputs import stream as _st
    _st.ImageStream.__iter__ = wrap(_st.ImageStream.__iter__)
    hook = "capcurate.inputs.ImageStream"
except (ImportError, AttributeError):
    try:
        import capcurate.imageloader as _il
        _il.iter_image_batches = wrap(_il.iter_image_batches)
        hook = "capcurate.imageloader.iter_image_batches"
    except (ImportError, AttributeError):
        pass
events.write(f"hook {time.time():.6f} 0 {hook}\n")
fn = getattr(capcurate, spec["call"])
ev("imported")
s = fn(*spec["args"], **spec["kwargs"])
ev("done")
with open(spec["result"], "w") as f:
    json.dump(s.to_dict() if s is not None else None, f, default=str)
'''

OPENCLIP_TRAIN = r'''
import sys, types
for name in ("pandas", "fsspec"):  # open_clip_train imports them at the top; the webdataset path never uses them
    try:
        __import__(name)
    except ImportError:
        sys.modules[name] = types.ModuleType(name)
if sys.argv[1]:
    import open_clip
    open_clip.add_model_config(sys.argv[1])
from open_clip_train.main import main
main(sys.argv[2:])
'''


class GpuSampler:
    """``nvidia-smi`` utilisation samples every 200 ms while a child runs (skipped without nvidia-smi)."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.proc = out, None
        if enabled and shutil_which("nvidia-smi"):
            try:
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=timestamp,utilization.gpu", "--format=csv,noheader,nounits",
                     "-lms", "200"], stdout=open(out, "w"), stderr=subprocess.DEVNULL, start_new_session=True)
            except OSError:
                self.proc = None

    def stop(self) -> list[tuple[float, float]]:
        if self.proc is None:
            return []
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        samples = []
        from datetime import datetime

        for line in self.out.read_text().splitlines():
            try:
                ts, util = (x.strip() for x in line.split(","))
                samples.append((datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp(), float(util)))
            except ValueError:
                continue
        return samples


def shutil_which(cmd: str) -> str | None:
    import shutil

    return shutil.which(cmd)


def mean_util(samples: list[tuple[float, float]], t0: float | None, t1: float | None) -> float | None:
    if not samples or t0 is None or t1 is None:
        return None
    inside = [u for t, u in samples if t0 <= t <= t1]
    return sum(inside) / len(inside) if inside else None


def busy_util(samples: list[tuple[float, float]]) -> float | None:
    """Mean GPU utilisation from 2 s after the GPU first got busy to the last busy sample."""
    busy = [t for t, u in samples if u > 0]
    return mean_util(samples, busy[0] + 2.0, busy[-1]) if len(busy) > 1 else None


def child_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


_CHILDREN: list[int] = []  # process groups of running children (killed on SIGTERM)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_child(cmd: list[str], timeout: float, log_path: Path, env: dict[str, str],
              sampler_path: Path | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group; kill the group after ``timeout`` s. Wall times in time.time()."""
    sampler = GpuSampler(sampler_path, True) if sampler_path else None
    t_spawn = time.time()
    with open(log_path, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        _CHILDREN.append(p.pid)
        try:
            rc = p.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(p.pid)
            rc = p.wait()
        finally:
            _kill_group(p.pid)  # DataLoader workers a finished or killed child may have left behind
            _CHILDREN.remove(p.pid)
    t_exit = time.time()
    util = sampler.stop() if sampler else []
    tail = log_path.read_text(errors="replace")[-2500:] if log_path.exists() else ""
    if rc != 0 and not timed_out:
        log(f"child exited {rc}: {' '.join(cmd[:3])} ...\n{tail}")
    return {"rc": rc, "timed_out": timed_out, "t_spawn": t_spawn, "t_exit": t_exit, "wall_s": t_exit - t_spawn,
            "util": util, "util_busy": busy_util(util), "tail": tail}


def run_capcurate(tmp: Path, tag: str, call: str, args: list, kwargs: dict, timeout: float,
                  smoke: bool) -> dict[str, Any]:
    """``capcurate.<call>(*args, **kwargs)`` in a fresh interpreter; batch timestamps, summary, wall."""
    runner = tmp / "runner.py"
    runner.write_text(RUNNER)
    spec = {"call": call, "args": args, "kwargs": kwargs, "events": str(tmp / f"{tag}.events"),
            "result": str(tmp / f"{tag}.result.json"), "sys_path": [str(REPO)]}
    (tmp / f"{tag}.spec.json").write_text(json.dumps(spec))
    log(f"capcurate.{call}({', '.join(map(repr, args))}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        f"  [limit {timeout:.0f} s]")
    res = run_child([sys.executable, str(runner), str(tmp / f"{tag}.spec.json")], timeout,
                    tmp / f"{tag}.log", child_env(smoke), None if smoke else tmp / f"{tag}.smi")
    events, hook = [], None
    if Path(spec["events"]).exists():
        for line in Path(spec["events"]).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                events.append((parts[0], float(parts[1]), int(parts[2])))
            if parts[0] == "hook" and len(parts) >= 4:
                hook = parts[3]
    summary = None
    if Path(spec["result"]).exists():
        summary = json.loads(Path(spec["result"]).read_text())
    marks = [(t, n) for k, t, n in events if k in ("batch", "end")]
    out: dict[str, Any] = {"rc": res["rc"], "timed_out": res["timed_out"], "wall_s": round(res["wall_s"], 2),
                           "summary": summary, "batches": sum(1 for k, _, _ in events if k == "batch"),
                           "max_batch": max((n for k, _, n in events if k == "batch"), default=None),
                           "hook": hook, "gpu_util_pct_busy": res["util_busy"]}
    if res["rc"] != 0 and not res["timed_out"]:
        out["error_tail"] = res["tail"][-1500:]
    done = [t for k, t, _ in events if k == "done"]
    # batch j is processed between marks[j] and marks[j+1]
    images_done = sum(n for _, n in marks[:-1]) + (marks[-1][1] if marks and done else 0)
    out["images_done"] = images_done
    if marks:
        out["first_batch_after_s"] = round(marks[0][0] - res["t_spawn"], 2)
    if done and images_done:
        out["e2e_per_s"] = images_done / (done[0] - res["t_spawn"])
    elif len(marks) >= 2:
        out["e2e_per_s"] = sum(n for _, n in marks[:-1]) / (marks[-1][0] - res["t_spawn"])
    if len(marks) >= 3:
        imgs = sum(n for _, n in marks[1:-1])
        dt = marks[-1][0] - marks[1][0]
        if imgs and dt > 0:
            out["steady_per_s"] = imgs / dt
            out["steady_images"] = imgs
            out["steady_s"] = round(dt, 2)
            out["gpu_util_pct_steady"] = mean_util(res["util"], marks[1][0], marks[-1][0])
    return out


# -- the bound -------------------------------------------------------------------------------------
def measure_bound(cfg: Cfg) -> dict[str, Any]:
    import torch

    n = cfg.matmul_n
    dt = torch.bfloat16
    a = torch.randn(n, n, device=cfg.device, dtype=dt)
    b = torch.randn(n, n, device=cfg.device, dtype=dt)
    r = rate(lambda: torch.matmul(a, b), 1, cfg.device, warmup=3, min_iters=10, target_s=2.0, max_iters=200)
    tflops = 2 * n ** 3 * r["per_s"] / 1e12
    a = b = None
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"what": f"bf16 torch.matmul {n}x{n}x{n}", "tflops": tflops, "iters": r["iters"]}


# -- stage a: recaption ----------------------------------------------------------------------------
def stage_recaption(cfg: Cfg, tmp: Path, ds: Path, blip_ref: str, blip_cfg: dict, bound: float | None,
                    limit: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText

    res: dict[str, Any] = {}
    an = blip_generate_flops(blip_cfg["vision"], blip_cfg["text"], TOKENS)
    res["flops_analytic"] = an
    child = run_capcurate(tmp, "recaption", "recaption", [str(ds)],
                          {"model": blip_ref, "name": "bench", "decoding": "greedy",
                           "min_new_tokens": TOKENS, "max_new_tokens": TOKENS}, limit, cfg.smoke)
    res["capcurate"] = child
    s = child.get("summary") or {}
    det = s.get("details", {}) if isinstance(s, dict) else {}
    chosen = det.get("batch_size")
    if not isinstance(chosen, int):  # a run cut off by its limit has no summary: its largest batch
        chosen = child.get("max_batch")
    res["capcurate_batch"] = chosen
    res["capcurate_batch_note"] = det.get("batch_size_note")
    if s:
        res["capcurate_summary_per_s"] = det.get("images_per_second")
        if s.get("counts", {}).get("images_captioned") != cfg.images:
            res["note"] = f"captioned {s.get('counts')} of {cfg.images}"

    directory = blip_ref[len("hf:"):]
    dev, dtype = cfg.device, (torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32)
    try:  # as capcurate loads it: SDPA where the class has it, else its default attention
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    except ValueError:
        model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype)
    model = model.to(dev).eval()
    res["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    size = blip_cfg["vision"]["image_size"]
    gen = dict(do_sample=False, num_beams=1, max_new_tokens=TOKENS, min_new_tokens=TOKENS, use_cache=True)

    def pixels(n: int) -> torch.Tensor:
        return torch.randn(n, 3, size, size, device=dev, dtype=dtype)

    one = pixels(1)
    res["flops_counted"] = {
        "total": count_flops(lambda: model.generate(pixel_values=one, **gen)),
        "vision": count_flops(lambda: model.vision_model(pixel_values=one)),
    }
    with torch.inference_mode():
        out = model.generate(pixel_values=one, **gen)
        res["generated_tokens_check"] = int(out.shape[1])  # bos + 20 new tokens
        batches = []
        for b in (chosen, cfg.gen_batch):
            if isinstance(b, int) and b > 0 and b not in batches:
                batches.append(b)
        alone = {}
        for b in batches:
            px = pixels(b)
            try:
                r = rate(lambda px=px: model.generate(pixel_values=px, **gen), b, dev, warmup=1, min_iters=2,
                         target_s=4.0, max_iters=10)
                alone[str(b)] = r
                log(f"generate alone, batch {b}: {r['per_s']:.1f} images/s")
            except torch.OutOfMemoryError as e:
                alone[str(b)] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            px = None
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
        res["generate_alone"] = alone
        px = pixels(cfg.gen_batch)
        r = rate(lambda: model.vision_model(pixel_values=px), cfg.gen_batch, dev, warmup=2, min_iters=3,
                 target_s=2.0)
        res["vision_alone"] = r
        log(f"vision tower alone, batch {cfg.gen_batch}: {r['per_s']:.1f} images/s")
    model = px = None
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()

    fl = res["flops_counted"]["total"] or an["total"]
    flv = res["flops_counted"]["vision"] or an["vision"]
    res["flops_per_image"] = fl
    ref_b = str(chosen) if str(chosen) in alone and "per_s" in alone[str(chosen)] else str(cfg.gen_batch)
    alone_rate = alone.get(ref_b, {}).get("per_s")
    res["row"] = {
        "stage": "recaption", "what": f"BLIP-{cfg.blip} greedy {TOKENS} tok", "unit": "images/s",
        "capcurate_steady": child.get("steady_per_s"), "capcurate_e2e": child.get("e2e_per_s"),
        "alone": alone_rate, "alone_what": f"generate, batch {ref_b}",
        "ratio_steady": ratio(child.get("steady_per_s"), alone_rate),
        "pct_bound_capcurate": pct(child.get("steady_per_s"), fl, bound), "pct_bound_alone": pct(alone_rate, fl, bound),
        "gflop_per_item": fl / 1e9,
        "extra": {f"generate_alone_b{cfg.gen_batch}": alone.get(str(cfg.gen_batch), {}).get("per_s"),
                  f"ratio_vs_generate_b{cfg.gen_batch}": ratio(child.get("steady_per_s"),
                                                  alone.get(str(cfg.gen_batch), {}).get("per_s")),
                  "vision_alone": r["per_s"], "vision_pct_bound": pct(r["per_s"], flv, bound),
                  "capcurate_batch": chosen, "capcurate_first_batch_after_s": child.get("first_batch_after_s"),
                  "gpu_util_steady": child.get("gpu_util_pct_steady"),
                  "flops": f"FlopCounterMode on generate(1 image, {TOKENS} new tokens): "
                           f"{fmt(_g(res['flops_counted']['total']))} GFLOP (vision "
                           f"{fmt(_g(res['flops_counted']['vision']))}); analytic {an['total'] / 1e9:.1f} "
                           f"(vision {an['vision'] / 1e9:.1f}, decoder with KV cache {an['decoder'] / 1e9:.1f})"},
    }
    return res


# -- stage e: a chat-template VLM ------------------------------------------------------------------
VLM_MAX_PIXELS = 448 * 448


def stage_vlm(cfg: Cfg, tmp: Path, jpegs: list[bytes], limit: float) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from capcurate.models.captioners import DEFAULT_INSTRUCTIONS

    res: dict[str, Any] = {}
    t = time.time()
    ref = build_vlm(tmp, cfg.vlm, cfg.device)
    res["build_s"] = round(time.time() - t, 1)
    log(f"VLM {cfg.vlm} built and saved in {res['build_s']} s: {ref}")
    ds = build_inference_dataset(tmp / "ds-vlm", jpegs[:cfg.vlm_images], cfg.per_shard)
    kwargs = {"model": ref, "name": "bench", "decoding": "greedy", "min_new_tokens": TOKENS,
              "max_new_tokens": TOKENS, "max_pixels": VLM_MAX_PIXELS}
    if cfg.smoke:
        kwargs.update(batch_size=cfg.vlm_batch, workers=1)
    child = run_capcurate(tmp, "vlm", "recaption", [str(ds)], kwargs, limit, cfg.smoke) if cfg.vlm_plain else {}
    res["capcurate"] = child
    if cfg.vlm_compile:  # a static KV cache; transformers compiles the decoding step around it on a GPU
        res["capcurate_compile"] = run_capcurate(tmp, "vlm-compile", "recaption", [str(ds)],
                                                 {**kwargs, "name": "bench_compile", "compile": True}, limit,
                                                 cfg.smoke)
    ran = child or res.get("capcurate_compile", {})  # the batch the stage chose, for the baseline
    s = ran.get("summary") or {}
    det = s.get("details", {}) if isinstance(s, dict) else {}
    chosen = det.get("batch_size") if isinstance(det.get("batch_size"), int) else ran.get("max_batch")
    res["capcurate_batch"] = chosen
    batch = chosen if isinstance(chosen, int) and chosen > 0 else cfg.vlm_batch

    directory = ref[len("hf:"):]
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).to(cfg.device).eval()
    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    ip = processor.image_processor
    ip.size = type(ip.size)(**{**{k: v for k, v in vars(ip.size).items() if v is not None},
                               "longest_edge": VLM_MAX_PIXELS})
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_INSTRUCTIONS["short"]}]}],
        add_generation_prompt=True, tokenize=False)
    from PIL import Image

    imgs = [Image.open(io.BytesIO(b)).convert("RGB") for b in jpegs[:batch]]
    inputs = processor(images=imgs, text=[text] * len(imgs), padding=True, return_tensors="pt").to(cfg.device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    res["prompt_tokens"] = int(inputs["input_ids"].shape[1])
    gen = dict(do_sample=False, num_beams=1, max_new_tokens=TOKENS, min_new_tokens=TOKENS, use_cache=True)
    with torch.inference_mode():
        try:
            alone = rate(lambda: model.generate(**inputs, **gen), len(imgs), cfg.device, warmup=1, min_iters=2,
                         target_s=4.0, max_iters=6)
        except torch.OutOfMemoryError as e:
            alone = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    res["generate_alone"] = alone
    model = inputs = None
    if cfg.device.startswith("cuda"):
        torch.cuda.empty_cache()
    steady, e2e, alone_rate = child.get("steady_per_s"), child.get("e2e_per_s"), alone.get("per_s")
    res["row"] = {
        "stage": "vlm", "what": f"Qwen2-VL ({cfg.vlm}) greedy {TOKENS} tok, <= {VLM_MAX_PIXELS} px",
        "unit": "images/s", "capcurate_steady": steady, "capcurate_e2e": e2e, "alone": alone_rate,
        "alone_what": f"generate on processor inputs, batch {len(imgs)}", "ratio_steady": ratio(steady, alone_rate),
        "pct_bound_capcurate": None, "pct_bound_alone": None, "gflop_per_item": None,
        "extra": {"capcurate_tokens_per_s_steady": steady * TOKENS if steady else None,
                  "capcurate_tokens_per_s_e2e": e2e * TOKENS if e2e else None,
                  "alone_tokens_per_s": alone_rate * TOKENS if alone_rate else None,
                  "prompt_tokens_per_image": res["prompt_tokens"], "capcurate_batch": chosen,
                  "capcurate_first_batch_after_s": child.get("first_batch_after_s"),
                  **({"compile_steady": res["capcurate_compile"].get("steady_per_s"),
                      "compile_e2e": res["capcurate_compile"].get("e2e_per_s"),
                      "compile_first_batch_after_s": res["capcurate_compile"].get("first_batch_after_s")}
                     if "capcurate_compile" in res else {})},
    }
    return res


# -- stage b: score --------------------------------------------------------------------------------
def stage_score(cfg: Cfg, tmp: Path, ds: Path, bound: float | None, limit: float) -> dict[str, Any]:
    import inspect

    import open_clip
    import torch

    import capcurate

    res: dict[str, Any] = {}
    if cfg.smoke:
        from scorer_fixtures import TINY_OPENCLIP_CFG

        path = register_tiny_clip(tmp, TINY_OPENCLIP_CFG, "bench-tiny-score")
        ref, arch, model_cfg = f"openclip:{path}", path.stem, TINY_OPENCLIP_CFG
    else:
        ref, arch, model_cfg = cfg.clip_ref, cfg.clip_arch, open_clip.get_model_config(cfg.clip_arch)
    sig = inspect.signature(capcurate.score).parameters
    defaults = {k: sig[k].default for k in ("device", "precision", "batch_size", "workers", "num_workers",
                                            "decode") if k in sig}
    res["defaults"] = defaults
    default_dev = defaults.get("device")
    # "auto"/None picks CUDA when there is one; an explicit "cpu" default means a user gets the CPU
    on_cuda_by_default = default_dev in (None, "", "auto") or str(default_dev).startswith("cuda")
    runs = {}
    random = {"pretrained": "random"}  # random weights by choice: speed does not depend on them
    first_limit = limit if (on_cuda_by_default or cfg.smoke) else min(limit, 40.0)
    runs["defaults"] = run_capcurate(tmp, "score-defaults", "score", [str(ds), ref, "bench"], dict(random),
                                     first_limit, cfg.smoke)
    if not on_cuda_by_default and torch.cuda.is_available() and not cfg.smoke:
        runs["cuda_bf16"] = run_capcurate(tmp, "score-cuda", "score", [str(ds), ref, "bench_cuda"],
                                          {**random, "device": "cuda", "precision": "bf16"}, limit, cfg.smoke)
    if cfg.score_variants:  # which input path and batch feed the tower best, measured side by side
        for tag, kw in (("decode_cpu", {"decode": "cpu"}), ("batch_512", {"batch_size": 512})):
            runs[tag] = run_capcurate(tmp, f"score-{tag}", "score", [str(ds), ref, f"bench_{tag}"], {**random, **kw}, limit,
                                      cfg.smoke)
    res["capcurate"] = runs

    dev = cfg.device
    prec = "bf16" if dev.startswith("cuda") else "fp32"
    model = open_clip.create_model(arch, device=dev, precision=prec).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    one = torch.randn(1, 3, size, size, device=dev, dtype=dtype)
    res["flops_counted"] = count_flops(lambda: model.encode_image(one))
    with torch.inference_mode():
        px = torch.randn(cfg.tower_batch, 3, size, size, device=dev, dtype=dtype)
        r = rate(lambda: model.encode_image(px), cfg.tower_batch, dev, warmup=2, min_iters=3, target_s=3.0)
    res["tower_alone"] = r
    log(f"{arch} image tower alone, batch {cfg.tower_batch}, {prec}: {r['per_s']:.1f} images/s")
    model = px = None
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    res["flops_analytic"] = clip_image_flops(model_cfg)
    fl = res["flops_counted"] or res["flops_analytic"]
    res["flops_per_image"] = fl
    d = runs["defaults"]
    best = runs.get("cuda_bf16", d)
    res["row"] = {
        "stage": "score", "what": f"{arch} image+text, defaults {defaults}", "unit": "images/s",
        "capcurate_steady": d.get("steady_per_s"), "capcurate_e2e": d.get("e2e_per_s"),
        "alone": r["per_s"], "alone_what": f"encode_image {prec}, batch {cfg.tower_batch}",
        "ratio_steady": ratio(d.get("steady_per_s"), r["per_s"]),
        "pct_bound_capcurate": pct(d.get("steady_per_s"), fl, bound), "pct_bound_alone": pct(r["per_s"], fl, bound),
        "gflop_per_item": fl / 1e9,
        "extra": {"target": "capcurate >= 70% of tower alone",
                  "cuda_bf16_steady": best.get("steady_per_s") if "cuda_bf16" in runs else None,
                  "cuda_bf16_e2e": best.get("e2e_per_s") if "cuda_bf16" in runs else None,
                  "cuda_bf16_ratio": ratio(best.get("steady_per_s"), r["per_s"]) if "cuda_bf16" in runs else None,
                  "capcurate_first_batch_after_s": d.get("first_batch_after_s"),
                  **{f"{tag}_steady": runs[tag].get("steady_per_s") for tag in ("decode_cpu", "batch_512")
                     if tag in runs},
                  "gpu_util_steady": best.get("gpu_util_pct_steady"),
                  "flops": f"FlopCounterMode on encode_image(1 image): {fmt(_g(res['flops_counted']))} GFLOP; "
                           f"analytic {res['flops_analytic'] / 1e9:.1f} (text tower not counted)"},
    }
    return res


# -- stage c: train --------------------------------------------------------------------------------
def steady_from_steps(times: list[float], batch: int, skip: int) -> float | None:
    kept = times[skip:]
    return batch * len(kept) / sum(kept) if kept and sum(kept) > 0 else None


def stage_train(cfg: Cfg, tmp: Path, shard_dir: Path, pattern: str, bound: float | None,
                limit: float) -> dict[str, Any]:
    import open_clip
    import torch

    res: dict[str, Any] = {}
    if cfg.smoke:
        from train import MODEL as TINY_TRAIN

        cfg_path = register_tiny_clip(tmp, TINY_TRAIN, "bench-tiny-train")
        model_kw = {"model_config": str(cfg_path)}
        arch, model_cfg, oc_cfg = cfg_path.stem, TINY_TRAIN, str(cfg_path)
    else:
        model_kw = {"model": cfg.train_model}
        arch, model_cfg, oc_cfg = cfg.train_model, open_clip.get_model_config(cfg.train_model), ""
    B, W, P = cfg.train_batch, cfg.train_workers, cfg.train_precision
    n = cfg.train_samples
    half = max(30.0, limit / 2)

    # capcurate train
    run = tmp / "run-capcurate"
    ours = run_capcurate(tmp, "train-capcurate", "train", [str(shard_dir), str(run)],
                         {**model_kw, "batch_size": B, "precision": P, "workers": W, "warmup": 10,
                          "log_every": 1}, half, cfg.smoke)
    steps = []
    if (run / "metrics.jsonl").exists():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "samples_per_s" in row and row.get("samples_per_s"):
                steps.append(B / row["samples_per_s"])
    summ = ours.get("summary") or {}
    seen = (summ.get("counts") or {}).get("samples_seen") or B * len(steps)
    ours_steady = steady_from_steps(steps, B, cfg.train_skip_steps)
    ours_e2e = seen / ours["wall_s"] if seen else None
    res["capcurate"] = {**{k: v for k, v in ours.items() if k != "summary"}, "steps": len(steps),
                        "samples": seen, "steady_per_s": ours_steady, "e2e_per_s": ours_e2e,
                        "summary_samples_per_s": (summ.get("counts") or {}).get("samples_per_s")}
    log(f"capcurate train: {len(steps)} steps, steady {fmt(ours_steady)} samples/s, e2e {fmt(ours_e2e)}")

    # open_clip_train.main, same settings
    logs = tmp / "openclip-logs"
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[P]
    argv = ["--train-data", pattern, "--train-num-samples", str(n), "--dataset-type", "webdataset",
            "--model", arch, "--batch-size", str(B), "--epochs", "1", "--workers", str(W),
            "--precision", precision, "--lr", "5e-4", "--warmup", "10", "--logs", str(logs), "--name", "bench",
            "--report-to", "", "--log-every-n-steps", "1", "--save-frequency", "1", "--seed", "0"]
    script = tmp / "openclip_train.py"
    script.write_text(OPENCLIP_TRAIN)
    theirs_limit = max(half, limit - ours["wall_s"])  # what capcurate's run left of the stage's limit
    log(f"open_clip_train.main {' '.join(argv)}  [limit {theirs_limit:.0f} s]")
    theirs = run_child([sys.executable, str(script), oc_cfg, *argv], theirs_limit, tmp / "train-openclip.log",
                       child_env(cfg.smoke), None if cfg.smoke else tmp / "train-openclip.smi")
    oc_times, oc_seen = [], 0
    out_log = logs / "bench" / "out.log"
    text = out_log.read_text(errors="replace") if out_log.exists() else ""
    for m in re.finditer(r"Train Epoch: \d+ \[\s*(\d+)/\s*\d+.*?Batch \(t\): ([0-9.]+)", text):
        oc_seen = int(m.group(1))
        oc_times.append(float(m.group(2)))
    theirs_steady = steady_from_steps(oc_times, B, cfg.train_skip_steps)
    theirs_e2e = oc_seen / theirs["wall_s"] if oc_seen else None
    res["open_clip_train"] = {"rc": theirs["rc"], "timed_out": theirs["timed_out"],
                              "wall_s": round(theirs["wall_s"], 2), "steps": len(oc_times), "samples": oc_seen,
                              "steady_per_s": theirs_steady, "e2e_per_s": theirs_e2e}
    if theirs["rc"] != 0 and not theirs["timed_out"]:
        res["open_clip_train"]["error_tail"] = theirs["tail"][-1500:]
    log(f"open_clip_train: {len(oc_times)} steps, steady {fmt(theirs_steady)} samples/s, e2e {fmt(theirs_e2e)}")

    # the train step alone on ready tensors: the same captions, tokenised as open_clip does (padded to the
    # context length); then the same step with capcurate's trimmed text tower (models/text_trim.py)
    from capcurate.models.text_trim import token_trimmer

    dev = cfg.device
    torch.manual_seed(0)
    model = open_clip.create_model(arch, device=dev)
    model.train()
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    v = model_cfg["vision_cfg"]
    size = v["image_size"]
    images = torch.randn(B, 3, size, size, device=dev)
    tokenizer = open_clip.get_tokenizer(arch)
    tokens = tokenizer([train_caption(i) for i in range(B)])
    texts = tokens.to(dev)
    use_amp = P != "fp32"
    amp_dtype = torch.bfloat16 if P == "bf16" else torch.float16

    def step(imgs=images, txts=texts):
        with torch.autocast(device_type=torch.device(dev).type, dtype=amp_dtype, enabled=use_amp):
            f_img, f_txt, scale = model(imgs, txts)[:3]
            loss = loss_fn(f_img, f_txt, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def fwd_bwd():
        with torch.autocast(device_type=torch.device(dev).type, dtype=amp_dtype, enabled=use_amp):
            f_img, f_txt, scale = model(images[:8], texts[:8])[:3]
            loss = loss_fn(f_img, f_txt, scale)
        loss.backward()

    counted = count_flops(fwd_bwd)
    opt.zero_grad(set_to_none=True)
    res["flops_counted"] = counted / 8 if counted else None
    r = rate(step, B, dev, warmup=3, min_iters=5, target_s=4.0, max_iters=60)
    res["step_alone"] = r
    log(f"train step alone ({arch}, batch {B}, {P}): {r['per_s']:.1f} samples/s")
    r_trim: dict[str, Any] = {}
    short = token_trimmer(model, tokenizer)(tokens).to(dev)  # as capcurate's trainer does
    if short.shape[1] < tokens.shape[1]:
        r_trim = rate(lambda: step(images, short), B, dev, warmup=3, min_iters=5, target_s=4.0, max_iters=60)
        r_trim["tokens"] = int(short.shape[1])
        log(f"train step alone, text tower over {short.shape[1]} of {tokens.shape[1]} tokens: "
            f"{r_trim['per_s']:.1f} samples/s")
    res["step_alone_trimmed"] = r_trim
    model = opt = images = texts = None
    if dev.startswith("cuda"):
        torch.cuda.empty_cache()
    res["flops_analytic"] = clip_train_flops(model_cfg)
    fl = res["flops_counted"] or res["flops_analytic"]
    res["flops_per_sample"] = fl
    res["row"] = {
        "stage": "train", "what": f"{arch} b{B} {P} w{W}", "unit": "samples/s",
        "capcurate_steady": ours_steady, "capcurate_e2e": ours_e2e,
        "alone": r["per_s"], "alone_what": "train step on ready tensors",
        "ratio_steady": ratio(ours_steady, r["per_s"]),
        "pct_bound_capcurate": pct(ours_steady, fl, bound), "pct_bound_alone": pct(r["per_s"], fl, bound),
        "gflop_per_item": fl / 1e9,
        "extra": {"open_clip_train_steady": theirs_steady, "open_clip_train_e2e": theirs_e2e,
                  "step_alone_trimmed": r_trim.get("per_s"), "trimmed_tokens": r_trim.get("tokens"),
                  "ratio_steady_vs_trimmed_step": ratio(ours_steady, r_trim.get("per_s")),
                  "capcurate_vs_open_clip_train_steady": ratio(ours_steady, theirs_steady),
                  "capcurate_vs_open_clip_train_e2e": ratio(ours_e2e, theirs_e2e),
                  "capcurate_steps": len(steps), "open_clip_train_steps": len(oc_times),
                  "gpu_util_busy_capcurate": ours.get("gpu_util_pct_busy"),
                  "gpu_util_busy_open_clip_train": theirs.get("util_busy"),
                  "flops": f"FlopCounterMode on forward+backward of 8 samples / 8: "
                           f"{fmt(_g(res['flops_counted']))} GFLOP/sample; analytic 3 x forward "
                           f"{res['flops_analytic'] / 1e9:.1f}"},
    }
    return res


# -- stage d: image input --------------------------------------------------------------------------
def stage_input(cfg: Cfg, jpegs: list[bytes], blip_ref: str | None, size: int) -> dict[str, Any]:
    """Per CPU core: JPEG bytes -> model-ready 384 px tensor; and nvJPEG batch decode on the GPU."""
    import torch
    import transformers
    from PIL import Image

    res: dict[str, Any] = {}
    errors: dict[str, str] = {}
    data = jpegs[:cfg.input_images]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: dict[str, Any] = {}

    def per_core(name: str, fn) -> None:
        try:
            fn(data[0])
            t0 = time.perf_counter()
            for b in data:
                fn(b)
            rows[name] = len(data) / (time.perf_counter() - t0)
            log(f"input, one core: {name}: {rows[name]:.1f} images/s")
        except Exception as e:  # one path failing must not hide the others
            rows[name] = None
            errors[name] = f"{type(e).__name__}: {e}"

    def pil(b: bytes):
        return Image.open(io.BytesIO(b)).convert("RGB")

    auto = None
    try:
        per_core("PIL decode only", lambda b: pil(b).load())
        seen = set()
        for cls_name in ("BlipImageProcessor", "BlipImageProcessorPil", "BlipImageProcessorFast"):
            try:
                cls = getattr(transformers, cls_name)
            except (AttributeError, ImportError):
                continue
            if cls in seen:
                continue
            seen.add(cls)
            proc = cls(size={"height": size, "width": size})
            backend = next((c.__name__ for c in cls.__mro__[1:] if "Backend" in c.__name__), "")
            label = f"PIL + {cls_name}" + (f" ({backend})" if backend else "")
            per_core(label, lambda b, p=proc: p(images=pil(b), return_tensors="pt")["pixel_values"])
        if blip_ref:
            from transformers import AutoProcessor

            auto = AutoProcessor.from_pretrained(blip_ref[len("hf:"):]).image_processor
            res["auto_image_processor"] = type(auto).__name__
        # capcurate's decode workers (capcurate.inputs): header check, libjpeg-turbo decode, uint8
        # resize/crop to the model's input; normalisation runs once per batch on the device
        try:
            from capcurate.inputs import decode_cpu, from_hf, read_header

            spec = from_hf(auto) if auto is not None else None
            res["capcurate_spec"] = spec.describe() if spec is not None else None
            if spec is not None:
                per_core("capcurate.inputs worker, decode=cpu (uint8 out)",
                         lambda b: spec.resize_crop(decode_cpu(b, header=read_header(b))))

                def cpu_full(b: bytes):
                    return spec.normalize(spec.resize_crop(decode_cpu(b, header=read_header(b)))[None])

                per_core("capcurate.inputs decode=cpu + normalise (float out)", cpu_full)
            else:
                errors["capcurate.inputs"] = "no ImageSpec for this processor: capcurate runs the processor"
        except ImportError as e:
            errors["capcurate.inputs"] = f"absent ({e}): row not measured"
            if auto is not None:  # the older path: the model's processor on a PIL image in each worker
                from capcurate.images import decode_image

                per_core(f"capcurate worker (decode_image + {type(auto).__name__})",
                         lambda b: auto(images=decode_image(b), return_tensors="pt")["pixel_values"])
    finally:
        torch.set_num_threads(threads)
    res["per_core"] = rows

    if torch.cuda.is_available() and cfg.device.startswith("cuda"):
        try:
            from torchvision.io import decode_jpeg

            enc = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs[:cfg.gpu_decode_batch]]
            mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device="cuda").view(1, 3, 1, 1)
            std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device="cuda").view(1, 3, 1, 1)

            def decode():
                return decode_jpeg(enc, device="cuda")

            def decode_pre():
                x = torch.stack(decode_jpeg(enc, device="cuda")).float().div_(255)
                x = torch.nn.functional.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
                return ((x - mean) / std).to(torch.bfloat16)

            gpu = {"batch": len(enc)}
            gpu["decode_jpeg(device='cuda')"] = rate(decode, len(enc), "cuda", warmup=2, min_iters=3,
                                                     target_s=2.0)["per_s"]
            gpu[f"decode + batched bicubic {size} + normalise"] = rate(decode_pre, len(enc), "cuda", warmup=2,
                                                                       min_iters=3, target_s=2.0)["per_s"]
            try:  # what capcurate.inputs does with decode=gpu: nvJPEG batch, per-image resize_crop, normalise
                from capcurate.inputs import decode_jpegs_gpu, from_hf

                spec = from_hf(auto) if auto is not None else None
                if spec is not None:
                    dev = torch.device("cuda")

                    def capcurate_gpu():
                        imgs = decode_jpegs_gpu(enc, dev)
                        return spec.normalize(torch.stack([spec.resize_crop(i) for i in imgs]), torch.bfloat16)

                    gpu["capcurate.inputs decode=gpu path"] = rate(capcurate_gpu, len(enc), "cuda", warmup=2,
                                                                   min_iters=3, target_s=2.0)["per_s"]
            except ImportError as e:
                errors["capcurate.inputs gpu"] = f"absent ({e})"
            res["gpu_decode"] = gpu
            log(f"GPU decode: {json.dumps({k: round(v, 1) for k, v in gpu.items()})}")
        except Exception as e:
            errors["gpu_decode"] = f"{type(e).__name__}: {e}"
        torch.cuda.empty_cache()
    else:
        res["gpu_decode"] = "skipped: no CUDA device"
    res["errors"] = errors
    base = next((v for k, v in rows.items() if k.startswith("PIL + BlipImageProcessor")), None)
    # a worker's share of the pipeline: decode + resize to uint8 (normalising is one batched pass on the
    # model's device); the float-out figure, one process doing both, stays in "extra"
    ours = next((v for k, v in rows.items() if k.startswith("capcurate") and "uint8" in k), None)
    ours = ours or next((v for k, v in rows.items() if k.startswith("capcurate")), None)
    res["row"] = {
        "stage": "input", "what": f"512x384 JPEG -> {size}px tensor, 1 core", "unit": "images/s/core",
        "capcurate_steady": ours, "capcurate_e2e": None, "alone": base,
        "alone_what": "PIL + BlipImageProcessor", "ratio_steady": ratio(ours, base),
        "pct_bound_capcurate": None, "pct_bound_alone": None, "gflop_per_item": None,
        "extra": {**{f"1 core: {k}": v for k, v in rows.items()},
                  **({f"GPU: {k}": v for k, v in res["gpu_decode"].items()}
                     if isinstance(res.get("gpu_decode"), dict) else {"GPU": res.get("gpu_decode")})},
    }
    return res


# -- report ----------------------------------------------------------------------------------------
def print_table(rows: list[dict[str, Any]], bound: dict[str, Any] | None, card: str) -> None:
    print()
    print(f"== capcurate GPU benchmark on {card}; bound: "
          f"{fmt(bound and bound.get('tflops'))} TFLOP/s ({bound and bound.get('what')}) ==")
    head = (f"{'stage':<10} {'capcurate steady':>16} {'capcurate e2e':>14} {'model alone':>12} {'ratio':>6} "
            f"{'GFLOP/item':>10} {'%bound cc':>9} {'%bound alone':>12}  unit / baseline")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['stage']:<10} {fmt(r.get('capcurate_steady')):>16} {fmt(r.get('capcurate_e2e')):>14} "
              f"{fmt(r.get('alone')):>12} {fmt(r.get('ratio_steady'), '.2f'):>6} "
              f"{fmt(r.get('gflop_per_item')):>10} {fmt(r.get('pct_bound_capcurate')):>9} "
              f"{fmt(r.get('pct_bound_alone')):>12}  {r['unit']}; {r.get('alone_what', '')}; {r.get('what', '')}")
        for k, v in (r.get("extra") or {}).items():
            if v is None or isinstance(v, (dict, list)):
                continue
            print(f"{'':<10}   {k}: {fmt(v, '.3g') if isinstance(v, float) else v}")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, 64 images, CPU: check the script here")
    ap.add_argument("--json-out", default=None, help="write every number (and the card name) here")
    ap.add_argument("--only", default="recaption,score,train,input",
                    help="comma-separated stages to run (also: vlm, opt-in)")
    ap.add_argument("--budget", type=float, default=290.0, help="seconds for the whole run (stages shrink)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--vlm-compile", action="store_true",
                    help="the VLM row also with --compile (static KV cache, compiled decoding step)")
    ap.add_argument("--vlm-compile-only", action="store_true",
                    help="with --vlm-compile: skip the plain VLM run (when it was measured before)")
    ap.add_argument("--score-variants", action="store_true",
                    help="score also with --decode cpu and --batch-size 512 (about 40 s more on a GPU)")
    args = ap.parse_args()
    if args.smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    cfg = make_cfg(args.smoke)
    cfg.score_variants = args.score_variants
    cfg.vlm_compile = args.vlm_compile or args.vlm_compile_only
    cfg.vlm_plain = not args.vlm_compile_only
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    t_start = time.time()
    deadline = t_start + args.budget

    def left(reserve: float) -> float:
        return deadline - time.time() - reserve

    report: dict[str, Any] = {"smoke": cfg.smoke, "config": asdict(cfg), "stages": {}, "errors": {}}

    def save() -> None:  # after every stage, so a run cut off from outside still leaves its numbers
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))

    def on_term(signum, frame):
        for pid in list(_CHILDREN):
            _kill_group(pid)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    import resource

    import torch  # torch.cuda.is_available() does not create a CUDA context: the JPEG pool may still fork

    if not cfg.smoke and not torch.cuda.is_available():
        report["errors"]["cuda"] = "no CUDA device visible (torch.cuda.is_available() is False)"
        save()
        log("no CUDA device: run with --smoke on a CPU machine")
        return 2
    report["open_files_limit"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    tmp = Path(tempfile.mkdtemp(prefix="capcurate-gpu-bench-"))
    log(f"temporary directory {tmp}")
    try:
        # 1. data, before CUDA is used (the JPEG pool forks)
        t = time.time()
        need_inf = bool(only & {"recaption", "score", "input", "vlm"})
        jpegs = make_jpegs(cfg.images, cfg.image_size) if need_inf else []
        ds = build_inference_dataset(tmp / "ds", jpegs, cfg.per_shard) if need_inf else None
        # score gets its own copy: on the recaptioned one its default would also score the new captions
        ds_score = (build_inference_dataset(tmp / "ds-score", [jpegs[i % len(jpegs)] for i in range(cfg.score_images)],
                                            cfg.per_shard) if "score" in only else None)
        shard_dir, pattern = tmp / "train-shards", ""
        if "train" in only:
            try:
                train_jpegs = make_jpegs(cfg.train_unique, (cfg.train_size, cfg.train_size), seed0=10_000_000)
                pattern, _ = write_train_shards(shard_dir, train_jpegs, cfg.train_samples, cfg.train_per_shard)
                train_jpegs = None
            except Exception as e:
                report["errors"]["train_data"] = traceback.format_exc()
                log(f"writing the train shards failed: {e}")
                only.discard("train")
        report["data_seconds"] = round(time.time() - t, 1)
        log(f"data ready in {report['data_seconds']} s: {len(jpegs)} JPEGs {cfg.image_size[0]}x{cfg.image_size[1]}"
            f" in {ds}; {cfg.train_samples if pattern else 0} train samples ({cfg.train_unique} distinct "
            f"{cfg.train_size}px JPEGs) in {pattern}")

        import transformers

        if cfg.smoke:
            torch.set_num_threads(1)  # as capcurate does on a CPU beside its decode workers; no OpenMP spinning
        card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"
        report.update(card=card, torch=torch.__version__, transformers=transformers.__version__,
                      cuda=torch.version.cuda, cpu_count=os.cpu_count(), python=sys.version.split()[0])
        log(f"device: {card}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers "
            f"{transformers.__version__}; {os.cpu_count()} CPU cores")
        bound = None
        try:
            report["bound"] = measure_bound(cfg)
            bound = report["bound"]["tflops"]
            log(f"bound: {report['bound']['what']}: {bound:.1f} TFLOP/s")
        except Exception as e:
            report["errors"]["bound"] = traceback.format_exc()
            log(f"bound failed: {e}")

        blip_ref, blip_cfg = None, None
        if only & {"recaption", "input"}:
            try:
                t = time.time()
                blip_ref, blip_cfg = build_blip(tmp, cfg.blip, cfg.device)
                log(f"BLIP-{cfg.blip} built and saved in {time.time() - t:.1f} s: {blip_ref}")
            except Exception as e:
                report["errors"]["build_blip"] = traceback.format_exc()
                log(f"building BLIP failed: {e}")

        stages = [
            # (name, most seconds for its capcurate child(ren), seconds kept back for the later stages, run)
            ("recaption", 120.0, 140.0,
             lambda lim: stage_recaption(cfg, tmp, ds, blip_ref, blip_cfg, bound, lim)),
            ("score", 60.0, 100.0, lambda lim: stage_score(cfg, tmp, ds_score, bound, lim)),
            ("train", 200.0, 10.0, lambda lim: stage_train(cfg, tmp, shard_dir, pattern, bound, lim)),
            ("input", 0.0, 0.0, lambda lim: stage_input(cfg, jpegs, blip_ref,
                                                       blip_cfg["vision"]["image_size"] if blip_cfg else 384)),
            ("vlm", 150.0, 0.0, lambda lim: stage_vlm(cfg, tmp, jpegs, lim)),
        ]
        for name, max_limit, reserve, fn in stages:
            if name not in only:
                continue
            limit = max_limit if cfg.smoke else min(max_limit, left(reserve))
            if name == "recaption" and blip_ref is None:
                continue  # building the model failed: reported above
            if max_limit and limit < 25:
                report["errors"][name] = f"skipped: {left(0):.0f} s of the {args.budget:.0f} s budget left"
                log(report["errors"][name])
                continue
            log(f"== stage {name} ==")
            t = time.time()
            try:
                report["stages"][name] = fn(limit)
                report["stages"][name]["seconds"] = round(time.time() - t, 1)
            except Exception as e:
                report["errors"][name] = traceback.format_exc()
                log(f"stage {name} failed: {type(e).__name__}: {e}\n{report['errors'][name]}")
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            log(f"stage {name}: {time.time() - t:.1f} s")
            save()
        rows = [s["row"] for s in report["stages"].values() if "row" in s]
        report["table"] = rows
        report["total_seconds"] = round(time.time() - t_start, 1)
        print_table(rows, report.get("bound"), card)
        for name, err in report["errors"].items():
            print(f"error in {name}: {err.strip().splitlines()[-1] if err.strip() else err}")
        log(f"total {report['total_seconds']} s")
    finally:
        if args.json_out:
            save()
            log(f"wrote {args.json_out}")
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
