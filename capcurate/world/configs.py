"""Tiny open_clip model configs (open_clip's model_configs JSON format) over the world's tokenizer.

Sizes are chosen for 2 CPU cores at 64 px with patch 8: with the world's ~160-word vocabulary the
CLIP has 3.6M parameters and the CoCa 4.7M (about 100 training samples/s each on 2 idle cores).
Load them with ``openclip:DIR/models/tiny_clip.json``; their text_cfg points open_clip at the world's
tokenizer directory, so everything works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import atomic


def _vision(image_size: int, width: int, layers: int) -> dict[str, Any]:
    return {"image_size": image_size, "layers": layers, "width": width, "patch_size": max(2, image_size // 8),
            "head_width": 64, "mlp_ratio": 4.0}


def _text(vocab_size: int, tokenizer_dir: str, context_length: int, width: int, layers: int) -> dict[str, Any]:
    return {"context_length": context_length, "vocab_size": vocab_size, "width": width, "heads": max(1, width // 64),
            "layers": layers, "hf_tokenizer_name": tokenizer_dir}


def tiny_clip_config(vocab_size: int, tokenizer_dir: str, *, image_size: int = 64,
                     context_length: int = 32) -> dict[str, Any]:
    return {
        "embed_dim": 128,
        "vision_cfg": _vision(image_size, width=192, layers=6),
        "text_cfg": _text(vocab_size, tokenizer_dir, context_length, width=128, layers=4),
    }


def tiny_coca_config(vocab_size: int, tokenizer_dir: str, *, image_size: int = 64,
                     context_length: int = 32) -> dict[str, Any]:
    vision = _vision(image_size, width=192, layers=6)
    # CoCa's attentional pooler: one query for the contrastive embedding, the rest for the decoder
    vision.update({"attentional_pool": True, "attn_pooler_heads": 4, "attn_pooler_queries": 64,
                   "output_tokens": True})
    text = _text(vocab_size, tokenizer_dir, context_length, width=128, layers=3)
    text.update({"embed_cls": True, "output_tokens": True})
    return {
        "embed_dim": 128,
        "vision_cfg": vision,
        "text_cfg": text,
        "multimodal_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": 128,
                           "heads": 2, "layers": 3, "attn_pooler_heads": 4},
        "custom_text": True,
    }


def write_model_configs(models_dir: str | Path, vocab_size: int, tokenizer_dir: str | Path, *,
                        image_size: int = 64, context_length: int = 32) -> dict[str, Path]:
    """Write tiny_clip.json and tiny_coca.json; the tokenizer path is stored absolute (open_clip resolves it)."""
    tok = str(Path(tokenizer_dir).resolve())
    out = Path(models_dir)
    paths = {}
    for name, cfg in (("tiny_clip", tiny_clip_config(vocab_size, tok, image_size=image_size, context_length=context_length)),
                      ("tiny_coca", tiny_coca_config(vocab_size, tok, image_size=image_size, context_length=context_length))):
        paths[name] = out / f"{name}.json"
        atomic.write_json(paths[name], cfg)
    return paths
