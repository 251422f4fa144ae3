"""The one caption word count of every DataComp-style rule: fastText's tokeniser, in Python and in SQL.

DataComp's image-based filter counts words with ``fasttext.tokenize`` (``baselines/apply_filter.py``),
which reads tokens with fastText's ``Dictionary::readWord`` (``src/dictionary.cc``):

- a token is a maximal run of bytes other than the separators space, ``\\n``, ``\\r``, ``\\t``, ``\\v``,
  ``\\f`` and NUL; nothing else separates (a non-breaking or ideographic space is part of a word);
- every ``\\n`` is itself a token, the end-of-line token ``</s>``, so "sunflower\\n" is two tokens.

The separators are ASCII, so reading a Python ``str`` by code points gives the same tokens as fastText's
bytes of its UTF-8. ``word_count`` (Python) and ``word_count_sql`` (a DuckDB expression, what filter
runs) count the same; tests/test_caption_words.py checks both on a table of edge cases whose expected
counts were produced by fastText's own Python binding.
"""

from __future__ import annotations

import re

SEPARATORS = " \n\r\t\v\f\0"   # Dictionary::readWord's, in that order
EOS = "</s>"                   # fastText's end-of-line token: one per "\n"

_TOKEN = re.compile(r"[^ \n\r\t\v\f\0]+|\n")
# the same class for RE2 (DuckDB): inside a SQL string literal a backslash is an ordinary character
_SQL_WORD = r"[^ \n\r\t\x0b\x0c\x00]+"


def tokens(text: str) -> list[str]:
    """fastText's tokens of ``text``, ``EOS`` for each line end (``fasttext.tokenize`` gives the same)."""
    return [EOS if t == "\n" else t for t in _TOKEN.findall(text)]


def word_count(text: str) -> int:
    """How many tokens fastText reads in ``text`` (``len(fasttext.tokenize(text))``)."""
    return len(_TOKEN.findall(text))


def word_count_sql(expr: str) -> str:
    """A DuckDB expression counting the tokens of the text expression ``expr`` as ``word_count`` does
    (NULL for a NULL text): the runs of non-separators plus one per line end (counted in bytes: "\\r\\n" is
    one character to DuckDB's grapheme-aware functions, and "\\n" is one byte of UTF-8)."""
    return (f"(len(regexp_extract_all({expr}, '{_SQL_WORD}')) "
            f"+ (strlen({expr}) - strlen(replace({expr}, chr(10), ''))))")
