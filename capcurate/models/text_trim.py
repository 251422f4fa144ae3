"""Run a CLIP text tower over the tokens a batch uses, not over the full context length.

open_clip pads every caption to the context length (77 for the released CLIPs) and its ``CLIP`` class
adds the full positional table and the full causal mask, so a batch of ten-token captions costs as much
as a batch of 77-token ones: on ViT-B-32 the text tower is about 40% of a train step's FLOPs. With a
causal mask, position i sees only positions <= i, and the pooled feature is taken at the end-of-text
token (``argmax``/``eos``) or the first one, so the padding columns after the longest caption of a batch
change nothing: dropping them gives the same features (up to matmul rounding) for less work. That holds
for training (the same loss and gradients) and for scoring. Models without a causal mask, with ``last``
pooling or another text tower class are left as they are.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch

_EXACT_POOLS = ("argmax", "eos", "first")
_TRIMMED = "_capcurate_text_trim"


def can_trim(model: torch.nn.Module) -> bool:
    """True for open_clip ``CLIP`` text towers where trailing padding is provably inert."""
    try:
        from open_clip.model import CLIP
    except ImportError:
        return False
    return (isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in _EXACT_POOLS
            and all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")))


def _encode_text(self: Any, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` with the positional table and the causal mask cut to ``text``'s length."""
    from open_clip.transformer import text_global_pool

    n = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None))
    if self.text_projection is not None:
        x = self.text_projection(x) if isinstance(self.text_projection, torch.nn.Linear) else x @ self.text_projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def enable_text_trim(model: torch.nn.Module) -> bool:
    """Let ``model.encode_text`` (and so ``model(images, texts)``) take token batches shorter than the
    context length. Returns whether it could; the model's weights and state dict are untouched."""
    if getattr(model, _TRIMMED, False):
        return True
    if not can_trim(model):
        return False
    # an instance attribute: forward() calls self.encode_text, so DDP and torch.compile see it too
    model.encode_text = types.MethodType(_encode_text, model)
    setattr(model, _TRIMMED, True)
    return True


def pad_token_id(tokenizer: Any) -> int:
    """The id a tokenizer pads with: the last position of an empty text (0 for open_clip's BPE)."""
    return int(tokenizer([""])[0, -1])


def trim_tokens(tokens: torch.Tensor, pad_id: int = 0, multiple: int = 8) -> torch.Tensor:
    """Drop the padding columns after the longest row, keeping a multiple of ``multiple`` columns (fewer
    distinct shapes for torch.compile and tensor-core-friendly sizes). Needs no device sync on a CPU tensor."""
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        return tokens
    used = (tokens != pad_id).any(dim=0).nonzero()
    n = int(used[-1]) + 1 if len(used) else 1
    # argmax pooling reads the row's largest id: keep it even where a tokenizer's pad id outranks its EOT
    n = max(n, int(tokens.argmax(dim=1).max()) + 1)
    n = min(tokens.shape[1], -(-n // multiple) * multiple)
    return tokens if n == tokens.shape[1] else tokens[:, :n].contiguous()


def token_trimmer(model: torch.nn.Module, tokenizer: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """What to apply to a batch of ``tokenizer``'s tokens before ``model`` encodes them: ``trim_tokens``
    when the model's text tower can take the shorter batch (``enable_text_trim``), else nothing."""
    if not enable_text_trim(model):
        return lambda tokens: tokens
    pad_id = pad_token_id(tokenizer)
    return lambda tokens: trim_tokens(tokens, pad_id)
