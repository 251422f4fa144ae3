"""A convolutional stem for open_clip's ViT (capcurate/models/conv_stem.py): the same token grid, trained,
exported and loaded back through capcurate (train -> recaption with a CoCa), at every precision."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from train_fixtures import tiny_coca_config, write_shards

from capcurate.models import parse_model_ref
from capcurate.models.conv_stem import ConvStem, split_config
from capcurate.models.openclip_loader import load_openclip
from capcurate.stages.recaption import recaption
from capcurate.train import train


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_stem_gives_the_patch_embeddings_grid(patch):
    x = torch.randn(2, 3, 64, 64)
    plain = torch.nn.Conv2d(3, 48, patch, stride=patch, bias=False)
    assert ConvStem(48, patch)(x).shape == plain(x).shape == (2, 48, 64 // patch, 64 // patch)


def test_stem_needs_a_power_of_two_patch():
    with pytest.raises(ValueError, match="power-of-two"):
        ConvStem(48, 14)


def test_split_config_hides_the_key_from_open_clip():
    cfg = {"vision_cfg": {"patch_size": 8, "conv_stem": True}, "text_cfg": {}}
    plain, stem = split_config(cfg)
    assert stem and "conv_stem" not in plain["vision_cfg"] and cfg["vision_cfg"]["conv_stem"] is True


def test_conv_stem_coca_trains_exports_loads_and_captions(tmp_path, tiny_dataset):
    path = tiny_coca_config(tmp_path, "stem_coca")
    cfg = json.loads(path.read_text())
    cfg["vision_cfg"]["conv_stem"] = True
    path.write_text(json.dumps(cfg))
    write_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    run = tmp_path / "run"
    s = train(str(tmp_path / "shards"), str(run), model_config=str(path), loss="coca", batch_size=8, workers=0,
              max_steps=3)
    assert s.ok and s.counts["caption_loss"] > 0
    exported = json.loads((run / "model" / "open_clip_config.json").read_text())["model_cfg"]
    assert exported["vision_cfg"]["conv_stem"] is True
    fp32 = load_openclip(parse_model_ref(str(run)))
    assert isinstance(fp32.model.visual.conv1, ConvStem)
    # the trained stem came back, not a fresh one
    from safetensors.torch import load_file

    saved = load_file(str(run / "model" / "open_clip_model.safetensors"))
    torch.testing.assert_close(fp32.model.state_dict()["visual.conv1.layers.0.weight"],
                               saved["visual.conv1.layers.0.weight"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = fp32.model.encode_image(x)
        for precision in ("bf16", "fp16"):
            low = load_openclip(parse_model_ref(str(run)), precision=precision).model
            dtype = low.visual.conv1.layers[0].weight.dtype
            out = low.encode_image(x.to(dtype)).float()
            assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.98, precision
    r = recaption(tiny_dataset, model=str(run), name="stem", decoding="greedy", max_new_tokens=4, workers=0)
    assert r.ok and r.counts["images_captioned"] == 21
    caps = pq.read_table(tiny_dataset / "captions" / "stem").column("caption").to_pylist()
    assert any(c for c in caps)
