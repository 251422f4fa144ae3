"""How many pixels of each image a VLM's processor keeps: ``--max-pixels`` / ``--min-pixels`` mapped onto
whatever resolution control the processor has, and the default budget when none is given.

Image tokens, and so the cost of a caption, grow with the pixels a processor keeps. Processors control
that in four ways, recognised by their settings rather than by a list of names:

- ``area`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): each image resized to an area in [min, max] pixels
  (``size.shortest_edge`` / ``size.longest_edge`` are pixel counts there);
- ``tiled-edge`` (Idefics3, SmolVLM with image splitting): the longest edge, in whole tiles of
  ``max_image_size``;
- ``edge`` (Pixtral, Mistral3): the longest edge, in whole patches;
- ``tiles`` (InternVL with ``crop_to_patches``, Llama 4): the number of fixed-size tiles.

Everything else (LLaVA, LLaVA-NeXT, Gemma3, PaliGemma, Florence-2, Idefics3 without splitting) has a
fixed input size: an explicit budget is refused there, since it could not change a thing.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from ...errors import InputError

# Alt-text captions name a subject, its attributes and the setting; 448x448 is the resolution SigLIP- and
# InternViT-class towers see and keeps Qwen2-VL at <= 256 image tokens, where Qwen's own default (12.8 MP)
# allows ~16k tokens per image. The default only ever lowers a processor's own limit.
DEFAULT_MAX_PIXELS = 448 * 448


@dataclass(frozen=True)
class PixelBudget:
    """The resolution control a processor got, for lineage and for ``--batch-size auto``'s probe image."""

    kind: str                  # area | tiled-edge | edge | tiles | fixed
    setting: str               # what was set, e.g. "size.longest_edge=448"
    max_pixels: int | None     # the most pixels one image keeps (None: fixed size, unknown here)
    min_pixels: int | None = None
    source: str = "default"    # default | --max-pixels

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "setting": self.setting, "max_pixels": self.max_pixels,
                "min_pixels": self.min_pixels, "source": self.source}


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _with(size: Any, **keys: int) -> Any:
    """``size`` (a dict or transformers' SizeDict) with ``keys`` replaced."""
    if isinstance(size, dict):
        return {**size, **keys}
    out = copy.copy(size)
    for k, v in keys.items():
        setattr(out, k, v)
    return out


def control_kind(ip: Any) -> str:
    """Which resolution control an image processor has (see the module docstring)."""
    size = getattr(ip, "size", None)
    if getattr(ip, "merge_size", None) and _get(size, "longest_edge") and _get(size, "shortest_edge"):
        return "area"
    if getattr(ip, "max_image_size", None) and _get(size, "longest_edge"):
        return "tiled-edge" if getattr(ip, "do_image_splitting", False) else "fixed"
    if _get(size, "longest_edge") and getattr(ip, "patch_size", None):
        return "edge"
    if getattr(ip, "max_patches", None) and _get(size, "height") and _get(size, "width") \
            and getattr(ip, "crop_to_patches", True):
        return "tiles"
    return "fixed"


def apply_pixel_budget(ip: Any, original: dict[str, Any], max_pixels: int | None,
                       min_pixels: int | None, *, where: str) -> PixelBudget:
    """Set ``ip``'s resolution control from the processor's ``original`` settings (``snapshot``) and the
    request: an explicit ``max_pixels`` is set as given, otherwise ``DEFAULT_MAX_PIXELS`` where it is
    lower than the processor's own limit. Refuses (InputError) a budget the processor cannot take."""
    for k, v in original.items():
        setattr(ip, k, copy.copy(v))
    kind = control_kind(ip)
    source = "--max-pixels" if max_pixels is not None else "default"
    name = type(ip).__name__
    if min_pixels is not None and kind != "area":
        raise InputError(f"--min-pixels: {name} of {where} has no smallest area (only area-budget processors "
                         "such as Qwen2-VL's take one)")
    if kind == "fixed":
        if max_pixels is not None:
            raise InputError(f"--max-pixels: {name} of {where} has no pixel budget (a fixed input size); "
                             "leave --max-pixels out")
        return PixelBudget("fixed", "processor's own", None)
    size = ip.size
    if kind == "area":
        lo, hi = _get(size, "shortest_edge"), _get(size, "longest_edge")
        hi = max_pixels if max_pixels is not None else min(hi, DEFAULT_MAX_PIXELS)
        lo = min_pixels if min_pixels is not None else min(lo, hi)
        if lo > hi:
            raise InputError(f"--min-pixels {lo} exceeds the pixel budget {hi}")
        ip.size = _with(size, shortest_edge=lo, longest_edge=hi)
        return PixelBudget(kind, f"size.shortest_edge={lo}, size.longest_edge={hi}", hi, lo, source)
    if kind == "tiles":
        tile = _get(size, "height") * _get(size, "width")
        own = ip.max_patches
        n = max(1, (max_pixels or DEFAULT_MAX_PIXELS) // tile)
        n = n if max_pixels is not None else min(own, n)
        ip.max_patches = n
        return PixelBudget(kind, f"max_patches={n}", n * tile, None, source)
    if kind == "tiled-edge":
        step = _get(ip.max_image_size, "longest_edge")
    else:  # edge
        step = ip.patch_size if isinstance(ip.patch_size, int) else _get(ip.patch_size, "height")
    own = _get(size, "longest_edge")
    edge = max(step, math.isqrt(max_pixels or DEFAULT_MAX_PIXELS) // step * step)
    edge = edge if max_pixels is not None else min(own, edge)
    ip.size = _with(size, longest_edge=edge)
    return PixelBudget(kind, f"size.longest_edge={edge}", edge * edge, None, source)


def snapshot(ip: Any) -> dict[str, Any]:
    """The processor's own resolution settings, so each request starts from them (never from the last)."""
    return {k: copy.copy(getattr(ip, k)) for k in ("size", "max_patches") if getattr(ip, k, None) is not None}
