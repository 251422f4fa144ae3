"""The packed text tower (capcurate.models.text_pack): open_clip's features, loss and gradients without padding."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from scorer_fixtures import TINY_OPENCLIP_CFG

from capcurate.models.text_pack import can_pack, caption_lengths, enable_text_pack, pack_layout

ROOT = Path(__file__).resolve().parents[1]
# two layers and four heads, so cross-caption leaks through attention would show in the second layer
CFG = {**TINY_OPENCLIP_CFG, "text_cfg": {**TINY_OPENCLIP_CFG["text_cfg"], "context_length": 32, "layers": 2,
                                         "heads": 4}}
# one caption cut at the context (EOT in the last column), one empty, others of varied length
CAPTIONS = ["a red square", "two small blue circles on the left of a big green triangle", "", "dog " * 40,
            "photo", "the new sale of a blue photo"]


def _lengths_module():
    spec = importlib.util.spec_from_file_location("caption_lengths", ROOT / "benchmarks" / "caption_lengths.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(tmp_path, name: str, cfg: dict):
    import open_clip

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, output_dict=True), open_clip.get_tokenizer(name)


def test_pack_layout_keeps_each_caption_up_to_its_end_token_with_positions_from_zero():
    tokens = torch.tensor([[9, 5, 99, 0, 0], [9, 99, 0, 0, 0], [9, 4, 4, 4, 99]])
    lengths = caption_lengths(tokens, "argmax")
    assert lengths.tolist() == [3, 2, 5]
    layout = pack_layout(lengths, tokens.shape[1])
    assert layout.rows.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    assert layout.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3, 4]
    assert layout.pooled.tolist() == [2, 4, 9] and layout.longest == 5
    assert tokens.view(-1)[layout.flat].tolist() == [9, 5, 99, 9, 99, 9, 4, 4, 4, 99]  # no padding kept
    assert caption_lengths(torch.tensor([[1, 7, 3, 7, 0]]), "eos", eos_id=7).tolist() == [2]  # first eos


@pytest.mark.parametrize("attention", ["sdpa", "flex"])
def test_packed_features_equal_open_clips_padded_ones(tmp_path, attention):
    model, tok = _model(tmp_path, f"pack-tiny-{attention}", CFG)
    model.eval()
    tokens = tok(CAPTIONS)
    with torch.no_grad():
        full = model.encode_text(tokens)
        packed_model = copy.deepcopy(model)
        assert enable_text_pack(packed_model, attention) and enable_text_pack(packed_model, attention)
        packed = packed_model.encode_text(tokens)
        narrow = packed_model.encode_text(tokens[:, :24])  # a trimmed batch: the captions that fit pack the same
    torch.testing.assert_close(packed, full, atol=2e-6, rtol=1e-5)
    keep = tokens[:, 24:].eq(0).all(dim=1)  # rows whose caption fits in 24 columns
    torch.testing.assert_close(narrow[keep], full[keep], atol=2e-6, rtol=1e-5)
    assert set(packed_model.state_dict()) == set(model.state_dict())  # checkpoints stay open_clip's


@pytest.mark.parametrize("attention", ["sdpa", pytest.param("flex", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="FlexAttention has no backward on the CPU"))])
def test_packed_training_step_has_open_clips_loss_and_gradients(tmp_path, attention):
    from open_clip import ClipLoss

    ref, tok = _model(tmp_path, f"pack-tiny-train-{attention}", CFG)
    fast = copy.deepcopy(ref)
    assert enable_text_pack(fast, attention)
    torch.manual_seed(1)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    tokens = tok(CAPTIONS)
    losses = []
    for model in (ref, fast):
        out = model(images, tokens)
        loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    text_grads = 0
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        text_grads += name.startswith(("transformer.", "token_embedding", "positional_embedding", "ln_final",
                                       "text_projection"))
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert text_grads >= 10  # the text tower's parameters were compared, not skipped


def test_positional_rows_past_every_caption_get_no_gradient_as_in_open_clip(tmp_path):
    """Packing must not touch positions no caption reaches: their positional rows' gradients stay 0."""
    model, tok = _model(tmp_path, "pack-tiny-pos", CFG)
    assert enable_text_pack(model)
    out = model(torch.randn(2, 3, 32, 32), tok(["a red square", "photo"]))
    (out["text_features"].sum() + out["image_features"].sum()).backward()
    g = model.positional_embedding.grad
    assert g[:5].abs().sum() > 0 and g[5:].abs().sum() == 0  # "a red square" is 5 tokens with start/end


@pytest.mark.parametrize("change", ["no_causal_mask", "last_pool"])
def test_towers_packing_cannot_reproduce_are_left_alone(tmp_path, change):
    cfg = copy.deepcopy(CFG)
    if change == "no_causal_mask":
        cfg["text_cfg"]["no_causal_mask"] = True
    else:
        cfg["text_cfg"]["pool_type"] = "last"
    model, _ = _model(tmp_path, f"pack-tiny-{change.replace('_', '-')}", cfg)
    assert not can_pack(model) and not enable_text_pack(model)
    assert "encode_text" not in vars(model)


def test_datacomp_like_lengths_have_the_documented_mean_and_77_token_tail():
    mod = _lengths_module()
    lengths = mod.datacomp_like_lengths(200_000, seed=0)
    assert lengths.min() >= mod.MIN_TOKENS and lengths.max() == 77
    assert abs((lengths == 77).double().mean().item() - mod.TAIL_AT_CAP) < 0.002
    assert 13.5 < lengths.double().mean().item() < 15.5  # ~15 before the cap folds the tail onto 77
    batches = lengths[: 512 * 200].view(200, 512)
    assert (batches.max(dim=1).values == 77).double().mean() > 0.99  # a 512 batch almost always runs 77
    tokens = mod.datacomp_like_tokens(64, seed=1)
    assert torch.equal(caption_lengths(tokens, "argmax"), mod.datacomp_like_lengths(64, seed=1))
