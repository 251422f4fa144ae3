"""What a model family does to an image before it sees it, as data: resize, crop, rescale, normalise.

An ``ImageSpec`` is read off the model's own preprocessing (a transformers image processor or an
open_clip transform) and replays it on uint8 tensors, so the same steps run in a CPU decode worker or,
batched, on the GPU. Resizing is done on uint8 images with antialiasing (torchvision's antialiased
kernels follow PIL's), normalisation in float32 on the whole batch at the end. Where the model's
preprocessing has a step a spec cannot express (padding, tiling, dynamic resolution), ``from_*``
returns None and the caller falls back to running the model's own processor on each PIL image.

The tolerance against the model's own processor is tested per family in tests/test_inputs.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# PIL / transformers resample codes -> torchvision interpolation names
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_SUPPORTED = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ImageSpec:
    """Resize (shortest side to ``resize`` or exactly to ``resize``=(h, w)), optional centre crop, normalise."""

    resize: int | tuple[int, int]           # int: shortest side; (h, w): both sides ("squash")
    crop: tuple[int, int] | None            # (h, w) centre crop after resizing, or None
    interpolation: str                      # bicubic | bilinear | nearest
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float = 1 / 255
    family: str = ""                        # where it was read from, for lineage and errors
    # where a centre crop starts when the margin is odd: transformers floors, torchvision rounds
    crop_floor: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        """(h, w) of every preprocessed image."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            raise ValueError("a shortest-side resize without a crop gives images of varying size")
        return self.resize

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step, computed as torchvision/PIL-based ``Resize(int)`` computes it."""
        if not isinstance(self.resize, int):
            return self.resize
        short, long = (h, w) if h <= w else (w, h)
        new_short, new_long = self.resize, int(self.resize * long / short)
        return (new_short, new_long) if h <= w else (new_long, new_short)

    def resize_crop(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] or [n, 3, H, W] of one size (any device) -> uint8 at ``output_size``."""
        from torchvision.transforms.v2 import functional as F

        h, w = img.shape[-2:]
        size = list(self.resized_size(h, w))
        if [h, w] != size:
            mode = getattr(F.InterpolationMode, self.interpolation.upper())
            img = F.resize(img, size, interpolation=mode, antialias=mode != F.InterpolationMode.NEAREST)
        if self.crop is not None and tuple(img.shape[-2:]) != self.crop:
            h, w = img.shape[-2:]
            ch, cw = self.crop
            if ch > h or cw > w:
                return F.center_crop(img, list(self.crop))  # pads, as both libraries do
            if self.crop_floor:
                top, left = (h - ch) // 2, (w - cw) // 2
            else:
                top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            img = img[..., top:top + ch, left:left + cw]
        return img

    def normalize(self, batch: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 [n, 3, h, w] -> normalised float ``dtype`` on the batch's device.

        (x * rescale - mean) / std as the processors compute it, folded into one multiply and one
        subtract in place on the float32 copy (4x faster on a CPU core than the textbook form; the
        results differ by float rounding only).
        """
        dev = batch.device
        scale = torch.tensor([self.rescale / s for s in self.std], dtype=torch.float32, device=dev)
        shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=torch.float32,
                             device=dev)
        x = batch.to(torch.float32).mul_(scale.view(1, 3, 1, 1)).sub_(shift.view(1, 3, 1, 1))
        return x if dtype == torch.float32 else x.to(dtype)

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "resize": self.resize, "crop": self.crop,
                "interpolation": self.interpolation}


# -- transformers image processors -----------------------------------------------------------------
def _get(obj: Any, key: str) -> Any:
    """A field of a dict (transformers 4) or a SizeDict (transformers 5)."""
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def _interp(resample: Any) -> str | None:
    if resample is None:
        return "bicubic"
    name = getattr(resample, "name", None)  # PIL.Image.Resampling, PILImageResampling, InterpolationMode
    if isinstance(name, str):
        name = name.lower()
        return name if name in _SUPPORTED else None
    if isinstance(resample, int):
        name = _RESAMPLE.get(resample)
        return name if name in _SUPPORTED else None
    return None


def _triple(x: Any, default: float) -> tuple[float, float, float] | None:
    if x is None:
        return (default,) * 3
    if isinstance(x, (int, float)):
        return (float(x),) * 3
    vals = tuple(float(v) for v in x)
    return vals if len(vals) == 3 else None


def from_hf(image_processor: Any) -> ImageSpec | None:
    """The spec of a transformers image processor (CLIP, SigLIP, BLIP, BLIP-2, GIT...), or None.

    None for processors with steps a spec cannot replay: padding, tiling or dynamic resolution
    (LLaVA-NeXT, Qwen2-VL, Idefics...); those run their own processor per image.
    """
    p = image_processor
    if any(getattr(p, a, None) for a in ("do_pad", "do_image_splitting", "image_grid_pinpoints")):
        return None
    if any(getattr(p, a, None) for a in ("min_pixels", "max_pixels", "merge_size")):
        return None  # dynamic resolution (Qwen2-VL style)
    if getattr(p, "do_resize", True) is False:
        return None
    interp = _interp(getattr(p, "resample", None))
    if interp is None:
        return None
    size = getattr(p, "size", None)
    if _get(size, "shortest_edge") and not _get(size, "longest_edge"):
        resize: int | tuple[int, int] = int(_get(size, "shortest_edge"))
    elif _get(size, "height") and _get(size, "width"):
        resize = (int(_get(size, "height")), int(_get(size, "width")))
    else:
        return None
    crop = None
    if getattr(p, "do_center_crop", False):
        cs = getattr(p, "crop_size", None)
        if not (_get(cs, "height") and _get(cs, "width")):
            return None
        crop = (int(_get(cs, "height")), int(_get(cs, "width")))
    elif isinstance(resize, int):
        return None  # varying output sizes: let the processor decide
    do_norm = getattr(p, "do_normalize", True)
    mean = _triple(getattr(p, "image_mean", None) if do_norm else 0.0, 0.0)
    std = _triple(getattr(p, "image_std", None) if do_norm else 1.0, 1.0)
    if mean is None or std is None:
        return None
    rescale = float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0
    return ImageSpec(resize, crop, interp, mean, std, rescale, family=type(p).__name__, crop_floor=True)


# -- open_clip ------------------------------------------------------------------------------------
def from_openclip(preprocess_cfg: dict[str, Any]) -> ImageSpec | None:
    """The spec of open_clip's eval transform from ``open_clip.get_model_preprocess_cfg(model)``."""
    size = preprocess_cfg.get("size", 224)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mode = preprocess_cfg.get("resize_mode", "shortest")
    interp = preprocess_cfg.get("interpolation", "bicubic")
    if interp not in _SUPPORTED:
        return None
    mean = _triple(preprocess_cfg.get("mean"), 0.0)
    std = _triple(preprocess_cfg.get("std"), 1.0)
    if mean is None or std is None:
        return None
    if mode == "shortest":
        if h != w:
            return None  # open_clip resizes the shortest side to max(size) then crops: not modelled
        return ImageSpec(h, (h, w), interp, mean, std, family="open_clip")
    if mode == "squash":
        return ImageSpec((h, w), None, interp, mean, std, family="open_clip")
    return None  # "longest" pads with a fill colour: run open_clip's own transform

