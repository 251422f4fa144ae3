"""Sizes of one benchmark run: the GPU defaults, and --smoke (tiny models, a few images, the CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Cfg:
    smoke: bool
    device: str
    precision: str = "bf16"
    images: int = 2048  # recaption / score / input
    per_shard: int = 512
    image_size: tuple[int, int] = (512, 384)
    image_scale: float = 1.0  # mixed sizes (score) scaled by this
    blip: str = "large"
    tokens: int = 20  # greedy rows: exactly this many new tokens
    beam_images: int = 512  # the default decoding (beam 3, up to 30 tokens) is slower
    beam_max_tokens: int | None = (
        None  # None: the default 30; --smoke caps it (a tiny model never stops early)
    )
    vlm: str = "qwen2-vl-2b"  # the vlm family: Qwen2-VL-2B's shape (random weights)
    vlm_images: int = 512
    vlm_batch: int = 64  # generate alone: images per call
    clip_arch: str = "ViT-L-14"
    gen_batch: int = 256  # the ceiling's batch (capcurate's own auto batch on the stage side)
    stage_batch: int | str = "auto"  # --batch-size of the inference stages; --smoke: several small batches
    score_sample: int = 64  # rows compared with the fp32 reference
    score_tol: float = 2e-2
    train_arch: str = "ViT-B-32"
    train_samples: int = 16384
    train_unique: int = 2048
    train_size: int = 256
    train_per_shard: int = 512
    train_batch: int = 256
    train_steps: int = 40
    train_loss_tol: float = 0.15  # |capcurate - open_clip_train| mean loss over the steps, relative
    step_iters: int = 10  # train step alone
    workers: int = max(1, (os.cpu_count() or 2) - 1)
    input_images: int = 256


def make_cfg(smoke: bool) -> Cfg:
    """The GPU run, or the same code paths at tiny size on the CPU."""
    if not smoke:
        return Cfg(smoke=False, device="cuda")
    return Cfg(
        smoke=True,
        device="cpu",
        precision="fp32",
        images=8,
        per_shard=4,
        image_size=(64, 48),
        image_scale=0.125,
        blip="tiny",
        tokens=5,
        beam_images=2,
        beam_max_tokens=8,
        vlm="tiny",
        vlm_images=8,
        vlm_batch=4,
        clip_arch="",
        gen_batch=8,
        stage_batch=4,
        score_sample=8,
        train_arch="",
        train_samples=32,
        train_unique=8,
        train_size=40,
        train_per_shard=16,
        train_batch=8,
        train_steps=2,
        step_iters=2,
        workers=1,
        input_images=8,
        train_loss_tol=0.5,
    )  # batches of 8: the mean of 2 steps varies a lot between trainers


def stage_options(cfg: Cfg) -> dict[str, Any]:
    """What a row passes to a stage beyond its defaults: nothing on the GPU (the defaults are what is
    measured); in --smoke the CPU, wherever it runs (a GPU machine too), and no decode worker processes
    (starting them costs seconds; the smoke run checks the code paths, not the speed)."""
    return {"device": "cpu", "workers": 0} if cfg.smoke else {}
