"""DataComp's basic filtering as SQL predicates (Gadre et al. 2023, ``baselines/apply_filter.py``).

DataComp keeps a sample when its caption is English (fastText lid.176 top-1 == 'en'), has more than
two words and more than five characters, and its image's smaller side is at least 200 pixels with an
aspect ratio (longer / shorter side) of at most 3, measured on ``original_width``/``original_height``.
Here the language comes from py3langid, which ships its model; every bound is a field so a user can move
it. Words are counted by ``caption_words`` (fastText's tokeniser), the same count as ``--cluster``'s
caption rule; DataComp's basic-filter script itself used ``len(text.split())``, which differs only on
non-ASCII white space (3 words in "red\\u00a0circle left" there, 2 here) and line ends (each "\\n" is
a token here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .caption_words import word_count_sql

LANG_FUNCTION = "capcurate_language"


@dataclass(frozen=True)
class BasicFilter:
    language: str | None = "en"     # ISO 639-1 code py3langid must predict; None skips the rule
    min_words: int = 3              # at least this many words (caption_words; DataComp: > 2)
    min_chars: int = 6              # at least this many characters (DataComp: > 5)
    min_side: int = 200             # smaller image side in pixels, at least
    max_aspect_ratio: float = 3.0   # longer side / shorter side, at most

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rules(self, caption: str, width: str, height: str) -> list[tuple[str, str]]:
        """(label, predicate) pairs over SQL expressions for the caption and the image size."""
        rules = []
        if self.language:
            # the language of each distinct caption is computed once into __capcurate_lang (see below)
            rules.append((f"basic: caption language = {self.language}",
                          f"{caption} IN (SELECT text FROM __capcurate_lang WHERE lang = '{self.language}')"))
        rules.append((f"basic: caption words >= {self.min_words}",
                      f"{word_count_sql(caption)} >= {int(self.min_words)}"))
        rules.append((f"basic: caption chars >= {self.min_chars}", f"length({caption}) >= {int(self.min_chars)}"))
        rules.append((f"basic: min(width, height) >= {self.min_side}",
                      f"least({width}, {height}) >= {int(self.min_side)}"))
        # multiplied out rather than divided, so a zero side cannot divide by zero
        rules.append((f"basic: aspect ratio <= {self.max_aspect_ratio:g}",
                      f"greatest({width}, {height}) <= {float(self.max_aspect_ratio)!r} * least({width}, {height})"))
        return rules


def register_language_table(con: Any, text_sql: str) -> int:
    """Create ``__capcurate_lang(text, lang)`` over the distinct texts of ``text_sql``; returns their count.

    py3langid is Python, so DuckDB calls it through a vectorised (Arrow) UDF once per distinct caption:
    web alt-texts repeat a lot, and the two passes of the filter then reuse the table.
    """
    import py3langid
    import pyarrow as pa

    def language(texts):  # no annotations: DuckDB evaluates them to infer types
        return pa.array([None if t is None else py3langid.classify(t.replace("\n", " "))[0]
                         for t in texts.to_pylist()], pa.string())

    try:
        con.remove_function(LANG_FUNCTION)
    except Exception:  # not registered yet on this connection
        pass
    con.create_function(LANG_FUNCTION, language, ["VARCHAR"], "VARCHAR", type="arrow")
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE __capcurate_lang AS SELECT text, {LANG_FUNCTION}(text) AS lang "
        f"FROM (SELECT DISTINCT t AS text FROM ({text_sql}) q(t) WHERE t IS NOT NULL)"
    )
    return con.execute("SELECT count(*) FROM __capcurate_lang").fetchall()[0][0]
