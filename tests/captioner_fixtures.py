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
