"""Tiny random CLIP scorers saved locally, loaded back by reference like real checkpoints.

No weights can be downloaded here, so the tests exercise the real loading paths (an open_clip config +
checkpoint file, an open_clip local-dir export as ``capcurate train`` writes it, a transformers
CLIPModel folder) on models small enough to run in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

TINY_OPENCLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_openclip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``capcurate-tiny-clip.json`` and a random checkpoint; returns (config, weights)."""
    import open_clip
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "capcurate-tiny-clip.json"
    cfg_path.write_text(json.dumps(TINY_OPENCLIP_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model("capcurate-tiny-clip")
    weights = folder / "capcurate-tiny-clip.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    return cfg_path, weights


def save_tiny_openclip_run(run: Path, seed: int = 1) -> Path:
    """A directory shaped like a ``capcurate train`` run: RUN/model in open_clip's local-dir layout."""
    import open_clip
    import torch

    from capcurate.models.openclip_loader import export_openclip_dir

    cfg_path = run / "capcurate-tiny-clip.json"
    run.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(json.dumps(TINY_OPENCLIP_CFG))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model("capcurate-tiny-clip")
    export_openclip_dir(model, TINY_OPENCLIP_CFG, run / "model", preprocess_cfg={})
    return run


def _write_clip_bpe_files(folder: Path) -> None:
    """A byte-level BPE vocabulary without merges: every byte is a token (enough for a tiny CLIP)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")


def save_tiny_hf_clip(folder: Path, seed: int = 0) -> Path:
    """A random transformers CLIPModel + CLIPProcessor saved with save_pretrained."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok_dir = folder / "tokenizer-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    _write_clip_bpe_files(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    assert len(tokenizer) > 400, len(tokenizer)  # the byte vocabulary really was read
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    out = folder / "tiny-hf-clip"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out

