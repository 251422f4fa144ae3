"""capcurate's own caption decoding over an open_clip CoCa, with a KV cache.

Why not ``CoCa.generate``: open_clip 3.3 imports ``BeamSearchScorer`` from transformers, which
transformers 5 removed, so its generation fails; its loop also re-runs the whole prefix through both
text towers at every step. Here each step feeds only the new token through the causal text tower and
the multimodal decoder, keeping per-layer keys/values, and the image keys/values of the decoder's
cross-attention are projected once per batch.

The cache path reads the weights of open_clip's standard blocks (``ResidualAttentionBlock`` around an
``nn.MultiheadAttention``); any other layout (custom blocks, an HF text tower) falls back to the
plain loop that re-runs the prefix, which gives the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .captioners.base import DecodingConfig


@dataclass(frozen=True)
class SpecialTokens:
    sot: int
    eot: int
    pad: int = 0


def supports_kv_cache(model: torch.nn.Module) -> bool:
    """True when every attention block of CoCa's text tower and decoder has the standard layout."""
    from open_clip.transformer import ResidualAttentionBlock, TextTransformer

    text, dec = getattr(model, "text", None), getattr(model, "text_decoder", None)
    if not isinstance(text, TextTransformer) or dec is None or text.attn_mask is None or text.use_pad_mask:
        return False
    blocks = [*text.transformer.resblocks, *dec.resblocks, *dec.cross_attn]
    for b in blocks:
        a = getattr(b, "attn", None)
        if type(b) is not ResidualAttentionBlock or not isinstance(a, torch.nn.MultiheadAttention):
            return False
        if not a._qkv_same_embed_dim or a.bias_k is not None or a.add_zero_attn or not a.batch_first:
            return False
    return bool(text.transformer.batch_first and dec.batch_first)


def max_text_length(model: torch.nn.Module) -> int:
    """Longest token sequence (prefix + generated) the model's position tables allow."""
    return min(int(model.text.context_length), int(model.text_decoder.context_length))


class _Heads:
    """Split/merge attention heads for one ``nn.MultiheadAttention``."""

    def __init__(self, attn: torch.nn.MultiheadAttention):
        self.attn = attn
        self.h = attn.num_heads
        self.w = attn.embed_dim

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, W] -> [N, h, L, W/h]
        n, seq, _ = x.shape
        return x.view(n, seq, self.h, self.w // self.h).transpose(1, 2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        n, _, seq, _ = x.shape
        return x.transpose(1, 2).reshape(n, seq, self.w)

    def project(self, x: torch.Tensor, part: slice) -> torch.Tensor:
        b = self.attn.in_proj_bias
        return F.linear(x, self.attn.in_proj_weight[part], None if b is None else b[part])


class CocaIncrementalDecoder:
    """Next-token logits for a growing batch of token prefixes over fixed image embeddings."""

    def __init__(self, model: torch.nn.Module, image_embs: torch.Tensor, *, use_cache: bool = True):
        self.model = model
        self.image_embs = image_embs
        self.use_cache = use_cache and supports_kv_cache(model)
        self.seen = 0  # tokens already inside the caches
        if self.use_cache:
            w = model.text_decoder.width
            self.self_kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * (
                len(model.text.transformer.resblocks) + len(model.text_decoder.resblocks))
            self.cross_kv = []
            for blk in model.text_decoder.cross_attn:
                hd = _Heads(blk.attn)
                kv_in = blk.ln_1_kv(image_embs)
                self.cross_kv.append((hd.split(hd.project(kv_in, slice(w, 2 * w))),
                                      hd.split(hd.project(kv_in, slice(2 * w, 3 * w)))))

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (beam search): caches and image embeddings follow their sequences."""
        self.image_embs = self.image_embs.index_select(0, index)
        if self.use_cache:
            self.self_kv = [None if kv is None else (kv[0].index_select(0, index), kv[1].index_select(0, index))
                            for kv in self.self_kv]
            self.cross_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.cross_kv]

    @torch.no_grad()
    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for the token after ``tokens`` [N, L] (L grows by one per call)."""
        if not self.use_cache:
            _, token_embs = self.model._encode_text(tokens)
            return self.model.text_decoder(self.image_embs, token_embs)[:, -1]
        new = tokens[:, self.seen:]
        logits = self._cached_step(new, self.seen)
        self.seen = tokens.shape[1]
        return logits

    def _cached_step(self, new: torch.Tensor, offset: int) -> torch.Tensor:
        text, dec = self.model.text, self.model.text_decoder
        cast = text.transformer.get_cast_dtype()
        x = text.token_embedding(new).to(cast)
        x = x + text.positional_embedding[offset:offset + new.shape[1]].to(cast)
        n_text = len(text.transformer.resblocks)
        for i, blk in enumerate(text.transformer.resblocks):
            x = self._self_block(blk, x, i)
        if text.cls_emb is None:  # without the appended CLS token the tower normalises its token outputs
            x = text.ln_final(x)
        for j, (blk, cross) in enumerate(zip(dec.resblocks, dec.cross_attn, strict=True)):
            x = self._self_block(blk, x, n_text + j)
            x = self._cross_block(cross, x, j)
        out = dec.ln_final(x[:, -1:])
        # open_clip's precision='bf16'/'fp16' leaves this parameter float32 (load_openclip aligns it)
        return (out @ dec.text_projection.to(out.dtype))[:, -1]

    def _self_block(self, blk: torch.nn.Module, x: torch.Tensor, slot: int) -> torch.Tensor:
        hd = _Heads(blk.attn)
        q, k, v = (hd.split(t) for t in hd.project(blk.ln_1(x), slice(None)).chunk(3, dim=-1))
        past = self.self_kv[slot]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        self.self_kv[slot] = (k, v)
        n_new, n_all = q.shape[2], k.shape[2]
        mask = None
        if n_new > 1:  # a prompt prefix: causal among the new tokens, all cached ones visible
            mask = torch.ones(n_new, n_all, dtype=torch.bool, device=x.device).tril(n_all - n_new)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + blk.ls_1(blk.attn.out_proj(hd.merge(o)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))

    def _cross_block(self, blk: torch.nn.Module, x: torch.Tensor, j: int) -> torch.Tensor:
        hd = _Heads(blk.attn)
        w = hd.w
        q = hd.split(hd.project(blk.ln_1(x), slice(0, w)))
        k, v = self.cross_kv[j]
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        x = x + blk.ls_1(blk.attn.out_proj(hd.merge(o)))
        return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


# -- logits processing (the order transformers uses: penalties, then temperature, top-k, top-p) ---

def apply_penalties(logits: torch.Tensor, tokens: torch.Tensor, n_generated: int, cfg: DecodingConfig,
                    special: SpecialTokens) -> torch.Tensor:
    # PAD and SOT are never caption tokens (CoCa's caption loss ignores PAD); a PAD in the prefix would
    # also change the text tower's attention mask, so the cached and uncached paths would disagree
    logits = logits.clone()
    logits[:, [special.pad, special.sot]] = float("-inf")
    if cfg.repetition_penalty != 1.0:
        seen = logits.gather(1, tokens)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        logits = logits.scatter(1, tokens, seen)
    if n_generated < cfg.min_new_tokens:
        logits[:, special.eot] = float("-inf")
    return logits


def warp_for_sampling(logits: torch.Tensor, cfg: DecodingConfig) -> torch.Tensor:
    logits = logits / cfg.temperature
    if cfg.decoding == "topk":
        k = min(cfg.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif cfg.decoding == "nucleus" and cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the more likely ones already cover top_p (the first always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= cfg.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


# -- decoding loops ----------------------------------------------------------------------------

@torch.no_grad()
def coca_generate(model: torch.nn.Module, images: torch.Tensor, cfg: DecodingConfig, special: SpecialTokens,
                  *, prompt_ids: list[int] | None = None, generator: torch.Generator | None = None,
                  use_cache: bool = True) -> list[list[list[int]]]:
    """Generated token ids (prompt and end token removed): ``num_captions`` lists per image."""
    prefix = [special.sot, *(prompt_ids or [])]
    budget = min(cfg.max_new_tokens, max_text_length(model) - len(prefix))
    if budget < 1:
        raise ValueError(f"the prompt leaves no room to generate in a context of {max_text_length(model)}")
    _, image_embs = model._encode_image(images)
    if cfg.decoding == "beam":
        return _beam_search(model, image_embs, cfg, special, prefix, budget, use_cache)
    n = cfg.num_captions
    embs = image_embs.repeat_interleave(n, dim=0)
    tokens = torch.tensor(prefix, device=images.device).repeat(embs.shape[0], 1)
    dec = CocaIncrementalDecoder(model, embs, use_cache=use_cache)
    finished = torch.zeros(embs.shape[0], dtype=torch.bool, device=images.device)
    for step in range(budget):
        logits = apply_penalties(dec.next_logits(tokens).float(), tokens, step, cfg, special)
        if cfg.sampling:
            probs = warp_for_sampling(logits, cfg).softmax(dim=-1)
            probs = torch.where(finished[:, None], torch.ones_like(probs), probs)  # keep multinomial valid
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = logits.argmax(dim=-1)
        nxt = torch.where(finished, torch.full_like(nxt, special.pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        finished |= nxt == special.eot
        if bool(finished.all()):
            break
    seqs = [_strip(row, len(prefix), special.eot) for row in tokens.tolist()]
    return [seqs[i * n:(i + 1) * n] for i in range(images.shape[0])]


def _strip(row: list[int], n_prefix: int, eot: int) -> list[int]:
    out = row[n_prefix:]
    return out[:out.index(eot)] if eot in out else out


def _beam_search(model: torch.nn.Module, image_embs: torch.Tensor, cfg: DecodingConfig, special: SpecialTokens,
                 prefix: list[int], budget: int, use_cache: bool) -> list[list[list[int]]]:
    b, k = image_embs.shape[0], cfg.num_beams
    device = image_embs.device
    dec = CocaIncrementalDecoder(model, image_embs.repeat_interleave(k, dim=0), use_cache=use_cache)
    tokens = torch.tensor(prefix, device=device).repeat(b * k, 1)
    scores = torch.zeros(b, k, device=device)
    scores[:, 1:] = -1e9  # all beams start identical: expand only the first at step one
    hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(budget):
        logits = apply_penalties(dec.next_logits(tokens).float(), tokens, step, cfg, special)
        logp = logits.log_softmax(dim=-1)
        vocab = logp.shape[-1]
        cand = (scores.view(-1, 1) + logp).view(b, k * vocab)
        top_scores, top_idx = cand.topk(min(2 * k, k * vocab), dim=1)
        rows, new_tok, new_scores = [], [], []
        for i in range(b):
            picked: list[tuple[int, int, float]] = []
            if not done[i]:
                for rank, (s, idx) in enumerate(zip(top_scores[i].tolist(), top_idx[i].tolist(), strict=True)):
                    beam, tok = divmod(idx, vocab)
                    if tok == special.eot:
                        if rank < k:
                            gen = tokens[i * k + beam, len(prefix):].tolist()
                            hyps[i].append((s / ((len(gen) + 1) ** cfg.length_penalty), gen))
                    else:
                        picked.append((beam, tok, s))
                    if len(picked) == k:
                        break
                hyps[i] = sorted(hyps[i], key=lambda h: -h[0])[:k]
                best_running = picked[0][2] / ((step + 1) ** cfg.length_penalty) if picked else float("-inf")
                if len(hyps[i]) >= k and best_running <= hyps[i][-1][0]:
                    done[i] = True
            while len(picked) < k:  # finished image (or vocab exhausted): keep rows aligned, ignored
                picked.append((len(picked), special.pad, -1e9))
            for beam, tok, s in picked:
                rows.append(i * k + beam)
                new_tok.append(tok)
                new_scores.append(s)
        index = torch.tensor(rows, device=device)
        dec.reorder(index)
        tokens = torch.cat([tokens.index_select(0, index), torch.tensor(new_tok, device=device)[:, None]], dim=1)
        scores = torch.tensor(new_scores, device=device).view(b, k)
        if all(done):
            break
    out = []
    for i in range(b):
        if not done[i]:  # ran out of budget: unfinished beams compete with the finished ones
            for j in range(k):
                s = scores[i, j].item()
                if s > -1e8:
                    gen = tokens[i * k + j, len(prefix):].tolist()
                    hyps[i].append((s / (len(gen) ** cfg.length_penalty), gen))
        best = sorted(hyps[i], key=lambda h: -h[0])[:cfg.num_captions]
        out.append([g for _, g in best])
    return out
