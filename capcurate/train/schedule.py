"""Learning-rate schedule: linear warmup, then cosine decay to zero (open_clip_train's ``cosine``)."""

from __future__ import annotations

import math


def cosine_with_warmup(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based), in [0, 1]."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / decay, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, *, warmup: int, total: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, warmup=warmup, total=total))
