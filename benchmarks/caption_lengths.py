"""Caption lengths like DataComp's raw alt-text, for the train benchmark: a long tail up to the 77-token cap.

Where the numbers come from (and where they do not):
- the mean: DataComp-1B's original alt-text averages about ten words per caption, as reported by
  Li et al. 2024, "What If We Recaption Billions of Web Images with LLaMA-3?" (arXiv 2406.08478;
  Recap-DataComp-1B), the only published figure used here;
- words to tokens: ~1.3 CLIP BPE tokens per English word (a rule of thumb, not measured here), plus the
  start and end tokens, gives a mean of ~15 tokens;
- the shape and the tail are an ASSUMPTION, not a fit: a log-normal with that mean whose spread puts 1.5%
  of captions at the 77-token cap (open_clip truncates longer alt-text there). With it a batch of 512 holds
  a 77-token caption with probability 1 - 0.985**512 > 99.9%, which is what issue 23 says of real batches.
Replace ``TOKENS_MEAN`` / ``TAIL_AT_CAP`` (or the whole function) with a histogram measured on real
DataComp shards when one is at hand; nothing here was measured on DataComp itself.
"""

from __future__ import annotations

import math

import torch

CONTEXT = 77          # open_clip's context: longer captions are cut to it (the tail piles up here)
TOKENS_MEAN = 15.0    # ~10 words (Li et al. 2024) x ~1.3 tokens/word + start/end tokens
TAIL_AT_CAP = 0.015   # assumed share of captions cut at 77 tokens
MIN_TOKENS = 3        # start, one word, end


def lognormal_params(mean: float = TOKENS_MEAN, tail: float = TAIL_AT_CAP, cap: int = CONTEXT) -> tuple[float, float]:
    """(mu, sigma) of the log-normal with ``mean`` and P(length >= cap) = ``tail`` (the smaller sigma)."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - tail)
    # ln(cap) = mu + z*sigma and mu = ln(mean) - sigma^2/2  ->  sigma^2/2 - z*sigma + ln(cap/mean) = 0
    c = math.log(cap / mean)
    sigma = z - math.sqrt(z * z - 2 * c)
    return math.log(mean) - sigma * sigma / 2, sigma


def datacomp_like_lengths(n: int, seed: int = 0, cap: int = CONTEXT) -> torch.Tensor:
    """``n`` caption lengths in CLIP tokens (start and end included), in [MIN_TOKENS, cap]."""
    mu, sigma = lognormal_params(cap=cap)
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return x.round().clamp(MIN_TOKENS, cap).long()


def datacomp_like_tokens(n: int, seed: int = 0, context: int = CONTEXT, vocab: int = 49408) -> torch.Tensor:
    """(n, context) token ids as open_clip's tokenizer lays them out: start token, words, end token (the
    largest id, which argmax pooling finds), zero padding; lengths from ``datacomp_like_lengths``."""
    sot, eot = vocab - 2, vocab - 1
    lengths = datacomp_like_lengths(n, seed, cap=context)
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(1, sot, (n, context), generator=g)
    pos = torch.arange(context)[None, :]
    tokens[pos >= lengths[:, None]] = 0
    tokens[:, 0] = sot
    tokens[torch.arange(n), lengths - 1] = eot
    return tokens


def datacomp_like_captions(n: int, seed: int = 0, words: tuple[str, ...] = ("red", "dog", "photo", "of",
                                                                            "the", "sale", "new", "blue")) -> list[str]:
    """``n`` captions of one-token words whose CLIP token counts follow ``datacomp_like_lengths`` (for
    training shards: each word here is one BPE token, so a caption of L tokens has L - 2 words)."""
    lengths = datacomp_like_lengths(n, seed)
    g = torch.Generator().manual_seed(seed + 2)
    return [" ".join(words[int(i)] for i in torch.randint(len(words), (int(ln) - 2,), generator=g))
            for ln in lengths]
