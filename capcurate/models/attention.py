"""Fused attention (``torch.nn.functional.scaled_dot_product_attention``) for transformers models whose
classes have none: BLIP's ViT image tower.

transformers' BLIP (``BlipForConditionalGeneration``, the Salesforce/blip-* captioners) refuses
``attn_implementation="sdpa"`` and computes attention as matmul -> softmax -> matmul, materialising a
[batch, heads, 577, 577] matrix per layer of its ViT-L at 384 px. SDPA dispatches the same arithmetic to
FlashAttention / memory-efficient kernels on a GPU. Only the forward of each attention module instance
is replaced (not the class), outputs are identical up to float rounding (tested against eager), and
``attention_probs`` are no longer returned (generation never asks for them).

BLIP's text decoder keeps its eager attention: while decoding, each step attends with one query, where
a fused kernel gains little, and its cache handling changes between transformers releases.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def _blip_vision_forward(self: Any, hidden_states: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, None]:
    b, n, d = hidden_states.shape
    qkv = self.qkv(hidden_states).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
    p = self.dropout.p if self.training else 0.0
    out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], dropout_p=p, scale=self.scale)
    return self.projection(out.transpose(1, 2).reshape(b, n, d)), None


def use_sdpa(model: torch.nn.Module) -> int:
    """Give the attention modules of a transformers model that lacks SDPA a fused forward; returns how
    many were switched (0 for models transformers already runs with SDPA)."""
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name == "BlipAttention" and hasattr(module, "qkv"):
            module.forward = types.MethodType(_blip_vision_forward, module)
            patched += 1
    return patched
