"""The model side of speed: fused attention where transformers has none, --compile, and the shared
--workers/--device/--decode/--batch-size options, each checked to change speed and nothing else."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import build_tiny_blip
from scorer_fixtures import save_tiny_openclip
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.errors import InputError
from capcurate.stages.recaption import recaption
from capcurate.stages.score import score


@pytest.fixture(scope="module")
def blip_ref(tmp_path_factory):
    return build_tiny_blip(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    return save_tiny_openclip(tmp_path_factory.mktemp("openclip"))


def _table(root, family, name):
    return pq.read_table(sorted((root / family / name).glob("*.parquet"))).to_pylist()


def test_blip_vision_tower_gets_fused_attention_with_identical_outputs(blip_ref):
    from transformers import BlipForConditionalGeneration

    from capcurate.models.attention import use_sdpa

    path = blip_ref[len("hf:"):]
    eager = BlipForConditionalGeneration.from_pretrained(path).eval()
    fused = BlipForConditionalGeneration.from_pretrained(path).eval()
    assert use_sdpa(fused) == eager.config.vision_config.num_hidden_layers
    x = torch.randn(3, 3, eager.config.vision_config.image_size, eager.config.vision_config.image_size)
    with torch.no_grad():
        a = eager.vision_model(pixel_values=x).last_hidden_state
        b = fused.vision_model(pixel_values=x).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        ga = eager.generate(pixel_values=x, max_new_tokens=5, do_sample=False)
        gb = fused.generate(pixel_values=x, max_new_tokens=5, do_sample=False)
    assert torch.equal(ga, gb)


def test_recaption_loads_blip_with_fused_attention_and_records_it(tiny_dataset, blip_ref):
    recaption(tiny_dataset, model=blip_ref, name="b", decoding="greedy", max_new_tokens=4, workers=0)
    from capcurate.dataset import Dataset

    entry = [e for e in Dataset(tiny_dataset).card.lineage() if e.get("name") == "b"][-1]
    assert entry["model"]["attn_implementation"] == "sdpa (capcurate)"


def test_compile_gives_the_same_scores_and_captions(tiny_dataset, blip_ref, tiny_openclip):
    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    score(tiny_dataset, ref, "plain", pretrained=str(weights), workers=0)
    score(tiny_dataset, ref, "compiled", pretrained=str(weights), workers=0, compile=True)
    plain, comp = _table(tiny_dataset, "scores", "plain"), _table(tiny_dataset, "scores", "compiled")
    for p, c in zip(plain, comp, strict=True):
        if p["score_plain_raw"] is None:
            assert c["score_compiled_raw"] is None
        else:
            assert c["score_compiled_raw"] == pytest.approx(p["score_plain_raw"], abs=1e-4)
    recaption(tiny_dataset, model=blip_ref, name="c0", decoding="greedy", max_new_tokens=4, workers=0)
    recaption(tiny_dataset, model=blip_ref, name="c1", decoding="greedy", max_new_tokens=4, workers=0, compile=True)
    assert [r["caption"] for r in _table(tiny_dataset, "captions", "c0")] == \
        [r["caption"] for r in _table(tiny_dataset, "captions", "c1")]


@pytest.mark.parametrize("decode", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_workers_decode_and_batch_size_change_nothing_but_speed(tiny_dataset, tiny_openclip, decode):
    """The reference: no workers, batches of 3, CPU decode and model. Against it: 2 workers, the auto batch
    size, and the decoder under test: ``cpu`` here (the only exact CPU decoder; ``draft`` changes pixels by
    design), ``gpu`` (nvJPEG, model on cuda) where a GPU is visible, within the 1e-3 score.py documents."""
    from capcurate.dataset import Dataset

    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    score(tiny_dataset, ref, "a", pretrained=str(weights), workers=0, batch_size=3, device="cpu", decode="cpu")
    device = "cuda" if decode == "gpu" else "cpu"
    score(tiny_dataset, ref, "b", pretrained=str(weights), workers=2, batch_size="auto", device=device,
          precision="fp32", decode=decode)
    entries = {e["name"]: e for e in Dataset(tiny_dataset).card.lineage("scores")}
    ran = entries["b"]
    assert (ran["decode"], ran["workers"], ran["device"]) == (decode, 2, device), ran
    assert (entries["a"]["decode"], entries["a"]["workers"], entries["a"]["batch_size"]) == ("cpu", 0, 3)
    tol = 1e-3 if decode == "gpu" else 1e-5
    a, b = _table(tiny_dataset, "scores", "a"), _table(tiny_dataset, "scores", "b")
    assert len(a) == len(b) == 24
    for x, y in zip(a, b, strict=True):
        assert (x["score_a_raw"] is None) == (y["score_b_raw"] is None)
        if x["score_a_raw"] is not None:
            assert x["score_a_raw"] == pytest.approx(y["score_b_raw"], abs=tol)
        assert x["error_a"] == y["error_b"]


def test_shared_options_refuse_bad_values_in_one_line(tiny_dataset, tiny_openclip):
    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    with pytest.raises(InputError, match="--decode gpu needs --device cuda"):
        score(tiny_dataset, ref, "x", pretrained=str(weights), decode="gpu", device="cpu")
    with pytest.raises(InputError, match="--workers"):
        score(tiny_dataset, ref, "x", pretrained=str(weights), workers="many")
    with pytest.raises(InputError, match="--precision"):
        score(tiny_dataset, ref, "x", pretrained=str(weights), precision="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            score(tiny_dataset, ref, "x", pretrained=str(weights), device="cuda")
    runner = CliRunner()
    for command in (["score", str(tiny_dataset), "--model", ref, "--name", "x"],
                    ["recaption", str(tiny_dataset), "--model", ref, "--name", "x"]):
        res = runner.invoke(app, [*command, "--decode", "nvjpeg"])
        assert res.exit_code == 2 and "--decode must be one of" in res.output
        res = runner.invoke(app, [*command, "--batch-size", "0"])
        assert res.exit_code == 2 and "--batch-size" in res.output


def test_shards_stream_in_windows_with_the_same_results(tiny_dataset, tiny_openclip, monkeypatch):
    """A pool of thousands of shards goes through in windows of STREAM_WINDOW (bounded memory)."""
    import capcurate.engines.local as local

    cfg, weights = tiny_openclip
    ref = f"openclip:{cfg}"
    score(tiny_dataset, ref, "one", pretrained=str(weights), workers=0, batch_size=5)
    monkeypatch.setattr(local, "STREAM_WINDOW", 2)  # 3 shards: windows of 2 and 1
    s = score(tiny_dataset, ref, "two", pretrained=str(weights), workers=0, batch_size=5)
    assert s.counts["shards_processed"] == 3
    for x, y in zip(_table(tiny_dataset, "scores", "one"), _table(tiny_dataset, "scores", "two"), strict=True):
        assert (x["score_one_raw"] is None) == (y["score_two_raw"] is None) and x["error_one"] == y["error_two"]
        if x["score_one_raw"] is not None:
            assert x["score_one_raw"] == pytest.approx(y["score_two_raw"], abs=1e-6)


def test_blip2_compile_adds_a_static_kv_cache_with_the_same_captions(tmp_path):
    """--compile on BLIP-2: its language model decodes with a static KV cache (a compiled step on a GPU),
    greedy captions unchanged; BLIP's BERT decoder cannot, so it keeps the dynamic cache."""
    from captioner_fixtures import build_tiny_blip2

    from capcurate.models.captioners import DecodingConfig, load_captioner

    ref = build_tiny_blip2(tmp_path)
    plain = load_captioner(ref)
    static = load_captioner(ref)
    static.static_cache = True  # what --compile sets, without compiling the image tower on the CPU
    cfg = DecodingConfig(decoding="greedy", max_new_tokens=5)
    assert static.generate_kwargs(cfg)["cache_implementation"] == "static"
    x = torch.rand(3, 3, *static.image_spec.output_size)
    assert static.caption(x, cfg) == plain.caption(x, cfg)
    assert load_captioner(build_tiny_blip(tmp_path / "blip")).static_cache is False


def test_batch_probing_runs_uncompiled_then_compile_is_back(blip_ref):
    """--batch-size auto with --compile: every probed size would compile the tower (and the decoding step)
    again, so probing runs the eager tower and a dynamic cache; the compiled ones are back afterwards."""
    from capcurate.models.captioners import load_captioner
    from capcurate.stages.batch_search import uncompiled

    cap = load_captioner(blip_ref, compile=True)  # torch.compile is lazy: nothing compiles until a call
    compiled = cap.model.vision_model
    assert hasattr(compiled, "_orig_mod")
    cap.static_cache = True  # as for a decoder transformers can compile
    seen = {}
    with uncompiled(cap):
        seen["tower"], seen["static"] = cap.model.vision_model, cap.static_cache
    assert seen["tower"] is compiled._orig_mod and seen["static"] is False
    assert cap.model.vision_model is compiled and cap.static_cache is True


def test_tests_not_marked_gpu_see_no_gpu():
    """conftest's autouse fixture: in process and in subprocesses, device auto is the CPU (fp32)."""
    import os
    import subprocess
    import sys

    from capcurate.devices import resolve_device, resolve_precision

    assert torch.cuda.is_available() is False and torch.cuda.device_count() == 0
    assert resolve_device("auto") == "cpu" and resolve_precision("auto", "cpu") == "fp32"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "''"
