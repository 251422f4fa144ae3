"""Small open_clip model configs (open_clip's model_configs JSON format) over the world's tokenizer.

Two sizes, written side by side: ``tiny_*`` for 2 CPU cores (the demo), ``small_*`` for one GPU
(``QUICKSTART_SCALE=gpu``). Load them with ``openclip:DIR/models/tiny_clip.json``; their text_cfg points
open_clip at the world's tokenizer directory, so everything works offline.

Why these towers:

- the CLIPs (scorer and the per-strategy CLIPs) use open_clip's ModifiedResNet: trained from scratch on a
  few thousand images a small convnet learns shape within the demo's budget where the ViT it replaces
  stayed at chance, and it is about 3x cheaper per sample on a CPU (329 vs 104 samples/s on 2 cores);
- the CoCa captioner must be a ViT (open_clip's CoCa reads image tokens, which only its VisionTransformer
  returns), so it gets what helps a small ViT most on little data: fixed 2D sin-cos position embeddings
  (learned ones start as noise) and 16-pixel patches at 64 px, which halve its cost so that it can see
  more samples in the same time; and a convolutional stem in place of the patch embedding
  (``vision_cfg.conv_stem``, capcurate/models/conv_stem.py): on the demo's seed 0, same 28,000 samples,
  it took the pool captions' shape from 41.4% to 61.0% right (colour and shape: 41.1% -> 60.8%) for 8%
  more training time;
- the CoCas read 16 tokens, not 32 (``write_model_configs(caption_context_length=...)``): they learn the
  true captions only, which never pass 15 tokens, and half-length text towers cost less.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import atomic

SIZES = ("tiny", "small")


def _vit(image_size: int, width: int, layers: int, patch_grid: int) -> dict[str, Any]:
    return {"image_size": image_size, "layers": layers, "width": width,
            "patch_size": max(2, image_size // patch_grid), "head_width": 64, "mlp_ratio": 4.0,
            "pos_embed_type": "sin_cos_2d"}


def _resnet(image_size: int, width: int, layers: list[int]) -> dict[str, Any]:
    # ModifiedResNet downsamples 32x: at 64 px its attention pool sees a 2x2 grid (plus the mean token)
    return {"image_size": image_size, "layers": layers, "width": width, "head_width": 64}


def _text(vocab_size: int, tokenizer_dir: str, context_length: int, width: int, layers: int) -> dict[str, Any]:
    return {"context_length": context_length, "vocab_size": vocab_size, "width": width, "heads": max(1, width // 64),
            "layers": layers, "hf_tokenizer_name": tokenizer_dir}


CLIP_SIZES = {"tiny": {"resnet_width": 16, "resnet_layers": [1, 1, 1, 1], "text_width": 128, "text_layers": 4},
              "small": {"resnet_width": 32, "resnet_layers": [2, 2, 2, 2], "text_width": 256, "text_layers": 6}}
COCA_SIZES = {"tiny": {"width": 192, "layers": 6, "patch_grid": 4, "text_width": 128, "text_layers": 3},
              "small": {"width": 384, "layers": 8, "patch_grid": 8, "text_width": 256, "text_layers": 4}}


def clip_config(vocab_size: int, tokenizer_dir: str, *, size: str = "tiny", image_size: int = 64,
                context_length: int = 32) -> dict[str, Any]:
    s = CLIP_SIZES[size]
    return {
        "embed_dim": 128 if size == "tiny" else 256,
        "vision_cfg": _resnet(image_size, s["resnet_width"], s["resnet_layers"]),
        "text_cfg": _text(vocab_size, tokenizer_dir, context_length, s["text_width"], s["text_layers"]),
    }


def coca_config(vocab_size: int, tokenizer_dir: str, *, size: str = "tiny", image_size: int = 64,
                context_length: int = 32) -> dict[str, Any]:
    s = COCA_SIZES[size]
    vision = _vit(image_size, s["width"], s["layers"], s["patch_grid"])
    # CoCa's attentional pooler: one query for the contrastive embedding, the rest for the decoder
    vision.update({"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 64,
                   "output_tokens": True})
    patch = vision["patch_size"]
    if patch >= 2 and patch & (patch - 1) == 0:  # the stem halves the resolution per layer
        vision["conv_stem"] = True
    text = _text(vocab_size, tokenizer_dir, context_length, s["text_width"], s["text_layers"])
    text.update({"embed_cls": True, "output_tokens": True})
    return {
        "embed_dim": 128 if size == "tiny" else 256,
        "vision_cfg": vision,
        "text_cfg": text,
        "multimodal_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": s["text_width"],
                           "heads": max(2, s["text_width"] // 64), "layers": s["text_layers"],
                           "attn_pooler_heads": 4},
        "custom_text": True,
    }


def write_model_configs(models_dir: str | Path, vocab_size: int, tokenizer_dir: str | Path, *,
                        image_size: int = 64, context_length: int = 32,
                        caption_context_length: int | None = None) -> dict[str, Path]:
    """Write {tiny,small}_{clip,coca}.json; the tokenizer path is stored absolute (open_clip resolves it).

    The CLIPs read ``context_length`` tokens (they score the pool's alt-texts, which run long); the CoCas
    ``caption_context_length`` (default the same): the captioner learns the true captions only, and a
    context that just fits them makes its text towers half as long (32 -> 16 tokens, tiny CoCa on 2 CPU
    cores: 18% more samples per second in a forward/backward micro-benchmark, about 5% end to end)."""
    tok = str(Path(tokenizer_dir).resolve())
    out = Path(models_dir)
    contexts = {"clip": context_length, "coca": caption_context_length or context_length}
    paths = {}
    for size in SIZES:
        for kind, make in (("clip", clip_config), ("coca", coca_config)):
            name = f"{size}_{kind}"
            paths[name] = out / f"{name}.json"
            atomic.write_json(paths[name], make(vocab_size, tok, size=size, image_size=image_size,
                                                context_length=contexts[kind]))
    return paths
