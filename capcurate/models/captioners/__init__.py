"""Captioners: one interface (``Captioner``); transformers backends for pixel captioners (BLIP, BLIP-2, GIT)
and chat-template VLMs, and an open_clip CoCa backend.

``load_captioner("hf:Salesforce/blip-image-captioning-large")`` or
``load_captioner("openclip:coca_ViT-L-14", pretrained=...)`` resolves the reference with
``parse_model_ref`` and returns a ready model; backends are imported lazily (they pull in torch models).
"""

from __future__ import annotations

from .base import (
    DECODINGS,
    DEFAULT_INSTRUCTIONS,
    DTYPES,
    STYLES,
    Captioner,
    DecodingConfig,
    clean_caption,
    image_seed,
)


def load_captioner(reference: str, *, pretrained: str | None = None, device: str = "cpu", dtype: str = "fp32",
                   trust_remote_code: bool = False, compile: bool = False) -> Captioner:
    """Turn a model reference a user typed into a loaded ``Captioner``."""
    from ...errors import InputError
    from ..ref import parse_model_ref

    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    ref = parse_model_ref(reference, pretrained)
    if ref.kind == "hf":
        from .hf import PIXEL_CAPTIONERS, HFCaptioner, load_hf_parts

        parts = load_hf_parts(ref.name, dtype=dtype, trust_remote_code=trust_remote_code)
        if getattr(parts[0], "model_type", "") in PIXEL_CAPTIONERS:
            return HFCaptioner(ref, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                               compile=compile, parts=parts)
        from .vlm import VLMCaptioner

        return VLMCaptioner(ref, parts, device=device, compile=compile)
    from .coca import CocaCaptioner

    return CocaCaptioner(ref, device=device, dtype=dtype, compile=compile)


__all__ = ["DECODINGS", "DEFAULT_INSTRUCTIONS", "DTYPES", "STYLES", "Captioner", "DecodingConfig",
           "clean_caption", "image_seed", "load_captioner"]
