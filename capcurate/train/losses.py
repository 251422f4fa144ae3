"""Thin wrappers that pick open_clip's losses and feed them the model's output dict."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError

LOSSES = ("clip", "siglip", "coca")


def is_coca(model: torch.nn.Module) -> bool:
    return hasattr(model, "text_decoder")


def build_loss(name: str, model: torch.nn.Module, *, rank: int = 0, world_size: int = 1,
               local_loss: bool = False, gather_with_grad: bool = False,
               caption_loss_weight: float = 2.0, clip_loss_weight: float = 1.0,
               pad_id: int = 0) -> torch.nn.Module:
    """``clip``: InfoNCE (ClipLoss); ``siglip``: SigLipLoss; ``coca``: CoCaLoss (contrastive + captioning)."""
    from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

    if name not in LOSSES:
        raise InputError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    if name == "coca" and not is_coca(model):
        raise InputError(f"--loss coca needs a CoCa model (a config with multimodal_cfg); got {type(model).__name__}")
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size)
    if name == "coca":
        return CoCaLoss(caption_loss_weight=caption_loss_weight, clip_loss_weight=clip_loss_weight,
                        pad_id=pad_id, local_loss=local_loss, gather_with_grad=gather_with_grad,
                        rank=rank, world_size=world_size)
    return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                    rank=rank, world_size=world_size)


def compute_loss(loss_fn: torch.nn.Module, out: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Loss terms by name (``contrastive_loss``, ``caption_loss``) from the model's output dict."""
    from open_clip.loss import CoCaLoss, SigLipLoss

    if isinstance(loss_fn, CoCaLoss):
        return loss_fn(out["image_features"], out["text_features"], out["logits"], out["labels"],
                       out["logit_scale"], output_dict=True)
    if isinstance(loss_fn, SigLipLoss):
        return loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                       out["logit_bias"], output_dict=True)
    # CoCa models trained with a plain contrastive loss still return logits/labels: ignore them
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"],
                   out.get("logit_bias"), output_dict=True)
