"""The caption-mixing strategies of "Improving Multimodal Datasets with Image Captioning" (Nguyen et al. 2023).

Each strategy is one function returning a SELECT over the CTE ``base`` (the images a mix may use: rows
of ``samples`` with an image, restricted by ``--from-selection`` / ``--where``) with the columns
``uid, caption, caption_source, score``. ``score`` is the chosen pair's similarity under ``--score``
(NULL without a scorer). Rows whose chosen caption is empty are left out: they teach nothing.

Thresholds: ``--min-score`` applies to pairs with a raw caption, ``--synthetic-min-score`` to pairs
with a synthetic caption (it defaults to ``--min-score``: "the same or its own threshold").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...errors import InputError
from ...views import sql_string
from .columns import MixColumns, nonempty


@dataclass
class MixOptions:
    top_fraction: float | None = None
    min_score: float | None = None
    synthetic_min_score: float | None = None
    p: float = 0.5
    seed: int = 0
    separator: str = " "
    caption_probs: list[float] | None = None   # sample: one per source (raw, then each --synthetic)

    @property
    def synthetic_threshold(self) -> float | None:
        return self.min_score if self.synthetic_min_score is None else self.synthetic_min_score


def _at_least(expr: str, threshold: float | None) -> str:
    return "TRUE" if threshold is None else f"{expr} >= {float(threshold)!r}"


def _pairs(cols: MixColumns, source: str, threshold: float | None, where: str = "TRUE",
           table: str = "base") -> str:
    """One (image, caption of ``source``) pair per image whose caption is there and passes ``threshold``."""
    cap = cols.caption(source)
    score = cols.score(source) if threshold is not None else cols.score_or_null(source)
    return (
        f"SELECT uid, {cap} AS caption, {sql_string(source)} AS caption_source, {score} AS score "
        f"FROM {table} WHERE ({where}) AND {nonempty(cap)} AND {_at_least(score, threshold)}"
    )


def _ranked_by_raw_score(cols: MixColumns) -> str:
    """``base`` with each image's rank by raw CLIP score (best first; images without a score last)."""
    return (
        f"(SELECT *, row_number() OVER (ORDER BY {cols.score('raw')} DESC NULLS LAST, uid) AS rank_, "
        "count(*) OVER () AS n_ FROM base)"
    )


def _top(fraction: float) -> str:
    return f"rank_ <= CAST(round({float(fraction)!r} * n_) AS BIGINT)"


def raw(cols: MixColumns, opt: MixOptions) -> str:
    """Raw alt-text only; ``--top-fraction`` keeps the best-scoring fraction (CLIP-score filtering)."""
    if opt.top_fraction is None:
        return _pairs(cols, "raw", opt.min_score)
    return _pairs(cols, "raw", opt.min_score, _top(opt.top_fraction), _ranked_by_raw_score(cols))


def synthetic(cols: MixColumns, opt: MixOptions) -> str:
    """One synthetic caption per image (the best-scoring of several when the scorer chose one)."""
    return _pairs(cols, cols.synthetic[0], opt.synthetic_threshold)


def raw_top_synthetic(cols: MixColumns, opt: MixOptions) -> str:
    """Raw captions for the top ``--top-fraction`` of images by raw score, synthetic ones for the rest.

    The paper's best family on DataComp: the best raw pairs keep their (diverse) alt-text and every other
    image is rescued with a synthetic caption, itself thresholded.
    """
    if opt.top_fraction is None:
        raise InputError("strategy raw-top+synthetic needs --top-fraction (e.g. 0.3)")
    ranked = _ranked_by_raw_score(cols)
    top = _top(opt.top_fraction)
    return (
        _pairs(cols, "raw", opt.min_score, top, ranked) + " UNION ALL "
        + _pairs(cols, cols.synthetic[0], opt.synthetic_threshold, f"NOT ({top})", ranked)
    )


def best(cols: MixColumns, opt: MixOptions) -> str:
    """Per image, whichever caption (raw or any synthetic) the scorer rates highest; ``--min-score`` on it.

    Ties go to the source listed first: raw, then the ``--synthetic`` names in order.
    """
    candidates = " UNION ALL ".join(
        f"SELECT uid, {cols.caption(s)} AS caption, {sql_string(s)} AS caption_source, "
        f"{cols.score(s)} AS score, {i} AS order_ FROM base WHERE {nonempty(cols.caption(s))}"
        for i, s in enumerate(["raw", *cols.synthetic])
    )
    return (
        f"SELECT uid, caption, caption_source, score FROM ({candidates}) WHERE score IS NOT NULL "
        f"AND {_at_least('score', opt.min_score)} "
        "QUALIFY row_number() OVER (PARTITION BY uid ORDER BY score DESC, order_) = 1"
    )


def both(cols: MixColumns, opt: MixOptions) -> str:
    """Every image twice, once with its raw and once with its synthetic caption, as separate samples."""
    return (
        _pairs(cols, "raw", opt.min_score) + " UNION ALL "
        + _pairs(cols, cols.synthetic[0], opt.synthetic_threshold)
    )


def concat(cols: MixColumns, opt: MixOptions) -> str:
    """Raw and synthetic caption joined in one caption (``--separator``); a part below its threshold is left out."""
    name = cols.synthetic[0]
    raw_cap, syn_cap = cols.caption("raw"), cols.caption(name)
    raw_score = cols.score("raw") if opt.min_score is not None else ""
    syn_thr = opt.synthetic_threshold
    syn_score = cols.score(name) if syn_thr is not None else ""
    raw_ok = f"{nonempty(raw_cap)} AND {_at_least(raw_score, opt.min_score)}"
    syn_ok = f"{nonempty(syn_cap)} AND {_at_least(syn_score, syn_thr)}"
    return (
        "SELECT uid, concat_ws("
        f"{sql_string(opt.separator)}, CASE WHEN raw_ok THEN trim(raw_cap) END, "
        "CASE WHEN syn_ok THEN trim(syn_cap) END) AS caption, "
        f"CASE WHEN raw_ok AND syn_ok THEN {sql_string('raw+' + name)} WHEN raw_ok THEN 'raw' "
        f"ELSE {sql_string(name)} END AS caption_source, NULL::FLOAT AS score FROM ("
        f"SELECT uid, {raw_cap} AS raw_cap, {syn_cap} AS syn_cap, coalesce({raw_ok}, FALSE) AS raw_ok, "
        f"coalesce({syn_ok}, FALSE) AS syn_ok FROM base) WHERE raw_ok OR syn_ok"
    )


def random(cols: MixColumns, opt: MixOptions) -> str:
    """Synthetic caption with probability ``--p``, raw otherwise; the coin is a hash of (seed, uid).

    Hashing instead of a random generator makes the draw for an image independent of row order and of
    which other images are in the mix, so the same seed gives the same choice everywhere.
    """
    if not 0.0 <= opt.p <= 1.0:
        raise InputError(f"--p must be a probability between 0 and 1, got {opt.p}")
    # 13 hex digits of md5 = 52 random bits, a uniform number in [0, 1)
    coin = (
        f"(CAST('0x' || substr(md5(concat({int(opt.seed)}, ':', uid)), 1, 13) AS BIGINT) "
        "/ 4503599627370496.0)"
    )
    table = f"(SELECT *, {coin} < {float(opt.p)!r} AS pick_synthetic FROM base)"
    return (
        _pairs(cols, "raw", opt.min_score, "NOT pick_synthetic", table) + " UNION ALL "
        + _pairs(cols, cols.synthetic[0], opt.synthetic_threshold, "pick_synthetic", table)
    )


def sample(cols: MixColumns, opt: MixOptions) -> str:
    """Every image once, its captions kept for train-time choice (Recap-DataComp, LaCLIP, VeCLIP sample among
    raw and rewritten captions at each step). The row's caption is its most probable non-empty source; the
    probabilities (``--caption-probs``, for raw then each ``--synthetic``) go to the lineage, where ``shard``
    reads them: every source is written into each sample's .json and the recipe into manifest.json.
    """
    sources = ["raw", *cols.synthetic]
    probs = opt.caption_probs or [1.0 / len(sources)] * len(sources)
    if len(probs) != len(sources):
        raise InputError(f"--caption-probs has {len(probs)} values for {len(sources)} sources "
                         f"({', '.join(sources)})")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise InputError(f"--caption-probs must be non-negative and sum to 1, got {probs}")
    order = sorted(range(len(sources)), key=lambda i: -probs[i])  # stable: ties keep source order
    caption = ", ".join(f"CASE WHEN {nonempty(cols.caption(sources[i]))} THEN {cols.caption(sources[i])} END"
                        for i in order)
    source = " ".join(f"WHEN {nonempty(cols.caption(sources[i]))} THEN {sql_string(sources[i])}" for i in order)
    return (
        f"SELECT uid, caption, caption_source, NULL::FLOAT AS score FROM (SELECT uid, coalesce({caption}) AS "
        f"caption, CASE {source} END AS caption_source FROM base) WHERE caption IS NOT NULL"
    )


# name -> (function, needs a scorer, how many synthetic sources: 0, 1 or "many")
STRATEGIES: dict[str, tuple[Callable[[MixColumns, MixOptions], str], bool, object]] = {
    "raw": (raw, False, 0),
    "synthetic": (synthetic, False, 1),
    "raw-top+synthetic": (raw_top_synthetic, True, 1),
    "best": (best, True, "many"),
    "both": (both, False, 1),
    "concat": (concat, False, 1),
    "random": (random, False, 1),
    "sample": (sample, False, "many"),
}
