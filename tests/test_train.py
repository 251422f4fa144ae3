"""capcurate train: the loop, the data pipeline, resume, DDP, bad input (tiny CPU models, seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from train_fixtures import (
    textured_image,
    tiny_clip_config,
    tiny_coca_config,
    write_eval_set,
    write_shards,
    write_textured_shards,
)
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.errors import InputError, OutputExistsError, StageFailed
from capcurate.train import train
from capcurate.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# CPU tests on any machine: device/precision auto would pick cuda + bf16 where a GPU is visible
SUBPROCESS_ENV = {**os.environ, "CAPCURATE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run ~10x faster on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "loss" in r]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run)]


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    write_shards(tmp_path / "shards", n_shards=4, per_shard=16)
    return {"shards": tmp_path / "shards", "clip": tiny_clip_config(tmp_path), "root": tmp_path}


def test_train_loss_decreases_on_tiny_dataset(tiny):
    run = tiny["root"] / "run"
    s = train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, epochs=3,
              lr=2e-3, workers=0)
    assert s.ok and s.counts["steps"] == 12 and s.counts["samples_seen"] == 192
    ls = losses(run)
    assert len(ls) == 12
    assert sum(ls[-3:]) / 3 < 0.7 * sum(ls[:3]) / 3, ls
    rows = metrics(run)
    assert {"step", "loss", "contrastive_loss", "lr", "samples_per_s", "logit_scale"} <= set(rows[0])
    assert (run / "model" / "open_clip_config.json").is_file()
    assert (run / "checkpoints").is_dir() and json.loads((run / "run.json").read_text())["total_steps"] == 12


def test_train_cli_writes_a_run_that_eval_loads(tiny):
    run, evalset = tiny["root"] / "run", write_eval_set(tiny["root"] / "eval")
    r = CliRunner().invoke(app, ["train", str(tiny["shards"] / "manifest.json"), "-o", str(run), "--model-config",
                                 str(tiny["clip"]), "--batch-size", "16", "--epochs", "2", "--lr", "2e-3",
                                 "--workers", "2", "--eval-data", str(evalset), "--eval-every", "4", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["stage"] == "train" and out["counts"]["steps"] == 8
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [4, 8]
    r = CliRunner().invoke(app, ["eval", str(run), "--data", str(evalset), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["details"]["results"]
    assert {x["task"] for x in res} == {"zeroshot_classification", "zeroshot_retrieval"}
    # the last in-training eval ran on the exported weights through the same input pipeline: same metrics
    last = evals[-1]["eval"]
    for x in res:
        assert last[x["task"]] == pytest.approx(x["metrics"], abs=1e-6), x["task"]


def test_in_training_eval_runs_on_the_shared_input_stream(tiny):
    """Its image batches come from the one input pipeline (which announces them), not a serial PIL loop."""
    from capcurate import events

    evalset = write_eval_set(tiny["root"] / "eval")
    seen: list[tuple[str, int]] = []
    with events.listening(lambda kind, n: seen.append((kind, n))):
        train(str(tiny["shards"]), str(tiny["root"] / "run"), model_config=str(tiny["clip"]), batch_size=16,
              workers=0, max_steps=2, eval_data=str(evalset), eval_every=2)
    steps = [n for kind, n in seen if kind == "step"]
    eval_images = sum(n for kind, n in seen if kind == "batch")
    assert len(steps) == 2 and eval_images > 0, seen


def test_existing_run_is_refused_without_resume_or_overwrite(tiny):
    run = tiny["root"] / "run"
    opts = dict(model_config=str(tiny["clip"]), batch_size=16, workers=0, max_steps=1)
    train(str(tiny["shards"]), str(run), **opts)
    with pytest.raises(OutputExistsError, match="--resume latest"):
        train(str(tiny["shards"]), str(run), **opts)
    assert train(str(tiny["shards"]), str(run), overwrite=True, **opts).ok


def test_resume_after_kill_reproduces_the_uninterrupted_run(tiny):
    opts = ["--model-config", str(tiny["clip"]), "--batch-size", "8", "--epochs", "1", "--lr", "2e-3",
            "--workers", "2", "--shuffle-buffer", "20", "--save-every", "3", "--warmup", "2"]
    full = tiny["root"] / "full"
    r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(full), *opts])
    assert r.exit_code == 0, r.output
    killed = tiny["root"] / "killed"
    env = {**SUBPROCESS_ENV, "CAPCURATE_TRAIN_KILL_AT_STEP": "5"}
    p = subprocess.run([sys.executable, "-m", "capcurate", "train", str(tiny["shards"]), "-o", str(killed), *opts],
                       env=env, cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == -9, p.stderr[-2000:]
    assert max(r["step"] for r in metrics(killed)) == 5  # logged past the last checkpoint (step 3)
    # step 3 is mid-epoch (8 steps per epoch) with an odd number of batches consumed: the worker
    # rotation and each worker's raw position in its shuffle buffer must both be restored
    r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(killed), *opts, "--resume", "latest"])
    assert r.exit_code == 0, r.output
    a, b = metrics(full), metrics(killed)
    assert [x["step"] for x in b] == list(range(1, 9))
    assert [(x["step"], x["loss"], x["lr"]) for x in a] == [(x["step"], x["loss"], x["lr"]) for x in b]


def test_resume_with_another_architecture_is_refused_naming_both(tiny):
    run = tiny["root"] / "run"
    train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, workers=0, max_steps=1)
    cfg = json.loads(tiny["clip"].read_text())
    cfg["embed_dim"] = 48
    other = tiny["root"] / "wider_clip.json"
    other.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="'tiny_clip'.*'wider_clip'"):
        train(str(tiny["shards"]), str(run), model_config=str(other), batch_size=16, workers=0, resume="latest")


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny):
    run = tiny["root"] / "run"
    with pytest.raises(StageFailed, match=r"at step (\d+).*step_0+1\b") as e:
        train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, workers=0,
              lr=1e30, grad_clip=None, save_every=1, keep_checkpoints=0)
    nan_step = int(str(e.value).split("at step ")[1].split(";")[0])
    kept = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert kept[-1] == f"step_{nan_step - 1:08d}"


def test_shards_without_text_members_are_refused_naming_what_was_found(tmp_path):
    write_shards(tmp_path / "notext", 1, 4, text=False)
    r = CliRunner().invoke(app, ["train", str(tmp_path / "notext"), "-o", str(tmp_path / "run"),
                                 "--model-config", str(tiny_clip_config(tmp_path))])
    assert r.exit_code == 2
    assert "no text members" in r.output and "jpg, json" in r.output


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    write_shards(tmp_path / "shards", 2, 16, corrupt_every=8)
    s = train(str(tmp_path / "shards"), str(tmp_path / "run"), model_config=str(tiny_clip_config(tmp_path)),
              batch_size=8, workers=0, shuffle_buffer=0)
    assert s.ok and s.counts["skipped_samples"] == 4


def test_siglip_loss_trains_with_a_learned_bias(tiny):
    import open_clip
    import torch

    run = tiny["root"] / "run"
    s = train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), loss="siglip", batch_size=16,
              workers=0, max_steps=2, shuffle_buffer=0)
    assert s.ok and s.counts["contrastive_loss"] > 0
    exported = json.loads((run / "model" / "open_clip_config.json").read_text())["model_cfg"]
    assert exported["init_logit_bias"] == -10.0
    # the loss form: at init (bias -10, scale 10, features of norm 1) SigLIP's sigmoid loss over a batch
    # of 16 is ~10 (each positive pair costs -log sigmoid(10 s - 10)); InfoNCE would be ~ln 16 = 2.8
    first = losses(run)[0]
    assert 5.0 < first < 20.0, first
    # training moved the learned bias and scale: the exported weights are trained, not the init
    trained = open_clip.create_model("local-dir:" + str(run / "model"))
    assert trained.logit_bias is not None and abs(trained.logit_bias.item() + 10.0) > 1e-4
    assert abs(trained.logit_scale.item() - float(torch.log(torch.tensor(10.0)))) > 1e-4


def test_coca_loss_trains_and_exports_a_loadable_captioner(tiny):
    import open_clip
    import torch

    from capcurate.models.captioners import load_captioner
    from capcurate.models.captioners.base import DecodingConfig

    run = tiny["root"] / "run"
    s = train(str(tiny["shards"]), str(run), model_config=str(tiny_coca_config(tiny["root"])), loss="coca",
              batch_size=8, workers=0, max_steps=2, caption_loss_weight=1.5)
    assert s.ok and s.counts["caption_loss"] > 0 and s.counts["contrastive_loss"] > 0
    cap = load_captioner(str(run))
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 32, 32)
    cfg = DecodingConfig(decoding="greedy", max_new_tokens=6, min_new_tokens=6)
    ids = cap.generate_ids(pixels, cfg)
    assert [len(x[0]) for x in ids] == [6, 6]  # it generates, to the length asked
    # and what it generates is the trained model's own greedy choice: each token is the argmax of plain
    # open_clip's CoCa forward (exported weights, no capcurate code) over the tokens before it
    plain = open_clip.create_model("local-dir:" + str(run / "model")).eval()
    eot = cap.special.eot
    for i in range(2):
        tokens = torch.tensor([[cap.special.sot]])
        for t in ids[i][0]:
            with torch.no_grad():
                logits = plain(pixels[i:i + 1], tokens, output_labels=False)["logits"][0, -1]
            logits[eot] = -float("inf")  # min_new_tokens holds the end token back
            assert int(logits.argmax()) == t
            tokens = torch.cat([tokens, torch.tensor([[t]])], dim=1)


def test_coca_loss_on_a_clip_model_is_refused(tiny):
    with pytest.raises(InputError, match="CoCa"):
        train(str(tiny["shards"]), str(tiny["root"] / "r"), model_config=str(tiny["clip"]), loss="coca",
              workers=0, max_steps=1)


def test_ddp_two_processes_match_one_process_with_the_doubled_batch(tmp_path):
    # shards of exactly one per-rank batch, read in order: rank r gets shards r, r+2, ..., so every
    # global batch holds the same samples as the single process's batch of 16
    write_shards(tmp_path / "shards", 6, 8)
    cfg = tiny_clip_config(tmp_path)
    common = ["--model-config", str(cfg), "--epochs", "1", "--lr", "1e-3", "--workers", "0",
              "--shuffle-buffer", "0", "--no-shuffle-shards", "--gather-with-grad"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = CliRunner().invoke(app, ["train", str(tmp_path / "shards"), "-o", str(single), "--batch-size", "16", *common])
    assert r.exit_code == 0, r.output
    env = SUBPROCESS_ENV
    p = subprocess.run([sys.executable, "-m", "capcurate", "train", str(tmp_path / "shards"), "-o", str(ddp),
                        "--batch-size", "8", "--nproc", "2", *common, "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout.strip().splitlines()[-1])["counts"]["world_size"] == 2
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, abs=1e-4)


def test_shard_specs_brace_pattern_and_sizes_json(tmp_path):
    from capcurate.train.shard_list import resolve_shards

    paths = write_shards(tmp_path / "s", 3, 4)
    assert resolve_shards(str(tmp_path / "s" / "{00000..00002}.tar")).urls == [str(p) for p in paths]
    (tmp_path / "s" / "manifest.json").unlink()
    (tmp_path / "s" / "sizes.json").write_text(json.dumps({p.name: 4 for p in paths}))
    sl = resolve_shards(str(tmp_path / "s"))
    assert sl.num_samples == 12 and len(sl.urls) == 3
    with pytest.raises(InputError, match="do not exist"):
        resolve_shards(str(tmp_path / "s" / "{00000..00005}.tar"))


def test_fewer_shards_than_workers_resamples_and_keeps_epoch_length(tmp_path):
    write_shards(tmp_path / "shards", 1, 16)
    s = train(str(tmp_path / "shards"), str(tmp_path / "run"), model_config=str(tiny_clip_config(tmp_path)),
              batch_size=4, workers=2, epochs=1)
    assert s.ok and s.counts["steps"] == 4 and s.counts["samples_seen"] == 16


def test_train_config_round_trips_through_torchrun_arguments():
    from capcurate.cli.train_commands import config_to_argv

    cfg = TrainConfig(data="d", output="o", model="ViT-B-32", grad_clip=None, shuffle_shards=False,
                      gather_with_grad=True, precision="bf16", accum=4)
    argv = config_to_argv(cfg)
    assert argv[:3] == ["d", "-o", "o"]
    assert "--no-shuffle-shards" in argv and "--gather-with-grad" in argv
    assert argv[argv.index("--grad-clip") + 1] == "0" and argv[argv.index("--accum") + 1] == "4"


# -- defaults, the step statistics, the image paths -------------------------------------------------
def test_auto_defaults_resolve_per_process_and_are_recorded(tiny, monkeypatch):
    from capcurate import devices

    monkeypatch.setattr(devices, "available_cpus", lambda: 16)
    cfg = TrainConfig(data="d", output="o", model="ViT-B-32").resolved()
    assert (cfg.device, cfg.precision, cfg.workers, cfg.decode) == ("cpu", "fp32", 15, "cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: the cores are shared by 2 ranks
    assert TrainConfig(data="d", output="o", workers="auto").resolved().workers == 7
    assert TrainConfig(data="d", output="o", workers="2").resolved().workers == 2
    monkeypatch.setattr(devices, "available_cpus", lambda: 2)  # a laptop: decode inside the CPU step
    assert TrainConfig(data="d", output="o", workers="auto").resolved().workers == 0
    with pytest.raises(InputError, match="--decode gpu needs --device cuda"):
        TrainConfig(data="d", output="o", decode="gpu").resolved()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(devices, "resolve_device", lambda d: "cuda")  # a GPU: the cores are free to decode
    monkeypatch.setattr(devices, "available_cpus", lambda: 4)
    assert TrainConfig(data="d", output="o", precision="fp32", workers="auto").resolved().workers == 3
    monkeypatch.undo()
    run = tiny["root"] / "run"
    train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, workers=0, max_steps=1)
    rec = json.loads((run / "run.json").read_text())
    assert {k: rec["config"][k] for k in ("device", "precision", "decode")} == \
        {"device": "cpu", "precision": "fp32", "decode": "cpu"}
    assert rec["image_path"] == "cpu"


def test_step_stats_reduce_on_the_process_groups_device(monkeypatch):
    """The read-back all-reduces float64/int64 tensors on the group's device: CPU under gloo (run here on
    a 1-rank group), the rank's GPU under NCCL (tests/test_gpu_train.py runs that on a GPU)."""
    import socket

    import torch
    import torch.distributed as tdist

    from capcurate.train.distributed import DistInfo, collective_device
    from capcurate.train.step_stats import NO_BAD_STEP, StepStats, reduce_step_stats

    info = DistInfo(device=torch.device("cpu"))
    stats = StepStats(info.device, accum=2)
    for v in (1.0, 3.0):
        stats.add({"contrastive_loss": torch.tensor(v), "caption_loss": torch.tensor(2 * v)})
    stats.end_step(1)
    # no group: nothing is reduced
    terms, skipped, bad, extra = reduce_step_stats(info, stats.terms, 5, stats.bad_step, {"x": torch.tensor(7.0)})
    assert terms == {"contrastive_loss": 2.0, "caption_loss": 4.0} and skipped == 5
    assert bad == NO_BAD_STEP and extra == {"x": 7.0}

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    seen = []
    real = tdist.all_reduce

    def spy(t, op=tdist.ReduceOp.SUM, **kw):
        seen.append((t.device.type, t.dtype))
        return real(t, op=op, **kw)

    monkeypatch.setattr(tdist, "all_reduce", spy)
    try:
        stats.add({"contrastive_loss": torch.tensor(float("nan")), "caption_loss": torch.tensor(0.0)})
        stats.end_step(2)
        stats.add({"contrastive_loss": torch.tensor(1.0), "caption_loss": torch.tensor(0.0)})
        stats.end_step(3)  # finite again: the first bad step is what is reported
        terms, skipped, bad, _ = reduce_step_stats(info, stats.terms, 2, stats.bad_step)
        assert terms == {"contrastive_loss": 0.5, "caption_loss": 0.0} and skipped == 2 and bad == 2
        assert seen == [("cpu", torch.float64), ("cpu", torch.int64)]
        monkeypatch.setattr(tdist, "get_backend", lambda *a: "nccl")
        assert collective_device(DistInfo(device=torch.device("cuda", 3))) == torch.device("cuda", 3)
    finally:
        tdist.destroy_process_group()


def test_nan_is_noticed_at_the_next_logged_step_and_reported_at_its_own(tiny):
    run = tiny["root"] / "run"
    with pytest.raises(StageFailed, match=r"at step (\d+).*none \(no checkpoint") as e:
        train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, workers=0,
              lr=1e30, grad_clip=None, log_every=100)
    assert int(str(e.value).split("at step ")[1].split(";")[0]) < 4  # checked at step 4, the epoch end
    assert not (run / "checkpoints").is_dir() or not any((run / "checkpoints").iterdir())


def _stream(urls, mode, transform, aug, **kw):
    from capcurate.train.data import TrainStream

    return TrainStream(urls, 6, 3, transform, lambda texts: list(texts), seed=3, num_workers=1,
                       shuffle_buffer=0, mode=mode, aug=aug, **kw)


@pytest.fixture
def textured(tmp_path):
    import open_clip

    paths = write_textured_shards(tmp_path / "tex", 2, 9, png_every=4, corrupt_every=7)
    transform = open_clip.image_transform(32, is_train=True)
    from capcurate.train.gpu_batches import CropAug

    return [str(p) for p in paths], transform, CropAug.from_transform(transform)


def test_crop_boxes_are_the_ones_open_clips_transform_cuts(textured, monkeypatch):
    """--decode cpu/gpu draw the RandomResizedCrop box from the header and the sample's seed: the box the
    PIL transform (the "before" path) cuts from the same sample, and pixels within a few uint8 levels."""
    import torch
    import torchvision.transforms.functional as TF

    urls, transform, aug = textured
    assert aug is not None and aug.size == (32, 32) and aug.scale == (0.9, 1.0)
    boxes = []
    real = TF.resized_crop

    def record(img, top, left, height, width, *a, **kw):
        boxes.append((top, left, height, width))
        return real(img, top, left, height, width, *a, **kw)

    monkeypatch.setattr(TF, "resized_crop", record)
    pil, cpu = _stream(urls, "pil", transform, None), _stream(urls, "cpu", transform, aug)
    for seed, (w, h) in enumerate([(48, 40), (40, 56), (64, 64), (300, 200)]):
        data = textured_image(seed, w, h)
        before = pil._pil_transform(data, seed)
        kind, u8 = cpu._crop(data, seed)
        assert kind == "u8" and aug.draw_box(h, w, seed) == boxes[-1]
        std = torch.tensor(aug.std).view(3, 1, 1)
        diff = ((before - aug.normalize(u8[None])[0]) * std * 255).abs()
        assert diff.mean() < 0.5 and diff.max() <= 6, (w, h, float(diff.mean()), float(diff.max()))
        if w > 64:  # downscaling: antialiased bicubic on tensors follows PIL within one level
            assert diff.max() <= 1.01


def test_gpu_mode_worker_batches_decoded_on_cpu_equal_cpu_mode(textured):
    """gpu mode ships JPEG bytes + boxes (PNGs and broken files as in cpu mode): the training-process
    decode of those, run on the CPU, gives the cpu mode's batch bit for bit, with the same skips."""
    import torch

    from capcurate.train.gpu_batches import assemble_batch

    urls, transform, aug = textured
    cpu = list(_stream(urls, "cpu", transform, aug))
    gpu = list(_stream(urls, "gpu", transform, aug))
    assert len(cpu) == len(gpu) == 3
    kinds = set()
    for (a, ta, ma), (b, tb, mb) in zip(cpu, gpu, strict=True):
        assert ta == tb and torch.equal(ma, mb) and len(a["jpeg_pos"]) == 0
        kinds |= {"jpeg"} if len(b["jpeg_pos"]) else set()
        kinds |= {"u8"} if len(b["u8_pos"]) else set()
        xa, fa = assemble_batch(a, aug, "cpu")
        xb, fb = assemble_batch(b, aug, "cpu")
        assert fa == fb == 0 and xa.shape == (6, 3, 32, 32) and torch.equal(xa, xb)
    assert kinds == {"jpeg", "u8"} and int(cpu[-1][2][3]) > 0  # both paths used; broken files skipped


def test_cpu_decode_resumes_bit_exactly_with_workers_and_accumulation(tmp_path):
    write_textured_shards(tmp_path / "tex", 4, 12, png_every=5)
    cfg = tiny_clip_config(tmp_path)
    opts = ["--model-config", str(cfg), "--batch-size", "6", "--accum", "2", "--lr", "2e-3", "--workers", "2",
            "--decode", "cpu", "--shuffle-buffer", "10", "--save-every", "1", "--log-every", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = CliRunner().invoke(app, ["train", str(tmp_path / "tex"), "-o", str(full), *opts])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", str(tmp_path / "tex"), "-o", str(part), *opts, "--max-steps", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["train", str(tmp_path / "tex"), "-o", str(part), *opts, "--resume", "latest"])
    assert r.exit_code == 0, r.output
    a, b = metrics(full), [x for x in metrics(part) if x["step"] != 1]  # part also logged its stop step
    assert [x["step"] for x in a] == [x["step"] for x in b] == [2, 4]
    drop = ("samples_per_s",)
    assert [{k: v for k, v in x.items() if k not in drop} for x in a] == \
        [{k: v for k, v in x.items() if k not in drop} for x in b]


# -- train-time caption choice (--caption-keys / --caption-probs, or the shards' recipe) -------------------
def _caption_shards(folder: Path, n_shards: int = 2, per_shard: int = 40, recipe: dict | None = None):
    """Shards whose .json holds a raw and a blip caption per sample (as `shard --captions raw,blip` writes)."""
    from train_fixtures import colour_image

    from capcurate.shards import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with TarShardWriter(path) as w:
            for j in range(per_shard):
                meta = {"uid": f"u{s}{j}", "raw": f"raw {s} {j}", "blip": f"blip {s} {j}"}
                w.write(f"{s:05d}{j:04d}", {"jpg": colour_image("red", jitter=j), "txt": b"plain txt",
                                            "json": json.dumps(meta).encode()})
        paths.append(path)
    manifest = {"shards": [{"name": p.name, "samples": per_shard} for p in paths],
                "total_samples": n_shards * per_shard, "captions": recipe}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return [str(p) for p in paths]


def test_caption_choice_frequencies_match_the_probabilities():
    from capcurate.train.caption_choice import caption_uniform, parse_caption_choice

    n = 6000
    for keys, probs in (("raw,blip", "0.2,0.8"), ("raw,blip,syn", "0.5,0.2,0.3")):
        choice = parse_caption_choice(keys, probs)
        meta = {k: f"{k} text" for k in choice.keys}
        picks = [choice.pick(meta, caption_uniform(0, 0, "caption", "shard.tar", f"k{i}"))[0] for i in range(n)]
        for k, p in zip(choice.keys, choice.probs, strict=True):
            assert abs(picks.count(k) / n - p) < 0.025, (k, picks.count(k) / n, p)  # ~4 binomial sd
    choice = parse_caption_choice("raw,blip", "0.2,0.8")
    assert choice.pick({"raw": "r", "blip": "  "}, 0.99) == ("raw", "r")  # an empty caption leaves the draw
    assert choice.pick({"other": "x"}, 0.5) is None
    assert parse_caption_choice("raw,blip", None).probs == (0.5, 0.5)
    for keys, probs, msg in (("raw,blip", "0.5", "1 values for 2"), ("raw,blip", "0.5,0.6", "sum to 1"),
                             ("raw,raw", None, "distinct"), ("raw,blip", "a,b", "numbers"),
                             (None, "1.0", "needs --caption-keys")):
        with pytest.raises(InputError, match=msg):
            parse_caption_choice(keys, probs)


def test_train_stream_draws_each_samples_caption_per_epoch_deterministically(tmp_path):
    import torch

    from capcurate.train.caption_choice import parse_caption_choice
    from capcurate.train.data import TrainStream

    urls = _caption_shards(tmp_path / "shards")
    choice = parse_caption_choice("raw,blip", "0.2,0.8")

    def texts(epoch, captions=choice):
        stream = TrainStream(urls, 8, 10, lambda im: torch.zeros(1), lambda t: list(t), seed=5, epoch=epoch,
                             num_workers=1, shuffle_buffer=0, mode="pil", captions=captions)
        return [t for _, batch, _ in stream for t in batch]

    e0, e1 = texts(0), texts(1)
    assert e0 == texts(0) and e0 != e1 and len(e0) == 80  # fixed under the seed, redrawn every epoch
    blip = sum(t.startswith("blip") for t in e0 + e1) / 160
    assert all(t.startswith(("raw", "blip")) for t in e0) and 0.65 < blip < 0.93
    assert set(texts(0, None)) == {"plain txt"}  # without a choice the .txt is read, as before


def test_train_cli_caption_keys_and_the_shards_recipe_are_used_and_recorded(tmp_path):
    _caption_shards(tmp_path / "shards", recipe={"keys": ["raw", "blip"], "probs": [0.2, 0.8]})
    clip = tiny_clip_config(tmp_path)
    base = ["train", str(tmp_path / "shards"), "--model-config", str(clip), "--batch-size", "16",
            "--workers", "0", "--max-steps", "1"]
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "r1"), "--caption-keys", "blip,raw",
                                 "--caption-probs", "0.7,0.3"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "r1" / "run.json").read_text())
    assert run["captions"] == {"keys": ["blip", "raw"], "probs": [0.7, 0.3]}
    assert run["config"]["caption_keys"] == "blip,raw"
    s = train(str(tmp_path / "shards"), str(tmp_path / "r2"), model_config=str(clip), batch_size=16, workers=0,
              max_steps=1)
    assert s.ok and json.loads((tmp_path / "r2" / "run.json").read_text())["captions"] == \
        {"keys": ["raw", "blip"], "probs": [0.2, 0.8]}
    r = CliRunner().invoke(app, [*base, "-o", str(tmp_path / "r3"), "--caption-probs", "1.0"])
    assert r.exit_code == 2 and "--caption-probs needs --caption-keys" in r.output


def test_caption_keys_the_shards_do_not_hold_exit_2_naming_the_key(tmp_path):
    clip = tiny_clip_config(tmp_path)

    def run(folder: Path, keys: str) -> object:
        return CliRunner().invoke(app, ["train", str(folder), "-o", str(tmp_path / "r"), "--model-config",
                                        str(clip), "--batch-size", "16", "--workers", "0", "--max-steps", "1",
                                        "--caption-keys", keys])

    _caption_shards(tmp_path / "rec", recipe={"keys": ["raw", "blip"], "probs": None})
    r = run(tmp_path / "rec", "raw,sny")  # a typo: before, exit 0 on raw alone with run.json saying raw,sny
    assert r.exit_code == 2 and "'sny'" in r.output and "raw, blip" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    _caption_shards(tmp_path / "plain", recipe=None)  # `shard` without --captions records no keys
    r = run(tmp_path / "plain", "raw")  # before: silently trained on .txt
    assert r.exit_code == 2 and "without `capcurate shard --captions`" in r.output, r.output
    bare = tmp_path / "bare"  # no manifest: the first sample's .json is what the shards hold
    bare.mkdir()
    for u in _caption_shards(tmp_path / "rec2", recipe=None):
        Path(u).rename(bare / Path(u).name)
    r = run(bare, "blip,sny")
    assert r.exit_code == 2 and "'sny'" in r.output and "first sample's .json" in r.output, r.output
    write_shards(tmp_path / "txt", 1, 4)
    (tmp_path / "txt" / "manifest.json").unlink()
    r = run(tmp_path / "txt", "raw")
    assert r.exit_code == 2 and "no .json captions" in r.output, r.output
    from capcurate.train.caption_choice import check_keys_recorded, parse_caption_choice
    from capcurate.train.shard_list import ShardList

    # a stream that cannot be peeked at (http, pipe:) is not judged here: the draw falls back per sample
    check_keys_recorded(parse_caption_choice("raw", None), ShardList(["https://host/00000.tar"], None, "pattern"))


def test_caption_draws_and_augmentation_seeds_survive_moving_the_shards(tmp_path, monkeypatch):
    """Keyed on (shard file name, sample key): an absolute path, a moved folder read by a relative path,
    give the same captions and the same augmentation (before, __url__ as typed changed ~1/3 of draws)."""
    import torch

    from capcurate.train.caption_choice import parse_caption_choice
    from capcurate.train.data import TrainStream

    choice = parse_caption_choice("raw,blip", "0.5,0.5")

    def draws(urls: list[str]) -> list[tuple[str, float]]:
        # the transform runs after the per-sample seed is set: its random number is the augmentation's
        stream = TrainStream(urls, 8, 10, lambda im: torch.rand(1), lambda t: list(t), seed=3, epoch=1,
                             num_workers=1, shuffle_buffer=0, mode="pil", captions=choice)
        return [(t, float(x)) for images, batch, _ in stream for x, t in zip(images, batch, strict=True)]

    urls = _caption_shards(tmp_path / "a" / "shards")
    before = draws([str(Path(u).resolve()) for u in urls])
    (tmp_path / "a" / "shards").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    after = draws([f"moved/{Path(u).name}" for u in urls])
    assert len(before) == 80 and after == before
    assert 20 < sum(t.startswith("blip") for t, _ in before) < 60 and len({x for _, x in before}) == 80


def test_text_tower_packed_trimmed_and_padded_train_the_same_losses(tiny):
    """--text-tower: packed (the default where exact), trimmed and padded give open_clip's losses; run.json
    records the tower used; a tower the model cannot take exactly exits 2."""
    runs = {}
    for tower in ("auto", "trimmed", "padded"):
        run = tiny["root"] / f"run-{tower}"
        r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(run), "--model-config",
                                     str(tiny["clip"]), "--batch-size", "16", "--workers", "0", "--max-steps", "2",
                                     "--shuffle-buffer", "0", "--text-tower", tower])
        assert r.exit_code == 0, r.output
        runs[json.loads((run / "run.json").read_text())["text_tower"]] = losses(run)
    assert set(runs) == {"packed", "trimmed", "padded"}  # auto chose packed for this CLIP
    for tower in ("packed", "trimmed"):
        assert runs[tower] == pytest.approx(runs["padded"], rel=1e-5, abs=1e-6), tower
    r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(tiny["root"] / "coca"), "--model-config",
                                 str(tiny_coca_config(tiny["root"])), "--loss", "coca", "--workers", "0",
                                 "--max-steps", "1", "--text-tower", "packed"])
    assert r.exit_code == 2 and "--text-tower packed" in r.output, r.output
    r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(tiny["root"] / "x"), "--model-config",
                                 str(tiny["clip"]), "--text-tower", "ragged"])
    assert r.exit_code == 2 and "auto, packed, trimmed, padded" in r.output, r.output


def test_text_tower_auto_is_trimmed_under_compile(tmp_path):
    """Packing has a data-dependent token count (a recompile per step under torch.compile): auto trims there."""
    import open_clip

    from capcurate.train.text_tower import prepare_text_tower

    open_clip.add_model_config(tiny_clip_config(tmp_path, "tiny_clip_tower"))
    model, tok = open_clip.create_model("tiny_clip_tower"), open_clip.get_tokenizer("tiny_clip_tower")
    assert prepare_text_tower(model, tok, "auto", compiled=True)[1] == "trimmed"
    assert prepare_text_tower(model, tok, "auto")[1] == "packed" and "encode_text" in vars(model)


def test_compile_trains_the_same_losses_as_eager(tiny):
    """--compile: torch.compile of the whole model (text batches of varying trimmed lengths included)
    gives the eager run's losses, and the run records it."""
    runs = {}
    for compile_ in (False, True):
        run = tiny["root"] / f"run-compile-{compile_}"
        s = train(str(tiny["shards"]), str(run), model_config=str(tiny["clip"]), batch_size=16, epochs=1,
                  lr=2e-3, workers=0, compile=compile_)
        assert s.ok and s.counts["steps"] == 4
        runs[compile_] = losses(run)
    assert runs[True] == pytest.approx(runs[False], rel=1e-3, abs=1e-4)
    assert json.loads((tiny["root"] / "run-compile-True" / "run.json").read_text())["config"]["compile"] is True


@pytest.mark.parametrize("unlocked", [0, 1])
def test_lock_image_and_adamw_betas_through_the_cli(tiny, unlocked):
    """--lock-image (LiT) keeps the image tower at its initial weights (--lock-image-unlocked-groups N: all
    but its last N groups) while the text tower learns; --beta1/--beta2 reach AdamW and the checkpoint."""
    import torch
    from safetensors.torch import load_file

    from capcurate.train.checkpoint import latest_checkpoint
    from capcurate.train.model_setup import build_model

    run = tiny["root"] / f"lit-{unlocked}"
    r = CliRunner().invoke(app, ["train", str(tiny["shards"]), "-o", str(run), "--model-config", str(tiny["clip"]),
                                 "--batch-size", "16", "--epochs", "1", "--lr", "1e-2", "--workers", "0",
                                 "--beta1", "0.5", "--beta2", "0.9", "--lock-image",
                                 "--lock-image-unlocked-groups", str(unlocked)])
    assert r.exit_code == 0, r.output
    ckpt = latest_checkpoint(run)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert {tuple(g["betas"]) for g in state["optimizer"]["param_groups"]} == {(0.5, 0.9)}
    trained = load_file(str(ckpt / "model.safetensors"))
    cfg = TrainConfig.from_dict(json.loads((run / "run.json").read_text())["config"])
    initial = build_model(cfg, torch.device("cpu")).model.state_dict()  # same seed: the same initial weights
    changed = {k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])}
    assert any(k.startswith("transformer.") for k in changed)  # the text tower learned
    assert "visual.conv1.weight" not in changed and "visual.transformer.resblocks.0.attn.in_proj_weight" not in changed
    # unlocked groups: open_clip's last group of a ViT is ln_post + proj
    assert ("visual.proj" in changed) == (unlocked > 0)
