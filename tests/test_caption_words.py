"""One caption word count for every DataComp-style rule, equal to fastText's tokeniser on edge cases."""

from __future__ import annotations

import duckdb
import pytest

from capcurate.stages.basic_filter import BasicFilter
from capcurate.stages.caption_words import EOS, tokens, word_count, word_count_sql
from capcurate.stages.cluster_filter import ClusterFilter

# text -> len(fasttext.tokenize(text)), as printed by fastText's own Python binding (fasttext-numpy2
# 0.10.4, Dictionary::readWord); Python's len(text.split()) differs where the last column says so
FASTTEXT_COUNTS = [
    ("a red circle", 3, None),
    ("red\u00a0circle left", 2, 3),          # a non-breaking space is part of a word
    ("a\u3000b", 1, 2),                      # so is an ideographic space
    ("a\u2028b", 1, 2),                      # and a Unicode line separator
    ("a\x1cb", 1, 2),                        # and an ASCII file separator (Python splits on it)
    ("a\x85b", 1, 2),                        # and NEL
    ("sunflower\n", 2, 1),                   # every "\n" is the end-of-line token </s>
    ("\n", 1, 0),
    ("\n\n", 2, 0),
    ("x\n\ny", 4, 2),
    ("line1\nline2\n", 4, 2),
    ("a \n b", 3, 2),
    ("a\r\nb", 3, 2),                        # "\r" separates, "\n" is a token
    ("tree\vhouse", 2, None),                # vertical tab separates (RE2's \S did not)
    ("a\fb", 2, None),                       # form feed separates
    ("a\tb", 2, None),
    ("a\rb", 2, None),
    ("\r", 0, None),
    ("a\x00b", 2, 1),                        # NUL separates
    ("", 0, None),
    ("   ", 0, None),
    ("a  b", 2, None),
    (" a b ", 2, None),
    ("caf\u00e9 au lait", 3, None),
]


@pytest.mark.parametrize("text, expected, python_split", FASTTEXT_COUNTS)
def test_word_count_equals_fasttext_tokenize_in_python_and_sql(text, expected, python_split):
    assert word_count(text) == len(tokens(text)) == expected
    assert duckdb.connect().execute(f"SELECT {word_count_sql('$t')}", {"t": text}).fetchone()[0] == expected
    assert len(text.split()) == (expected if python_split is None else python_split)


def test_tokens_are_fasttexts_with_the_end_of_line_token():
    assert tokens("red\u00a0circle\nleft ") == ["red\u00a0circle", EOS, "left"]
    assert tokens("tree\vhouse\r\n") == ["tree", "house", EOS]


def test_basic_and_cluster_rules_count_words_the_same_way():
    """The two DataComp-style caption rules at the same bound keep the same rows (they differed on a
    non-breaking space, 3 vs 2 words, and on line ends and vertical tabs)."""
    texts = [t for t, _, _ in FASTTEXT_COUNTS] + [None]
    con = duckdb.connect()
    con.execute("CREATE TABLE c AS SELECT unnest($t) AS t", {"t": texts})
    for bound in (1, 2, 3):
        basic = dict(BasicFilter(language=None, min_words=bound).rules("t", "1", "1"))[
            f"basic: caption words >= {bound}"]
        cluster = dict(ClusterFilter("s", targets="x", language=None, min_words=bound).caption_rules("t"))[
            f"cluster: caption words >= {bound}"]
        got_basic = con.execute(f"SELECT list(coalesce({basic}, false) ORDER BY rowid) FROM c").fetchone()[0]
        got_cluster = con.execute(f"SELECT list(coalesce({cluster}, false) ORDER BY rowid) FROM c").fetchone()[0]
        want = [t is not None and word_count(t) >= bound for t in texts]
        assert got_basic == got_cluster == want
