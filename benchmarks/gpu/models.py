"""Random models of real shapes (GPU) or tiny ones (--smoke), saved to disk and loaded back by reference,
so every row goes through capcurate's own loading path and the fp32 references load the same weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BERT_VOCAB = 30524  # Salesforce/blip-image-captioning-large: bert-base-uncased + [DEC] + [ENC]

BLIP_SHAPES = {
    "large": dict(
        vision=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=384,
            patch_size=16,
        ),
        text=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=512,
        ),
        vocab=BERT_VOCAB,
    ),
    "tiny": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        vocab=512,
    ),
}

TINY_CLIP = {  # tests/scorer_fixtures.py's tiny open_clip config
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_TRAIN_CLIP = {  # TINY_CLIP with open_clip's full 77-token context, so text trimming has work to skip
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def build_blip(root: Path, shape: str, device: str) -> str:
    """A random BLIP of ``shape`` + BlipProcessor written with save_pretrained; returns ``hf:<dir>``."""
    import torch
    from transformers import BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import BlipImageProcessorFast as BlipImageProcessor
    spec = BLIP_SHAPES[shape]
    d = root / f"blip-{shape}"
    tok_dir = d / "tok-src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
    words = "a an the photo of picture image red green blue big small dog cat car tree on in with".split()
    fill = [f"w{i}" for i in range(spec["vocab"] - len(specials) - len(words))]
    (tok_dir / "vocab.txt").write_text("\n".join(specials + words + fill) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(tok_dir))  # BertTokenizerFast(vocab_file=...) ignores it
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as Salesforce/blip-*: generation starts from [DEC]
    size = spec["vision"]["image_size"]
    proc = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": size, "width": size}), tokenizer=tok
    )
    text = dict(
        spec["text"],
        vocab_size=len(tok),
        encoder_hidden_size=spec["vision"]["hidden_size"],
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
        eos_token_id=tok.sep_token_id,
    )
    cfg = BlipConfig(vision_config=dict(spec["vision"]), text_config=text, projection_dim=256)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes a second, on the CPU a minute
        model = BlipForConditionalGeneration(cfg)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)  # capcurate loads bf16 on CUDA anyway; half the file to write
    model.save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return f"hf:{d}"


def save_openclip(
    root: Path, name: str, cfg: dict[str, Any], device: str, seed: int = 0
) -> tuple[Path, Path]:
    """Register ``cfg`` as open_clip model ``name``, write random weights; returns (config, weights)."""
    import open_clip
    import torch

    root.mkdir(parents=True, exist_ok=True)
    cfg_path = root / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, device=device)
    weights = root / f"{name}.pt"
    torch.save({"state_dict": {k: v.cpu() for k, v in model.state_dict().items()}}, weights)
    return cfg_path, weights


def openclip_config(arch: str) -> dict[str, Any]:
    """open_clip's own config of ``arch`` (e.g. ViT-L-14), to save random weights of the real shape."""
    import open_clip

    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        raise SystemExit(f"open_clip has no model config {arch!r}")
    return cfg


QWEN2_VL_2B = {  # Qwen/Qwen2-VL-2B-Instruct's config.json shapes
    "text": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        rope_theta=1000000.0,
    ),
    "vision": dict(
        depth=32,
        embed_dim=1280,
        hidden_size=1536,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
    "vocab": 151936,
}


def build_vlm(root: Path, shape: str, device: str) -> str:
    """A random Qwen2-VL of ``shape`` ("qwen2-vl-2b", or "tiny": the test fixture) and its processor."""
    import torch

    from .data import _tests_on_path

    _tests_on_path()  # tests/captioner_fixtures.py: the tiny model and the chat template the tests use
    if shape == "tiny":
        from captioner_fixtures import build_tiny_qwen2_vl

        return build_tiny_qwen2_vl(root)
    from captioner_fixtures import QWEN_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    spec = QWEN2_VL_2B
    d = root / f"vlm-{shape}"
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
        "<unk>",
    ]
    # the model's full vocabulary, so every id a random model emits decodes (the text is not read)
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(spec["vocab"] - len(specials))])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[1:7]})
    assert len(tok) == spec["vocab"], f"tokenizer has {len(tok)} tokens, expected {spec['vocab']}"
    proc = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_TEMPLATE,
    )
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    cfg = Qwen2VLConfig(
        text_config=dict(
            spec["text"],
            vocab_size=spec["vocab"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            bos_token_id=None,
        ),
        vision_config=dict(spec["vision"]),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU takes seconds, on the CPU minutes
        model = Qwen2VLForConditionalGeneration(cfg)
    if device.startswith("cuda"):
        model = model.to(torch.bfloat16)
    model.save_pretrained(str(d))
    proc.save_pretrained(str(d))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return f"hf:{d}"
