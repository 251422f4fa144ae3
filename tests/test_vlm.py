"""Chat-template VLM captioners (tiny random Qwen2-VL, LLaVA, Idefics3, PaliGemma, Florence-2): the captioner
equals the model's own processor + generate, prompts condition the answer, only the answer is stored."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from captioner_fixtures import VLM_BUILDERS, build_tiny_blip
from conftest import make_image_bytes
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.errors import InputError
from capcurate.images import decode_image
from capcurate.models.captioners import DEFAULT_INSTRUCTIONS, DecodingConfig, load_captioner
from capcurate.stages.recaption import recaption

FAMILIES = list(VLM_BUILDERS)
SHORT = "Describe this image in one sentence."
OTHER = "What colour is the background? Answer with one word."
PLAIN = {"paligemma": ("caption en", "describe en"), "florence2": ("<CAPTION>", "<MORE_DETAILED_CAPTION>")}


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {k: build(root) for k, build in VLM_BUILDERS.items()}


@pytest.fixture(scope="module")
def captioners(vlms):
    return {k: load_captioner(ref) for k, ref in vlms.items()}


def _pil_images(n=3):
    sizes = [(40, 30), (64, 48), (30, 52)]  # different sizes: Qwen2-VL gives them different token counts
    return [decode_image(make_image_bytes(i, size=sizes[i % 3])) for i in range(n)]


def _u8(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).contiguous()


def _prompts(family):
    return PLAIN.get(family, (SHORT, OTHER))


def _reference(directory, family, images, prompt, max_new_tokens, **gen):
    """The model's own path: AutoProcessor + chat template + generate on the same batch, answer tokens only."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    text = prompt
    if processor.chat_template:
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True, tokenize=False)
    imgs = [[im] for im in images] if family == "idefics3" else images
    inputs = processor(images=imgs, text=[text] * len(images), padding=True, return_tensors="pt")
    inputs.pop("labels", None)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, **gen)
    new = out if model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1]:]
    return [" ".join(t.split()) for t in processor.batch_decode(new, skip_special_tokens=True)], text


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_greedy_equals_the_models_own_generate_and_stores_the_answer_only(vlms, captioners, family):
    cap = captioners[family]
    assert cap.input_kind == "images" and cap.backend == "transformers-vlm"
    images = _pil_images()
    prompt = _prompts(family)[0]
    cfg = cap.prepare(DecodingConfig(decoding="greedy", max_new_tokens=6, prompt=prompt))
    ours = [c[0] for c in cap.caption([_u8(im) for im in images], cfg)]
    theirs, template = _reference(vlms[family][len("hf:"):], family, images, prompt, 6, do_sample=False,
                                  num_beams=1)
    assert ours == theirs
    assert any(ours) and len(set(ours)) > 1  # not empty, and the images matter
    assert cap.describe_request(cfg)["template_text"] == template
    for c in ours:  # the templated prompt is never echoed into the caption
        assert prompt not in c and "assistant" not in c.lower() and "<image>" not in c


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_prompts_condition_the_caption_and_beams_differ(captioners, family):
    cap = captioners[family]
    images = [_u8(im) for im in _pil_images(2)]
    a, b = (cap.caption(images, cap.prepare(DecodingConfig(decoding="greedy", max_new_tokens=6, prompt=p)))
            for p in _prompts(family))
    assert a != b  # the instruction reaches the model
    beam = DecodingConfig(decoding="beam", num_beams=3, num_captions=2, max_new_tokens=6, prompt=_prompts(family)[0])
    assert all(len(per) == 2 for per in cap.caption(images, beam))
    ids = cap.generate_ids(images, beam)  # compared as tokens: random bytes may decode to the same U+FFFD
    assert all(not torch.equal(ids[2 * i], ids[2 * i + 1]) for i in range(len(images)))


@pytest.mark.parametrize("family", ["qwen2_vl", "florence2"])
def test_vlm_max_new_tokens_is_honoured(captioners, family):
    cap = captioners[family]
    images = [_u8(im) for im in _pil_images(2)]
    for n in (3, 7):
        cfg = cap.prepare(DecodingConfig(decoding="greedy", max_new_tokens=n, min_new_tokens=n))
        ids = cap.generate_ids(images, cfg)
        real = (ids != cap.tokenizer.pad_token_id).sum(-1)
        start = 1 if cap.encoder_decoder else 0  # an encoder-decoder's answer starts with its start token
        assert int(real.max()) - start <= n and ids.shape[1] - start == n


def test_vlm_style_defaults_system_turn_and_pixel_budget(captioners):
    qwen = captioners["qwen2_vl"]
    dense = qwen.prepare(DecodingConfig(style="dense", system="You caption images for CLIP."))
    text = qwen.describe_request(dense)["template_text"]
    assert DEFAULT_INSTRUCTIONS["dense"] in text and "You caption images for CLIP." in text
    assert qwen.prepare(DecodingConfig()).prompt == DEFAULT_INSTRUCTIONS["short"]
    assert captioners["paligemma"].prepare(DecodingConfig(style="dense")).prompt == "describe en"
    assert captioners["florence2"].prepare(DecodingConfig()).prompt == "<CAPTION>"
    big = [_u8(decode_image(make_image_bytes(1, size=(200, 150))))]
    cfg = qwen.prepare(DecodingConfig(decoding="greedy", max_new_tokens=2, max_pixels=56 * 56, min_pixels=28 * 28))
    small_tokens = qwen.build_inputs(big, cfg)["image_grid_thw"].prod()
    qwen.prepare(DecodingConfig(max_pixels=112 * 112))
    assert qwen.build_inputs(big, cfg)["image_grid_thw"].prod() > small_tokens
    with pytest.raises(InputError, match="no pixel budget"):
        captioners["llava"].prepare(DecodingConfig(max_pixels=10000))
    with pytest.raises(InputError, match="--system needs a chat template"):
        captioners["paligemma"].prepare(DecodingConfig(system="be brief"))
    with pytest.raises(InputError, match="cannot be combined with --prompt"):
        DecodingConfig(style="short", prompt="hi")
    with pytest.raises(InputError, match="--style must be one of"):
        DecodingConfig(style="long")


def test_vlm_recaption_through_the_cli_records_template_and_is_batch_independent(vlms, tiny_dataset):
    ref = vlms["qwen2_vl"]
    runner = CliRunner()
    base = ["recaption", str(tiny_dataset), "--model", ref, "--max-new-tokens", "5", "--workers", "1"]
    r = runner.invoke(app, [*base, "--name", "qd", "--decoding", "greedy", "--style", "dense",
                            "--system", "You caption images.", "--max-pixels", "3136", "--min-pixels", "784",
                            "--batch-size", "4", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout.strip().splitlines()[-1])["counts"]["images_captioned"] == 21
    rows = pq.read_table(tiny_dataset / "captions" / "qd").to_pylist()
    ok = [x for x in rows if x["error"] is None]
    assert len(ok) == 21 and all(x["caption"] == x["captions"][0] for x in ok)
    (entry,) = Dataset(tiny_dataset).card.lineage("captions", "qd")
    assert entry["parameters"]["style"] == "dense" and entry["parameters"]["max_pixels"] == 3136
    assert entry["model"]["class"] == "Qwen2VLForConditionalGeneration"
    assert DEFAULT_INSTRUCTIONS["dense"] in entry["model"]["template_text"]
    assert "You caption images." in entry["model"]["template_text"]
    assert entry["model"]["generate_kwargs"]["max_new_tokens"] == 5
    budget = entry["model"]["pixel_budget"]
    assert (budget["min_pixels"], budget["max_pixels"], budget["source"]) == (784, 3136, "--max-pixels")
    # sampling: each image draws from a hash of (seed, uid), so batch size and order do not matter
    kw = dict(model=ref, decoding="nucleus", top_p=0.9, temperature=1.5, num_captions=2, max_new_tokens=5,
              workers=0)
    recaption(tiny_dataset, name="s3", batch_size=3, **kw)
    recaption(tiny_dataset, name="s8", batch_size=8, **kw)
    s3, s8 = ({x["uid"]: x["captions"] for x in pq.read_table(tiny_dataset / "captions" / n).to_pylist()}
              for n in ("s3", "s8"))
    assert s3 == s8 and len({c for v in s3.values() if v for c in v}) > 5


def test_vlm_options_on_pixel_captioners_are_one_line_errors(tmp_path, tiny_dataset, vlms):
    blip = build_tiny_blip(tmp_path)
    runner = CliRunner()
    for extra, msg in ((["--style", "dense"], "--style needs a chat-template VLM"),
                       (["--system", "x"], "--system needs a chat-template VLM"),
                       (["--max-pixels", "0"], "--max-pixels must be a positive")):
        r = runner.invoke(app, ["recaption", str(tiny_dataset), "--model", blip, "--name", "b", *extra])
        last = r.output.strip().splitlines()[-1]  # (earlier lines: transformers' loading progress)
        assert r.exit_code == 2 and last.startswith("error:") and msg in last, r.output
    with pytest.raises(InputError, match="--compile: transformers cannot compile the decoding step"):
        load_captioner(vlms["idefics3"], compile=True)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "florence2"])
def test_vlm_compile_is_a_static_kv_cache_with_the_same_captions(vlms, captioners, family):
    """--compile on a VLM: a static KV cache (transformers compiles the decoding step around it on a GPU;
    on the CPU it runs eagerly), greedy captions unchanged; beam search keeps the dynamic cache."""
    fast = load_captioner(vlms[family], compile=True)
    assert fast.static_cache and fast.describe()["kv_cache"] == "static"
    images = [_u8(im) for im in _pil_images(3)]
    cfg = fast.prepare(DecodingConfig(decoding="greedy", max_new_tokens=6))
    kw = fast.describe_request(cfg)["generate_kwargs"]
    assert kw["cache_implementation"] == "static"
    assert fast.caption(images, cfg) == captioners[family].caption(images, captioners[family].prepare(cfg))
    beam = fast.describe_request(fast.prepare(DecodingConfig(decoding="beam", num_beams=2)))["generate_kwargs"]
    assert "cache_implementation" not in beam


def test_a_resume_with_another_request_to_the_model_is_refused(vlms, tiny_dataset):
    """Same parameters, but the earlier run's processor kept its own resolution (recorded by a capcurate
    without a default pixel budget) or was set to another budget: the rest of the shards would be captioned
    at another resolution under the same name, so the resume is refused (exit 3) until the budget matches.
    Another template text (a chat template that writes today's date) does not refuse it."""
    from capcurate.card import Card

    base = ["recaption", str(tiny_dataset), "--model", vlms["qwen2_vl"], "--name", "q", "--max-new-tokens", "3",
            "--workers", "0", "--decoding", "greedy"]
    assert (r := CliRunner().invoke(app, [*base, "--part", "0/3"])).exit_code == 0, r.output
    card = Card(tiny_dataset)
    (entry,) = card.lineage("captions", "q")
    recorded = dict(entry["model"])
    other = {**recorded["pixel_budget"], "max_pixels": recorded["pixel_budget"]["max_pixels"] * 2}
    for edit, why in ((lambda m: m.pop("pixel_budget"), "pixel_budget (earlier: the processor's own)"),
                      (lambda m: m.update(pixel_budget=other), "pixel_budget")):
        with card.editing() as c:
            m = dict(recorded)
            edit(m)
            next(e for e in c["lineage"] if e["id"] == entry["id"])["model"] = m
        r = CliRunner().invoke(app, [*base, "--part", "1/3"])
        errors = [x for x in r.output.splitlines() if x.startswith("error:")]  # (transformers' load bar aside)
        assert r.exit_code == 3 and len(errors) == 1 and why in errors[0], r.output
    with card.editing() as c:   # the same budget, another template text (today's date): resumed
        next(e for e in c["lineage"] if e["id"] == entry["id"])["model"] = {
            **recorded, "template_text": recorded["template_text"] + " Today Date: 1 Jan 2026"}
    assert (r := CliRunner().invoke(app, [*base, "--part", "1/3"])).exit_code == 0, r.output
