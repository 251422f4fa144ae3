"""capcurate train on shards it cannot open: a clear error instead of a hang, counted per-shard failures,
and an exported model that loads from any directory."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from http_fixtures import serve
from train_fixtures import tiny_clip_config, write_shards

from capcurate.train import train
from capcurate.train.data import ShardsUnreadable

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CAPCURATE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_train_on_unreachable_shards_fails_with_one_line_instead_of_hanging(tmp_path):
    # DataLoader worker processes (--workers 1): the error crosses the process boundary as one line
    cfg = tiny_clip_config(tmp_path)
    urls = f"http://127.0.0.1:{closed_port()}/{{0..1}}.tar"
    r = subprocess.run(
        [sys.executable, "-m", "capcurate", "train", urls, "-o", str(tmp_path / "run"), "--model-config", str(cfg),
         "--train-num-samples", "32", "--batch-size", "8", "--workers", "1", "--device", "cpu"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "none of the 2 training shards could be opened" in last and "could not connect" in last, last
    assert "Traceback" not in r.stderr
    assert "cannot open training shard" in r.stderr  # each failed open is logged


def test_train_skips_missing_shards_counts_them_and_trains_on_the_rest(tmp_path, caplog):
    write_shards(tmp_path / "shards", n_shards=2, per_shard=16)
    cfg = tiny_clip_config(tmp_path)
    with serve() as srv:
        for i, name in ((0, "00000.tar"), (2, "00001.tar")):  # 1.tar and 3.tar answer 404
            srv.add(f"/{i}.tar", (tmp_path / "shards" / name).read_bytes(), "application/x-tar")
        with caplog.at_level(logging.WARNING, logger="capcurate.train"):
            s = train(f"{srv.base}/{{0..3}}.tar", str(tmp_path / "run"), model_config=str(cfg), batch_size=8,
                      epochs=1, train_num_samples=32, workers=0, shuffle_buffer=1, device="cpu")
    assert s.ok and s.counts["steps"] == 4
    assert s.counts["shard_open_errors"] >= 2  # each pass over 1.tar and 3.tar fails once
    logged = [r.getMessage() for r in caplog.records if r.name == "capcurate.train"]
    assert len(logged) == 2  # logged once per shard, counted every time
    assert any("/1.tar: curl exit 22 (HTTP error status)" in m for m in logged)
    assert any("/3.tar: curl exit 22" in m for m in logged)


def test_train_on_missing_and_unreachable_mix_in_process_raises_shards_unreadable(tmp_path):
    cfg = tiny_clip_config(tmp_path)
    with serve() as srv:  # a live server that has none of the shards: every open is a 404
        with pytest.raises(ShardsUnreadable, match="none of the 3 training shards"):
            train(f"{srv.base}/{{0..2}}.tar", str(tmp_path / "run"), model_config=str(cfg), batch_size=8,
                  train_num_samples=32, workers=0, device="cpu")


def test_exported_model_loads_with_plain_open_clip_from_another_directory(tmp_path, monkeypatch):
    import open_clip
    import torch

    from capcurate.models.openclip_loader import export_openclip_dir

    tok_dir = tmp_path / "tok"
    _word_tokenizer(tok_dir)
    cfg = json.loads(tiny_clip_config(tmp_path).read_text())
    cfg["text_cfg"]["hf_tokenizer_name"] = str(tok_dir)
    model = open_clip.CLIP(**cfg)
    monkeypatch.chdir(tmp_path)
    export_openclip_dir(model, cfg, Path("runs/r/model"), tokenizer_dir=tok_dir)  # relative, as -o runs/r
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = json.loads((tmp_path / "runs/r/model/open_clip_config.json").read_text())
    assert Path(saved["model_cfg"]["text_cfg"]["hf_tokenizer_name"]).is_absolute()
    # plain open_clip, no capcurate code: its local-dir loader reads the exported weights and tokenizer
    loaded = open_clip.create_model("local-dir:" + str(tmp_path / "runs/r/model"), output_dict=True)
    mine, theirs = model.state_dict(), loaded.state_dict()
    assert set(theirs) == set(mine)
    for k, v in mine.items():
        assert torch.equal(theirs[k], v), k  # the weights themselves, not a fresh random init
    tokens = open_clip.get_tokenizer("local-dir:" + str(tmp_path / "runs/r/model"))(["a red square"])
    assert tokens[0, :3].tolist() == [3, 4, 5]  # the exported word-level tokenizer's ids
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)


def _word_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", "a", "red", "square"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                            eos_token="</s>").save_pretrained(str(d))
