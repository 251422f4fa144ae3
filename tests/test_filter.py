"""capcurate filter: SQL rules over a generated manifest of thousands of rows, checked by hand in Python."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.dataset import Dataset, samples_schema
from capcurate.errors import InputError
from capcurate.stages.basic_filter import BasicFilter
from capcurate.stages.filter import filter as run_filter

CAPTIONS = [
    "a red cube on a wooden table", "photo of a small dog playing in the park",
    "the quick brown fox jumps over the lazy dog", "blue sky over a quiet mountain lake",
    "le chat noir dort sur le canapé du salon", "der große Hund läuft schnell über die Wiese",
    "una casa blanca junto al mar azul", "IMG_0231.jpg", "two words", "hi", "", None, "   ",
    "stock photo of a happy business team", "a b c", "sunset",
]
N_ROWS, N_SHARDS = 3000, 3


def make_rows(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(N_ROWS):
        ok = rng.random() < 0.9
        caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))]
        ow, oh = (int(v) for v in rng.integers(50, 1000, size=2))
        known_original = rng.random() < 0.8
        raw_ok = ok and caption is not None and caption.strip() != ""
        rows.append({
            "uid": f"{i:032x}", "key": f"{i:09d}", "shard": f"{i % N_SHARDS:05d}", "url": f"http://x/{i}.jpg",
            "caption": caption, "status": "success" if ok else "failed_to_download",
            "error_message": None if ok else "404",
            "width": min(ow, 512) if ok else None, "height": min(oh, 512) if ok else None,
            "original_width": ow if ok and known_original else None,
            "original_height": oh if ok and known_original else None, "sha256": None,
            "score_b32_raw": float(np.float32(rng.uniform(-0.1, 0.5))) if raw_ok else None,
            "score_b32_blip": float(np.float32(rng.uniform(0.0, 0.6))) if ok else None,
        })
    return rows


@pytest.fixture
def pool(tmp_path):
    """A dataset with only Parquet files: manifest + scores/b32 (raw and one synthetic source)."""
    ds = Dataset.create(tmp_path / "pool")
    rows = make_rows()
    for s in range(N_SHARDS):
        part = [r for r in rows if r["shard"] == f"{s:05d}"]
        atomic.write_parquet(ds.samples_path(f"{s:05d}"), pa.Table.from_pylist(
            [{k: r[k] for k in samples_schema().names} for r in part], schema=samples_schema()))
        atomic.write_parquet(ds.family_dir("scores", "b32") / f"{s:05d}.parquet", pa.table({
            "uid": [r["uid"] for r in part],
            "score_b32_raw": pa.array([r["score_b32_raw"] for r in part], pa.float32()),
            "score_b32_blip": pa.array([r["score_b32_blip"] for r in part], pa.float32()),
        }))
    return ds.root, rows


def selected(root, name):
    return Dataset(root).query(f"SELECT * FROM selection_{name}").to_pylist()


def test_min_score_keeps_downloaded_rows_at_or_above_the_threshold(pool):
    root, rows = pool
    s = run_filter(root, "b32_02", min_score=0.2, score="b32:raw")
    want = {r["uid"] for r in rows if r["score_b32_raw"] is not None and r["score_b32_raw"] >= np.float32(0.2)}
    got = selected(root, "b32_02")
    assert {r["uid"] for r in got} == want and 0 < len(want) < N_ROWS
    assert s.counts["pool"] == N_ROWS and s.counts["kept"] == len(want)
    assert s.counts["passes image downloaded"] == sum(r["status"] == "success" for r in rows)
    by_uid = {r["uid"]: r for r in rows}
    assert all(r["caption"] == by_uid[r["uid"]]["caption"] and r["caption_source"] == "raw" for r in got)
    assert {"uid", "caption", "caption_source", "shard", "key", "score_b32_raw"} <= set(got[0])


def test_top_fraction_threshold_is_the_pool_quantile(pool):
    root, rows = pool
    s = run_filter(root, "top30", top_fraction=0.3, score="b32:blip")
    scores = np.array([r["score_b32_blip"] for r in rows if r["score_b32_blip"] is not None])
    threshold = np.quantile(scores, 0.7)  # linear interpolation, as DuckDB's quantile_cont
    assert s.details["top_fraction_threshold"] == pytest.approx(threshold, abs=1e-6)
    want = {r["uid"] for r in rows if r["score_b32_blip"] is not None and r["score_b32_blip"] >= threshold}
    assert {r["uid"] for r in selected(root, "top30")} == want
    assert abs(len(want) - 0.3 * len(scores)) <= 1


def test_basic_filter_follows_datacomp_definitions(pool):
    import py3langid

    root, rows = pool
    s = run_filter(root, "basic", basic=True)

    def keep(r):
        c = r["caption"]
        w = r["original_width"] if r["original_width"] is not None else r["width"]
        h = r["original_height"] if r["original_height"] is not None else r["height"]
        return (r["status"] == "success" and c is not None and py3langid.classify(c)[0] == "en"
                and len(c.split()) > 2 and len(c) > 5 and min(w, h) >= 200 and max(w, h) / min(w, h) <= 3.0)

    want = {r["uid"] for r in rows if keep(r)}
    assert {r["uid"] for r in selected(root, "basic")} == want and 0 < len(want) < N_ROWS / 2
    ok = [r for r in rows if r["status"] == "success"]
    assert s.counts["passes basic: caption words >= 3"] == sum(
        r["caption"] is not None and len(r["caption"].split()) >= 3 for r in rows)
    assert s.counts["passes basic: min(width, height) >= 200"] == sum(
        min(r["original_width"] or r["width"], r["original_height"] or r["height"]) >= 200 for r in ok)
    assert s.counts["kept"] == len(want)


def test_basic_bounds_are_settable(pool):
    root, rows = pool
    bounds = BasicFilter(language=None, min_words=1, min_chars=1, min_side=600, max_aspect_ratio=1.5)
    s = run_filter(root, "big", basic=bounds)
    assert not any("language" in k for k in s.counts)

    def keep(r):
        w, h = r["original_width"] or r["width"], r["original_height"] or r["height"]
        return (r["status"] == "success" and r["caption"] is not None and len(r["caption"].split()) >= 1
                and min(w, h) >= 600 and max(w, h) <= 1.5 * min(w, h))

    assert {r["uid"] for r in selected(root, "big")} == {r["uid"] for r in rows if keep(r)}


def test_where_and_score_rules_are_counted_separately_and_combined(pool):
    root, rows = pool
    where = "width >= 200 AND score_b32_blip > 0.25 AND caption NOT ILIKE '%dog%'"
    s = run_filter(root, "custom", where=where, min_score=0.1, score="b32:raw")

    def by_where(r):
        return (r["width"] is not None and r["width"] >= 200 and r["score_b32_blip"] is not None
                and r["score_b32_blip"] > np.float32(0.25) and r["caption"] is not None
                and "dog" not in r["caption"].lower())

    def by_score(r):
        return r["score_b32_raw"] is not None and r["score_b32_raw"] >= np.float32(0.1)

    assert s.counts[f"passes where: {where}"] == sum(by_where(r) for r in rows)
    assert s.counts["passes score_b32_raw >= 0.1"] == sum(by_score(r) for r in rows)
    want = {r["uid"] for r in rows if by_where(r) and by_score(r) and r["status"] == "success"}
    assert {r["uid"] for r in selected(root, "custom")} == want and s.counts["kept"] == len(want)


def test_from_selection_chains_on_the_earlier_rows(pool):
    root, rows = pool
    first = run_filter(root, "first", min_score=0.1, score="b32:raw")
    s = run_filter(root, "second", from_selection="first", where="score_b32_blip > 0.3")
    assert s.counts["pool"] == first.counts["kept"]
    want = {r["uid"] for r in rows if r["score_b32_raw"] is not None and r["score_b32_raw"] >= np.float32(0.1)
            and r["score_b32_blip"] is not None and r["score_b32_blip"] > np.float32(0.3)}
    assert {r["uid"] for r in selected(root, "second")} == want
    with pytest.raises(InputError, match="selections: first, second"):
        run_filter(root, "third", from_selection="nope")


def test_unknown_score_column_lists_the_existing_ones(pool):
    root, _ = pool
    with pytest.raises(InputError, match="score_b32_raw.*score_b32_blip|score_b32_blip.*score_b32_raw"):
        run_filter(root, "x", min_score=0.2, score="l14:raw")
    with pytest.raises(InputError, match="need --score"):
        run_filter(root, "x", top_fraction=0.5)


def test_filter_cli_prints_counts_and_refuses_an_existing_name(pool):
    root, _ = pool
    runner = CliRunner()
    args = ["filter", str(root), "--min-score", "0.28", "--score", "b32:raw", "--name", "b32_028"]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["counts"]["kept"] == len(selected(root, "b32_028"))
    res = runner.invoke(app, args)
    assert res.exit_code == 3 and "--overwrite" in res.output
    res = runner.invoke(app, [*args, "--overwrite"])
    assert res.exit_code == 0 and "kept" in res.output and "passes score_b32_raw >= 0.28" in res.output
    entry = Dataset(root).card.lineage("selections", "b32_028")
    assert len(entry) == 1 and entry[0]["counts"]["kept"] == out["counts"]["kept"]


def test_where_syntax_error_shows_duckdbs_message(pool):
    root, _ = pool
    res = CliRunner().invoke(app, ["filter", str(root), "--where", "width >>= 3 AND", "--name", "bad"])
    assert res.exit_code == 2 and "Parser Error" in res.output
    assert not Dataset(root).selection_path("bad").exists()


def test_top_fraction_with_basic_is_their_intersection(pool):
    root, _ = pool
    run_filter(root, "top", top_fraction=0.3, score="b32:raw")
    run_filter(root, "basic", basic=True)
    s = run_filter(root, "datacomp_best", top_fraction=0.3, score="b32:raw", basic=True)
    top, basic = ({r["uid"] for r in selected(root, n)} for n in ("top", "basic"))
    assert {r["uid"] for r in selected(root, "datacomp_best")} == top & basic and s.counts["kept"] == len(top & basic)


@pytest.mark.parametrize("text", ["red\xa0circle\xa0left", "red\u3000circle\u3000left", "red \u2009circle\tleft",
                                  "red circle", "redcircleleft", "  red\u00a0\u00a0circle  left\u2028"])
def test_basic_word_count_is_the_shared_fasttext_count(text):
    # one count for every DataComp-style rule (capcurate.stages.caption_words, fastText's tokeniser):
    # non-breaking and ideographic spaces do not separate words; tests/test_caption_words.py has the table
    import duckdb

    from capcurate.stages.caption_words import word_count

    rule = dict(BasicFilter(language=None, min_words=3).rules("t", "1", "1"))["basic: caption words >= 3"]
    got = duckdb.connect().execute(f"SELECT {rule} FROM (SELECT ? AS t)", [text]).fetchone()[0]
    assert got == (word_count(text) >= 3)


def test_threads_and_memory_limit_reach_duckdb_and_change_nothing_else(pool, monkeypatch):
    root, _ = pool
    from capcurate import views

    seen = []
    original = views.connect

    def spy(*a, **kw):
        con = original(*a, **kw)
        seen.append(con.execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchall()[0])
        return con

    monkeypatch.setattr(views, "connect", spy)
    runner = CliRunner()
    args = ["filter", str(root), "--min-score", "0.28", "--score", "b32:raw"]
    assert runner.invoke(app, [*args, "--name", "plain"]).exit_code == 0
    res = runner.invoke(app, [*args, "--name", "bounded", "--threads", "1", "--memory-limit", "64MB"])
    assert res.exit_code == 0, res.output
    assert seen[-1][0] == 1 and seen[-1][1].startswith("61.0 MiB")  # 64 MB as DuckDB reports it
    assert selected(root, "bounded") == selected(root, "plain")
    res = runner.invoke(app, [*args, "--name", "bad", "--memory-limit", "lots"])
    assert res.exit_code == 2 and "--memory-limit 'lots'" in res.output and len(res.output.strip().splitlines()) == 1


def test_a_rerun_removes_the_temp_of_a_killed_selection_write(pool):
    """kill -9 before the rename of selections/<name>.parquet leaves its temp; the next run of any
    selection-writing stage (filter, dedup, mix claim the name the same way) removes it."""
    import subprocess
    import sys

    root, _ = pool
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    (root / "selections").mkdir(exist_ok=True)
    temp = root / "selections" / f".top.parquet~{atomic.host_name()}~{dead}~aaaaaaaa.tmp"
    temp.write_bytes(b"partial")
    run_filter(root, "top", min_score=0.2, score="b32:raw")
    assert not temp.exists() and (root / "selections" / "top.parquet").exists()
