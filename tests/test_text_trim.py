"""The trimmed text tower (capcurate.models.text_trim): same features, loss and gradients as the full one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from scorer_fixtures import TINY_OPENCLIP_CFG

from capcurate.models.text_trim import can_trim, enable_text_trim, pad_token_id, token_trimmer, trim_tokens

# a 32-token context, so the padding of these captions (at most 14 tokens) can be cut
CFG = {**TINY_OPENCLIP_CFG, "text_cfg": {**TINY_OPENCLIP_CFG["text_cfg"], "context_length": 32}}
CAPTIONS = ["a red square", "two small blue circles on the left of a big green triangle", "", "dog"]


def _model(tmp_path, name: str, cfg: dict):
    import open_clip

    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model(name, output_dict=True), open_clip.get_tokenizer(name)


def test_trim_tokens_keeps_every_used_column_and_rounds_up():
    t = torch.zeros(3, 32, dtype=torch.long)
    t[0, :5] = torch.tensor([49406, 10, 11, 12, 49407])
    t[1, :3] = torch.tensor([49406, 10, 49407])
    out = trim_tokens(t, pad_id=0, multiple=8)
    assert out.shape == (3, 8) and torch.equal(out, t[:, :8])
    assert trim_tokens(t, 0, multiple=1).shape == (3, 5)
    assert trim_tokens(torch.zeros(2, 16, dtype=torch.long), 0, multiple=4).shape == (2, 4)  # all padding
    full = torch.ones(2, 16, dtype=torch.long)
    assert trim_tokens(full, 0) is full  # nothing to cut: the same tensor, no copy
    # a tokenizer whose pad id outranks its EOT: argmax pooling must still find the same column
    odd = torch.full((1, 16), 9, dtype=torch.long)
    odd[0, :3] = torch.tensor([1, 4, 5])
    assert trim_tokens(odd, pad_id=9, multiple=1).shape == (1, 4)


def test_trimmed_features_match_the_full_context(tmp_path):
    model, tok = _model(tmp_path, "trim-tiny-clip", CFG)
    model.eval()
    tokens = tok(CAPTIONS)
    with torch.no_grad():
        full = model.encode_text(tokens)
    assert enable_text_trim(model) and enable_text_trim(model)  # idempotent
    short = trim_tokens(tokens, pad_token_id(tok))
    assert short.shape[1] == 16 < tokens.shape[1]
    with torch.no_grad():
        trimmed = model.encode_text(short)
        untrimmed = model.encode_text(tokens)  # the full context still works through the same method
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(untrimmed, full, atol=1e-6, rtol=1e-6)
    # the state dict is untouched: checkpoints stay open_clip's
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())


def test_trimmed_training_step_has_the_same_loss_and_gradients(tmp_path):
    from open_clip import ClipLoss

    ref, tok = _model(tmp_path, "trim-tiny-clip-train", CFG)
    fast = copy.deepcopy(ref)
    assert enable_text_trim(fast)
    images = torch.randn(len(CAPTIONS), 3, 32, 32)
    tokens = tok(CAPTIONS)
    loss_fn = ClipLoss()
    losses = []
    for model, text in ((ref, tokens), (fast, trim_tokens(tokens, pad_token_id(tok)))):
        out = model(images, text)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters(), strict=True):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("change", ["no_causal_mask", "last_pool"])
def test_towers_where_padding_matters_are_left_alone(tmp_path, change):
    cfg = copy.deepcopy(CFG)
    if change == "no_causal_mask":
        cfg["text_cfg"]["no_causal_mask"] = True
    else:
        cfg["text_cfg"]["pool_type"] = "last"
    model, _ = _model(tmp_path, f"trim-tiny-{change.replace('_', '-')}", cfg)
    assert not can_trim(model) and not enable_text_trim(model)
    assert "encode_text" not in vars(model)
    tokens = torch.zeros(2, 32, dtype=torch.long)
    assert token_trimmer(model, None)(tokens) is tokens  # what train and score apply: nothing here


def test_token_trimmer_is_what_train_and_score_apply(tmp_path):
    model, tok = _model(tmp_path, "trim-tiny-clip-trimmer", CFG)
    tokens = tok(CAPTIONS)
    assert torch.equal(token_trimmer(model, tok)(tokens), trim_tokens(tokens, pad_token_id(tok)))
    assert "encode_text" in vars(model)  # the model now takes the shorter batches
