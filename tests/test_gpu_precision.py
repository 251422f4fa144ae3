"""The precision matrix of tests/test_precision.py on CUDA: score (open_clip, transformers), recaption (CoCa,
BLIP) and eval at fp32, bf16 and fp16 with ``--device cuda``. Skipped where no GPU is visible (conftest).

bf16 is what recaption and score pick by default on a GPU, so a dtype error here fails every shard of
every default GPU run. Each test builds its own tiny random models and a 6-image dataset: seconds.
Tolerances as in test_precision.py (cosine scores: 2e-2 for bf16, 5e-3 for fp16, against fp32 on the GPU).
"""

from __future__ import annotations

import inspect
import json

import pyarrow.parquet as pq
import pytest
from captioner_fixtures import build_every_model
from conftest import build_dataset, make_image_bytes
from train_fixtures import write_eval_set
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.stages.recaption import recaption
from capcurate.stages.score import score

pytestmark = pytest.mark.gpu

PRECISIONS = ("fp32", "bf16", "fp16")
SCORE_TOL = {"bf16": 2e-2, "fp16": 5e-3}


def _kw(fn, **options):
    """Keep the options ``fn`` accepts (the stages' keyword names are being unified)."""
    names = inspect.signature(fn).parameters
    return {k: v for k, v in options.items() if k in names}


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
                  **_kw(score, device="cuda", precision=p, num_workers=0, workers=0))
        assert s.ok, (p, s.details.get("failed_shards"))
        assert s.counts["images_scored"] == 5, (p, s.counts)
        t = pq.read_table(gpu_dataset / "scores" / name)
        got[p] = dict(zip(t.column("uid").to_pylist(), t.column(f"score_{name}_raw").to_pylist(), strict=True))
    ok = {u: v for u, v in got["fp32"].items() if v is not None}
    assert len(ok) == 5
    for p, tol in SCORE_TOL.items():
        worst = max(abs(got[p][u] - v) for u, v in ok.items())
        assert worst <= tol, f"{backend} {p} on cuda: max |score - fp32 score| = {worst:.4f}"


@pytest.mark.parametrize("backend", ["coca", "blip"])
@pytest.mark.parametrize("precision", [*PRECISIONS, "auto"])
def test_gpu_recaption_at_every_precision(gpu_models, gpu_dataset, backend, precision):
    """``auto`` is bf16 on a GPU: the default run that failed on every shard with CoCa."""
    ref, pretrained = gpu_models[backend]
    opts = {"precision": precision, "dtype": precision} if precision != "auto" else {}
    s = recaption(gpu_dataset, model=ref, pretrained=pretrained, name="c", decoding="greedy", max_new_tokens=5,
                  batch_size=4, **_kw(recaption, device="cuda", workers=0, num_workers=0, **opts))
    assert s.ok, s.details
    assert s.counts["images_captioned"] == 5 and s.counts["images_failed"] == 1, s.counts
    rows = [r for r in pq.read_table(gpu_dataset / "captions" / "c").to_pylist() if r["caption"] is not None]
    assert len(rows) == 5 and all(r["caption"].strip() for r in rows)


@pytest.mark.parametrize("backend", ["run", "hf"])
def test_gpu_eval_at_every_precision(gpu_models, tmp_path, backend):
    evalset = write_eval_set(tmp_path / "eval", per_class=1)
    ref, _ = gpu_models[backend]
    for p in PRECISIONS:
        r = CliRunner().invoke(app, ["eval", ref, "--data", str(evalset), "--device", "cuda", "--precision", p,
                                     "--json"])
        assert r.exit_code == 0, (p, r.output[-2000:])
        counts = json.loads(r.stdout)["counts"]
        assert counts["images"] == 8
        assert all(0.0 <= v <= 1.0 for k, v in counts.items() if "/" in k)
