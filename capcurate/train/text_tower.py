"""How the text tower runs over a batch (``--text-tower``): packed, trimmed or padded, all giving open_clip's
loss and gradients where chosen (models/text_pack.py, models/text_trim.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import InputError
from ..models.text_pack import can_pack, enable_text_pack
from ..models.text_trim import can_trim, token_trimmer

TEXT_TOWERS = ("auto", "packed", "trimmed", "padded")


def prepare_text_tower(model: torch.nn.Module, tokenizer: Any, choice: str,
                       compiled: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """(what to apply to each token batch before the step, the tower actually used). ``auto``: packed
    where that is exact and the model is not compiled (packing has a data-dependent token count, which
    would recompile every step), else trimmed where exact, else padded. An explicit choice the model
    cannot take exactly is refused."""
    if choice not in TEXT_TOWERS:
        raise InputError(f"--text-tower {choice!r}: expected one of {', '.join(TEXT_TOWERS)}")
    if choice == "auto":
        choice = "packed" if can_pack(model) and not compiled else "trimmed" if can_trim(model) else "padded"
    if choice == "padded":
        return (lambda tokens: tokens), "padded"
    if choice == "trimmed" and not can_trim(model):
        raise InputError("--text-tower trimmed: this text tower is not open_clip's CLIP with a causal mask and "
                         "argmax/eos/first pooling, so padding is not provably inert; use padded")
    if choice == "packed" and not can_pack(model):
        raise InputError("--text-tower packed: this text tower is not open_clip's CLIP with a causal mask, "
                         "argmax/eos pooling and plain attention blocks (no grad checkpointing); use trimmed "
                         "or padded")
    trim = token_trimmer(model, tokenizer)  # packing takes any width: trimming first moves fewer ids
    if choice == "packed":
        enable_text_pack(model)
    return trim, choice
