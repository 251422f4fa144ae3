"""capcurate mix: each strategy on a dataset with known scores gives exactly the expected pairs."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_fixtures import BLIP_SCORES, UIDS, build_scored_dataset, raw_caption
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import InputError, OutputExistsError
from capcurate.stages.mix import mix


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    return build_scored_dataset(tmp_path_factory.mktemp("mix") / "ds")


def pairs(root, name):
    rows = pq.read_table(Dataset(root).selection_path(name)).to_pylist()
    return [(r["uid"], r["caption"], r["caption_source"]) for r in rows]


def test_mix_raw_keeps_downloaded_images_with_a_raw_caption(scored):
    s = mix(scored, "raw", name="t_raw")
    # u09 has an empty alt-text, u10 was never downloaded
    assert pairs(scored, "t_raw") == [(u, raw_caption(i), "raw") for i, u in enumerate(UIDS[:9])]
    assert s.details["by_source"] == {"raw": 9}
    assert s.counts["images_considered"] == 10


def test_mix_raw_top_fraction_is_clip_score_filtering(scored):
    mix(scored, "raw", score="l14", top_fraction=0.3, name="t_rawtop")
    assert pairs(scored, "t_rawtop") == [("u00", "raw 0", "raw"), ("u02", "raw 2", "raw"), ("u05", "raw 5", "raw")]


def test_mix_synthetic_uses_best_scoring_of_several_captions(scored):
    mix(scored, "synthetic", synthetic="syn", score="l14", name="t_syn")
    # the scorer prefers caption index i % 2 for image i
    assert pairs(scored, "t_syn") == [(u, f"syn {i} {'ab'[i % 2]}", "syn") for i, u in enumerate(UIDS)]
    scores = pq.read_table(Dataset(scored).selection_path("t_syn")).column("score").to_pylist()
    assert scores[1] == pytest.approx(0.39)


def test_mix_synthetic_threshold(scored):
    mix(scored, "synthetic", synthetic="blip", score="l14", synthetic_min_score=0.25, name="t_synthr")
    expected = [u for u, s in zip(UIDS, BLIP_SCORES, strict=True) if s is not None and s >= 0.25]
    assert [p[0] for p in pairs(scored, "t_synthr")] == expected


def test_mix_raw_top_synthetic_is_the_papers_recipe(scored):
    s = mix(scored, "raw-top+synthetic", score="l14", top_fraction=0.3, synthetic="blip",
            synthetic_min_score=0.2, name="t_rts")
    # raw scores rank u05 > u00 > u02 > ...: those three keep raw; the rest take blip if >= 0.2
    # (u08 has no blip caption, u05's own blip score does not matter)
    assert pairs(scored, "t_rts") == [
        ("u00", "raw 0", "raw"), ("u01", "blip 1", "blip"), ("u02", "raw 2", "raw"),
        ("u03", "blip 3", "blip"), ("u04", "blip 4", "blip"), ("u05", "raw 5", "raw"),
        ("u06", "blip 6", "blip"), ("u07", "blip 7", "blip"), ("u09", "blip 9", "blip"),
    ]
    assert s.details["by_source"] == {"blip": 6, "raw": 3}


def test_mix_best_picks_the_highest_scoring_caption_per_image(scored):
    mix(scored, "best", score="l14", synthetic="blip", name="t_best")
    got = {u: src for u, _, src in pairs(scored, "t_best")}
    assert got == {"u00": "raw", "u01": "blip", "u02": "raw", "u03": "blip", "u04": "blip", "u05": "raw",
                   "u06": "blip", "u07": "blip", "u08": "raw", "u09": "blip"}


def test_mix_best_over_all_captioners_by_default(scored):
    mix(scored, "best", score="l14", name="t_best_all")
    got = {u: (cap, src) for u, cap, src in pairs(scored, "t_best_all")}
    assert got["u01"] == ("syn 1 b", "syn")  # 0.39 beats blip 0.30 and raw 0.12
    assert got["u05"] == ("raw 5", "raw")    # ties with syn 5 b at 0.35: raw, listed first, wins


def test_mix_both_gives_every_image_twice(scored):
    s = mix(scored, "both", synthetic="blip", name="t_both")
    got = pairs(scored, "t_both")
    assert len(got) == 18 and s.counts["images"] == 10
    assert ("u03", "raw 3", "raw") in got and ("u03", "blip 3", "blip") in got
    assert ("u08", "raw 8", "raw") in got and not any(u == "u08" and src == "blip" for u, _, src in got)


def test_mix_concat_joins_raw_and_synthetic(scored):
    mix(scored, "concat", synthetic="blip", separator=". ", name="t_concat")
    got = pairs(scored, "t_concat")
    assert got[0] == ("u00", "raw 0. blip 0", "raw+blip")
    assert got[8] == ("u08", "raw 8", "raw") and got[9] == ("u09", "blip 9", "blip")


def test_mix_random_is_a_seeded_coin_per_image(scored):
    mix(scored, "random", synthetic="blip", p=0.5, seed=7, name="t_rand")

    def coin(uid):
        return int(hashlib.md5(f"7:{uid}".encode()).hexdigest()[:13], 16) / 16**13 < 0.5

    expected = []
    for i, u in enumerate(UIDS):
        if coin(u):
            if BLIP_SCORES[i] is not None:  # stand-in for "has a blip caption" (u08 has none)
                expected.append((u, f"blip {i}", "blip"))
        elif raw_caption(i):
            expected.append((u, raw_caption(i), "raw"))
    assert pairs(scored, "t_rand") == expected
    mix(scored, "random", synthetic="blip", p=0.0, name="t_rand0")
    mix(scored, "random", synthetic="blip", p=1.0, name="t_rand1")
    assert {s for *_, s in pairs(scored, "t_rand0")} == {"raw"}
    assert {s for *_, s in pairs(scored, "t_rand1")} == {"blip"}


def test_mix_combines_with_a_filter_selection(scored):
    atomic.write_parquet(Dataset(scored).selection_path("f_keep"), pa.table({
        "uid": ["u01", "u04", "u07"], "caption": ["raw 1", "raw 4", "raw 7"], "caption_source": ["raw"] * 3}))
    mix(scored, "both", synthetic="blip", from_selection="f_keep", name="t_from")
    assert {u for u, *_ in pairs(scored, "t_from")} == {"u01", "u04", "u07"}
    mix(scored, "raw", where="caption LIKE 'raw 1%'", name="t_where")
    assert pairs(scored, "t_where") == [("u01", "raw 1", "raw")]


def test_mix_missing_columns_name_what_exists(scored, tiny_dataset):
    with pytest.raises(InputError, match=r"no scores named 'b32'.*scores present: l14"):
        mix(scored, "best", score="b32")
    with pytest.raises(InputError, match=r"captions present: blip, syn"):
        mix(scored, "synthetic", synthetic="coca")
    with pytest.raises(InputError, match=r"needs --synthetic NAME; captions present: blip, syn"):
        mix(scored, "both")
    with pytest.raises(InputError, match=r"needs --score SCORER; scores present: \(none\)"):
        mix(tiny_dataset, "raw-top+synthetic", top_fraction=0.3)
    with pytest.raises(InputError, match="no selection named 'nope'"):
        mix(scored, "raw", from_selection="nope")


def test_mix_same_name_with_other_parameters_is_refused_unless_overwrite(scored):
    mix(scored, "raw", name="t_again")
    mix(scored, "raw", name="t_again")  # same parameters: fine
    with pytest.raises(OutputExistsError, match="strategy"):
        mix(scored, "both", synthetic="blip", name="t_again")
    mix(scored, "both", synthetic="blip", name="t_again", overwrite=True)
    assert len(pairs(scored, "t_again")) == 18
    entries = Dataset(scored).card.lineage("selections", "t_again")
    assert len(entries) == 1 and entries[0]["parameters"]["strategy"] == "both"


def test_mix_cli_prints_counts_per_caption_source(scored):
    r = CliRunner().invoke(app, ["mix", str(scored), "--strategy", "raw-top+synthetic", "--score", "l14",
                                 "--top-fraction", "0.3", "--synthetic", "blip",
                                 "--synthetic-min-score", "0.25", "--name", "mixA", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["details"]["by_source"] == {"blip": 4, "raw": 3}
    r = CliRunner().invoke(app, ["mix", str(scored), "--strategy", "nonsense"])
    assert r.exit_code == 2 and "raw-top+synthetic" in r.output


def test_mix_sample_keeps_every_image_once_and_records_the_caption_recipe(scored):
    s = mix(scored, "sample", synthetic="blip", caption_probs="0.2,0.8", name="t_sample")
    # the most probable source is the row's caption: blip, raw where blip failed (u08), blip where raw is empty
    assert pairs(scored, "t_sample") == [(u, "raw 8", "raw") if i == 8 else (u, f"blip {i}", "blip")
                                          for i, u in enumerate(UIDS)]
    assert s.details["by_source"] == {"blip": 9, "raw": 1}
    (entry,) = Dataset(scored).card.lineage("selections", "t_sample")
    assert entry["parameters"]["caption_keys"] == ["raw", "blip"]
    assert entry["parameters"]["caption_probs"] == [0.2, 0.8]
    with pytest.raises(InputError, match="3 values for 2 sources"):
        mix(scored, "sample", synthetic="blip", caption_probs="0.2,0.3,0.5", name="t_bad")
    with pytest.raises(InputError, match="sum to 1"):
        mix(scored, "sample", synthetic="blip", caption_probs="0.5,0.6", name="t_bad")
    r = CliRunner().invoke(app, ["mix", str(scored), "--strategy", "random", "--synthetic", "blip",
                                 "--caption-probs", "0.5,0.5", "--name", "t_bad"])
    assert r.exit_code == 2 and "--caption-probs belongs to --strategy sample" in r.output
    r = CliRunner().invoke(app, ["mix", str(scored), "--strategy", "sample", "--synthetic", "blip,syn",
                                 "--caption-probs", "0.2,0.5,0.3", "--name", "t_sample3", "--json"])
    assert r.exit_code == 0, r.output
    (entry,) = Dataset(scored).card.lineage("selections", "t_sample3")
    assert entry["parameters"]["caption_probs"] == [0.2, 0.5, 0.3]
