"""Every training option in one place: the CLI fills it, ``RUN/run.json`` records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
CPU_INLINE_DECODE_CORES = 4  # --workers auto on the CPU: decode in the training process up to this many cores
# options that may differ between a run and its resumption without changing the result
RESUMABLE_CHANGES = {"resume", "workers_hint", "log_every", "eval_every", "eval_data", "keep_checkpoints",
                     "save_every", "device", "overwrite", "max_steps", "compile",
                     "text_tower"}  # the text tower: the same loss up to rounding


@dataclass
class TrainConfig:
    data: str
    output: str
    model: str | None = None           # open_clip architecture name, e.g. ViT-B-32 / coca_ViT-B-32
    model_config: str | None = None    # or a JSON config file in open_clip's model_configs format
    pretrained: str | None = None      # open_clip tag or weights file to fine-tune from
    loss: str = "clip"                 # clip | siglip | coca
    batch_size: int = 256              # per rank, per micro-batch
    epochs: int = 1
    train_num_samples: int | None = None
    lr: float = 5e-4
    wd: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: int = 0
    grad_clip: float | None = 1.0
    precision: str = "auto"           # auto (bf16 on a GPU, fp32 on the CPU) | fp32 | bf16 | fp16
    accum: int = 1
    compile: bool = False
    workers: int | str = "auto"       # auto: usable cores / processes on this machine - 1 (0 on a few CPU cores)
    decode: str = "auto"               # auto (gpu on cuda) | cpu | gpu: where training images are decoded
    seed: int = 0
    shuffle_buffer: int = 1000
    shuffle_shards: bool = True
    local_loss: bool = False
    gather_with_grad: bool = False
    caption_loss_weight: float = 2.0
    clip_loss_weight: float = 1.0
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    save_every: int = 0                # steps; 0 = at the end of each epoch only
    keep_checkpoints: int = 2
    resume: str | None = None          # "latest" or a checkpoint dir
    eval_data: str | None = None
    eval_every: int = 0
    log_every: int = 1
    device: str | None = None          # None/auto: cuda when available
    overwrite: bool = False
    max_steps: int | None = None       # stop early (smoke tests, benchmarks); schedule still spans epochs
    caption_keys: str | None = None    # e.g. "raw,blip": draw each sample's caption from these .json keys
    caption_probs: str | None = None   # e.g. "0.2,0.8" (default: equal); None keys: the shards' recipe or .txt
    text_tower: str = "auto"           # auto | packed | trimmed | padded (train/text_tower.py)

    def resolved(self) -> TrainConfig:
        """This config with auto device, precision, workers and decode made concrete for this process
        (what run.json and checkpoints record, and what --resume compares)."""
        from ..devices import (
            available_cpus,
            resolve_decode,
            resolve_device,
            resolve_precision,
            resolve_workers,
        )
        from ..errors import InputError
        from .distributed import local_world_size

        device = resolve_device(self.device)
        precision = resolve_precision(self.precision, device)
        if self.workers in (None, "", "auto"):
            cores = available_cpus() // local_world_size()
            # on a few CPU cores the training step itself uses every core, and a decode process only takes
            # them away (2 cores, tiny CoCa: 131 samples/s with 0 workers, 102 with 1); elsewhere one decode
            # process per core, less one per rank
            workers = 0 if device == "cpu" and cores <= CPU_INLINE_DECODE_CORES else max(1, cores - 1)
        else:
            workers = resolve_workers(self.workers)
        decode = resolve_decode(self.decode, device)
        if decode not in ("cpu", "gpu"):
            raise InputError(f"--decode {decode}: training decodes with auto, cpu or gpu")
        return replace(self, device=device, precision=precision, workers=workers, decode=decode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def differences(self, other: TrainConfig) -> list[str]:
        """Options that change the training result and differ from ``other``."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k not in RESUMABLE_CHANGES and a[k] != b[k]]
