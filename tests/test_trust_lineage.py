"""Lineage covers the tar a derived file was read from, and a damaged derived file is made again (issue 22,
items 3 and 6): a repaired tar makes its scores stale, a wholly unreadable tar fails its shard (exit 1)."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from scorer_fixtures import save_tiny_openclip

from capcurate import lineage
from capcurate.stages.score import score


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_openclip(tmp_path_factory.mktemp("clip"))


def _dataset(tmp_path):
    samples = [{"caption": f"thing {i}", "image": make_image_bytes(i)} for i in range(8)]
    return build_dataset(tmp_path / "ds", samples, per_shard=4)  # shards 00000, 00001


def _score(root, clip):
    cfg, weights = clip
    return score(root, f"openclip:{cfg}", "s", pretrained=str(weights), workers=0, batch_size=4)


def _restore(path, data: bytes) -> None:
    """Write a tar back as a repair + re-fetch would: a new file (new inode) in its place."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_a_zeroed_tar_fails_its_shard_and_the_repaired_tar_is_scored_again(tmp_path, clip):
    root = _dataset(tmp_path)
    tar = root / "shards" / "00001.tar"
    good = tar.read_bytes()
    tar.write_bytes(b"\0" * len(good))  # zeroed in place: same size, same manifest
    first = _score(root, clip)
    assert not first.ok and "00001" in first.details["failed_shards"]  # exit 1, as docs/score.md says
    assert not (root / "scores" / "s" / "00001.parquet").exists()  # no NULL rows that look finished
    _restore(tar, good)
    second = _score(root, clip)
    assert second.ok and second.counts["shards_processed"] == 1
    col = pq.read_table(root / "scores" / "s" / "00001.parquet").column("score_s_raw")
    assert col.null_count == 0


def test_a_tar_rewritten_under_a_byte_identical_manifest_makes_its_scores_stale(tmp_path, clip):
    root = _dataset(tmp_path)
    _score(root, clip)
    out = root / "scores" / "s" / "00001.parquet"
    tar = root / "shards" / "00001.tar"
    _restore(tar, tar.read_bytes())  # doctor --repair + re-ingest: the same manifest, a new tar
    again = _score(root, clip)
    assert again.counts["shards_processed"] == 1 and again.counts["shards_skipped"] == 1
    assert lineage.recorded_inputs(out)[lineage.TAR] == lineage.tar_identity(tar)


def test_a_zero_byte_or_garbage_score_file_is_made_again_without_a_traceback(tmp_path, clip):
    root = _dataset(tmp_path)
    _score(root, clip)
    (root / "scores" / "s" / "00000.parquet").write_bytes(b"")
    (root / "scores" / "s" / "00001.parquet").write_bytes(b"not parquet at all")
    again = _score(root, clip)
    assert again.ok and again.counts["shards_processed"] == 2
    assert pq.read_table(root / "scores" / "s").num_rows == 8


def test_a_zero_byte_captions_file_counts_as_missing_not_a_traceback(tmp_path):
    root = _dataset(tmp_path)
    f = root / "captions" / "blip" / "00000.parquet"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"")
    assert lineage.recorded_inputs(f) is None  # recaption's is_done: not done, so it is captioned again
    assert not lineage.is_fresh(f, {lineage.SAMPLES: root / "samples" / "00000.parquet"})


def test_a_zero_byte_captions_source_fails_only_its_shard_with_what_to_do(tmp_path, clip):
    import pyarrow as pa

    root = _dataset(tmp_path)
    d = root / "captions" / "blip"
    d.mkdir(parents=True)
    (d / "00000.parquet").write_bytes(b"")
    uids = pq.read_table(root / "samples" / "00001.parquet").column("uid")
    pq.write_table(pa.table({"uid": uids, "caption": ["x"] * 4, "captions": [["x"]] * 4,
                             "error": pa.array([None] * 4, pa.string())}), d / "00001.parquet")
    cfg, weights = clip
    s = score(root, f"openclip:{cfg}", "s", pretrained=str(weights), workers=0, captions="raw,blip")
    assert not s.ok and list(s.details["failed_shards"]) == ["00000"]
    assert "doctor --repair" in s.details["failed_shards"]["00000"]
    assert s.counts["shards_processed"] == 1


def test_recaption_fails_a_truncated_tar_and_recaptions_it_once_repaired(tmp_path):
    from captioner_fixtures import build_tiny_blip

    from capcurate.stages.recaption import recaption

    blip = build_tiny_blip(tmp_path / "blip")
    root = _dataset(tmp_path)
    tar = root / "shards" / "00000.tar"
    good = tar.read_bytes()
    tar.write_bytes(good[:1200])  # cut off after the first members
    kw = dict(model=blip, name="blip", decoding="greedy", max_new_tokens=4, workers=0, batch_size=8)
    first = recaption(root, **kw)
    assert not first.ok and list(first.details["failed_shards"]) == ["00000"]
    _restore(tar, good)
    again = recaption(root, **kw)
    assert again.ok and again.counts["shards_processed"] == 1
    caps = pq.read_table(root / "captions" / "blip" / "00000.parquet")
    assert caps.column("error").null_count == 4
