"""Which SQL expression gives a caption or a score for a source (``raw`` or a captions name).

The wide ``samples`` view (capcurate.views) holds the raw caption as ``caption``, a captioner's first
caption as ``cap_<name>`` and all of them as ``caps_<name>``, and a scorer's similarities as
``score_<scorer>_<source>`` (+ ``scores_`` / ``best_`` for sources with several captions). Every
strategy asks this module for its expressions, so a missing column is reported in one place, naming
what exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import InputError
from ...views import ident


def nonempty(expr: str) -> str:
    """An SQL predicate: the caption is there and not only whitespace (an empty caption trains nothing)."""
    return f"nullif(trim({expr}), '') IS NOT NULL"


@dataclass
class MixColumns:
    """The columns of ``samples`` plus the scorer and captions names a mix was asked to use."""

    columns: list[str]
    scorers: list[str]
    captioners: list[str]
    scorer: str | None = None
    synthetic: list[str] = field(default_factory=list)

    # -- choosing names ----------------------------------------------------------------------------
    def choose_scorer(self, scorer: str | None, *, needed_for: str) -> str:
        """The scorer asked for, or the only one there is; the error lists the scorers present."""
        if scorer:
            if scorer not in self.scorers:
                raise InputError(
                    f"no scores named {scorer!r} in this dataset; scores present: {_names(self.scorers)}"
                )
            return scorer
        if len(self.scorers) == 1:
            return self.scorers[0]
        raise InputError(
            f"{needed_for} needs --score SCORER; scores present: {_names(self.scorers)}"
        )

    def choose_synthetic(self, names: list[str], *, needed_for: str, many: bool = False) -> list[str]:
        """The captions names asked for (all of them if ``many`` and none given, else the only one)."""
        if names:
            for n in names:
                if n not in self.captioners:
                    raise InputError(
                        f"no captions named {n!r} in this dataset; captions present: {_names(self.captioners)}"
                    )
            if not many and len(names) > 1:
                raise InputError(f"{needed_for} takes one --synthetic name, got {', '.join(names)}")
            return names
        if self.captioners and (many or len(self.captioners) == 1):
            return list(self.captioners)
        raise InputError(
            f"{needed_for} needs --synthetic NAME; captions present: {_names(self.captioners)}"
        )

    # -- expressions -------------------------------------------------------------------------------
    def caption(self, source: str) -> str:
        """The caption text of ``source``; for several captions, the best-scoring one when known."""
        if source == "raw":
            return "caption"
        cap, caps = f"cap_{source}", f"caps_{source}"
        if cap not in self.columns:
            raise InputError(
                f"column {cap} not found; caption columns present: {_names(self._starting('cap_'))}"
            )
        best = f"best_{self.scorer}_{source}" if self.scorer else None
        if best and best in self.columns and caps in self.columns:
            # best_ is a 0-based index into caps_; DuckDB lists are 1-based
            return f"coalesce(list_extract({ident(caps)}, {ident(best)} + 1), {ident(cap)})"
        return ident(cap)

    def score(self, source: str) -> str:
        """The scorer's similarity for ``source``'s chosen caption (see ``caption``)."""
        if not self.scorer:
            raise InputError("a score threshold or ranking needs --score SCORER")
        col = f"score_{self.scorer}_{source}"
        lst, best = f"scores_{self.scorer}_{source}", f"best_{self.scorer}_{source}"
        if col not in self.columns:
            raise InputError(
                f"column {col} not found; score columns present: {_names(self._starting('score_'))}"
            )
        if source != "raw" and lst in self.columns and best in self.columns and f"caps_{source}" in self.columns:
            return f"coalesce(list_extract({ident(lst)}, {ident(best)} + 1), {ident(col)})"
        return ident(col)

    def score_or_null(self, source: str) -> str:
        """The score when a scorer was chosen and scored this source, else NULL (kept for reference)."""
        if self.scorer and f"score_{self.scorer}_{source}" in self.columns:
            return self.score(source)
        return "NULL::FLOAT"

    def _starting(self, prefix: str) -> list[str]:
        return [c for c in self.columns if c.startswith(prefix)]


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "(none)"
