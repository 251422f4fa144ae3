"""capcurate shard: byte-identical images, deterministic shuffle, resume, refusal, and two real readers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curate_fixtures import UIDS, build_scored_dataset
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import OutputExistsError
from capcurate.shards import index_tar, iter_samples
from capcurate.stages import shard as shard_module
from capcurate.stages.mix import mix
from capcurate.stages.shard import shard

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The scored dataset with selection 'both' (18 rows, each image twice)."""
    root = build_scored_dataset(tmp_path_factory.mktemp("shard") / "ds")
    mix(root, "both", synthetic="blip", name="both")
    return root


def read_out(out: Path) -> list[tuple[str, dict[str, bytes]]]:
    tars = sorted(out.glob("*.tar"))
    return [s for t in tars for s in iter_samples(t)]


def source_image(root: Path, uid: str) -> bytes:
    ds = Dataset(root)
    for shard_id in ds.shard_ids():
        rows = pq.read_table(ds.samples_path(shard_id)).to_pylist()
        for r in rows:
            if r["uid"] == uid:
                return index_tar(ds.shard_path(shard_id)).read(r["key"], "jpg")
    raise KeyError(uid)


def test_shard_copies_image_bytes_unchanged(mixed, tmp_path):
    s = shard(mixed, "both", tmp_path / "out", samples_per_shard=5)
    samples = read_out(tmp_path / "out")
    assert s.counts["samples"] == len(samples) == 18 and s.counts["missing"] == 0
    selection = pq.read_table(Dataset(mixed).selection_path("both")).to_pylist()
    for (key, members), row in zip(samples, selection, strict=True):  # no --shuffle: selection order
        meta = json.loads(members["json"])
        assert "." not in key
        assert members["jpg"] == source_image(mixed, meta["uid"])
        assert (meta["uid"], meta["caption_source"]) == (row["uid"], row["caption_source"])
        assert members["txt"].decode() == row["caption"]
        assert set(meta["scores"]) == {"score_l14_raw", "score_l14_blip", "score_l14_syn"}


def test_shard_writes_manifest_and_open_clip_sizes(mixed, tmp_path):
    shard(mixed, "both", tmp_path / "out", samples_per_shard=5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sizes = json.loads((tmp_path / "out" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 5, "00003.tar": 3}
    assert manifest["shards"] == [{"name": n, "samples": c} for n, c in sizes.items()]
    assert manifest["total_samples"] == 18 and manifest["selection"] == "both"
    for name, n in sizes.items():
        assert len(list(iter_samples(tmp_path / "out" / name))) == n


def test_shard_shuffle_is_deterministic_across_the_whole_selection(mixed, tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        shard(mixed, "both", tmp_path / name, samples_per_shard=5, shuffle=True, seed=seed)
    a, b, c = (read_out(tmp_path / n) for n in "abc")
    order = [(json.loads(m["json"])["uid"], json.loads(m["json"])["caption_source"]) for _, m in a]
    for t in sorted((tmp_path / "a").glob("*.tar")):
        assert t.read_bytes() == (tmp_path / "b" / t.name).read_bytes()
    assert order != [(json.loads(m["json"])["uid"], json.loads(m["json"])["caption_source"]) for _, m in c]
    plain = [(r["uid"], r["caption_source"]) for r in
             pq.read_table(Dataset(mixed).selection_path("both")).to_pylist()]
    assert sorted(order) == sorted(plain) and order != plain
    # the first output shard draws from both source shards: a global shuffle, not a per-shard one
    first = {json.loads(m["json"])["source"]["shard"] for _, m in a[:5]}
    assert first == {"00000", "00001"}


def test_shard_resumes_after_kill(mixed, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    shard(mixed, "both", clean, samples_per_shard=4, shuffle=True)
    real = shard_module.ShardWriteJob.process
    calls = []

    def killed_on_third(self, shard_id):
        calls.append(shard_id)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, shard_id)

    monkeypatch.setattr(shard_module.ShardWriteJob, "process", killed_on_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        shard(mixed, "both", out, samples_per_shard=4, shuffle=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert not (out / "manifest.json").exists()
    monkeypatch.setattr(shard_module.ShardWriteJob, "process", real)
    s = shard(mixed, "both", out, samples_per_shard=4, shuffle=True)
    assert s.details["mode"] == "resume" and s.counts["shards_skipped"] == 2 and s.counts["shards_processed"] == 3
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        sorted(p.name for p in clean.iterdir() if not p.name.startswith("."))
    for t in clean.glob("*.tar"):
        assert t.read_bytes() == (out / t.name).read_bytes()
    assert not list(out.glob(".plan-*")) and not list(out.glob(".*.tmp"))


def test_shard_refuses_a_non_empty_out_unless_overwrite(mixed, tmp_path):
    out = tmp_path / "out"
    shard(mixed, "both", out, samples_per_shard=5)
    with pytest.raises(OutputExistsError, match="parameters"):
        shard(mixed, "both", out, samples_per_shard=6)
    s = shard(mixed, "both", out, samples_per_shard=6, overwrite=True)
    assert s.details["mode"] == "overwrite" and sorted(p.name for p in out.glob("*.tar")) == [
        "00000.tar", "00001.tar", "00002.tar"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not written by capcurate shard"):
        shard(mixed, "both", foreign)


def test_shard_counts_selected_uids_missing_from_the_shards(mixed, tmp_path):
    ds = Dataset(mixed)
    rows = [{"uid": u, "caption": f"c {u}", "caption_source": "raw"} for u in [*UIDS[:3], "u10", "ghost"]]
    atomic.write_parquet(ds.selection_path("with_missing"), pa.Table.from_pylist(rows))
    s = shard(mixed, "with_missing", tmp_path / "out")
    assert s.counts["samples"] == 3 and s.counts["missing"] == 2
    assert s.counts["missing_not_downloaded"] == 2  # u10 failed to download, ghost is unknown
    assert s.details["missing_examples"] == ["u10", "ghost"]
    assert "no image in the shards" in s.message
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["missing"] == {"not_downloaded": 2}


def test_shard_min_shards_splits_finer_for_many_workers(mixed, tmp_path):
    s = shard(mixed, "both", tmp_path / "out", samples_per_shard=10000, min_shards=4)
    assert s.counts["shards"] == 4 and s.counts["samples_per_shard"] == 5


def test_shards_read_with_webdataset(mixed, tmp_path):
    """Also with several captions in each .json (shard --captions): a plain reader still gets its .txt."""
    import webdataset as wds

    shard(mixed, "both", tmp_path / "out", samples_per_shard=5, shuffle=True, captions="raw,blip,syn")
    ds = wds.WebDataset(str(tmp_path / "out" / "{00000..00003}.tar"), shardshuffle=False) \
        .decode("pil").to_tuple("jpg", "txt", "json")
    got = list(ds)
    assert len(got) == 18
    img, txt, meta = got[0]
    assert img.size == (32, 32) and txt and meta["uid"] in UIDS
    assert {"raw", "blip", "syn"} <= set(meta)


def test_shards_train_in_open_clip_trainer(mixed, tmp_path):
    """open_clip's own trainer (3.3.0, .txt only) reads the shards, several captions per .json included, and
    finds the sample count in sizes.json."""
    shard(mixed, "both", tmp_path / "out", samples_per_shard=5, captions="raw,blip")
    cfg = tmp_path / "capcurate_tiny_clip.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    launcher = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                "from open_clip_train.main import main; main(sys.argv[2:])")
    cmd = [sys.executable, "-c", launcher, str(cfg), "--dataset-type", "webdataset",
           "--train-data", str(tmp_path / "out" / "{00000..00003}.tar"), "--model", cfg.stem,
           "--batch-size", "2", "--epochs", "1", "--workers", "1", "--device", "cpu", "--precision", "fp32",
           "--logs", str(tmp_path / "logs"), "--name", "run", "--report-to", "", "--warmup", "0",
           "--save-frequency", "0", "--seed", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "[18/18 (100%)]" in log  # all 18 samples, counted from sizes.json (no --train-num-samples)


def test_shard_cli(mixed, tmp_path):
    out = tmp_path / "cli_out"
    r = CliRunner().invoke(app, ["shard", str(mixed), "--selection", "both", "-o", str(out),
                                 "--samples-per-shard", "10", "--shuffle", "--seed", "0", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["samples"] == 18
    r = CliRunner().invoke(app, ["shard", str(mixed), "--selection", "both", "-o", str(out),
                                 "--samples-per-shard", "7"])
    assert r.exit_code == 3 and "--overwrite" in r.output
    r = CliRunner().invoke(app, ["shard", str(mixed), "--selection", "nope", "-o", str(out)])
    assert r.exit_code == 2 and "selections present" in r.output


def test_shard_captions_writes_every_chosen_caption_and_the_mix_recipe(mixed, tmp_path):
    mix(mixed, "sample", synthetic="blip,syn", caption_probs="0.2,0.5,0.3", name="smp")
    s = shard(mixed, "smp", tmp_path / "out", samples_per_shard=4)  # the recipe comes from the selection
    assert s.counts["samples"] == 10
    selection = {r["uid"]: r for r in pq.read_table(Dataset(mixed).selection_path("smp")).to_pylist()}
    for _, members in read_out(tmp_path / "out"):
        meta = json.loads(members["json"])
        i = UIDS.index(meta["uid"])
        assert meta["raw"] == ("" if i == 9 else f"raw {i}")
        assert meta["blip"] == (None if i == 8 else f"blip {i}") and meta["syn"] == f"syn {i} a"
        assert members["txt"].decode() == selection[meta["uid"]]["caption"]  # the primary one
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["captions"] == {"keys": ["raw", "blip", "syn"], "probs": [0.2, 0.5, 0.3]}
    r = CliRunner().invoke(app, ["shard", str(mixed), "--selection", "both", "-o", str(tmp_path / "o2"),
                                 "--captions", "raw,syn", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["captions"] == \
        {"keys": ["raw", "syn"], "probs": None}
    for bad, msg in (("raw,nope", "'nope' is not a caption set"), ("raw,raw", "distinct")):
        r = CliRunner().invoke(app, ["shard", str(mixed), "--selection", "both", "-o", str(tmp_path / "o3"),
                                     "--captions", bad])
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_shard_counts_keys_absent_from_a_source_tar(tmp_path):
    from conftest import build_dataset, make_image_bytes

    from capcurate.shards import TarShardWriter

    root = build_dataset(tmp_path / "ds", [{"uid": f"v{i}", "caption": f"c{i}", "image": make_image_bytes(i)}
                                          for i in range(4)], per_shard=4)
    ds = Dataset(root)
    kept = [(k, m) for k, m in iter_samples(ds.shard_path("00000")) if k != "000000001"]
    with TarShardWriter(ds.shard_path("00000")) as w:  # the manifest still lists v1 as downloaded
        for k, m in kept:
            w.write(k, m)
    mix(root, "raw", name="all")
    s = shard(root, "all", tmp_path / "out")
    assert s.counts["samples"] == 3 and s.counts["missing_not_in_shards"] == 1
    assert s.details["missing_examples"] == ["v1"]


def _tarfile_bytes(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """What the writer wrote when it used tarfile.addfile: the reference for the hand-built headers."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    return path.read_bytes()


def test_shard_writes_the_bytes_tarfile_writes(mixed, tmp_path):
    """Samples are written in source order at precomputed offsets; the tar is the one tarfile writes in order."""
    shard(mixed, "both", tmp_path / "out", samples_per_shard=18, shuffle=True)
    written = (tmp_path / "out" / "00000.tar").read_bytes()
    assert written == _tarfile_bytes(tmp_path / "ref.tar", list(iter_samples(tmp_path / "out" / "00000.tar")))


def test_tar_writer_in_any_order_matches_tarfile(tmp_path):
    import random

    from capcurate.shards import TarShardWriter

    rng = random.Random(0)
    samples = [(key, {ext: rng.randbytes(rng.choice([0, 1, 511, 512, 513, rng.randrange(20000)]))
                      for ext in exts})
               for key, exts in [("000000000", ["jpg", "txt", "json"]), ("a" * 96, ["png"]),
                                 ("d" * 80 + "/" + "b" * 50, ["webp", "txt"]), ("ünïcode", ["jpg", "cls"])]]
    ref = _tarfile_bytes(tmp_path / "ref.tar", samples)
    with TarShardWriter(tmp_path / "seq.tar") as w:
        for key, members in samples:
            w.write(key, members)
    spans = [TarShardWriter.sample_span(len(d) for d in m.values()) for _, m in samples]
    with TarShardWriter(tmp_path / "placed.tar") as w:
        for i in (2, 0, 3, 1):
            w.write_at(sum(spans[:i]), *samples[i])
    assert (tmp_path / "seq.tar").read_bytes() == ref == (tmp_path / "placed.tar").read_bytes()
    assert [k for k, _ in iter_samples(tmp_path / "placed.tar")] == [k for k, _ in samples]
