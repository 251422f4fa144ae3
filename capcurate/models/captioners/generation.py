"""``DecodingConfig`` -> keyword arguments of transformers' ``generate``, with per-image sampling seeds.

transformers samples every row of a batch from one global generator, so a sampled caption would depend
on which other images share its batch and in which order. ``SeededSampler`` makes each draw a function of
(the image's seed, which of its captions, the step, the token) alone: a counter-based hash gives every
candidate token a Gumbel variate, and ``argmax(log p + Gumbel)`` is an exact draw from ``p`` (the
Gumbel-max trick). The sampler leaves one finite logit per row, so ``generate``'s own multinomial step
can only pick that token. Repetition penalty and min-length run before it (transformers' own processors);
temperature, top-k and top-p run inside it.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import DecodingConfig

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)   # splitmix64's multipliers, as signed int64 (tensors wrap)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _int64(v: int) -> int:
    """A Python int wrapped to int64, as tensor arithmetic wraps."""
    return (v + (1 << 63)) % (1 << 64) - (1 << 63)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def hash_uniform(row_seeds: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """float32 uniforms in (0, 1), shape ``[rows, vocab]``, from (row seed, step, token id) only."""
    tokens = torch.arange(vocab, device=row_seeds.device, dtype=torch.int64)
    x = _mix64(row_seeds[:, None] + _int64((step + 1) * _GOLDEN)) + tokens[None, :] * _GOLDEN
    bits = _shr(_mix64(x), 40)  # 24 random bits: exact in float32
    return (bits.to(torch.float32) + 0.5) / float(1 << 24)


class SeededSampler:
    """A transformers logits processor: temperature, top-k/top-p, then a seeded Gumbel-max draw per row."""

    def __init__(self, row_seeds: torch.Tensor, config: DecodingConfig):
        self.row_seeds = row_seeds
        self.config = config
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.start is None:  # the prompt's (padded) length: steps count from here, not from the padding
            self.start = input_ids.shape[1]
        step = input_ids.shape[1] - self.start
        cfg = self.config
        logits = scores.float() / cfg.temperature
        if cfg.decoding == "topk":
            k = min(cfg.top_k, logits.shape[-1])
            kth = torch.topk(logits, k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        else:  # nucleus: keep the smallest set of tokens whose mass reaches top_p (the best one always)
            sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
            mass_before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)
            drop = mass_before >= cfg.top_p
            drop[:, 0] = False
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
        u = hash_uniform(self.row_seeds.to(logits.device), step, logits.shape[-1])
        pick = (logits - torch.log(-torch.log(u))).argmax(-1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick[:, None], 0.0)


def row_seeds(seeds: list[int], num_captions: int) -> torch.Tensor:
    """One seed per generated row: ``generate`` expands image i into rows i*k .. i*k+k-1."""
    rows = [(s + j * 0x632BE59BD9B4E019) % (1 << 63) for s in seeds for j in range(num_captions)]
    return torch.tensor(rows, dtype=torch.int64)


def can_use_static_cache(model: Any) -> bool:
    """transformers marks the models whose decoding step compiles as one graph around a static KV cache."""
    return bool(getattr(model, "_can_compile_fullgraph", False))


def generate_kwargs(config: DecodingConfig, seeds: list[int] | None = None, *,
                    static_cache: bool = False) -> dict[str, Any]:
    """Every setting that changes the output is passed explicitly, so a model's own generation_config
    (Qwen2-VL-Instruct ships top_k=1, repetition_penalty=1.05) never silently changes the captions.

    ``static_cache`` (``--compile``): a KV cache preallocated at its final length, so every decoding step
    has the same shapes; transformers then compiles that step on a GPU (fewer kernel launches per token:
    the decoder's share of a caption is many small steps). Greedy and sampled decoding only: beam search
    reorders its cache every step."""
    kw: dict[str, Any] = {
        "max_new_tokens": config.max_new_tokens,
        "min_new_tokens": config.min_new_tokens,
        "repetition_penalty": config.repetition_penalty,
        "num_return_sequences": config.num_captions,
        "use_cache": True,
    }
    if config.decoding == "greedy":
        kw.update(do_sample=False, num_beams=1)
    elif config.decoding == "beam":
        kw.update(do_sample=False, num_beams=config.num_beams, length_penalty=config.length_penalty)
    elif seeds is not None:
        from transformers import LogitsProcessorList

        # the sampler leaves one token per row; transformers' own warpers then keep exactly that one
        kw.update(do_sample=True, num_beams=1, top_k=0, top_p=1.0, temperature=1.0,
                  logits_processor=LogitsProcessorList([SeededSampler(row_seeds(seeds, config.num_captions),
                                                                       config)]))
    elif config.decoding == "nucleus":
        kw.update(do_sample=True, num_beams=1, top_p=config.top_p, top_k=0, temperature=config.temperature)
    else:
        kw.update(do_sample=True, num_beams=1, top_k=config.top_k, top_p=1.0, temperature=config.temperature)
    if static_cache and kw["num_beams"] == 1:
        kw["cache_implementation"] = "static"
    return kw


def recordable(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The generate kwargs as lineage records them (the sampler by name)."""
    out = {k: v for k, v in kwargs.items() if k != "logits_processor"}
    if "logits_processor" in kwargs:
        out["sampler"] = "capcurate SeededSampler (Gumbel-max, per-image seeds)"
    return out


def answer_lengths(ids: torch.Tensor, stop_ids: set[int], *, skip: int = 0) -> list[tuple[int, bool]]:
    """Per generated row: (tokens before its first stop token, whether it stopped at the length limit).

    ``ids`` holds the generated tokens only (``skip`` leading ones are not the model's: an encoder-decoder's
    start token). ``generate`` ends a row at an end-of-sequence token and pads it after; a row without one
    ran until ``max_new_tokens``: that caption was cut."""
    rows = ids[:, skip:].tolist()
    out = []
    for row in rows:
        end = next((i for i, t in enumerate(row) if t in stop_ids), None)
        out.append((len(row) if end is None else end, end is None))
    return out


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a row: the generation config's end-of-sequence ids and the tokenizer's."""
    ids: set[int] = set()
    for v in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if v is not None:
            ids.update(v if isinstance(v, (list, tuple)) else [v])
    return ids


def group_captions(texts: list[str], lengths: list[tuple[int, bool]], k: int) -> list[Any]:
    """``texts`` of ``n * k`` rows -> one ``ImageCaptions`` of ``k`` per image, with their token counts."""
    from .base import ImageCaptions

    return [ImageCaptions(texts[i * k:(i + 1) * k], [n for n, _ in lengths[i * k:(i + 1) * k]],
                          sum(cut for _, cut in lengths[i * k:(i + 1) * k])) for i in range(len(texts) // k)]
