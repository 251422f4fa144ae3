"""capcurate train on a CUDA GPU: every precision with --decode gpu and cpu, nvJPEG against the CPU decode,
and the step statistics' reduce on a (1-rank) NCCL process group. Tiny models; well under a minute.

Marked ``gpu``: skipped where no CUDA GPU is visible.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from train_fixtures import tiny_clip_config, write_textured_shards

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_train")
    # textured JPEGs of several sizes, every 5th a PNG (decoded in the worker), every 11th truncated
    write_textured_shards(root / "shards", 4, 12, png_every=5, corrupt_every=11)
    return {"shards": root / "shards", "clip": tiny_clip_config(root), "root": root}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize(("precision", "decode", "workers"), [
    ("fp32", "gpu", 1), ("bf16", "gpu", 0), ("fp16", "gpu", 0),
    ("fp32", "cpu", 0), ("bf16", "cpu", 1), ("fp16", "cpu", 0),
])
def test_trains_on_cuda(shards, precision, decode, workers):
    from capcurate.train import train

    run = shards["root"] / f"run_{precision}_{decode}"
    s = train(str(shards["shards"]), str(run), model_config=str(shards["clip"]), batch_size=8, lr=1e-3,
              precision=precision, decode=decode, workers=workers, max_steps=4, device="cuda", log_every=2,
              shuffle_buffer=0, shuffle_shards=False)
    assert s.ok and s.counts["steps"] == 4
    rec = json.loads((run / "run.json").read_text())
    assert rec["image_path"] == decode and rec["config"]["device"] == "cuda"
    assert rec["config"]["precision"] == precision
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["loss"] == r["loss"] and r["loss"] < 1e3 for r in rows)
    assert rows[-1]["skipped"] >= 1  # the first shard's truncated JPEG (sample 10)


@pytest.mark.parametrize("decode", ["gpu", "cpu"])
def test_loss_decreases_on_cuda(tmp_path, decode):
    """The CPU test's learnable task (solid colours captioned with their colour, tests/test_train.py) at the
    GPU's default precision: the mean of the last 3 of 12 losses under 0.7x the first 3's."""
    from train_fixtures import write_shards

    from capcurate.train import train

    write_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    run = tmp_path / "run"
    s = train(str(tmp_path / "shards"), str(run), model_config=str(tiny_clip_config(tmp_path)), batch_size=16,
              epochs=3, lr=2e-3, workers=0, decode=decode, device="cuda")
    assert s.ok and s.counts["steps"] == 12
    rec = json.loads((run / "run.json").read_text())
    assert rec["image_path"] == decode and rec["config"]["precision"] in ("bf16", "fp16")
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_auto_defaults_pick_the_gpu(shards):
    from capcurate.train.config import TrainConfig

    cfg = TrainConfig(data="d", output="o").resolved()
    assert cfg.device == "cuda" and cfg.decode == "gpu"
    assert cfg.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")


def test_nvjpeg_decodes_like_libjpeg_turbo(tmp_path):
    """The decoder alone. Without chroma subsampling (4:4:4) only the IDCT's rounding differs: a few levels
    at most. With 4:2:0 (most web JPEGs) the chroma upsampling differs too (libjpeg-turbo's triangle filter
    against nvJPEG's), which on noisy chroma moves single pixels by tens of levels, so there the bound is
    torchvision's own for nvJPEG (mean < 2). Bounds derived, not yet measured on a GPU here."""
    import io

    import numpy as np
    from PIL import Image

    from capcurate.inputs.decode import as_tensor, decode_cpu, decode_jpegs_gpu

    rng = np.random.default_rng(0)
    for subsampling, worst in ((0, 8), (2, None)):
        datas = []
        for w, h in ((48, 40), (64, 64), (97, 33)):
            x = np.linspace(0, 255, w)[None, :, None] + rng.normal(0, 25, (h, w, 3))
            buf = io.BytesIO()
            Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, subsampling=subsampling)
            datas.append(buf.getvalue())
        on_gpu = decode_jpegs_gpu([as_tensor(d) for d in datas], torch.device("cuda"))
        for data, img in zip(datas, on_gpu, strict=True):
            assert not isinstance(img, str) and img.is_cuda, img
            diff = (img.cpu().float() - decode_cpu(data).float()).abs()
            assert diff.mean() < 2, (subsampling, float(diff.mean()))
            if worst is not None:
                assert diff.max() <= worst, (subsampling, float(diff.max()))


def test_nvjpeg_batches_match_the_cpu_decode(shards):
    """The same packed batch (JPEG bytes + boxes, PNGs as uint8) decoded on the GPU and on the CPU: nvJPEG's
    IDCT and 4:2:0 chroma upsampling and the GPU resize differ from libjpeg-turbo's. On these noisy
    textures (sigma 25 per channel) the upsampling difference is about a quarter of a chroma step
    between neighbours (sigma ~6 levels in RGB), so single pixels reach ~25 levels (4 sigma) while the
    mean stays under 3 and 99% of pixels within 16. A shifted crop box or a wrong colour conversion moves
    the mean by 20 or more. Bounds derived, not yet measured on a GPU here."""
    import open_clip

    from capcurate.train.data import TrainStream
    from capcurate.train.gpu_batches import CropAug, assemble_batch

    transform = open_clip.image_transform(32, is_train=True)
    aug = CropAug.from_transform(transform)
    urls = sorted(str(p) for p in shards["shards"].glob("*.tar"))
    stream = TrainStream(urls, 12, 3, transform, lambda t: list(t), num_workers=1, shuffle_buffer=0,
                         mode="gpu", aug=aug)
    n_jpeg = 0
    for packed, _, _ in stream:
        n_jpeg += len(packed["jpeg_pos"])
        on_cpu, f_cpu = assemble_batch(packed, aug, "cpu")
        on_gpu, f_gpu = assemble_batch(packed, aug, torch.device("cuda"))
        assert on_gpu.is_cuda and f_cpu == f_gpu == 0
        std = torch.tensor(aug.std).view(1, 3, 1, 1)
        diff = ((on_gpu.cpu() - on_cpu) * std * 255).abs()
        p99 = float(diff.flatten().quantile(0.99))
        assert diff.mean() < 3 and p99 <= 16 and diff.max() <= 40, (float(diff.mean()), p99, float(diff.max()))
    assert n_jpeg > 20


def test_step_stats_reduce_on_a_nccl_group_and_training_under_it(shards):
    """With a process group up (1 rank, NCCL), the trainer's read-back all-reduces CUDA tensors; a whole
    training run under that group goes through the same path."""
    import torch.distributed as tdist

    from capcurate.train import train
    from capcurate.train.distributed import DistInfo, collective_device
    from capcurate.train.step_stats import NO_BAD_STEP, StepStats, reduce_step_stats

    dev = torch.device("cuda", torch.cuda.current_device())
    tdist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        info = DistInfo(device=dev)
        assert collective_device(info) == dev
        stats = StepStats(dev, accum=2)
        stats.add({"contrastive_loss": torch.tensor(1.0, device=dev)})
        stats.add({"contrastive_loss": torch.tensor(2.0, device=dev)})
        stats.end_step(7)
        terms, skipped, bad, extra = reduce_step_stats(info, stats.terms, 3, stats.bad_step,
                                                       {"scale": torch.tensor(2.0, device=dev)})
        assert terms == {"contrastive_loss": 1.5} and skipped == 3 and bad == NO_BAD_STEP and extra == {"scale": 2.0}
        stats.add({"contrastive_loss": torch.tensor(float("inf"), device=dev)})
        stats.end_step(8)
        assert reduce_step_stats(info, stats.terms, 0, stats.bad_step)[2] == 8

        run = shards["root"] / "run_nccl"
        s = train(str(shards["shards"]), str(run), model_config=str(shards["clip"]), batch_size=8,
                  precision="bf16", workers=0, max_steps=2, device="cuda")
        assert s.ok and s.counts["steps"] == 2
    finally:
        tdist.destroy_process_group()


def test_optimizer_is_fused_on_cuda_and_the_reference_loop_on_cpu():
    from capcurate.train.config import TrainConfig
    from capcurate.train.model_setup import build_optimizer

    cfg = TrainConfig(data="", output="")
    gpu = build_optimizer(torch.nn.Linear(4, 4).cuda(), cfg)
    cpu = build_optimizer(torch.nn.Linear(4, 4), cfg)
    assert gpu.defaults["fused"] is True and not cpu.defaults.get("fused")
    model = torch.nn.Linear(4, 4).cuda()
    opt = build_optimizer(model, cfg)
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    opt.step()
