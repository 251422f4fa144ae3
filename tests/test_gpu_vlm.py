"""A chat-template VLM on CUDA: its image processor runs on the GPU (captioners/vlm.py) and builds the same
inputs as on the CPU; the recaption stage's greedy captions equal transformers' own ``model.generate`` on
inputs the test builds itself with the model's processor (no capcurate code on that side).
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
                        precision="fp32", batch_size=4, workers=1, prompt=PROMPT)
    assert summary.ok, summary.message
    got = pq.read_table(ds / "captions" / "vlm" / "00000.parquet").column("caption").to_pylist()
    want = generate_directly(ref, decoded, PROMPT, "cuda", max_new_tokens=8)
    assert got == want and all(got), (got, want)


PROMPT = "Describe the image briefly."


def generate_directly(ref: str, images: list[torch.Tensor], prompt: str, device: str, *,
                      max_new_tokens: int) -> list[str]:
    """Greedy captions from transformers alone: the model's processor and chat template, ``model.generate``,
    the answer tokens decoded; one batch, left padding (as a batched caller must for a decoder-only model)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    path = ref[len("hf:"):]
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = Qwen2VLForConditionalGeneration.from_pretrained(path).to(device).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text] * len(images), padding=True, return_tensors="pt",
                       device=device).to(device)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    answers = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [" ".join(a.split()) for a in answers]


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
