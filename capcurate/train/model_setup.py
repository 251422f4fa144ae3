"""Build the open_clip model, transforms, tokenizer and optimizer a training run needs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, ModelLoadError
from ..models.conv_stem import apply_conv_stem, wants_conv_stem
from ..models.openclip_loader import init_coca_decoder, model_config, register_config_file
from .config import TrainConfig
from .gpu_batches import CropAug


@dataclass
class ModelSetup:
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    name: str                       # the name open_clip knows it by
    model_cfg: dict[str, Any]       # what RUN/model/open_clip_config.json records
    preprocess_cfg: dict[str, Any]
    tokenizer_dir: Path | None      # a local HF tokenizer folder to ship with RUN/model
    train_aug: CropAug | None = None  # preprocess_train as a crop spec (None: run it on PIL images)


def build_model(cfg: TrainConfig, device: torch.device) -> ModelSetup:
    import open_clip

    if bool(cfg.model) == bool(cfg.model_config):
        raise InputError("give exactly one of --model (an open_clip architecture) or --model-config FILE.json")
    if cfg.model_config:
        path = Path(cfg.model_config)
        if not path.is_file():
            raise InputError(f"--model-config {path} does not exist")
        name = register_config_file(path)  # capcurate's own keys (a conv stem) stay out of open_clip's view
    else:
        name = cfg.model
    base = model_config(name) if cfg.model_config else open_clip.get_model_config(name)
    if base is None:
        raise ModelLoadError(f"unknown open_clip architecture {name!r}; see open_clip.list_models() "
                             "or pass --model-config FILE.json")
    extra: dict[str, Any] = {}
    if cfg.loss == "siglip":
        # SigLIP's published initialisation: t' = log 10, b = -10
        extra = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}
    torch.manual_seed(cfg.seed)  # same initial weights on every rank and on every restart
    from ..models.ref import local_weights

    pretrained = local_weights(cfg.pretrained)  # weights in object storage: a cached local copy
    try:
        model, pre_train, pre_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, output_dict=True, **extra)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot build {name}: {msg}") from None
    if wants_conv_stem(base):
        if cfg.pretrained:
            raise InputError("--pretrained weights do not fit a conv-stem model (vision_cfg.conv_stem)")
        apply_conv_stem(model)  # before the optimizer is built and any checkpoint loads
    if not cfg.pretrained:
        init_coca_decoder(model)  # open_clip leaves a random CoCa's decoder projection uninitialised
    if cfg.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups, freeze_bn_stats=True)
    model_cfg = {**base, **extra}
    tok_name = (model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name")
    tok_dir = Path(tok_name) if tok_name and Path(tok_name).is_dir() else None
    return ModelSetup(model, pre_train, pre_val, tokenizer, name, model_cfg,
                      open_clip.get_model_preprocess_cfg(model), tok_dir, CropAug.from_transform(pre_train))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; gains, biases and the logit scale get no weight decay (as in open_clip_train)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    # on a GPU, one fused kernel updates every parameter instead of a dozen launches per tensor (the
    # step is what bounds training once the input pipeline keeps up); CPU runs keep the reference loop
    on_cuda = any(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(
        [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.wd}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True if on_cuda else None,
    )
