"""capcurate score: CLIP scores per caption column, equal to a direct computation with the model's own code."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from scorer_fixtures import save_tiny_hf_clip, save_tiny_openclip, save_tiny_openclip_run
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import InputError, OutputExistsError
from capcurate.stages.score import ScoreJob, score


@pytest.fixture(scope="session")
def tiny_openclip(tmp_path_factory):
    return save_tiny_openclip(tmp_path_factory.mktemp("openclip"))


@pytest.fixture(scope="session")
def tiny_openclip_run(tmp_path_factory):
    return save_tiny_openclip_run(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory):
    return save_tiny_hf_clip(tmp_path_factory.mktemp("hfclip"))


@pytest.fixture
def scored_dataset(tmp_path):
    """20 samples in 3 shards: good images, one empty and one NULL caption, a corrupt image, a dead link."""
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i, size=(40, 28))}
               for i in range(16)]
    samples.append({"caption": "   ", "image": make_image_bytes(50)})
    samples.append({"caption": None, "image": make_image_bytes(51), "url": "http://x/none.jpg"})
    samples.append({"caption": "corrupt image", "image": b"not an image at all"})
    samples.append({"caption": "dead link", "status": "failed_to_download"})
    return build_dataset(tmp_path / "ds", samples, per_shard=8)


def rows(ds_root, name="tiny"):
    return {r["uid"]: r for r in Dataset(ds_root).query(
        f"SELECT m.uid, m.key, m.shard, m.caption, m.status, s.* EXCLUDE (uid) FROM manifest m "
        f"JOIN scores_{name} s USING (uid)").to_pylist()}


def image_bytes(ds_root, shard, key):
    import tarfile

    with tarfile.open(Dataset(ds_root).shard_path(shard)) as tf:
        return tf.extractfile(f"{key}.jpg").read()


def direct_openclip_scores(ds_root, cfg, weights, rows_):
    """The score as open_clip's own API computes it, image by image."""
    import open_clip
    import torch
    from PIL import Image

    open_clip.add_model_config(cfg)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.stem, pretrained=str(weights))
    tok = open_clip.get_tokenizer(cfg.stem)
    model.eval()
    out = {}
    with torch.no_grad():
        for uid, r in rows_.items():
            if r["status"] != "success" or not (r["caption"] or "").strip() or r["caption"] == "corrupt image":
                continue
            img = Image.open(io.BytesIO(image_bytes(ds_root, r["shard"], r["key"]))).convert("RGB")
            i = model.encode_image(preprocess(img)[None], normalize=True)
            t = model.encode_text(tok([r["caption"]]), normalize=True)
            out[uid] = float((i * t).sum())
    return out


def test_score_equals_direct_open_clip_computation(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    summary = score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0,
                    batch_size=5)
    assert summary.ok and summary.counts["shards_processed"] == 3
    got = rows(scored_dataset)
    want = direct_openclip_scores(scored_dataset, cfg, weights, got)
    assert len(want) == 16
    for uid, s in want.items():
        assert got[uid]["score_tiny_raw"] == pytest.approx(s, abs=1e-3)  # tensor resize vs PIL: within the stated 1e-3


def test_score_equals_direct_transformers_clip_computation(scored_dataset, tiny_hf_clip):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    summary = score(scored_dataset, f"hf:{tiny_hf_clip}", "hfclip", workers=0, batch_size=4)
    assert summary.ok
    got = rows(scored_dataset, "hfclip")
    model = CLIPModel.from_pretrained(tiny_hf_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_hf_clip)
    checked = 0
    with torch.no_grad():
        for r in got.values():
            if r["score_hfclip_raw"] is None:
                continue
            img = Image.open(io.BytesIO(image_bytes(scored_dataset, r["shard"], r["key"]))).convert("RGB")
            inputs = proc(text=[r["caption"]], images=img, return_tensors="pt", padding=True)
            out = model(**inputs)
            i = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            t = torch.nn.functional.normalize(out.text_embeds, dim=-1)
            assert r["score_hfclip_raw"] == pytest.approx(float((i * t).sum()), abs=1e-5)
            checked += 1
    assert checked == 16


def test_failed_images_and_empty_captions_get_null_scores(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0)
    got = list(rows(scored_dataset).values())
    assert len(got) == 20
    by_caption = {r["caption"]: r for r in got}
    assert by_caption["   "]["score_tiny_raw"] is None and by_caption["   "]["error_tiny"] is None
    assert by_caption[None]["score_tiny_raw"] is None
    assert by_caption["corrupt image"]["score_tiny_raw"] is None
    assert "not an image" in by_caption["corrupt image"]["error_tiny"]
    assert by_caption["dead link"]["error_tiny"] == "not downloaded: failed_to_download"
    assert sum(r["score_tiny_raw"] is not None for r in got) == 16


def test_score_resumes_after_kill(scored_dataset, tiny_openclip, monkeypatch):
    cfg, weights = tiny_openclip
    real = ScoreJob._finish_shard

    def killed_on_second_shard(self, state):
        if state["sid"] == "00001":
            raise KeyboardInterrupt
        return real(self, state)

    monkeypatch.setattr(ScoreJob, "_finish_shard", killed_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0)
    monkeypatch.setattr(ScoreJob, "_finish_shard", real)
    out = Dataset(scored_dataset).family_dir("scores", "tiny")
    # shards finished before the interrupt are kept (the finishing thread may have completed a later one);
    # the interrupted shard left no file
    done = sorted(p.name for p in out.glob("*.parquet"))
    assert "00000.parquet" in done and "00001.parquet" not in done
    first = pq.read_table(out / "00000.parquet")
    summary = score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0)
    assert summary.counts["shards_skipped"] == len(done) and summary.counts["shards_processed"] == 3 - len(done)
    assert pq.read_table(out / "00000.parquet").equals(first)
    assert len(rows(scored_dataset)) == 20


def test_other_parameters_refused_unless_overwrite(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0)
    with pytest.raises(OutputExistsError, match="num_captions"):
        score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0, num_captions=3)
    s = score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0, num_captions=3,
              overwrite=True)
    assert s.counts["shards_processed"] == 3
    entries = Dataset(scored_dataset).card.lineage("scores", "tiny")
    assert len(entries) == 1 and entries[0]["finished"] and entries[0]["parameters"]["num_captions"] == 3


def test_unknown_caption_column_lists_existing_ones(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    with pytest.raises(InputError, match="blip2.*this dataset has raw"):
        score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), captions="raw,blip2")


def add_captions(ds_root, name, shard, n_caps=3):
    ds = Dataset(ds_root)
    uids = [r[0] for r in ds.connect().execute(
        f"SELECT uid FROM manifest WHERE shard = '{shard}' ORDER BY key").fetchall()]
    caps = [[f"{name} caption {i}", "", f"another {name} text {i}"][:n_caps] for i in range(len(uids))]
    caps[1] = []  # a captioner failure for that image
    atomic.write_parquet(ds.family_dir("captions", name) / f"{shard}.parquet", pa.table({
        "uid": uids, "caption": [c[0] if c else None for c in caps], "captions": caps,
        "error": [None if c else "failed" for c in caps]}))
    return uids, caps


def test_new_caption_column_scores_only_what_is_missing(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0, num_captions=3,
          save_embeddings=True)
    before = rows(scored_dataset)
    uids, caps = add_captions(scored_dataset, "blip", "00000")
    s = score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0, num_captions=3,
              save_embeddings=True)
    # only shard 00000 has blip captions; its images came from the saved embeddings, not the tar
    assert s.counts["shards_processed"] == 1 and s.counts["shards_skipped"] == 2
    assert s.counts["images_reused"] == 8
    after = rows(scored_dataset)
    assert [after[u]["score_tiny_raw"] for u in before] == [before[u]["score_tiny_raw"] for u in before]

    import open_clip
    import torch
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(cfg.stem, pretrained=str(weights))
    tok = open_clip.get_tokenizer(cfg.stem)
    r = after[uids[0]]
    img = Image.open(io.BytesIO(image_bytes(scored_dataset, r["shard"], r["key"]))).convert("RGB")
    with torch.no_grad():
        i = model.eval().encode_image(preprocess(img)[None], normalize=True)
        t = model.encode_text(tok([caps[0][0], caps[0][2]]), normalize=True)
    direct = (i @ t.T)[0].tolist()
    # float16 image embeddings were reused, hence the looser tolerance
    assert r["score_tiny_blip"] == pytest.approx(direct[0], abs=2e-3)
    assert r["scores_tiny_blip"][0] == pytest.approx(direct[0], abs=2e-3)
    assert r["scores_tiny_blip"][1] is None  # the empty caption
    assert r["scores_tiny_blip"][2] == pytest.approx(direct[1], abs=2e-3)
    assert r["best_tiny_blip"] == (0 if direct[0] >= direct[1] else 2)
    assert after[uids[1]]["score_tiny_blip"] is None and after[uids[1]]["scores_tiny_blip"] is None
    assert "score_tiny_blip" in Dataset(scored_dataset).columns("samples")
    s2 = score(scored_dataset, ref, "tiny", pretrained=str(weights), workers=0, num_captions=3,
               save_embeddings=True)
    assert s2.counts["shards_skipped"] == 3


def test_save_embeddings_are_normalised_float16_in_uid_order(scored_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0,
          save_embeddings=True)
    d = Dataset(scored_dataset).family_dir("embeddings", "tiny")
    order = pq.read_table(d / "00002.uids.parquet").column("uid").to_pylist()
    manifest = pq.read_table(Dataset(scored_dataset).samples_path("00002")).column("uid").to_pylist()
    assert order == manifest
    img, raw = np.load(d / "00002.image.npy"), np.load(d / "00002.raw.npy")
    assert img.dtype == np.float16 and img.shape == (4, 16) and raw.shape == (4, 16)
    norms = np.linalg.norm(img.astype(np.float32), axis=1)
    assert np.allclose(norms[:2], 1, atol=1e-2) and np.allclose(norms[2:], 0)  # corrupt, dead link
    assert not raw.any()  # shard 00002 has no usable caption: empty, NULL, corrupt image, dead link
    got = rows(scored_dataset)
    order = pq.read_table(d / "00000.uids.parquet").column("uid").to_pylist()
    img, raw = np.load(d / "00000.image.npy").astype(np.float32), np.load(d / "00000.raw.npy").astype(np.float32)
    for i in (0, 7):
        assert got[order[i]]["score_tiny_raw"] == pytest.approx(float(img[i] @ raw[i]), abs=2e-3)


def test_score_cli_loads_a_training_run_and_respects_part(scored_dataset, tiny_openclip_run):
    runner = CliRunner()
    res = runner.invoke(app, ["score", str(scored_dataset), "--model", str(tiny_openclip_run), "--name", "run",
                              "--part", "0/2", "--batch-size", "4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["counts"]["shards_processed"] == 2 and out["details"]["columns"] == ["score_run_raw"]
    names = sorted(p.name for p in Dataset(scored_dataset).family_dir("scores", "run").glob("*.parquet"))
    assert names == ["00000.parquet", "00002.parquet"]
    entry = Dataset(scored_dataset).card.lineage("scores", "run")[-1]
    assert entry["model"]["local_dir"].endswith("model")


def test_score_cli_reports_unknown_column_and_bad_model(scored_dataset, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["score", str(scored_dataset), "--model", "hf:" + str(tmp_path / "nope"),
                              "--name", "x", "--captions", "raw,coca"])
    assert res.exit_code == 2 and "coca" in res.output and "raw" in res.output
    res = runner.invoke(app, ["score", str(scored_dataset), "--model", str(tmp_path), "--name", "x"])
    assert res.exit_code == 4 and "holds no model" in res.output


def test_default_decode_within_1e3_of_the_models_own_preprocessing_and_draft_is_opt_in(tmp_path, tiny_openclip):
    cfg, weights = tiny_openclip
    samples = [{"caption": f"a large photo {i}", "image": make_image_bytes(i, size=(256, 192))} for i in range(4)]
    root = build_dataset(tmp_path / "big", samples, per_shard=4)
    ref = f"openclip:{cfg}"
    score(root, ref, "exact", pretrained=str(weights), workers=0)
    score(root, ref, "fast", pretrained=str(weights), workers=0, decode="draft")
    exact, fast = rows(root, "exact"), rows(root, "fast")
    direct = direct_openclip_scores(root, cfg, weights, exact)  # PIL + open_clip's own transform
    for uid, s in direct.items():
        assert exact[uid]["score_exact_raw"] == pytest.approx(s, abs=1e-3)
    diffs = [abs(fast[u]["score_fast_raw"] - exact[u]["score_exact_raw"]) for u in exact]
    assert max(diffs) > 1e-6 and max(diffs) < 0.05  # drafted decode: close, not identical


def test_overwrite_with_a_model_that_cannot_load_keeps_the_old_scores(scored_dataset, tiny_openclip, tmp_path):
    from capcurate.errors import ModelLoadError

    cfg, weights = tiny_openclip
    score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0)
    before = rows(scored_dataset)
    with pytest.raises(ModelLoadError):
        score(scored_dataset, f"openclip:{cfg}", "tiny", pretrained=str(tmp_path / "missing.pt"), workers=0,
              overwrite=True)
    assert rows(scored_dataset) == before  # the claim (and the deletion it implies) comes after the load
    lineage = Dataset(scored_dataset).card.lineage("scores", "tiny")
    assert len(lineage) == 1 and lineage[0]["parameters"]["pretrained"] == str(weights)
