"""Tiny randomly initialised captioners of every backend class, saved locally the way a user has them.

Each builder returns the reference a user would type (``hf:<dir>`` or ``openclip:<config.json>`` plus a
weights file); tokenizers are built offline from word lists and their sizes asserted, because a
tokenizer that silently fell back to a default vocabulary would make every test meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("a an the photo of picture image red green blue yellow black white big small circle square "
         "triangle star on in with and left right top bottom background dog cat car tree").split()
BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(d: Path, extra: tuple[str, ...] = ()):
    from transformers import BertTokenizerFast

    d.mkdir(parents=True, exist_ok=True)
    vocab = BERT_SPECIAL + list(extra) + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast.from_pretrained(str(d))
    assert len(tok) == len(vocab), f"tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    return tok


def word_level_tokenizer(d: Path, *, specials: list[str], post_sos: bool):
    """A WordLevel tokenizer wrapped as PreTrainedTokenizerFast (CapWorld's convention when post_sos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(specials + WORDS)}
    if post_sos:  # CapWorld: PAD 0, SOS 1, UNK 2, ..., EOS last so argmax pooling finds it
        vocab["[EOS]"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials[2] if post_sos else "<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if post_sos:
        tk.post_processor = processors.TemplateProcessing(
            single="[SOS] $A [EOS]", special_tokens=[("[SOS]", 1), ("[EOS]", vocab["[EOS]"])])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]",
                                      bos_token="[SOS]", eos_token="[EOS]")
    else:
        from tokenizers import decoders

        tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                      bos_token="</s>", eos_token="</s>")
    tok.save_pretrained(str(d))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(d))
    assert len(tok) == len(vocab), f"tokenizer has {len(tok)} tokens, expected {len(vocab)}"
    return tok


def _vision(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, **kw)


def build_tiny_blip(root: Path) -> str:
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    d = root / "tiny-blip"
    tok = bert_tokenizer(d / "tok", extra=("[DEC]",))
    tok.add_special_tokens({"bos_token": "[DEC]"})  # as in Salesforce/blip-*: generation starts from [DEC]
    ip = BlipImageProcessor(size={"height": 32, "width": 32})
    proc = BlipProcessor(image_processor=ip, tokenizer=tok)
    cfg = BlipConfig(
        vision_config=_vision(),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=tok.convert_tokens_to_ids("[DEC]"), pad_token_id=tok.pad_token_id,
                         sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return f"hf:{d}"


def build_tiny_blip2(root: Path) -> str:
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    d = root / "tiny-blip2"
    tok = word_level_tokenizer(d / "tok", specials=["<pad>", "</s>", "<unk>"], post_sos=False)
    proc = Blip2Processor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                          tokenizer=tok, num_query_tokens=4)  # adds the <image> token
    image_token = proc.tokenizer.convert_tokens_to_ids("<image>")
    assert image_token == len(proc.tokenizer) - 1
    text = OPTConfig(vocab_size=len(proc.tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    cfg = Blip2Config(vision_config=_vision(),
                      qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, encoder_hidden_size=32, vocab_size=64),
                      text_config=text.to_dict(), num_query_tokens=4, image_token_index=image_token)
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return f"hf:{d}"


def build_tiny_git(root: Path) -> str:
    """GIT: loaded through AutoModelForImageTextToText like any image-text-to-text model."""
    from transformers import CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    d = root / "tiny-git"
    tok = bert_tokenizer(d / "tok")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = GitProcessor(image_processor=ip, tokenizer=tok)
    cfg = GitConfig(vision_config=_vision(), vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                    bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GitForCausalLM(cfg).save_pretrained(str(d))
    proc.save_pretrained(str(d))
    return f"hf:{d}"


def build_tiny_coca(root: Path, context_length: int = 16) -> tuple[str, str]:
    """(``openclip:<config.json>``, weights file) for a CoCa with CapWorld's tokenizer convention."""
    import open_clip

    d = root / "tiny-coca"
    tok = word_level_tokenizer(d / "tok", specials=["[PAD]", "[SOS]", "[UNK]"], post_sos=True)
    v = len(tok)
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8,
                       "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {"context_length": context_length, "vocab_size": v, "width": 32, "heads": 2, "layers": 2,
                     "embed_cls": True, "output_tokens": True, "hf_tokenizer_name": str(d / "tok")},
        "multimodal_cfg": {"context_length": context_length, "vocab_size": v, "width": 32, "heads": 2,
                           "layers": 2, "attn_pooler_heads": 2},
        "custom_text": True,
    }
    cfg_path = d / "tiny_coca.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model("tiny_coca")
    # open_clip leaves the decoder's text_projection uninitialised (torch.empty): give it real values,
    # scaled up so random logits are not flat and greedy paths are well separated
    with torch.no_grad():
        model.text_decoder.text_projection.normal_(std=4 * 32 ** -0.5)
    weights = d / "tiny_coca.pt"
    torch.save({"state_dict": model.state_dict()}, weights)
    return f"openclip:{cfg_path}", str(weights)


# -- chat-template VLMs (and the prompt-only PaliGemma / Florence-2) -----------------------------------
def _save(model, processor, d: Path) -> str:
    """Scale the output layer up (random logits are otherwise nearly flat and every input gives the same
    greedy answer) and save the model with its processor, as a user's local directory holds them."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    model.save_pretrained(str(d))
    processor.save_pretrained(str(d))
    return f"hf:{d}"


def byte_tokenizer(specials, *, eos, pad, bos=None, chat_template=None, **attrs):
    """A byte-level BPE with no merges (one token per byte: any prompt tokenizes, and distinct prompts give
    distinct tokens) plus the special tokens a VLM processor looks for."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad, bos_token=bos, **attrs)
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (eos, pad, bos)]})
    if chat_template:
        tok.chat_template = chat_template
    return tok


QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_vl(root: Path) -> str:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    d = root / "tiny-qwen2-vl"
    sp = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok = byte_tokenizer(sp, eos="<|im_end|>", pad="<|endoftext|>")
    ip = Qwen2VLImageProcessor(min_pixels=28*28, max_pixels=56*56)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in sp}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    return _save(Qwen2VLForConditionalGeneration(cfg), proc, d)


LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }}\n"
    "{% else %}{{ message['role'].upper() }}: {% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _vlm_vit(**kw):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8, **kw)


def _llama(vocab, **kw):
    return dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=False, **kw)


def build_tiny_llava(root: Path) -> str:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    d = root / "tiny-llava"
    tok = byte_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>")
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=LLAVA_TEMPLATE, image_token="<image>", num_additional_image_tokens=1)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<s>", "</s>", "<pad>", "<image>"]}
    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", **_vlm_vit()),
                      text_config=dict(model_type="llama", **_llama(len(tok), bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])),
                      image_token_index=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-2,
                      projector_hidden_act="gelu")
    torch.manual_seed(0)
    return _save(LlavaForConditionalGeneration(cfg), proc, d)


def build_tiny_paligemma(root: Path) -> str:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )
    d = root / "tiny-paligemma"
    tok = byte_tokenizer(["<bos>", "<eos>", "<pad>"], bos="<bos>", eos="<eos>", pad="<pad>")
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ip.image_seq_length = 16
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<bos>", "<eos>", "<pad>", "<image>"]}
    cfg = PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **_vlm_vit(projection_dim=32)),
                          text_config=dict(model_type="gemma", head_dim=16, initializer_range=0.2, **_llama(len(tok), bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])),
                          image_token_index=ids["<image>"], projection_dim=32, hidden_size=32, tie_word_embeddings=False,
                          bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"], pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return _save(PaliGemmaForConditionalGeneration(cfg), proc, d)


IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% elif c['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(root: Path) -> str:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )
    d = root / "tiny-idefics3"
    sp = ["<|im_start|>", "<end_of_utterance>", "<pad>", "<image>", "<fake_token_around_image>", "<global-img>"]
    tok = byte_tokenizer(sp, bos="<|im_start|>", eos="<end_of_utterance>", pad="<pad>")
    ip = Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    tok = proc.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in sp}
    cfg = Idefics3Config(vision_config=dict(**_vlm_vit()), text_config=dict(model_type="llama", **_llama(len(tok), bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<pad>"])),
                         image_token_id=ids["<image>"], scale_factor=2, pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return _save(Idefics3ForConditionalGeneration(cfg), proc, d)


def build_tiny_florence2(root: Path) -> str:
    from transformers import (
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    d = root / "tiny-florence2"
    tok = byte_tokenizer(["<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                         extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=False)
    ip.image_seq_length = 5
    proc = Florence2Processor(image_processor=ip, tokenizer=tok)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<s>", "</s>", "<pad>", "<image>"]}
    text = dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                max_position_embeddings=128, tie_word_embeddings=False, init_std=0.2, bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"],
                decoder_start_token_id=ids["</s>"], forced_eos_token_id=None)
    vision = dict(depths=[1, 1, 1, 1], embed_dim=[8, 16, 32, 32], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
                  window_size=2, projection_dim=32, drop_path_rate=0.0)
    cfg = Florence2Config(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                          bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    torch.manual_seed(0)
    return _save(Florence2ForConditionalGeneration(cfg), proc, d)


VLM_BUILDERS = {"qwen2_vl": build_tiny_qwen2_vl, "llava": build_tiny_llava, "idefics3": build_tiny_idefics3,
                "paligemma": build_tiny_paligemma, "florence2": build_tiny_florence2}


def build_every_model(root: Path) -> dict[str, tuple[str, str | None]]:
    """One tiny model of each kind the precision tests run: (reference, pretrained) per backend."""
    from scorer_fixtures import save_tiny_hf_clip, save_tiny_openclip, save_tiny_openclip_run

    cfg, weights = save_tiny_openclip(root / "openclip")
    coca, coca_weights = build_tiny_coca(root)
    return {
        "openclip": (f"openclip:{cfg}", str(weights)),
        "hf": (f"hf:{save_tiny_hf_clip(root / 'hf')}", None),
        "run": (str(save_tiny_openclip_run(root / "run")), None),
        "coca": (coca, coca_weights),
        "blip": (build_tiny_blip(root), None),
    }
