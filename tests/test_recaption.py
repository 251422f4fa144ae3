"""capcurate recaption: per-shard caption files, lineage, resume, parts, seeds, bad input (tiny BLIP)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import build_tiny_blip
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import InputError, OutputExistsError
from capcurate.stages import recaption as stage
from capcurate.stages.batch_search import caption_with_backoff, find_batch_size
from capcurate.stages.recaption import recaption

FAST = dict(max_new_tokens=6, workers=0, batch_size=8)


@pytest.fixture(scope="module")
def blip_ref(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("models"))


def _captions(ds_root, name):
    return {r["uid"]: r for r in pq.read_table(ds_root / "captions" / name).to_pylist()}


def test_recaption_writes_one_file_per_shard_with_failed_images_recorded(tiny_dataset, blip_ref):
    s = recaption(tiny_dataset, model=blip_ref, name="blip", decoding="greedy", **FAST)
    assert s.ok and s.counts["shards_processed"] == 3
    assert (s.counts["images_captioned"], s.counts["images_failed"], s.counts["not_downloaded"]) == (21, 2, 1)
    files = sorted(p.name for p in (tiny_dataset / "captions" / "blip").iterdir())
    assert files == ["00000.parquet", "00001.parquet", "00002.parquet"]
    t = pq.read_table(tiny_dataset / "captions" / "blip" / "00002.parquet")
    assert t.schema.names == ["uid", "caption", "captions", "error"]
    assert pa.types.is_list(t.schema.field("captions").type) and t.schema.field("captions").type.value_type == pa.string()
    con = Dataset(tiny_dataset).connect()
    rows = con.execute("SELECT caption, cap_blip, caps_blip FROM samples ORDER BY uid").fetchall()
    assert len(rows) == 24
    bad = dict(con.execute("SELECT m.caption, c.error FROM manifest m JOIN captions_blip c USING (uid) "
                           "WHERE c.caption IS NULL").fetchall())
    assert set(bad) == {"corrupt", "truncated", "dead link"}
    assert "not an image" in bad["corrupt"] and "download status" in bad["dead link"]
    ok = [r for r in rows if r[1] is not None]
    assert len(ok) == 21 and all(r[2] == [r[1]] for r in ok)
    assert all("[" not in r[1] and r[1] == r[1].strip() for r in ok)  # no special tokens, no padding


def test_recaption_records_lineage(tiny_dataset, blip_ref):
    recaption(tiny_dataset, model=blip_ref, name="blip", decoding="beam", num_beams=2, **FAST)
    (entry,) = Dataset(tiny_dataset).card.lineage("captions", "blip")
    assert entry["stage"] == "recaption" and entry["finished"]
    assert entry["parameters"]["decoding"] == "beam" and entry["parameters"]["num_beams"] == 2
    assert entry["parameters"]["model"] == blip_ref and entry["parameters"]["max_new_tokens"] == 6
    assert entry["model"]["class"] == "BlipForConditionalGeneration"
    assert entry["model"]["resolved_weights"].endswith("tiny-blip")
    assert entry["capcurate_version"] and entry["counts"]["images_captioned"] == 21


def test_recaption_sampling_is_reproducible_under_seed(tiny_dataset, blip_ref):
    kw = dict(model=blip_ref, decoding="nucleus", top_p=0.95, num_captions=2, **FAST)
    recaption(tiny_dataset, name="a", seed=7, **kw)
    recaption(tiny_dataset, name="b", seed=7, **kw)
    recaption(tiny_dataset, name="c", seed=8, **kw)
    a, b, c = (_captions(tiny_dataset, n) for n in "abc")
    assert a == b
    assert a != c
    assert all(len(r["captions"]) == 2 for r in a.values() if r["error"] is None)


def test_recaption_sampling_does_not_depend_on_batch_size(tiny_dataset, blip_ref):
    """Each image samples from a hash of (seed, uid): batch size, chunking and order cannot change it."""
    kw = dict(model=blip_ref, decoding="topk", top_k=20, temperature=1.5, num_captions=2, max_new_tokens=6,
              workers=0)
    recaption(tiny_dataset, name="b3", batch_size=3, **kw)
    recaption(tiny_dataset, name="b8", batch_size=8, **kw)
    b3, b8 = _captions(tiny_dataset, "b3"), _captions(tiny_dataset, "b8")
    assert b3 == b8
    assert len({c for r in b3.values() if r["captions"] for c in r["captions"]}) > 5


def test_recaption_resumes_after_kill(tiny_dataset, blip_ref, monkeypatch):
    real = stage.RecaptionJob._write

    def dies_on_second_shard(self, shard_id, rows, results):
        if shard_id == "00001":
            raise KeyboardInterrupt  # what Ctrl-C / SIGTERM does mid-run
        return real(self, shard_id, rows, results)

    monkeypatch.setattr(stage.RecaptionJob, "_write", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        recaption(tiny_dataset, model=blip_ref, name="blip", decoding="greedy", **FAST)
    out = tiny_dataset / "captions" / "blip"
    assert sorted(p.name for p in out.iterdir()) == ["00000.parquet"]
    first = (out / "00000.parquet").stat().st_mtime_ns
    monkeypatch.setattr(stage.RecaptionJob, "_write", real)
    s = recaption(tiny_dataset, model=blip_ref, name="blip", decoding="greedy", **FAST)
    assert (s.counts["shards_skipped"], s.counts["shards_processed"]) == (1, 2)
    assert (out / "00000.parquet").stat().st_mtime_ns == first
    recaption(tiny_dataset, model=blip_ref, name="whole", decoding="greedy", **FAST)
    assert _captions(tiny_dataset, "blip") == _captions(tiny_dataset, "whole")


def test_recaption_refuses_other_parameters_unless_overwrite(tiny_dataset, blip_ref):
    recaption(tiny_dataset, model=blip_ref, name="blip", decoding="greedy", **FAST)
    with pytest.raises(OutputExistsError, match="differs in: decoding"):
        recaption(tiny_dataset, model=blip_ref, name="blip", decoding="beam", **FAST)
    s = recaption(tiny_dataset, model=blip_ref, name="blip", decoding="beam", overwrite=True, **FAST)
    assert s.details["mode"] == "overwrite" and s.counts["shards_processed"] == 3
    assert [e["parameters"]["decoding"] for e in Dataset(tiny_dataset).card.lineage("captions", "blip")] == ["beam"]


def test_recaption_part_takes_a_deterministic_subset(tiny_dataset, blip_ref):
    s = recaption(tiny_dataset, model=blip_ref, name="blip", decoding="greedy", part="1/2", **FAST)
    assert s.counts["shards_processed"] == 1
    assert [p.name for p in (tiny_dataset / "captions" / "blip").iterdir()] == ["00001.parquet"]


def test_recaption_cli_json_and_exit_codes(tiny_dataset, blip_ref):
    runner = CliRunner()
    base = ["recaption", str(tiny_dataset), "--model", blip_ref, "--name", "blip", "--max-new-tokens", "5",
            "--workers", "1", "--batch-size", "4"]
    r = runner.invoke(app, [*base, "--decoding", "topk", "--top-k", "5", "--num-captions", "3", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["counts"]["images_captioned"] == 21 and summary["details"]["batch_size"] == 4
    assert all(len(v["captions"]) == 3 for v in _captions(tiny_dataset, "blip").values() if v["error"] is None)
    r = runner.invoke(app, [*base, "--decoding", "greedy"])
    assert r.exit_code == 3 and "--overwrite" in r.output
    r = runner.invoke(app, [*base, "--decoding", "greedy", "--num-captions", "2", "--overwrite"])
    assert r.exit_code == 2 and "--num-captions 2" in r.output
    r = runner.invoke(app, ["recaption", str(tiny_dataset), "--model", "hf:/nowhere/blip", "--name", "x"])
    assert r.exit_code == 4 and "hf:/nowhere/blip" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["recaption", "--help"])
    assert r.exit_code == 0 and "--num-captions" in r.output and "--trust-remote-code" in r.output


def test_recaption_rejects_bad_options(tiny_dataset, blip_ref):
    with pytest.raises(InputError, match="--batch-size"):
        recaption(tiny_dataset, model=blip_ref, name="blip", batch_size="lots")
    with pytest.raises(InputError, match="--num-beams"):
        recaption(tiny_dataset, model=blip_ref, name="blip", decoding="beam", num_beams=2, num_captions=3)
    with pytest.raises(InputError, match="invalid captions name"):
        recaption(tiny_dataset, model=blip_ref, name="1-bad")


class _OomAbove:
    """A captioner stand-in that runs out of memory on batches larger than ``limit``."""

    def __init__(self, limit):
        self.limit, self.calls = limit, []

    def caption(self, pixels, config):
        self.calls.append(pixels.shape[0])
        if pixels.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [[f"c{int(x)}"] for x in pixels[:, 0]]


def test_out_of_memory_backs_off_and_keeps_every_image():
    fake = _OomAbove(limit=3)
    state = {"chunk": 16}
    out = caption_with_backoff(fake, torch.arange(10.0)[:, None], None, state)
    assert out == [[f"c{i}"] for i in range(10)]
    assert state["chunk"] == 2 and state["oom_backoffs"] == 3


def test_auto_batch_size_finds_largest_that_fits():
    def try_batch(n):
        if n > 37:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert find_batch_size(try_batch) == 37
    assert find_batch_size(lambda n: None, limit=64) == 64
    with pytest.raises(RuntimeError, match="not OOM"):
        find_batch_size(lambda n: (_ for _ in ()).throw(RuntimeError("not OOM")))


def test_length_penalty_reaches_beam_search_and_lineage(tiny_dataset, blip_ref, monkeypatch):
    from transformers import BlipForConditionalGeneration

    seen = []
    original = BlipForConditionalGeneration.generate

    def spy(self, *a, **kw):
        seen.append((kw.get("num_beams"), kw.get("length_penalty")))
        return original(self, *a, **kw)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", spy)
    r = CliRunner().invoke(app, ["recaption", str(tiny_dataset), "--model", blip_ref, "--name", "lp",
                                 "--decoding", "beam", "--num-beams", "3", "--length-penalty", "2.5",
                                 "--max-new-tokens", "5", "--workers", "0", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    assert seen and set(seen) == {(3, 2.5)}
    (entry,) = Dataset(tiny_dataset).card.lineage("captions", "lp")
    assert entry["parameters"]["length_penalty"] == 2.5
    assert entry["model"]["generate_kwargs"]["length_penalty"] == 2.5
