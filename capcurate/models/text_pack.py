"""Run a CLIP text tower over packed captions: every caption's own tokens, one after another, no padding.

Trimming (text_trim.py) cuts a batch to its longest caption, so one 77-token alt-text in a batch of
short ones makes every row run 77 positions. Packing goes further: the B captions of a batch become one
sequence of T = sum(lengths) tokens. The embeddings, every LayerNorm, the QKV and output projections and
the MLP (nearly all of a text tower's FLOPs at 77 tokens) then run on exactly T rows. Each token keeps its
own position (0..len-1 within its caption), and attention is causal *within* its caption only, so the
result equals open_clip's ``CLIP.encode_text`` on the padded batch (up to matmul rounding):

- a caption's length is its pooled position + 1: open_clip pools at the end-of-text token (``argmax`` of
  the token ids, which is EOT for its BPE; or the first ``eos`` id), and under the causal mask nothing
  after that position reaches it, so the padding is dropped without changing the pooled feature;
- positions restart at 0 for each caption (open_clip adds ``positional_embedding[:n]`` to every row);
- attention: ``sdpa`` (the default here) scatters q/k/v back to a (B, longest, heads, dim) layout for the
  attention core alone and runs causal SDPA on it, so only the score matrix of the attention sees padding;
  ``flex`` runs FlexAttention with a block mask per caption (document masking; compiled on CUDA it skips
  the blocks no caption covers, in eager it is a dense reference).

Only towers this reproduces exactly are packed: open_clip ``CLIP`` with a causal mask, ``argmax``/``eos``
pooling, plain ``ResidualAttentionBlock`` s (``nn.MultiheadAttention`` with no dropout, bias_k or
zero-attention) and no gradient checkpointing. Anything else keeps its own ``encode_text``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_PACKED = "_capcurate_text_pack"
ATTENTION_KINDS = ("sdpa", "flex")
_compiled_flex: Any = None


@dataclass
class PackedText:
    """Where each caption's tokens lie in the packed sequence (all on the tokens' device)."""

    flat: torch.Tensor       # (T,) indices into tokens.view(-1): the kept (row, position) pairs, row-major
    positions: torch.Tensor  # (T,) position of each packed token within its caption
    rows: torch.Tensor       # (T,) caption (row) of each packed token
    lengths: torch.Tensor    # (B,) tokens kept per caption
    pooled: torch.Tensor     # (B,) packed index of each caption's pooled (EOT) token
    longest: int             # max(lengths)


def caption_lengths(tokens: torch.Tensor, pool_type: str, eos_id: int | None = None) -> torch.Tensor:
    """Tokens per caption that reach the pooled feature: up to and including the pooled position."""
    if pool_type == "argmax":
        # open_clip's text_global_pool: x[arange(B), text.argmax(-1)] (the first maximal id)
        return tokens.argmax(dim=-1) + 1
    if pool_type == "eos":
        if eos_id is None:
            raise ValueError("eos pooling needs the tokenizer's eos id")
        return (tokens == eos_id).int().argmax(dim=-1) + 1
    raise ValueError(f"pooling {pool_type!r} cannot be packed")


def pack_layout(lengths: torch.Tensor, width: int) -> PackedText:
    """The packed layout of captions with ``lengths`` tokens out of rows ``width`` wide."""
    b = lengths.shape[0]
    dev = lengths.device
    keep = torch.arange(width, device=dev)[None, :] < lengths[:, None]
    flat = keep.reshape(-1).nonzero().squeeze(1)  # one host sync: T is data-dependent
    rows, positions = flat // width, flat % width
    starts = torch.cumsum(lengths, 0) - lengths
    pooled = starts + lengths - 1
    longest = int(lengths.max()) if b else 0
    return PackedText(flat, positions, rows, lengths, pooled, longest)


def can_pack(model: torch.nn.Module) -> bool:
    """True for open_clip ``CLIP`` text towers whose packed run equals the padded one (module docstring)."""
    try:
        from open_clip.model import CLIP
        from open_clip.transformer import ResidualAttentionBlock
    except ImportError:
        return False
    if not (isinstance(model, CLIP) and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) in ("argmax", "eos")):
        return False
    tower = getattr(model, "transformer", None)
    if tower is None or getattr(tower, "grad_checkpointing", False) or not hasattr(tower, "resblocks"):
        return False
    for block in tower.resblocks:
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            return False
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn.batch_first:
            return False
        if attn.dropout or attn.bias_k is not None or attn.add_zero_attn or not attn._qkv_same_embed_dim:
            return False
    return True


def _attend_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedText) -> torch.Tensor:
    """Causal attention within each caption: (T, H, d) packed -> (B, longest, H, d) -> SDPA -> packed."""
    b, n = layout.lengths.shape[0], layout.longest
    index = layout.rows * n + layout.positions

    def unpack(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(b * n, *t.shape[1:])
        return out.index_copy(0, index, t).view(b, n, t.shape[1], t.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(unpack(q), unpack(k), unpack(v), is_causal=True)
    return o.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[2]).index_select(0, index)


def _attend_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: PackedText) -> torch.Tensor:
    """Causal attention within each caption over the packed sequence: FlexAttention, a block mask per caption."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows, pos, t = layout.rows, layout.positions, q.shape[0]

    def same_caption_causal(b: Any, h: Any, qi: Any, ki: Any) -> Any:
        return (rows[qi] == rows[ki]) & (pos[ki] <= pos[qi])

    q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
    if q.device.type == "cuda":
        global _compiled_flex
        if _compiled_flex is None:  # the fused kernel; eager flex_attention materialises every score
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        mask = create_block_mask(same_caption_causal, None, None, t, t, device="cuda")
        return _compiled_flex(q, k, v, block_mask=mask)[0].transpose(0, 1)
    import warnings

    mask = create_block_mask(same_caption_causal, None, None, t, t, device=q.device.type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "called without torch.compile": the CPU reference path
        return flex_attention(q, k, v, block_mask=mask)[0].transpose(0, 1)


def _block(block: Any, x: torch.Tensor, layout: PackedText, attention: str) -> torch.Tensor:
    """open_clip's ``ResidualAttentionBlock.forward`` on packed (T, D) rows."""
    attn = block.attn
    h, d = attn.num_heads, attn.head_dim
    y = block.ln_1(x)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).view(x.shape[0], 3, h, d).unbind(1)
    o = (_attend_flex if attention == "flex" else _attend_sdpa)(q, k, v, layout)
    o = F.linear(o.reshape(x.shape[0], h * d), attn.out_proj.weight, attn.out_proj.bias)
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def encode_packed(model: Any, text: torch.Tensor, normalize: bool = False, attention: str = "sdpa") -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` on ``text`` (B, n <= context) with the captions packed."""
    cast_dtype = model.transformer.get_cast_dtype()
    lengths = caption_lengths(text, model.text_pool_type, getattr(model, "text_eos_id", None))
    layout = pack_layout(lengths, text.shape[1])
    ids = text.reshape(-1).index_select(0, layout.flat)
    x = model.token_embedding(ids).to(cast_dtype) + model.positional_embedding.to(cast_dtype)[layout.positions]
    for block in model.transformer.resblocks:
        x = _block(block, x, layout, attention)
    x = model.ln_final(x).index_select(0, layout.pooled)
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def enable_text_pack(model: torch.nn.Module, attention: str = "sdpa") -> bool:
    """Make ``model.encode_text`` (and so ``model(images, texts)``) pack its captions; whether it could.
    The weights and state dict are untouched; token batches of any width up to the context length work."""
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention {attention!r}: expected one of {', '.join(ATTENTION_KINDS)}")
    if getattr(model, _PACKED, None) == attention:
        return True
    if not can_pack(model):
        return False

    def encode_text(self: Any, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return encode_packed(self, text, normalize, attention)

    # an instance attribute: forward() calls self.encode_text, so DDP sees it too
    model.encode_text = types.MethodType(encode_text, model)
    setattr(model, _PACKED, attention)
    return True
