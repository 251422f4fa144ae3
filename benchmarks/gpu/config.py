"""Sizes of one benchmark run: the GPU defaults, and --smoke (tiny models, a few images, the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Cfg:
    smoke: bool
    device: str
    precision: str = "bf16"
    images: int = 2048               # recaption / score / input
    per_shard: int = 512
    image_size: tuple[int, int] = (512, 384)
    image_scale: float = 1.0         # mixed sizes (score) scaled by this
    blip: str = "large"
    tokens: int = 20                 # greedy rows: exactly this many new tokens
    beam_images: int = 512           # the default decoding (beam 3, up to 30 tokens) is slower
    clip_arch: str = "ViT-L-14"
    gen_batch: int = 256             # the ceiling's batch (capcurate's own auto batch on the stage side)
    score_sample: int = 64           # rows compared with the fp32 reference
    score_tol: float = 2e-2
    train_arch: str = "ViT-B-32"
    train_samples: int = 16384
    train_unique: int = 2048
    train_size: int = 256
    train_per_shard: int = 512
    train_batch: int = 256
    train_steps: int = 40
    train_loss_tol: float = 0.15     # |capcurate - open_clip_train| mean loss over the steps, relative
    step_iters: int = 10             # train step alone
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    input_images: int = 256


def make_cfg(smoke: bool) -> Cfg:
    """The GPU run, or the same code paths at tiny size on the CPU."""
    if not smoke:
        return Cfg(smoke=False, device="cuda")
    return Cfg(smoke=True, device="cpu", precision="fp32", images=16, per_shard=8, image_size=(64, 48),
               image_scale=0.125, blip="tiny", tokens=5, beam_images=4, clip_arch="", gen_batch=8,
               score_sample=8, train_arch="", train_samples=32, train_unique=8, train_size=40,
               train_per_shard=16, train_batch=8, train_steps=2, step_iters=2, workers=1, input_images=8,
               train_loss_tol=0.5)  # batches of 8: the mean of 2 steps varies a lot between trainers


def with_overrides(cfg: Cfg, **kw: object) -> Cfg:
    return replace(cfg, **{k: v for k, v in kw.items() if v is not None})
