"""The precision matrix of tests/test_precision.py on CUDA: score (open_clip, transformers), recaption (CoCa,
BLIP) and eval at fp32, bf16 and fp16 with ``--device cuda``. Skipped where no GPU is visible (conftest).

bf16 is what recaption and score pick by default on a GPU, so a dtype error here fails every shard of
every default GPU run. Each test builds its own tiny random models and a 6-image dataset: seconds.
Tolerances as in test_precision.py (cosine scores: 2e-2 for bf16, 5e-3 for fp16, against fp32 on the GPU);
options are passed by name, so a renamed one fails instead of running the default precision.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from captioner_fixtures import build_every_model
from conftest import build_dataset, make_image_bytes
from test_precision import check_close_to_fp32, eval_at_every_precision
from train_fixtures import write_eval_set

from capcurate.stages.recaption import recaption
from capcurate.stages.score import score

pytestmark = pytest.mark.gpu

PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_TOL = {"bf16": 2e-2, "fp16": 5e-3}


@pytest.fixture(scope="module")
def gpu_models(tmp_path_factory):
    return build_every_model(tmp_path_factory.mktemp("gpu-models"))


@pytest.fixture
def gpu_dataset(tmp_path):
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(5)]
    samples.append({"caption": "corrupt", "image": b"not an image"})
    return build_dataset(tmp_path / "ds", samples, per_shard=3)


@pytest.mark.parametrize("backend", ["openclip", "hf"])
def test_gpu_score_at_every_precision(gpu_models, gpu_dataset, backend):
    ref, pretrained = gpu_models[backend]
    got = {}
    for p in PRECISIONS:
        name = f"s_{p}"
        s = score(gpu_dataset, ref, name, pretrained=pretrained, captions="raw", batch_size=4,
                  device="cuda", precision=p, workers=0)
        assert s.ok, (p, s.details.get("failed_shards"))
        assert s.counts["images_scored"] == 5, (p, s.counts)
        t = pq.read_table(gpu_dataset / "scores" / name)
        got[p] = dict(zip(t.column("uid").to_pylist(), t.column(f"score_{name}_raw").to_pylist(), strict=True))
    ok = {u: v for u, v in got["fp32"].items() if v is not None}
    assert len(ok) == 5
    for p, tol in SCORE_TOL.items():
        worst = max(abs(got[p][u] - v) for u, v in ok.items())
        assert worst <= tol, f"{backend} {p} on cuda: max |score - fp32 score| = {worst:.4f}"
        assert worst > 0, f"{backend} {p} equals fp32 to the bit: the model did not run at {p}"


@pytest.mark.parametrize("backend", ["coca", "blip"])
@pytest.mark.parametrize("precision", [*PRECISIONS, "auto"])
def test_gpu_recaption_at_every_precision(gpu_models, gpu_dataset, backend, precision):
    """``auto`` is bf16 on a GPU: the default run that failed on every shard with CoCa."""
    ref, pretrained = gpu_models[backend]
    s = recaption(gpu_dataset, model=ref, pretrained=pretrained, name="c", decoding="greedy", max_new_tokens=5,
                  batch_size=4, device="cuda", workers=0, precision=precision)
    assert s.ok, s.details
    assert s.counts["images_captioned"] == 5 and s.counts["images_failed"] == 1, s.counts
    rows = [r for r in pq.read_table(gpu_dataset / "captions" / "c").to_pylist() if r["caption"] is not None]
    assert len(rows) == 5 and all(r["caption"].strip() for r in rows)


@pytest.mark.parametrize("backend", ["run", "hf"])
def test_gpu_eval_at_every_precision_is_close_to_fp32(gpu_models, tmp_path, backend, monkeypatch):
    """On CUDA (decode auto = nvJPEG): bf16/fp16 against fp32 as on the CPU, and fp32 on the GPU against the
    CPU's fp32 (these flat-colour JPEGs decode alike in nvJPEG and libjpeg-turbo, within a level)."""
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    ref = gpu_models[backend][0]
    counts, images = eval_at_every_precision(ref, evalset, monkeypatch, "--device", "cuda")
    check_close_to_fp32(counts, images, n_images=8)
    cpu_counts, cpu_images = eval_at_every_precision(ref, evalset, monkeypatch, "--device", "cpu")
    worst = (images["fp32"] - cpu_images["fp32"]).norm(dim=-1).max().item()
    assert worst <= SCORE_TOL["fp16"], f"fp32 on cuda moved image embeddings by {worst:.4f} from the CPU's"
    assert all(abs(v - cpu_counts["fp32"][k]) <= 1 / 8 + 1e-9 for k, v in counts["fp32"].items() if "/" in k)


def test_tests_marked_gpu_see_the_gpu():
    """conftest hides CUDA from every test not marked gpu, and from none that is."""
    import os

    import torch

    assert torch.cuda.is_available() and torch.cuda.device_count() >= 1
    assert os.environ.get("CUDA_VISIBLE_DEVICES") != ""
