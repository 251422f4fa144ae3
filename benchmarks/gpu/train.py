"""Train rows, decomposed.

``train_e2e``: ``capcurate.train`` (its defaults: decode on the GPU under CUDA, trimmed text, fused AdamW)
against ``open_clip_train.main`` with workers = cores - 1 and against capcurate with ``decode="cpu"``,
same shards, model, batch and steps. Gate: both trainers' mean loss over the steps agree within a tolerance
(they draw different batches, so not to the digit: 15% at batch 256 x 40 steps, 50% in --smoke).

``train_step``: one train step on ready device tensors, capcurate's (text trimmed by
``capcurate.models.text_trim``, fused AdamW on CUDA) against the same step with trimming off, fused off,
and both off (open_clip's step). Gate: the first step's loss equals the untrimmed step's (trimming is exact).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from .config import Cfg, stage_options
from .runner import Measure, Row, timed, timed_stage

STEP_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")  # open_clip_train's seconds per step
LOSS = re.compile(r"(?<![_\w])Loss: [0-9.]+ \(([0-9.]+)\)")  # open_clip_train's "Loss: step (running mean)"


def open_clip_train_side(cfg: Cfg, tmp: Path, pattern: str, model: str):
    """``open_clip_train.main.main`` in this process (its command line), timed; returns (Measure, loss)."""
    from open_clip_train.main import main as oc_main

    samples = cfg.train_steps * cfg.train_batch
    precision = {"fp32": "fp32", "bf16": "amp_bf16", "fp16": "amp"}[cfg.precision]

    def side(rep: int) -> Measure:
        logs = tmp / f"open_clip_train-{rep}"
        argv = [
            "--train-data",
            pattern,
            "--train-num-samples",
            str(samples),
            "--dataset-type",
            "webdataset",
            "--model",
            model,
            "--batch-size",
            str(cfg.train_batch),
            "--epochs",
            "1",
            "--workers",
            str(cfg.workers),
            "--precision",
            precision,
            "--lr",
            "5e-4",
            "--warmup",
            "2",
            # capcurate's AdamW defaults (open_clip_train's are beta2 0.999, eps 1e-8): the same optimiser
            "--beta1",
            "0.9",
            "--beta2",
            "0.98",
            "--eps",
            "1e-6",
            "--wd",
            "0.2",
            "--logs",
            str(logs),
            "--name",
            "bench",
            "--report-to",
            "",
            "--log-every-n-steps",
            "1",
            "--save-frequency",
            "1",
            "--seed",
            "0",
            "--device",
            cfg.device,
        ]  # saves at the end, as capcurate does
        # open_clip_train's setup_logging adds root handlers and sets every logger to INFO (torch's too)
        root = logging.getLogger()
        handlers = list(root.handlers)
        levels = {
            n: lg.level for n, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)
        }
        levels[""] = root.level
        try:
            rc, seconds = timed(lambda: oc_main(argv), cfg.device)
        finally:  # open_clip_train adds its own handlers to the root logger on every call
            for h in root.handlers[len(handlers) :]:
                root.removeHandler(h)
            for n, level in levels.items():
                logging.getLogger(n or None).setLevel(level)
        if rc not in (None, 0):  # e.g. -1: "experiment already exists", said only in its log
            raise RuntimeError(f"open_clip_train returned {rc}")
        text = (logs / "bench" / "out.log").read_text(errors="replace")
        means = [float(x) for x in LOSS.findall(text)]
        if len(means) != cfg.train_steps:
            raise RuntimeError(f"open_clip_train logged {len(means)} steps, expected {cfg.train_steps}")
        steps = [float(x) for x in STEP_TIME.findall(text)][1:]  # as capcurate's: after the first step
        steady = cfg.train_batch * len(steps) / sum(steps) if steps and sum(steps) > 0 else None
        return Measure(samples, seconds, means[-1], steady)  # output: the mean loss over its steps

    return side


_FLOPS: dict[tuple[Any, ...], dict[str, float | int]] = {}


def step_flops(cfg: Cfg, name: str) -> dict[str, float | int]:
    """FLOPs of one real train step (forward + backward of the CLIP loss; the optimizer step is element-wise
    and not counted) of ``name`` at the rows' batch, on data.train_caption's captions, counted three ways:
    the text tower as ``capcurate.train`` runs it by default (``--text-tower auto``: packed where exact),
    trimmed (the train_step row's side), and dense over the whole 77-token context (open_clip's step).
    Counted once and shared by both train rows."""
    key = (name, cfg.train_batch, cfg.device, cfg.precision)
    if key in _FLOPS:
        return _FLOPS[key]
    import open_clip
    import torch

    from capcurate.models.text_trim import token_trimmer
    from capcurate.train.losses import build_loss, compute_loss
    from capcurate.train.text_tower import prepare_text_tower

    from .bound import count_flops
    from .data import train_caption

    dev, batch = cfg.device, cfg.train_batch
    tok = open_clip.get_tokenizer(name)
    texts = tok([train_caption(i) for i in range(batch)])
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=dev)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.precision == "bf16" and dev.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    got: dict[str, float | int] = {}
    for tower in ("auto", "trimmed", "dense"):
        torch.manual_seed(0)
        model = open_clip.create_model(name, device=dev, output_dict=True).train()
        if tower == "auto":
            prep, used = prepare_text_tower(model, tok, "auto")
            got["auto_text_tower"] = used
        elif tower == "trimmed":
            prep = token_trimmer(model, tok)
        else:
            prep = lambda t: t  # noqa: E731
        t = prep(texts).to(dev)
        loss_fn = build_loss("clip", model)

        def step(model: Any = model, t: Any = t, loss_fn: Any = loss_fn) -> None:
            with autocast:
                loss = sum(compute_loss(loss_fn, model(images, t)).values())
            loss.backward()

        total, _, _ = count_flops(step)
        got[f"{tower}_per_item"] = total / batch
        got[f"{tower}_text_tokens"] = int(t.shape[1])
        del model, loss_fn
    _FLOPS[key] = got
    return got


def e2e_row(cfg: Cfg, tmp: Path, pattern: str, cfg_path: Path | None, arch: str) -> Row:
    import capcurate

    model_kw = {"model_config": str(cfg_path)} if cfg_path else {"model": arch}
    theirs = open_clip_train_side(cfg, tmp, pattern, cfg_path.stem if cfg_path else arch)
    their_loss: dict[str, float] = {}

    def trainer(decode: str, tag: str):
        def side(rep: int) -> Measure:
            summary, seconds, clock = timed_stage(
                lambda: capcurate.train(
                    pattern,
                    str(tmp / f"run-{tag}"),
                    **model_kw,
                    batch_size=cfg.train_batch,
                    max_steps=cfg.train_steps,
                    train_num_samples=cfg.train_samples,
                    precision=cfg.precision,
                    decode=decode,
                    lr=5e-4,
                    warmup=2,
                    seed=0,
                    overwrite=True,
                    **{"device": cfg.device, "workers": cfg.workers, **stage_options(cfg)},
                ),
                cfg.device,
            )
            steps = summary.counts["steps"]
            logged = [
                json.loads(x) for x in (tmp / f"run-{tag}" / "metrics.jsonl").read_text().splitlines() if x
            ]
            losses = [r["loss"] for r in logged if "loss" in r and "step" in r]
            mean = sum(losses) / len(losses) if losses else float("nan")
            return Measure(summary.counts["samples_seen"], seconds, (steps, mean), clock.steady_per_s())

        return side

    def theirs_recorded(rep: int) -> Measure:
        m = theirs(rep)
        their_loss[rep] = m.output
        return m

    def gate(out: tuple[int, float]) -> list[str]:
        steps, loss = out
        bad = [] if steps == cfg.train_steps else [f"trained {steps} steps, asked for {cfg.train_steps}"]
        if not loss == loss:  # NaN
            bad.append("loss is NaN")
        ref = list(their_loss.values())
        if ref:  # the baseline ran in this or the previous repeat
            rel = abs(loss - ref[-1]) / max(abs(ref[-1]), 1e-6)
            if rel > cfg.train_loss_tol:
                bad.append(
                    f"mean loss {loss:.4f} vs open_clip_train's {ref[-1]:.4f} over {steps} steps "
                    f"({rel:.1%} > {cfg.train_loss_tol:.0%})"
                )
        return bad

    def flops() -> dict[str, Any]:
        got = step_flops(cfg, cfg_path.stem if cfg_path else arch)
        return {
            "per_item": got["auto_per_item"],
            "text_tower": got["auto_text_tower"],
            "per_item_dense_77": got["dense_per_item"],
            "per_item_trimmed": got["trimmed_per_item"],
            "text_width_before_packing": got["auto_text_tokens"],
            "text_saves": 1 - got["auto_per_item"] / got["dense_per_item"],
            "how": f"FlopCounterMode: forward+backward of one step at batch {cfg.train_batch}, the text tower "
            f"as capcurate.train runs it ({got['auto_text_tower']}); dense 77-token count beside it",
        }

    baselines: dict[str, Any] = {"open_clip_train_workers_cores_minus_1": theirs_recorded}
    skipped = {}
    if cfg.device.startswith("cuda"):
        baselines["capcurate_decode_cpu"] = trainer("cpu", "decode-cpu")
    else:
        skipped["capcurate_decode_cpu"] = (
            "on the CPU capcurate's default is decode=cpu already (decode=gpu needs CUDA)"
        )
    return Row(
        family="train",
        name="train_e2e",
        unit="samples",
        what=f"{arch or cfg_path.stem}, batch {cfg.train_batch}, {cfg.train_steps} steps, {cfg.precision}, "
        f"captions of 3-11 words",
        capcurate=trainer("auto", "auto"),
        baselines=baselines,
        gate=gate,
        skipped=skipped,
        target=">= 2.0x open_clip_train",
        device=cfg.device,
        precision=cfg.precision,
        flops=flops,
    )


def step_row(cfg: Cfg, cfg_path: Path | None, arch: str) -> Row:
    """The train step alone on ready tensors, with trimming and the fused optimizer on and off."""
    import open_clip
    import torch

    from capcurate.models.text_trim import token_trimmer
    from capcurate.train.losses import build_loss, compute_loss

    from .data import train_caption

    name = cfg_path.stem if cfg_path else arch
    dev = cfg.device
    tok = open_clip.get_tokenizer(name)
    texts = tok([train_caption(i) for i in range(cfg.train_batch)]).to(dev)
    size = open_clip.get_model_config(name)["vision_cfg"]["image_size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    torch.manual_seed(0)
    images = torch.randn(cfg.train_batch, 3, size, size, device=dev)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cfg.precision == "bf16" and dev.startswith("cuda")
        else torch.autocast("cpu", enabled=False)
    )
    first_loss: dict[str, float] = {}
    can_fuse = dev.startswith("cuda")

    def step_side(trim: bool, fused: bool, tag: str):
        def side(rep: int) -> Measure:
            torch.manual_seed(0)
            model = open_clip.create_model(name, device=dev, output_dict=True).train()
            trimmer = token_trimmer(model, tok) if trim else (lambda t: t)
            loss_fn = build_loss("clip", model)
            opt = torch.optim.AdamW(model.parameters(), lr=5e-4, fused=fused or None)
            losses = []

            def run() -> None:
                for _ in range(cfg.step_iters):
                    with autocast:
                        terms = compute_loss(loss_fn, model(images, trimmer(texts)))
                        loss = sum(terms.values())
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.detach())

            _, seconds = timed(run, dev)
            first_loss[tag] = float(losses[0])
            return Measure(
                cfg.step_iters * cfg.train_batch,
                seconds,
                (tag, float(losses[0]), texts.shape[1], trimmer(texts).shape[1]),
            )

        return side

    def gate(out: tuple[str, float, int, int]) -> list[str]:
        _, loss, full, trimmed = out
        bad = [] if trimmed <= full else [f"trimmed tokens {trimmed} > {full}"]
        ref = first_loss.get("untrimmed")
        if ref is not None and abs(loss - ref) > (2e-2 if cfg.precision == "bf16" else 1e-4) * max(
            1.0, abs(ref)
        ):
            bad.append(
                f"first-step loss {loss:.6f} with trimming vs {ref:.6f} without: trimming is not exact"
            )
        return bad

    def flops() -> dict[str, Any]:
        got = step_flops(cfg, name)
        return {
            "per_item": got["trimmed_per_item"],
            "per_item_dense_77": got["dense_per_item"],
            "text_tokens": got["trimmed_text_tokens"],
            "text_tokens_dense": got["dense_text_tokens"],
            "text_saves": 1 - got["trimmed_per_item"] / got["dense_per_item"],
            "how": f"FlopCounterMode: forward+backward of one step at batch {cfg.train_batch}, text trimmed "
            "as this row's capcurate side runs it; dense 77-token count beside it",
        }

    baselines = {"untrimmed": step_side(False, can_fuse, "untrimmed")}
    skipped = {}
    if can_fuse:
        baselines["unfused"] = step_side(True, False, "unfused")
        baselines["open_clip_step_untrimmed_unfused"] = step_side(False, False, "plain")
    else:
        skipped["unfused"] = (
            "fused AdamW is capcurate's choice on CUDA only; on the CPU both sides run unfused"
        )
    return Row(
        family="train",
        name="train_step",
        unit="samples",
        what=f"{name} train step on ready tensors, batch {cfg.train_batch}, {cfg.step_iters} steps: "
        "text trimmed (capcurate.models.text_trim) and fused AdamW on/off",
        capcurate=step_side(True, can_fuse, "capcurate"),
        baselines=baselines,
        gate=gate,
        skipped=skipped,
        target="separates trimming and fusing from the input pipeline",
        device=cfg.device,
        precision=cfg.precision,
        flops=flops,
    )
