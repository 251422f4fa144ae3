"""Every precision (fp32, bf16, fp16) through score, recaption and eval on CPU, and the lineage of failed runs.

open_clip's ``precision='bf16'/'fp16'`` converts only some parameters (convolutions, linear layers,
attention projections) and keeps embeddings and LayerNorms in float32, so a model is never uniformly
low precision; these tests run the real stages on tiny random models at each precision and compare
the low-precision scores with float32 ones.

Tolerances: a CLIP score is a cosine in [-1, 1]. bf16 keeps 8 significant bits (unit roundoff
2**-9 ~ 2e-3) and fp16 11 bits (~5e-4); through the few layers of these tiny models the error of a
normalised embedding stays within a few roundoffs: measured here, at most 4.7e-3 (bf16) and 6.5e-4
(fp16) over 16 image-text pairs of both backends; eval's normalised image embeddings moved by at most
7.8e-3 (bf16) and 9.2e-4 (fp16) from fp32's (this 2-core CPU box), and no eval metric changed. 2e-2 for
bf16 and 5e-3 for fp16 leave a margin of 2.5x to 8x without hiding a real error (a wrong input cast or a
missing normalisation moves scores by 0.1 or more). Options are passed by name, never filtered: a renamed
option fails with a TypeError instead of silently running every "precision" at the default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import build_every_model
from conftest import build_dataset, make_image_bytes
from train_fixtures import write_eval_set
from typer.testing import CliRunner

from capcurate.card import Card, may_be_running
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import OutputExistsError
from capcurate.stages.recaption import recaption
from capcurate.stages.score import score

PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_TOL = {"fp32": 0.0, "bf16": 2e-2, "fp16": 5e-3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_every_model(tmp_path_factory.mktemp("precision-models"))


@pytest.fixture
def small_dataset(tmp_path):
    """6 images in 2 shards (one corrupt image, so the failure path runs at every precision too)."""
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(5)]
    samples.append({"caption": "corrupt", "image": b"not an image"})
    return build_dataset(tmp_path / "ds", samples, per_shard=3)


def _score(ds, ref, name, p, pretrained=None):
    # keywords passed as such: a renamed option is a TypeError here, never a silent default precision
    return score(ds, ref, name, pretrained=pretrained, captions="raw", batch_size=4, precision=p, workers=0)


def _scores(ds_root, name):
    t = pq.read_table(ds_root / "scores" / name)
    return dict(zip(t.column("uid").to_pylist(), t.column(f"score_{name}_raw").to_pylist(), strict=True))


@pytest.mark.parametrize("backend", ["openclip", "hf"])
def test_score_at_every_precision_is_close_to_fp32(models, small_dataset, backend):
    ref, pretrained = models[backend]
    got = {}
    for p in PRECISIONS:
        s = _score(small_dataset, ref, f"s_{p}", p, pretrained)
        assert s.ok, (p, s.details["failed_shards"])
        assert s.counts["images_scored"] == 5, (p, s.counts)
        got[p] = _scores(small_dataset, f"s_{p}")
        entry = Dataset(small_dataset).card.lineage("scores", f"s_{p}")[-1]
        assert entry["parameters"]["precision"] == p and entry["model"]
    ok = {u: v for u, v in got["fp32"].items() if v is not None}
    assert len(ok) == 5
    for p in ("bf16", "fp16"):
        assert {u for u, v in got[p].items() if v is not None} == set(ok)
        worst = max(abs(got[p][u] - v) for u, v in ok.items())
        assert worst <= SCORE_TOL[p], f"{backend} {p}: max |score - fp32 score| = {worst:.4f}"
        assert worst > 0, f"{backend} {p} equals fp32 to the bit: the model did not run at {p}"


def test_input_dtype_is_the_patch_embeddings_not_the_first_parameters(models):
    """open_clip at bf16 keeps e.g. class/positional embeddings fp32: the input follows the patch conv."""
    from transformers import AutoModel

    from capcurate.models.openclip_loader import input_dtype, load_openclip
    from capcurate.models.ref import parse_model_ref

    ref, weights = models["openclip"]
    for p, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model = load_openclip(parse_model_ref(ref, pretrained=weights), precision=p).model
        assert model.visual.class_embedding.dtype == torch.float32  # what misled the old cast
        assert input_dtype(model.visual) == model.visual.conv1.weight.dtype == dt
        hf = AutoModel.from_pretrained(models["hf"][0][3:], dtype=dt)
        assert input_dtype(hf) == hf.vision_model.embeddings.patch_embedding.weight.dtype == dt
    coca = load_openclip(parse_model_ref(models["coca"][0], pretrained=models["coca"][1]), precision="bf16").model
    # the parameters open_clip's conversion forgets follow their layers
    assert coca.visual.attn_pool.query.dtype == torch.bfloat16
    assert coca.text.cls_emb.dtype == coca.text_decoder.text_projection.dtype == torch.bfloat16
    # a LayerNorm with float32 weights must normalise in float32: CUDA's layer_norm refuses mixed dtypes
    # (the CPU accepts them, so only this check catches it without a GPU)
    from open_clip.transformer import LayerNormFp32

    norms = [(n, m) for n, m in coca.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(isinstance(m, LayerNormFp32) or m.weight.dtype != torch.float32 for _, m in norms), \
        [n for n, m in norms if not isinstance(m, LayerNormFp32) and m.weight.dtype == torch.float32]


@pytest.mark.parametrize("backend", ["coca", "blip"])
def test_recaption_at_every_precision(models, small_dataset, backend):
    ref, pretrained = models[backend]
    captions = {}
    for p in PRECISIONS:
        s = recaption(small_dataset, model=ref, pretrained=pretrained, name=f"c_{p}", decoding="greedy",
                      max_new_tokens=5, batch_size=4,
                      precision=p, workers=0, device="cpu")
        assert s.ok, (p, s.details)
        assert s.counts["images_captioned"] == 5 and s.counts["images_failed"] == 1, (p, s.counts)
        t = pq.read_table(small_dataset / "captions" / f"c_{p}").to_pylist()
        captions[p] = {r["uid"]: r["caption"] for r in t if r["caption"] is not None}
        assert len(captions[p]) == 5 and all(c.strip() for c in captions[p].values()), (p, captions[p])
        entry = Dataset(small_dataset).card.lineage("captions", f"c_{p}")[-1]
        assert entry["parameters"]["precision"] == p


def test_coca_low_precision_decoding_follows_fp32(models):
    """The KV-cached decoder at bf16/fp16: first-step logits close to fp32, cached == uncached tokens."""
    from capcurate.models.captioners import load_captioner
    from capcurate.models.captioners.base import DecodingConfig
    from capcurate.models.coca_decode import CocaIncrementalDecoder

    ref, weights = models["coca"]
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32)
    first = {}
    for p in PRECISIONS:
        cap = load_captioner(ref, pretrained=weights, dtype=p)
        assert cap.dtype == (torch.float32 if p == "fp32" else cap.model.visual.conv1.weight.dtype)
        with torch.no_grad():
            _, embs = cap.model._encode_image(pixels.to(cap.dtype))
            start = torch.full((2, 1), cap.special.sot)
            first[p] = CocaIncrementalDecoder(cap.model, embs).next_logits(start).float()
        cfg = DecodingConfig(decoding="greedy", max_new_tokens=5)
        cached = cap.generate_ids(pixels, cfg)
        cap.use_cache = False
        assert cap.generate_ids(pixels, cfg) == cached, p
        beam = DecodingConfig(decoding="beam", num_beams=2, max_new_tokens=4, prompt="a photo")
        assert cap.caption(pixels, beam) and all(len(c) == 1 for c in cap.caption(pixels, beam))
    scale = first["fp32"].abs().max().item()
    for p, rel in (("bf16", 5e-2), ("fp16", 1e-2)):
        err = (first[p] - first["fp32"]).abs().max().item()
        assert err <= rel * scale, f"{p}: first-step logits differ by {err:.4f} (scale {scale:.2f})"


def eval_at_every_precision(ref: str, evalset, monkeypatch, *extra: str) -> tuple[dict, dict]:
    """``capcurate eval`` at each precision: (the --json counts, the normalised image embeddings the metrics
    were computed from) per precision."""
    from capcurate.train import evaluation

    seen: dict[str, torch.Tensor] = {}
    task_results = evaluation.task_results

    def recording(eval_set, image_emb, *args, **kwargs):
        seen["images"] = torch.nn.functional.normalize(image_emb.float(), dim=-1)
        return task_results(eval_set, image_emb, *args, **kwargs)

    monkeypatch.setattr(evaluation, "task_results", recording)
    counts, images = {}, {}
    for p in PRECISIONS:
        r = CliRunner().invoke(app, ["eval", ref, "--data", str(evalset), "--precision", p, "--json", *extra])
        assert r.exit_code == 0, (p, r.output[-2000:])
        out = json.loads(r.stdout)
        assert out["details"]["precision"] == p
        counts[p], images[p] = out["counts"], seen.pop("images")
    return counts, images


def check_close_to_fp32(counts: dict, images: dict, n_images: int) -> None:
    """Each low precision's image embeddings within the score tolerance of fp32's (a cosine score moves by
    at most the distance between unit vectors), and its metrics within one image of fp32's."""
    for p in ("bf16", "fp16"):
        assert set(counts[p]) == set(counts["fp32"])
        assert counts[p]["images"] == counts["fp32"]["images"] == n_images
        worst = (images[p] - images["fp32"]).norm(dim=-1).max().item()
        assert worst <= SCORE_TOL[p], f"{p}: image embedding moved by {worst:.4f} from fp32"
        assert worst > 0, f"{p} equals fp32 to the bit: the model did not run at {p}"
        # a near tie may turn over at low precision: one image's outcome, never more
        moved = {k: abs(v - counts["fp32"][k]) for k, v in counts[p].items() if "/" in k}
        assert all(d <= 1 / n_images + 1e-9 for d in moved.values()), (p, moved)


@pytest.mark.parametrize("backend", ["run", "hf"])
def test_eval_cli_at_every_precision_is_close_to_fp32(models, tmp_path, backend, monkeypatch):
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    counts, images = eval_at_every_precision(models[backend][0], evalset, monkeypatch)
    check_close_to_fp32(counts, images, n_images=8)


# -- lineage: a run that wrote nothing does not hold its name ---------------------------------------

def test_failed_run_leaves_the_name_free_for_other_parameters(models, small_dataset, monkeypatch):
    ref, pretrained = models["openclip"]

    from capcurate.models import scorers

    real_load = scorers.load_scorer

    def failing_scorer(*args, **kwargs):  # loads, then fails on every image batch (as bf16 once did)
        def boom(pixels):
            raise RuntimeError("Input type (torch.FloatTensor) and weight type (BFloat16) should be the same")

        return dataclasses.replace(real_load(*args, **kwargs), encode_images=boom)

    with monkeypatch.context() as m:
        m.setattr(scorers, "load_scorer", failing_scorer)
        s = _score(small_dataset, ref, "l14", "bf16", pretrained)
    assert not s.ok and len(s.details["failed_shards"]) == 2
    assert not list((small_dataset / "scores" / "l14").glob("*.parquet"))
    card = Dataset(small_dataset).card
    assert card.lineage("scores", "l14")[-1]["finished"]  # the failed run is recorded ...

    s = _score(small_dataset, ref, "l14", "fp32", pretrained)
    assert s.ok and s.details["mode"] == "new" and s.counts["images_scored"] == 5
    entries = card.lineage("scores", "l14")  # ... and replaced by the run that made the output
    assert [e["parameters"]["precision"] for e in entries] == ["fp32"]

    # a run that did write something still holds the name
    with pytest.raises(OutputExistsError, match="precision"):
        _score(small_dataset, ref, "l14", "bf16", pretrained)
    # and the same parameters still resume
    s = _score(small_dataset, ref, "l14", "fp32", pretrained)
    assert s.details["mode"] == "resume" and s.counts["shards_skipped"] == 2


def _entry(card: Card, *, finished, pid: int, host: str | None = None, params=None, family: str = "scores",
           name: str = "x") -> dict:
    eid = card.start_entry(stage="score", family=family, name=name, params=params or {"precision": "bf16"})
    with card.editing() as c:
        e = next(e for e in c["lineage"] if e["id"] == eid)
        head, _, tail = eid.rsplit("-", 2)
        e["id"] = f"{head}-{pid}-{tail}"
        e["host"] = host or platform.node()
        e["finished"] = "2024-01-01T00:00:00+00:00" if finished else None
        return dict(e)


def test_unfinished_entry_holds_the_name_only_while_its_process_may_run(small_dataset):
    card = Dataset(small_dataset).card
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    e = _entry(card, finished=False, pid=dead_pid)
    assert not may_be_running(e)
    assert card.claim_output("scores", "x", {"precision": "fp32"}, overwrite=False, exists=False) == "new"

    alive = _entry(card, finished=False, pid=os.getppid())  # the test runner's parent is alive
    assert may_be_running(alive)
    with pytest.raises(OutputExistsError, match="precision"):
        card.claim_output("scores", "x", {"precision": "fp32"}, overwrite=False, exists=False)
    # another host cannot be checked: its unfinished run holds the name
    assert may_be_running({**alive, "host": "some-other-host"})
    # same parameters always resume, running or not
    assert card.claim_output("scores", "x", {"precision": "bf16"}, overwrite=False, exists=False) == "resume"


def test_claim_and_start_are_one_step_against_a_concurrent_claim(small_dataset):
    """Two runs claim a free name with other parameters; the second to start its entry is refused."""
    a, b = Card(small_dataset), Card(small_dataset)
    assert a.claim_output("scores", "y", {"precision": "bf16"}, overwrite=False, exists=False) == "new"
    assert b.claim_output("scores", "y", {"precision": "fp32"}, overwrite=False, exists=False) == "new"
    b.start_entry(stage="score", family="scores", name="y", params={"precision": "fp32"})
    with pytest.raises(OutputExistsError, match="precision"):
        a.start_entry(stage="score", family="scores", name="y", params={"precision": "bf16"})
    assert [e["parameters"] for e in a.lineage("scores", "y")] == [{"precision": "fp32"}]
    # the same parameters share the name (a SLURM array's parts)
    c = Card(small_dataset)
    assert c.claim_output("scores", "y", {"precision": "fp32"}, overwrite=False, exists=False) == "resume"
    b.start_entry(stage="score", family="scores", name="y", params={"precision": "fp32"})
    c.start_entry(stage="score", family="scores", name="y", params={"precision": "fp32"})
    assert len(a.lineage("scores", "y")) == 3


def test_whole_file_outputs_have_one_writer_at_a_time(small_dataset):
    """mix, filter and dedup write a selection in one go: while another run of that name may still be
    writing, each refuses in one line, whatever the parameters; once that run is over, the name is free."""
    import capcurate

    card = Dataset(small_dataset).card
    _entry(card, finished=False, pid=os.getppid(), family="selections", name="sel", params={"strategy": "raw"})
    runs = {"mix": lambda: capcurate.mix(small_dataset, strategy="raw", name="sel"),
            "filter": lambda: capcurate.filter(small_dataset, "sel", where="true"),
            "dedup": lambda: capcurate.dedup(small_dataset, "sel", exact=True, workers=0)}
    for stage, run in runs.items():
        with pytest.raises(OutputExistsError, match="selections/sel is being written by another run"):
            run()
        assert not Dataset(small_dataset).selection_path("sel").exists(), stage
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    with card.editing() as c:  # the other run died without finishing
        for e in c["lineage"]:
            if e.get("name") == "sel":
                head, _, tail = e["id"].rsplit("-", 2)
                e["id"] = f"{head}-{int(dead.stdout)}-{tail}"
    s = capcurate.mix(small_dataset, strategy="raw", name="sel")
    assert s.ok and Dataset(small_dataset).selection_path("sel").exists()
    assert card.lineage("selections", "sel")[-1]["finished"] is not None
