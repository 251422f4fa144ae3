"""A convolutional stem for open_clip's ViT ("ViT-C", Xiao et al. 2021, "Early Convolutions Help
Transformers See Better"): stride-2 3x3 convolutions in place of the patch embedding.

A ViT's patch embedding is one linear map of each patch's pixels; a small ViT trained from scratch on a
few thousand images learns shape poorly through it (CapWorld's CoCa: ~43% shape after 28,000 samples,
where a small CNN probe reaches 92%). open_clip's CoCa takes only its own ViT as image tower (a timm tower
has no token output), so the stem replaces ``visual.conv1``: it maps [B, 3, H, W] to the same
[B, width, H/patch, W/patch] grid, and everything after it (class token, positions, transformer, pooler)
is unchanged.

The switch is ``"conv_stem": true`` in a config's ``vision_cfg``, a capcurate key: ``split_config``
strips it before open_clip sees the config, and ``apply_conv_stem`` swaps the module in after open_clip
built the model (before any weights load). Such models load through capcurate, not plain open_clip.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

KEY = "conv_stem"


class _GroupNorm(nn.GroupNorm):
    """GroupNorm in float32 whatever the input's dtype: low-precision open_clip models keep norms in
    float32 while their convolutions run in bf16/fp16 (as open_clip's own LayerNorm does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


class ConvStem(nn.Module):
    """log2(patch) conv3x3-stride-2 + GroupNorm + GELU layers (channels doubling up to ``width``), then a
    1x1 projection to ``width``: the same output grid as a ``patch`` x ``patch`` patch embedding."""

    def __init__(self, width: int, patch: int, in_channels: int = 3):
        super().__init__()
        steps = patch.bit_length() - 1
        if patch < 2 or 1 << steps != patch:
            raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(steps):
            c_out = max(16, width >> (steps - 1 - i))
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), _GroupNorm(1, c_out), nn.GELU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def split_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the config open_clip accepts, whether it asks for a conv stem)."""
    out = copy.deepcopy(cfg)
    stem = bool((out.get("vision_cfg") or {}).pop(KEY, False))
    return out, stem


def wants_conv_stem(cfg: dict[str, Any] | None) -> bool:
    return bool(((cfg or {}).get("vision_cfg") or {}).get(KEY))


def apply_conv_stem(model: nn.Module) -> None:
    """Replace ``model.visual.conv1`` (a ViT's patch embedding) by a ConvStem on its device and dtype."""
    visual = getattr(model, "visual", None)
    conv = getattr(visual, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or conv.kernel_size[0] != conv.stride[0]:
        raise ValueError(f"{KEY}: the image tower is not an open_clip ViT with a patch embedding")
    stem = ConvStem(conv.out_channels, conv.kernel_size[0], conv.in_channels)
    visual.conv1 = stem.to(device=conv.weight.device, dtype=conv.weight.dtype)
