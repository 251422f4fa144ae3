"""A chat-template VLM on CUDA: its image processor runs on the GPU (captioners/vlm.py) and builds the same
inputs as on the CPU; the recaption stage's greedy captions equal the model's own ``generate`` on them.
Skipped where no GPU is visible (conftest)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import build_tiny_qwen2_vl
from conftest import build_dataset, make_image_bytes

from capcurate.inputs.decode import decode_cpu
from capcurate.models.captioners import load_captioner
from capcurate.models.captioners.generation import DecodingConfig
from capcurate.stages.recaption import recaption

pytestmark = pytest.mark.gpu


def test_vlm_processor_on_the_gpu_matches_the_cpu_and_the_stage_matches_generate(tmp_path):
    ref = build_tiny_qwen2_vl(tmp_path / "models")
    sizes = [(64, 48), (48, 64), (64, 48), (40, 40)]
    images = [make_image_bytes(size=s, seed=i) for i, s in enumerate(sizes)]
    decoded = [decode_cpu(b) for b in images]
    cfg = DecodingConfig(decoding="greedy", max_new_tokens=8)

    cpu = load_captioner(ref, device="cpu")
    gpu = load_captioner(ref, device="cuda")
    assert gpu._processor_kwargs == {"device": "cuda"}
    a = cpu.build_inputs(decoded, cpu.prepare(cfg))
    b = gpu.build_inputs(decoded, gpu.prepare(cfg))
    assert b["pixel_values"].is_cuda
    for k in a:
        if a[k].is_floating_point():
            # torchvision's CPU and CUDA bicubic kernels round differently at a few edge pixels: measured on
            # an H200, mean 6e-4 and max 0.114 in normalised units (~8 uint8 levels at the worst pixel)
            diff = (a[k].float() - b[k].float().cpu()).abs()
            assert diff.mean() < 5e-3 and diff.max() < 0.3, (k, float(diff.mean()), float(diff.max()))
        else:
            assert torch.equal(a[k], b[k].cpu()), k

    ds = build_dataset(tmp_path / "ds", [{"caption": f"c{i}", "image": img} for i, img in enumerate(images)])
    summary = recaption(str(ds), model=ref, name="vlm", decoding="greedy", max_new_tokens=8, device="cuda",
                        precision="fp32", batch_size=4, workers=1)
    assert summary.ok, summary.message
    got = pq.read_table(ds / "captions" / "vlm" / "00000.parquet").column("caption").to_pylist()
    want = [c[0] for c in gpu.caption(decoded, gpu.prepare(cfg))]
    assert got == want


def test_vlm_compile_on_cuda_compiles_the_decoding_step_with_the_same_captions(tmp_path):
    """--compile on a GPU: a static KV cache, and transformers compiles the decoding step around it."""
    ref = build_tiny_qwen2_vl(tmp_path / "models")
    decoded = [decode_cpu(make_image_bytes(size=(64, 48), seed=i)) for i in range(4)]
    cfg = DecodingConfig(decoding="greedy", max_new_tokens=8)
    plain = load_captioner(ref, device="cuda")
    fast = load_captioner(ref, device="cuda", compile=True)
    assert fast.static_cache
    want = plain.caption(decoded, plain.prepare(cfg))
    assert fast.caption(decoded, fast.prepare(cfg)) == want
    assert fast.caption(decoded, fast.prepare(cfg)) == want  # the compiled step, reused
