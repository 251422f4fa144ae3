"""VLM families beyond tests/test_vlm.py (Gemma3, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT, InternVL, Mistral3, Llama 4,
SmolVLM) and what holds on real-world inputs: a refused image costs its row only, each processor's pixel
budget, truncation and token counts, Florence-2 tasks that are not captions."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import build_tiny_florence2, build_tiny_qwen2_vl
from conftest import build_dataset, make_image_bytes
from typer.testing import CliRunner
from vlm_family_fixtures import FAMILY_BUILDERS

from capcurate.cli import app
from capcurate.errors import InputError
from capcurate.images import decode_image
from capcurate.models.captioners import DecodingConfig, load_captioner
from capcurate.models.captioners.base import ImageCaptions, ImageRejected
from capcurate.models.captioners.generation import answer_lengths
from capcurate.models.captioners.pixel_budget import DEFAULT_MAX_PIXELS, apply_pixel_budget, snapshot
from capcurate.stages.batch_search import probe_image
from capcurate.stages.caption_retry import caption_rows
from capcurate.stages.recaption import recaption

FAMILIES = list(FAMILY_BUILDERS)
# the layout each model's own documentation passes: one list of images per prompt where the processor counts
# images per sample, a flat list otherwise
NESTED_IN_THEIR_DOCS = ("gemma3", "smolvlm")
PROMPT = "Caption it."  # short: a long prompt of byte tokens drowns a tiny model's image signal


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm-families")
    out = {k: build(root) for k, build in FAMILY_BUILDERS.items()}
    out["qwen2_vl"] = build_tiny_qwen2_vl(root)
    out["florence2"] = build_tiny_florence2(root)
    return out


@pytest.fixture(scope="module")
def caps(refs):
    return {k: load_captioner(ref) for k, ref in refs.items()}


def _u8(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _images(sizes=((40, 30), (64, 48), (30, 52))):
    return [decode_image(make_image_bytes(i, size=s)) for i, s in enumerate(sizes)]


def _their_generate(directory, family, images, **gen):
    """The model's own path: AutoProcessor + chat template + generate on the same batch, answer tokens only."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        add_generation_prompt=True, tokenize=False)
    imgs = [[im] for im in images] if family in NESTED_IN_THEIR_DOCS else images
    inputs = processor(images=imgs, text=[text] * len(images), padding=True, return_tensors="pt")
    # Llama 4's processor normalises in bfloat16; the model card casts to the model's dtype
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, **gen)
    return [" ".join(t.split()) for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                                skip_special_tokens=True)]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_captions_equal_its_own_generate_at_batch_3(refs, caps, family):
    cap = caps[family]
    images = _images()
    cfg = cap.prepare(DecodingConfig(decoding="greedy", max_new_tokens=6, prompt=PROMPT))
    ours = [c[0] for c in cap.caption([_u8(im) for im in images], cfg)]
    assert ours == _their_generate(refs[family][len("hf:"):], family, images, do_sample=False, num_beams=1)
    ids = cap.generate_ids([_u8(im) for im in images], cfg)  # tokens: random bytes may decode alike
    assert len({tuple(row.tolist()) for row in ids}) > 1  # the images reach the model


def test_image_nesting_is_asked_of_the_processor(caps):
    assert caps["gemma3"]._nested  # its processor counts images per sample: flat lists fail at batch > 1
    qwen = caps["qwen2_vl"]

    class FlatOnly:  # a processor that takes only a flat list of images
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, images, **kw):
            if isinstance(images[0], list):
                raise ValueError("nested lists are not supported")
            return self.inner(images=images, **kw)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    real = qwen.processor
    try:
        qwen.processor = FlatOnly(real)
        assert qwen._images_nested() is False
    finally:
        qwen.processor = real


def _refused_dataset(root):
    """12 images in 3 shards of 4; the sixth (shard 1) is a 3000x10 PNG the processor refuses."""
    samples = [{"caption": f"photo {i}", "image": make_image_bytes(i, size=(48, 40))} for i in range(12)]
    samples[5] = {"caption": "a strip", "image": make_image_bytes(5, size=(3000, 10), fmt="PNG")}
    return build_dataset(root, samples, per_shard=4)


@pytest.mark.parametrize("family", ["qwen2_vl", "mistral3"])
def test_a_refused_image_costs_its_row_not_its_batch_or_the_shards_it_spans(tmp_path, refs, family):
    ds = _refused_dataset(tmp_path / "ds")
    # batches of 8 span shards 0-1 and 1-2: before, the refusal failed every shard of its batch
    s = recaption(ds, model=refs[family], name="c", decoding="greedy", max_new_tokens=3, batch_size=8,
                  workers=0, device="cpu")
    assert s.ok and s.counts["shards_processed"] == 3 and not s.details.get("failed_shards")
    assert (s.counts["images_captioned"], s.counts["images_failed"]) == (11, 1)
    rows = pq.read_table(ds / "captions" / "c").to_pylist()
    bad = [r for r in rows if r["error"]]
    assert len(bad) == 1 and bad[0]["caption"] is None and bad[0]["error"].startswith("rejected by")
    assert all(r["caption"] is not None for r in rows if not r["error"])


class _Fake:
    """A captioner that refuses some images, or fails on every batch, counting its calls."""

    def __init__(self, refuse=(), broken=False):
        self.refuse, self.broken, self.calls = set(refuse), broken, 0

    def caption(self, batch, config, seeds=None):
        self.calls += 1
        if self.broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if self.refuse & set(batch):
            raise ImageRejected(f"rejected by Fake: image {sorted(self.refuse & set(batch))[0]}")
        return [[f"cap {i}"] for i in batch]


def test_a_failed_batch_is_halved_down_to_the_refused_image_and_a_broken_model_still_fails():
    fake = _Fake(refuse={37})
    rows = caption_rows(fake, list(range(64)), DecodingConfig(decoding="greedy"), {"chunk": 64})
    assert rows[37] == (None, "rejected by Fake: image 37")
    assert all(rows[i] == ([f"cap {i}"], None) for i in range(64) if i != 37)
    assert fake.calls <= 2 * 6 + 1  # halving: ~2 log2(64) calls, not 64
    with pytest.raises(RuntimeError, match="illegal memory access"):  # not 64 error rows: the shards fail
        caption_rows(_Fake(broken=True), list(range(8)), DecodingConfig(decoding="greedy"), {"chunk": 8})
    # a captioner that can screen a refused batch (the VLMs: one processor call per image) is not halved
    class Screening(_Fake):
        def screen(self, batch, config):
            return {j: f"rejected by Fake: image {i}" for j, i in enumerate(batch) if i in self.refuse}

    fake = Screening(refuse={3, 40})
    rows = caption_rows(fake, list(range(64)), DecodingConfig(decoding="greedy"), {"chunk": 64})
    assert [i for i, r in enumerate(rows) if r[0] is None] == [3, 40] and fake.calls == 2
    assert rows[41] == (["cap 41"], None)
    # a lone image the processor refuses is still that image's row
    assert caption_rows(_Fake(refuse={0}), [0], DecodingConfig(), {"chunk": 4}) == [
        (None, "rejected by Fake: image 0")]


def _image_tokens(cap, images, cfg):
    return int(cap.build_inputs(images, cfg)["attention_mask"].sum())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mistral3", "internvl", "llama4", "smolvlm"])
def test_max_pixels_sets_the_resolution_control_each_processor_has(caps, family):
    cap = caps[family]
    big = [_u8(decode_image(make_image_bytes(1, size=(200, 90))))]  # wide: tiling processors use 2 tiles
    full = cap.prepare(DecodingConfig(decoding="greedy"))
    assert cap.pixel_budget.source == "default"
    n_full = _image_tokens(cap, big, full)
    small = cap.prepare(DecodingConfig(decoding="greedy", max_pixels=32 * 32))
    assert cap.pixel_budget.source == "--max-pixels" and cap.pixel_budget.max_pixels <= 32 * 32
    assert _image_tokens(cap, big, small) < n_full
    assert cap.caption(big, small)[0][0] is not None
    cap.prepare(DecodingConfig(decoding="greedy"))  # each request starts from the processor's own settings
    assert _image_tokens(cap, big, full) == n_full


@pytest.mark.parametrize("family", ["gemma3", "llava_next"])
def test_max_pixels_is_refused_where_the_input_size_is_fixed(caps, family):
    with pytest.raises(InputError, match="no pixel budget"):
        caps[family].prepare(DecodingConfig(max_pixels=10000))
    with pytest.raises(InputError, match="--min-pixels"):
        caps["mistral3"].prepare(DecodingConfig(min_pixels=100))


def test_default_pixel_budget_lowers_qwens_own_and_batch_size_auto_probes_at_it(caps):
    from transformers import Qwen2VLImageProcessor

    ip = Qwen2VLImageProcessor()  # Qwen's own default: up to 12.8 MP (~16k image tokens) per image
    budget = apply_pixel_budget(ip, snapshot(ip), None, None, where="hf:x")
    assert budget.max_pixels == DEFAULT_MAX_PIXELS == ip.size.longest_edge
    ip2 = Qwen2VLImageProcessor()
    assert apply_pixel_budget(ip2, snapshot(ip2), 1024 * 1024, None, where="hf:x").max_pixels == 1024 * 1024
    qwen = caps["qwen2_5_vl"]
    qwen.prepare(DecodingConfig(max_pixels=200 * 200))
    assert probe_image(qwen).shape == (3, 200, 200)
    qwen.prepare(DecodingConfig())  # the tiny processor's own 3136 is below the default: kept
    assert probe_image(qwen).shape == (3, 56, 56)


def test_answer_lengths_count_tokens_and_cut_captions():
    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert answer_lengths(ids, {2}) == [(2, False), (5, True), (0, False)]
    caps = ImageCaptions(["a", "b"], [3, 5], 1)
    assert caps == ["a", "b"] and caps.tokens == [3, 5] and caps.truncated == 1


def test_dense_with_few_tokens_warns_and_the_summary_counts_cut_captions_and_tokens_per_second(tiny_dataset, refs):
    r = CliRunner().invoke(app, ["recaption", str(tiny_dataset), "--model", refs["qwen2_vl"], "--name", "d",
                                 "--style", "dense", "--decoding", "greedy", "--max-new-tokens", "4",
                                 "--min-new-tokens", "4", "--workers", "0", "--batch-size", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["counts"]["captions_truncated"] == 21 and out["counts"]["tokens_generated"] == 21 * 4
    assert out["details"]["tokens_per_second"] > 0
    assert "--style dense with --max-new-tokens 4" in out["details"]["warnings"][0]
    assert out["details"]["pixel_budget"]["source"] == "default"


def test_florence2_tasks_that_are_not_captions_are_refused_with_exit_2(tiny_dataset, refs, caps):
    for task in ("<OD>", "<CAPTION_TO_PHRASE_GROUNDING>a dog"):
        r = CliRunner().invoke(app, ["recaption", str(tiny_dataset), "--model", refs["florence2"], "--name", "f",
                                     "--prompt", task, "--workers", "0"])
        last = r.output.strip().splitlines()[-1]
        assert r.exit_code == 2 and last.startswith("error:") and "not a caption" in last, r.output
    assert caps["florence2"].prepare(DecodingConfig(prompt="<DETAILED_CAPTION>")).prompt == "<DETAILED_CAPTION>"


def test_a_processor_missing_its_package_is_a_one_line_load_error(refs, tiny_dataset, monkeypatch):
    import transformers.models.smolvlm.processing_smolvlm as smolvlm

    monkeypatch.setattr(smolvlm, "num2words", None)  # as where num2words is not installed
    r = CliRunner().invoke(app, ["recaption", str(tiny_dataset), "--model", refs["smolvlm"], "--name", "s"])
    assert r.output.strip(), (r.exit_code, repr(r.exception), r.stderr_bytes)
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 4 and last.startswith("error:") and "num2words" in last and "capcurate[vlm]" in last
