"""Image-text scorers: one interface over open_clip and transformers (CLIPModel, SigLIP-style) models.

A ``Scorer`` gives the score stage three things: ``preprocess`` (PIL image -> tensor, run in DataLoader
workers), ``encode_images`` and ``encode_texts`` (batches -> L2-normalised float32 embeddings on the CPU).
The score is the plain cosine similarity of the two embeddings; the model's logit scale (and SigLIP's
bias) is deliberately not part of it, as in DataComp's CLIP score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelLoadError
from ..inputs.spec import from_hf, from_openclip
from .compiling import compile_image_tower
from .openclip_loader import input_dtype, open_clip_preprocess_cfg
from .ref import ModelRef, parse_model_ref
from .text_trim import token_trimmer

PRECISIONS = ("fp32", "fp16", "bf16")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Scorer:
    """What the score stage needs from any image-text model."""

    preprocess: Callable[[Any], torch.Tensor]
    # [n, C, H, W] -> [n, d] normalised float32, on the CPU (``to_cpu=False``: left on the model's device)
    encode_images: Callable[..., torch.Tensor]
    encode_texts: Callable[[Sequence[str]], torch.Tensor]  # n texts -> [n, d] normalised
    embed_dim: int
    backend: str
    model: dict[str, Any] = field(default_factory=dict)  # lineage: reference, backend, architecture
    # smallest (width, height) preprocessing needs; lets JPEGs decode at a reduced scale (images.decode_image)
    input_size: tuple[int, int] | None = None
    # the same preprocessing as data (capcurate.inputs.ImageSpec): decode workers and the GPU replay it;
    # None when the model's processor has steps a spec cannot express (then ``preprocess`` runs per image)
    spec: Any = None
    input_dtype: torch.dtype = torch.float32  # what encode_images wants its pixels in (cast on the device)


def _normalise(x: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return x.cpu() if to_cpu else x


def load_scorer(ref: str | ModelRef, *, pretrained: str | None = None, device: str = "cpu", compile: bool = False,
                precision: str = "fp32") -> Scorer:
    """Resolve a reference (``openclip:...``, ``hf:...``, a run or model directory) into a Scorer."""
    if precision not in PRECISIONS:
        raise ModelLoadError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if isinstance(ref, str):
        ref = parse_model_ref(ref, pretrained=pretrained)
    if ref.kind == "openclip":
        return _openclip_scorer(ref, device, precision, compile)
    if ref.kind == "hf":
        return _hf_scorer(ref, device, precision, compile)
    raise ModelLoadError(f"{ref.text}: no scorer backend for model kind {ref.kind!r}")


# -- open_clip -------------------------------------------------------------------------------------
def _openclip_scorer(ref: ModelRef, device: str, precision: str, compile: bool = False) -> Scorer:
    from .openclip_loader import load_openclip

    bundle = load_openclip(ref, device=device, precision=precision)
    model, tokenizer = bundle.model, bundle.tokenizer
    if compile:
        compile_image_tower(model)
    if not hasattr(model, "encode_text") or not hasattr(model, "encode_image"):
        raise ModelLoadError(f"{ref.text} is not a CLIP-style open_clip model (no encode_image/encode_text)")
    dtype = input_dtype(getattr(model, "visual", model))  # low precision leaves some parameters fp32
    # the text tower runs over the longest caption of a chunk, not the whole context (models/text_trim.py)
    trim = token_trimmer(model, tokenizer)

    @torch.inference_mode()
    def encode_images(pixels: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        return _normalise(model.encode_image(pixels.to(device=device, dtype=dtype)), to_cpu)

    @torch.inference_mode()
    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        return _normalise(model.encode_text(trim(tokenizer(list(texts))).to(device)))

    embed_dim = int(bundle.model_cfg.get("embed_dim", 0))
    size = getattr(getattr(model, "visual", None), "image_size", None)
    if isinstance(size, int):
        size = (size, size)
    return Scorer(bundle.preprocess, encode_images, encode_texts, embed_dim, "open_clip",
                  {**ref.describe(), "backend": "open_clip", "architecture": bundle.model_name,
                   "precision": precision}, tuple(size) if size else None,
                  spec=from_openclip(open_clip_preprocess_cfg(model)), input_dtype=dtype)


# -- transformers ----------------------------------------------------------------------------------
class _HFImageTransform:
    """PIL image -> pixel tensor with the model's own image processor (picklable for DataLoader workers)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, img: Any) -> torch.Tensor:
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]


def _features(out: Any) -> torch.Tensor:
    # transformers < 5 returns the projected tensor; 5.x returns an output whose pooler_output holds it
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _hf_scorer(ref: ModelRef, device: str, precision: str, compile: bool = False) -> Scorer:
    from transformers import AutoModel, AutoProcessor

    try:
        model = AutoModel.from_pretrained(ref.name, dtype=_DTYPES[precision])
        processor = AutoProcessor.from_pretrained(ref.name)
    except (OSError, ValueError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"cannot load {ref.text}: {msg}") from None
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        raise ModelLoadError(
            f"{ref.text} is a {type(model).__name__}, not a CLIP-style dual encoder "
            "(expected CLIPModel, SiglipModel or another model with get_image_features/get_text_features)"
        )
    model.to(device).eval()
    if compile:
        compile_image_tower(model)
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ModelLoadError(f"{ref.text}: its processor lacks a tokenizer or an image processor")
    text_cfg = getattr(model.config, "text_config", model.config)
    max_length = int(getattr(text_cfg, "max_position_embeddings", 77))
    # SigLIP was trained on text padded to the full length; CLIP pools at EOS, so padding is harmless
    siglip_like = "siglip" in model.config.model_type
    padding = "max_length" if siglip_like else True
    dtype = input_dtype(getattr(model, "vision_model", model))  # the patch embedding's, not the first parameter's

    @torch.inference_mode()
    def encode_images(pixels: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
        feats = _features(model.get_image_features(pixel_values=pixels.to(device=device, dtype=dtype)))
        return _normalise(feats, to_cpu)

    @torch.inference_mode()
    def encode_texts(texts: Sequence[str]) -> torch.Tensor:
        enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length,
                        return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if siglip_like:
            enc.pop("attention_mask", None)  # SigLIP attends to the padding it was trained with
        return _normalise(_features(model.get_text_features(**enc)))

    proj = getattr(model.config, "projection_dim", None) or getattr(text_cfg, "hidden_size", 0)
    return Scorer(_HFImageTransform(image_processor), encode_images, encode_texts, int(proj), "transformers",
                  {**ref.describe(), "backend": "transformers", "architecture": type(model).__name__,
                   "precision": precision}, _hf_input_size(image_processor),
                  spec=from_hf(image_processor), input_dtype=dtype)


def _hf_input_size(image_processor: Any) -> tuple[int, int] | None:
    size = getattr(image_processor, "size", None) or {}

    def get(k: str) -> Any:  # a dict in transformers 4, a SizeDict in 5
        return size.get(k) if isinstance(size, dict) else getattr(size, k, None)

    if get("shortest_edge"):
        return (int(get("shortest_edge")),) * 2
    if get("height") and get("width"):
        return int(get("width")), int(get("height"))
    return None
