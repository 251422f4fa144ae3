"""The world's own word-level tokenizer, saved in Hugging Face's format for open_clip and capcurate.

CapWorld's language has a few hundred words, so a WordLevel vocabulary keeps the text towers and
the caption logits tiny (CLIP's 49k-token BPE would dominate a small CoCa's compute). Layout, as the
shared contract fixes it: PAD id 0, SOS id 1, UNK id 2, the words, EOS last (so open_clip's default
argmax pooling finds EOS), post-processor ``[SOS] $A [EOS]``. Digits are split one by one, so file
names and numbers tokenise without UNK.
"""

from __future__ import annotations

from pathlib import Path

from .captions import POSITION_PHRASES, TEMPLATES
from .noise import BOILERPLATE_PHRASES, FILE_EXTS, FILE_PREFIXES, PARTIAL_TEMPLATES, SHOP_SUFFIXES
from .scene import BACKGROUND_TONES, BACKGROUNDS, COLOURS, COUNT_WORDS, PLURALS, SHAPES, SIZES

PAD, SOS, UNK, EOS = "[PAD]", "[SOS]", "[UNK]", "[EOS]"
# every form a shape takes in a caption (irregular plurals, regular ones) and a user may type
SHAPE_WORDS = (*SHAPES, *PLURALS.values(), *(s + "s" for s in SHAPES))
ZEROSHOT_TEMPLATES = (
    "a picture of the {c}.", "the {c}.", "a drawing of the {c}.", "an image showing the {c}.",
)
PUNCTUATION = list(".,-_:;!?|/()&%$#+'\"*")
# a few words users are likely to type into prompts or --where filters, kept out of UNK
EXTRA_WORDS = "and or with in on at of the this that image photo picture shape shapes object objects".split()


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Digits(individual_digits=True)])


def _source_texts() -> list[str]:
    """Every literal the world's generators can emit (templates with their fields removed)."""
    import re

    texts = [re.sub(r"\{[a-z]+\}", " ", t) for t in (*TEMPLATES, *PARTIAL_TEMPLATES, *ZEROSHOT_TEMPLATES)]
    texts += [*BOILERPLATE_PHRASES, *SHOP_SUFFIXES, *FILE_PREFIXES, *FILE_EXTS, *POSITION_PHRASES.values()]
    texts += [*SHAPE_WORDS, *COLOURS, *SIZES, *BACKGROUNDS]
    texts += [*BACKGROUND_TONES, *COUNT_WORDS.values(), "a an is are", *EXTRA_WORDS, "0 1 2 3 4 5 6 7 8 9"]
    return texts + PUNCTUATION


def vocabulary() -> list[str]:
    """Words in id order: [PAD], [SOS], [UNK], the sorted words, [EOS]."""
    pre = _pre_tokenizer()
    words: set[str] = set()
    for text in _source_texts():
        words.update(w for w, _ in pre.pre_tokenize_str(text.lower()))
    return [PAD, SOS, UNK, *sorted(words), EOS]


def build_tokenizer(context_length: int = 32):
    """A ``PreTrainedTokenizerFast`` over the world's vocabulary."""
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOS} $A {EOS}", special_tokens=[(SOS, vocab[SOS]), (EOS, vocab[EOS])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ."
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=context_length,
    )


def write_tokenizer(out_dir: str | Path, context_length: int = 32) -> int:
    """Save the tokenizer into ``out_dir`` (loadable with AutoTokenizer.from_pretrained); returns its size."""
    tok = build_tokenizer(context_length)
    tok.save_pretrained(str(out_dir))
    return len(tok)


def true_caption_max_tokens() -> int:
    """The most tokens (with [SOS] and [EOS]) any true caption can have: every template filled with the
    longest value of each field (a word-level tokenizer's counts add up word by word)."""
    tok = build_tokenizer()

    def n(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    values = {"n": ["a", *COUNT_WORDS.values()], "size": SIZES, "colour": COLOURS,
              "obj": SHAPE_WORDS, "where": POSITION_PHRASES.values(),
              "bg": BACKGROUNDS, "tone": BACKGROUND_TONES, "be": ["is", "are"]}
    longest = {field: max(vals, key=n) for field, vals in values.items()}
    return 2 + max(n(t.format(**longest)) for t in TEMPLATES)

