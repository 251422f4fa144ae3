"""``capcurate train`` and ``capcurate eval``: thin wrappers over capcurate.train."""

from __future__ import annotations

import os
from dataclasses import fields

import typer

from .app import (
    DECODE_HELP,
    DEVICE_HELP,
    JSON_HELP,
    PRECISION_HELP,
    PRETRAINED_HELP,
    WORKERS_HELP,
    app,
    run_command,
)

_BOOL_FLAGS = {  # TrainConfig field -> (on flag, off flag)
    "shuffle_shards": ("--shuffle-shards", "--no-shuffle-shards"),
    "local_loss": ("--local-loss", None),
    "gather_with_grad": ("--gather-with-grad", None),
    "lock_image": ("--lock-image", None),
    "compile": ("--compile", None),
    "overwrite": ("--overwrite", None),
}


@app.command()
def train(
    data: str = typer.Argument(..., help="Training shards: a directory of .tar files (uses its manifest.json or "
                               "sizes.json when present), a manifest.json/sizes.json file, or a brace pattern "
                               "like 'shards/{00000..00041}.tar'; local or a URL (s3://bucket/shards, s3://bucket/shards/manifest.json, "
                               "'s3://bucket/shards/{00000..00041}.tar'), streamed through fsspec. Each sample needs "
                               "an image (jpg/png/webp) and a .txt."),
    output: str = typer.Option(..., "-o", "--output", help="Run directory, local or a URL (s3://bucket/runs/x): "
                               "checkpoints/, model/ (open_clip local-dir export, loadable with --model RUN), "
                               "metrics.jsonl, run.json."),
    model: str | None = typer.Option(None, "--model", help="open_clip architecture name, e.g. ViT-B-32, "
                                        "ViT-B-16-SigLIP or coca_ViT-B-32 (random init unless --pretrained)."),
    model_config: str | None = typer.Option(None, "--model-config", help="A JSON model config in open_clip's "
                                               "model_configs format instead of --model (e.g. a tiny CPU model)."),
    pretrained: str | None = typer.Option(None, "--pretrained", help="Fine-tune from an open_clip pretrained "
                                             "tag, a local weights file or its URL (s3://...)."),
    loss: str = typer.Option("clip", "--loss", help="clip (InfoNCE, open_clip ClipLoss), siglip (SigLipLoss; "
                             "adds a learned logit bias) or coca (CoCaLoss: contrastive + captioning; needs a CoCa model)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Samples per micro-batch per process. Global batch = "
                                   "batch size x processes x --accum."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the data, measured in samples (from the manifest "
                               "or --train-num-samples)."),
    train_num_samples: int | None = typer.Option(None, "--train-num-samples", help="Samples per epoch; default: "
                                                    "the manifest's total, else counted from the tar headers."),
    lr: float = typer.Option(5e-4, "--lr", help="Peak learning rate of AdamW (after warmup)."),
    wd: float = typer.Option(0.2, "--wd", help="AdamW weight decay (not applied to gains, biases, logit scale)."),
    beta1: float = typer.Option(0.9, "--beta1", help="AdamW beta1."),
    beta2: float = typer.Option(0.98, "--beta2", help="AdamW beta2."),
    eps: float = typer.Option(1e-6, "--eps", help="AdamW epsilon."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps before the cosine decay."),
    grad_clip: float | None = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm to this (0 = off)."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 "
                                  "(autocast) or fp16 (autocast + GradScaler). Weights stay fp32."),
    accum: int = typer.Option(1, "--accum", help="Gradient accumulation: micro-batches per optimizer step."),
    compile: bool = typer.Option(False, "--compile", help="Wrap the model in torch.compile."),
    text_tower: str = typer.Option("auto", "--text-tower", help="How the text tower runs over a batch, all "
                                   "with open_clip's loss and gradients: packed (each caption's own tokens, one "
                                   "sequence, attention within each caption: no padding through the projections "
                                   "and MLP), trimmed (to the batch's longest caption), padded (the full context, "
                                   "as open_clip). auto = packed where exact and without --compile, else trimmed "
                                   "where exact, else padded; run.json records the one used."),
    workers: str = typer.Option("auto", "--workers", help="DataLoader worker processes per rank that read, "
                                "decode and augment images; auto = usable cores / processes per machine - 1, or 0 when "
                                "the model trains on 4 CPU cores or fewer (the step already uses them all); 0 "
                                "decodes in the training process."),
    decode: str = typer.Option("auto", "--decode", help="Where training images are decoded: gpu (workers read "
                               "headers and draw the crop; JPEGs are decoded in batches with nvJPEG, cropped and "
                               "resized on the GPU), cpu (workers decode, crop and resize uint8 tensors), or auto "
                               "(gpu when --device is cuda)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial weights, shard order, shuffle, augmentation and "
                             "caption choice."),
    caption_keys: str | None = typer.Option(None, "--caption-keys", help="Train on one of several captions per "
                                            "sample: comma-separated keys of each sample's .json (written by `shard "
                                            "--captions`), e.g. raw,blip; one is drawn per sample each time it is read; "
                                            "a key the shards do not hold exits 2. "
                                            "Default: the recipe in the shards' manifest.json, else the .txt."),
    caption_probs: str | None = typer.Option(None, "--caption-probs", help="Probabilities of --caption-keys, "
                                             "e.g. 0.2,0.8 (sum 1; default equal)."),
    shuffle_buffer: int = typer.Option(1000, "--shuffle-buffer", help="Samples held in each worker's shuffle "
                                       "buffer (0 or 1 = read in shard order)."),
    shuffle_shards: bool = typer.Option(True, "--shuffle-shards/--no-shuffle-shards", help="Shuffle the shard "
                                        "order every epoch."),
    local_loss: bool = typer.Option(False, "--local-loss", help="DDP: each rank computes the loss of its own "
                                    "samples against all gathered features (less memory; use with --gather-with-grad)."),
    gather_with_grad: bool = typer.Option(False, "--gather-with-grad", help="DDP: gather features with gradients "
                                          "so every rank's gradient equals the single-process one."),
    caption_loss_weight: float = typer.Option(2.0, "--caption-loss-weight", help="CoCa: weight of the captioning loss."),
    clip_loss_weight: float = typer.Option(1.0, "--clip-loss-weight", help="CoCa: weight of the contrastive loss."),
    lock_image: bool = typer.Option(False, "--lock-image", help="LiT: freeze the image tower and train the text tower."),
    lock_image_unlocked_groups: int = typer.Option(0, "--lock-image-unlocked-groups", help="With --lock-image: "
                                                   "leave the last N layer groups of the image tower trainable."),
    save_every: int = typer.Option(0, "--save-every", help="Checkpoint every N steps (0 = at each epoch end). "
                                   "Checkpoints also re-export RUN/model."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", help="Newest checkpoints to keep (0 = all)."),
    resume: str | None = typer.Option(None, "--resume", help="'latest' continues RUN from its newest checkpoint "
                                         "bit-exactly (same data order, same step); or a checkpoint directory, local or a URL."),
    eval_data: str | None = typer.Option(None, "--eval-data", help="An eval set (see `capcurate eval`), local or "
                                            "a URL, evaluated during training; results go to metrics.jsonl."),
    eval_every: int = typer.Option(0, "--eval-every", help="Evaluate every N steps (0 = only at the end)."),
    log_every: int = typer.Option(1, "--log-every", help="Write a metrics.jsonl line every N steps."),
    device: str | None = typer.Option(None, "--device", help="auto (default: cuda when available), cuda, cuda:1 "
                                      "or cpu."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps "
                                            "(the schedule still spans all epochs); useful for smoke tests."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an -o that already holds a run."),
    nproc: int = typer.Option(1, "--nproc", help="Launch this many processes with torchrun (DDP; one per GPU)."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Train a CLIP, SigLIP or CoCa model (open_clip) on webdataset shards, e.g. from `capcurate shard`.

    Example: capcurate train out_shards -o runs/b32 --model ViT-B-32 --batch-size 4096 --epochs 8 --precision bf16
    """
    from ..train.config import TrainConfig

    cfg = TrainConfig(
        data=data, output=output, model=model, model_config=model_config, pretrained=pretrained, loss=loss,
        batch_size=batch_size, epochs=epochs, train_num_samples=train_num_samples, lr=lr, wd=wd, beta1=beta1,
        beta2=beta2, eps=eps, warmup=warmup, grad_clip=grad_clip or None, precision=precision, accum=accum,
        compile=compile, text_tower=text_tower, workers=workers, decode=decode, seed=seed, shuffle_buffer=shuffle_buffer, shuffle_shards=shuffle_shards,
        local_loss=local_loss, gather_with_grad=gather_with_grad, caption_loss_weight=caption_loss_weight,
        clip_loss_weight=clip_loss_weight, lock_image=lock_image, lock_image_unlocked_groups=lock_image_unlocked_groups,
        save_every=save_every, keep_checkpoints=keep_checkpoints, resume=resume, eval_data=eval_data,
        eval_every=eval_every, log_every=log_every, device=device, overwrite=overwrite, max_steps=max_steps,
        caption_keys=caption_keys, caption_probs=caption_probs,
    )
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from ..train.distributed import launch_torchrun

        code = launch_torchrun(nproc, config_to_argv(cfg) + (["--json"] if json else []))
        if code:
            raise typer.Exit(code)
        return
    from ..train import train as train_fn

    run_command(lambda: train_fn(cfg), json_out=json)


def config_to_argv(cfg) -> list[str]:
    """The `capcurate train` arguments that rebuild ``cfg`` (what --nproc hands to each torchrun rank)."""
    from ..train.config import TrainConfig

    default = TrainConfig(data="", output="")
    argv = [cfg.data, "-o", cfg.output]
    for f in fields(cfg):
        name, value = f.name, getattr(cfg, f.name)
        if name in ("data", "output") or value == getattr(default, name):
            continue
        if name in _BOOL_FLAGS:
            on, off = _BOOL_FLAGS[name]
            flag = on if value else off
            if flag:
                argv.append(flag)
            continue
        if name == "grad_clip" and value is None:
            value = 0
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


@app.command("eval")
def eval_command(
    model: str = typer.Argument(..., help="What to evaluate: a capcurate run directory, an open_clip folder, "
                                "openclip:<arch>[/<tag>], openclip:<config.json> or hf:<CLIPModel id or dir>; "
                                "a run or folder may be a URL (s3://bucket/runs/x), downloaded once into "
                                "$CAPCURATE_CACHE/models (default ~/.cache/capcurate/models)."),
    data: str = typer.Option(..., "--data", help="Eval set directory, local or a URL: clip_benchmark's webdataset layout "
                             "(test/*.tar with .cls/.txt, classnames.txt, zeroshot_classification_templates.txt, as "
                             "`capcurate synth` writes it) or test.parquet (image path/bytes, label, caption)."),
    pretrained: str | None = typer.Option(None, "--pretrained", help=PRETRAINED_HELP),
    batch_size: str = typer.Option("auto", "--batch-size", help=(
        "Images (and texts) per forward pass, or auto: 256 on a GPU, 64 on the CPU.")),
    workers: str = typer.Option("auto", "--workers", help=WORKERS_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    decode: str = typer.Option("auto", "--decode", help=DECODE_HELP),
    output: str | None = typer.Option(None, "--output", "-o", help="Also write the clip_benchmark-shaped "
                                         "results ({dataset, model, task, metrics}) to this JSON file, local or "
                                         "a URL (s3://bucket/evals/x.json)."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Zero-shot classification (top-1/top-5) and image-text retrieval (R@1/5/10 both ways) of a CLIP model.

    Example: capcurate eval runs/b32 --data capworld/eval --json
    """
    from ..train import evaluate

    run_command(lambda: evaluate(model, data, pretrained=pretrained, batch_size=batch_size, workers=workers,
                                 device=device, precision=precision, decode=decode, output=output), json_out=json)
