"""Tiny random VLMs of the families transformers 5 ships beyond tests/captioner_fixtures.py: Gemma3,
Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, InternVL, Mistral3 (Pixtral vision), Llama 4 and SmolVLM.

Each builder saves a model with its processor in a local directory, as a user has them, and returns the
``hf:<dir>`` reference. Sizes are the smallest each family's shape rules allow (image tokens per image =
what its vision tower makes), so a whole family loads and generates in well under a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from captioner_fixtures import _llama, _save, _vlm_vit, byte_tokenizer


def generic_template(image: str) -> str:
    """A minimal chat template whose image turn is ``image`` (the placeholder each processor expands)."""
    return ("{% for message in messages %}{{ message['role'] }}: {% if message['content'] is string %}"
            "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
            + image + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _ids(tok, names):
    return {t: tok.convert_tokens_to_ids(t) for t in names}


def build_tiny_gemma3(root: Path) -> str:
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    d = root / "tiny-gemma3"
    sp = ["<bos>", "<eos>", "<pad>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    tok = byte_tokenizer(sp, bos="<bos>", eos="<eos>", pad="<pad>", extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    ip = Gemma3ImageProcessor(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4,
                           chat_template=generic_template("<start_of_image>"))
    ids = _ids(tok, sp)
    cfg = Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", **_vlm_vit()),
        text_config=dict(model_type="gemma3_text", head_dim=16, sliding_window=64, initializer_range=0.2,
                         **_llama(len(tok), bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
                                  pad_token_id=ids["<pad>"])),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"], tie_word_embeddings=False)
    cfg.eos_token_id, cfg.pad_token_id = ids["<eos>"], ids["<pad>"]
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # its projector starts near zero: random image features would not reach the text
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=1.0)
    return _save(model, proc, d)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def _qwen_parts(processor_cls, video_cls, *, patch: int):
    from captioner_fixtures import QWEN_TEMPLATE
    from transformers import Qwen2VLImageProcessor

    tok = byte_tokenizer(QWEN_SPECIALS, eos="<|im_end|>", pad="<|endoftext|>")
    side = patch * 2
    ip = Qwen2VLImageProcessor(patch_size=patch, min_pixels=side * side, max_pixels=4 * side * side)
    proc = processor_cls(image_processor=ip, tokenizer=tok, video_processor=video_cls(patch_size=patch),
                         chat_template=QWEN_TEMPLATE)
    ids = _ids(tok, QWEN_SPECIALS)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return tok, proc, ids, tokens


def build_tiny_qwen2_5_vl(root: Path) -> str:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tok, proc, ids, tokens = _qwen_parts(Qwen2_5_VLProcessor, Qwen2VLVideoProcessor, patch=14)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **tokens)
    torch.manual_seed(0)
    return _save(Qwen2_5_VLForConditionalGeneration(cfg), proc, root / "tiny-qwen2_5-vl")


def build_tiny_qwen3_vl(root: Path) -> str:
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tok, proc, ids, tokens = _qwen_parts(Qwen3VLProcessor, Qwen3VLVideoProcessor, patch=16)
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]),
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **tokens)
    torch.manual_seed(0)
    return _save(Qwen3VLForConditionalGeneration(cfg), proc, root / "tiny-qwen3-vl")


def build_tiny_llava_next(root: Path) -> str:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    sp = ["<s>", "</s>", "<pad>", "<image>"]
    tok = byte_tokenizer(sp, bos="<s>", eos="</s>", pad="<pad>")
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              chat_template=generic_template("<image>\n"), num_additional_image_tokens=1)
    ids = _ids(tok, sp)
    cfg = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", **_vlm_vit()),
        text_config=dict(model_type="llama", **_llama(len(tok), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                                                      pad_token_id=ids["<pad>"])),
        image_token_index=ids["<image>"], image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default",
        vision_feature_layer=-2, tie_word_embeddings=False)
    torch.manual_seed(0)
    return _save(LlavaNextForConditionalGeneration(cfg), proc, root / "tiny-llava-next")


def build_tiny_internvl(root: Path) -> str:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    sp = ["<|endoftext|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
    tok = byte_tokenizer(sp, eos="<|im_end|>", pad="<|endoftext|>", extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    ip = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=2)
    proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=InternVLVideoProcessor(),
                             image_seq_length=4, chat_template=generic_template("<IMG_CONTEXT>\n"))
    ids = _ids(tok, sp)
    cfg = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=dict(model_type="qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=512, eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4, downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    return _save(InternVLForConditionalGeneration(cfg), proc, root / "tiny-internvl")


def build_tiny_mistral3(root: Path) -> str:
    """Mistral3 (Mistral-Small-3.1 shape): a Pixtral vision tower and PixtralProcessor, which resizes to a
    longest edge and tiles image tokens by rows ([IMG] ... [IMG_BREAK] ... [IMG_END])."""
    from transformers import (
        Mistral3Config,
        Mistral3ForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
    )

    sp = ["<s>", "</s>", "<pad>", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tok = byte_tokenizer(sp, bos="<s>", eos="</s>", pad="<pad>")
    ip = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8)
    proc = PixtralProcessor(image_processor=ip, tokenizer=tok, patch_size=8, spatial_merge_size=2,
                            chat_template=generic_template("[IMG]"))
    ids = _ids(tok, sp)
    cfg = Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, image_size=64, patch_size=8),
        text_config=dict(model_type="mistral", head_dim=16, **_llama(len(tok), bos_token_id=ids["<s>"],
                                                                     eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])),
        image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(cfg)
    with torch.no_grad():  # scaled up so the random image features reach the random text model
        model.model.multi_modal_projector.linear_2.weight.normal_(std=1.0)
    return _save(model, proc, root / "tiny-mistral3")


def build_tiny_llama4(root: Path) -> str:
    from transformers import (
        Llama4Config,
        Llama4ForConditionalGeneration,
        Llama4ImageProcessor,
        Llama4Processor,
    )

    sp = ["<|begin_of_text|>", "<|eot|>", "<|finetune_right_pad|>", "<|image_start|>", "<|image_end|>",
          "<|image|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>", "<|header_start|>",
          "<|header_end|>"]
    tok = byte_tokenizer(sp, bos="<|begin_of_text|>", eos="<|eot|>", pad="<|finetune_right_pad|>")
    ip = Llama4ImageProcessor(size={"height": 32, "width": 32}, max_patches=2)
    proc = Llama4Processor(image_processor=ip, tokenizer=tok, patch_size=8, pixel_shuffle_ratio=0.5,
                           chat_template=generic_template("<|image|>"))
    ids = _ids(tok, sp)
    cfg = Llama4Config(
        # the pixel-shuffle MLP takes hidden_size / ratio**2 channels: intermediate_size must be 32 * 4
        vision_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_output_dim=32, projector_input_dim=32,
                           projector_output_dim=32, pixel_shuffle_ratio=0.5),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=512,
                         bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot|>"],
                         pad_token_id=ids["<|finetune_right_pad|>"]),
        boi_token_index=ids["<|image_start|>"], eoi_token_index=ids["<|image_end|>"],
        image_token_index=ids["<|patch|>"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(cfg)
    with torch.no_grad():  # scaled up so the random image features reach the random text model
        model.multi_modal_projector.linear_1.weight.normal_(std=1.0)
    return _save(model, proc, root / "tiny-llama4")


def build_tiny_smolvlm(root: Path) -> str:
    """SmolVLM (Idefics3's shape with its own processor, which spells image tokens with num2words)."""
    from captioner_fixtures import IDEFICS3_TEMPLATE
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    sp = ["<|im_start|>", "<end_of_utterance>", "<pad>", "<image>", "<fake_token_around_image>", "<global-img>"]
    tok = byte_tokenizer(sp, bos="<|im_start|>", eos="<end_of_utterance>", pad="<pad>")
    # image splitting on, as in HuggingFaceTB/SmolVLM-*: up to 2x2 tiles of 32 plus the whole image
    ip = SmolVLMImageProcessor(do_image_splitting=True, size={"longest_edge": 64},
                               max_image_size={"longest_edge": 32})
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=SmolVLMVideoProcessor(),
                            image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    tok = proc.tokenizer
    ids = _ids(tok, sp)
    cfg = SmolVLMConfig(vision_config=dict(**_vlm_vit()),
                        text_config=dict(model_type="llama", **_llama(len(tok), bos_token_id=ids["<|im_start|>"],
                                                                      eos_token_id=ids["<end_of_utterance>"],
                                                                      pad_token_id=ids["<pad>"])),
                        image_token_id=ids["<image>"], scale_factor=2, pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return _save(SmolVLMForConditionalGeneration(cfg), proc, root / "tiny-smolvlm")


FAMILY_BUILDERS = {
    "gemma3": build_tiny_gemma3, "qwen2_5_vl": build_tiny_qwen2_5_vl, "qwen3_vl": build_tiny_qwen3_vl,
    "llava_next": build_tiny_llava_next, "internvl": build_tiny_internvl, "mistral3": build_tiny_mistral3,
    "llama4": build_tiny_llama4, "smolvlm": build_tiny_smolvlm,
}
