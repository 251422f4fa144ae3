"""The training loop: AdamW + cosine schedule, AMP, accumulation, DDP, checkpoints, resume, eval.

The loop never waits on the GPU for bookkeeping: loss terms stay device tensors, accumulated over the
micro-batches of a step and checked for NaN/inf on the device; they are read back (one sync, and under
DDP one all-reduce of the terms and skipped counts plus one of the first bad step, on the process
group's device) only at steps that log, checkpoint or evaluate, and at the last step. A non-finite loss
is therefore reported at the step it happened, but noticed at the next such step (every step with the
default ``--log-every 1``): never after a checkpoint was written past it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from typing import Any

import torch

from .. import events, storage
from ..errors import InputError, OutputExistsError, StageFailed
from ..inputs.prefetch import prefetched
from ..summary import Summary
from . import checkpoint as ckpt_mod
from .caption_choice import caption_choice
from .config import PRECISIONS, TrainConfig
from .data import ShardsUnreadable, TrainStream, WorkerState, batches_per_worker, make_loader, one_line_cause
from .distributed import (
    DistInfo,
    all_gather_object,
    barrier,
    cleanup,
    init_distributed,
)
from .gpu_batches import assemble_batch
from .losses import LOSSES, build_loss, compute_loss
from .metrics_log import MetricsLog
from .model_setup import ModelSetup, build_model, build_optimizer
from .progress import TrainProgress
from .schedule import make_scheduler
from .shard_list import check_members, count_samples, resolve_shards
from .step_stats import NO_BAD_STEP, StepStats, reduce_step_stats
from .text_tower import prepare_text_tower

# test hook: SIGKILL this process right after the given optimizer step (resume tests)
KILL_ENV = "CAPCURATE_TRAIN_KILL_AT_STEP"


def train(data: str | TrainConfig, output: str | None = None, **options: Any) -> Summary | None:
    """Train an open_clip model on webdataset shards; returns the Summary on rank 0, None elsewhere.

    ``train("shards/", "runs/x", model_config="tiny.json", epochs=2)`` or ``train(TrainConfig(...))``.
    """
    if isinstance(data, TrainConfig):
        config = data
    else:
        if output is None:
            raise InputError("train needs an output run directory (-o RUN)")
        config = TrainConfig(data=str(data), output=str(output), **options)
    config = config.resolved()  # auto device/precision/workers/decode -> what this process uses
    _validate(config)
    dist = init_distributed(config.device)
    try:
        return _Trainer(config, dist).run()
    except ShardsUnreadable as e:  # from a DataLoader worker its message carries the worker's traceback
        raise ShardsUnreadable(one_line_cause(e)) from None
    finally:
        cleanup(dist)


def _validate(c: TrainConfig) -> None:
    if c.precision not in PRECISIONS:
        raise InputError(f"--precision {c.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if c.loss not in LOSSES:
        raise InputError(f"--loss {c.loss!r}: choose one of {', '.join(LOSSES)}")
    for name in ("batch_size", "epochs", "accum"):
        if getattr(c, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(c, name)}")
    if int(c.workers) < 0:
        raise InputError(f"--workers must be 0 (decode in process) or more, got {c.workers}")


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Trainer:
    def __init__(self, cfg: TrainConfig, dist: DistInfo):
        self.cfg, self.dist = cfg, dist
        self.run_dir = storage.path(cfg.output)  # a local folder or a URL (s3://bucket/runs/x)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

    # -- set-up ------------------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        cfg, run = self.cfg, self.run_dir
        storage.check_writable(run)
        storage.check_container(run)  # a missing bucket is one line before any work
        has_run = storage.exists(run / "run.json") or bool(ckpt_mod.checkpoint_dirs(run))
        if has_run and not cfg.resume and not cfg.overwrite:
            raise OutputExistsError(f"{run} already holds a training run; pass --resume latest to continue it "
                                    "or --overwrite to start over")
        barrier(self.dist)  # every rank has looked before rank 0 clears anything
        if self.dist.is_main:
            if has_run and cfg.overwrite and not cfg.resume:
                for p in ("checkpoints", "model"):
                    storage.rmtree(run / p)
                for p in ("metrics.jsonl", "run.json", "summary.json"):
                    storage.remove(run / p)
            storage.ensure_dir(run)
        barrier(self.dist)

    def run(self) -> Summary | None:
        try:
            return self._run()
        finally:
            if self.dist.is_main:
                self.metrics.close()  # a run in a bucket: the lines logged since the last upload

    def _run(self) -> Summary | None:
        cfg, dist = self.cfg, self.dist
        t0 = time.time()
        # the data first: training data that does not exist must leave no -o behind
        shards = resolve_shards(cfg.data)
        check_members(shards.urls[0])
        captions = caption_choice(cfg, shards)  # --caption-keys, else the shards' recipe, else .txt
        num_samples = cfg.train_num_samples or shards.num_samples
        if num_samples is None:
            if any("://" in u for u in shards.urls):
                raise InputError("remote shards: pass --train-num-samples, or give the folder with its "
                                 "manifest.json / sizes.json (sizes are not counted by reading every tar)")
            num_samples = count_samples(shards.urls)
        self._prepare_run_dir()

        setup = build_model(cfg, dist.device)
        self.setup = setup
        # cpu/gpu need the train transform as a crop spec; anything more elaborate runs on PIL images
        self.image_path = cfg.decode if setup.train_aug is not None else "pil"
        model = setup.model
        # a CLIP text tower runs over its captions' own tokens (packed) or each batch's longest caption
        # (trimmed), not all 77 positions: exact under the causal mask (train/text_tower.py)
        self.trim_texts, self.text_tower = prepare_text_tower(model, setup.tokenizer, cfg.text_tower, cfg.compile)
        loss_fn = build_loss(cfg.loss, model, rank=dist.rank, world_size=dist.world_size,
                             local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                             caption_loss_weight=cfg.caption_loss_weight, clip_loss_weight=cfg.clip_loss_weight)
        optimizer = build_optimizer(model, cfg)
        n_workers = max(cfg.workers, 1)
        bpw = batches_per_worker(num_samples, cfg.batch_size, dist.world_size, n_workers, cfg.accum)
        micro_per_epoch = bpw * n_workers
        steps_per_epoch = micro_per_epoch // cfg.accum
        total_steps = steps_per_epoch * cfg.epochs
        scheduler = make_scheduler(optimizer, warmup=cfg.warmup, total=total_steps)
        scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")

        step, epoch, micro_done = 0, 0, 0
        data_state: dict[int, WorkerState] = {}
        resume_from = ckpt_mod.resolve_resume(self.run_dir, cfg.resume)
        if resume_from is not None:
            state, meta = ckpt_mod.load_checkpoint(resume_from, model, model_name=setup.name,
                                                   model_cfg=setup.model_cfg)
            self._check_resume_options(meta)
            if len(state["data"]) != dist.world_size:
                raise InputError(f"checkpoint {resume_from} was written by {len(state['data'])} ranks; "
                                 f"this run has {dist.world_size} (resume with the same --nproc)")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            ckpt_mod.set_rng_state(state["rng"][dist.rank])
            step, epoch, micro_done = int(state["step"]), int(state["epoch"]), int(state["micro"])
            data_state = {int(k): WorkerState(*map(int, v)) for k, v in state["data"][dist.rank].items()}
            if micro_done >= micro_per_epoch:
                epoch, micro_done, data_state = epoch + 1, 0, {}
        if dist.is_main:
            self.metrics.truncate_after(step)
            if not storage.exists(self.run_dir / "run.json"):
                from .. import atomic

                atomic.write_json(self.run_dir / "run.json", {
                    "config": cfg.to_dict(), "model_name": setup.name, "model_cfg": setup.model_cfg,
                    "world_size": dist.world_size, "num_samples": num_samples, "shards": len(shards.urls),
                    "shard_source": shards.source, "steps_per_epoch": steps_per_epoch,
                    "total_steps": total_steps, "image_path": self.image_path,
                    "captions": captions.to_dict() if captions else None, "text_tower": self.text_tower})

        core = model
        if dist.distributed:
            ids = [dist.device.index] if dist.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
        if cfg.compile:
            model = torch.compile(model)

        self.core, self.model, self.optimizer, self.scheduler, self.scaler = core, model, optimizer, scheduler, scaler
        eval_set = self._open_eval()
        stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        global_batch = cfg.batch_size * dist.world_size * cfg.accum
        last: dict[str, float] = {"loss": float("nan")}
        saved_step = step if resume_from is not None else -1
        skipped = 0
        open_errors: dict[tuple[int, int], int] = {}  # (epoch, worker) -> shards that failed to open
        seen = 0
        rate = 0.0
        stats = StepStats(dist.device, cfg.accum)
        t_train = time.time()
        model.train()
        with TrainProgress(total_steps, step, enabled=dist.is_main) as bar:
            while epoch < cfg.epochs and step < stop_at:
                stream = TrainStream(
                    shards.urls, cfg.batch_size, bpw, setup.preprocess_train, setup.tokenizer,
                    seed=cfg.seed, epoch=epoch, rank=dist.rank, world_size=dist.world_size,
                    num_workers=n_workers, shuffle_shards=cfg.shuffle_shards, shuffle_buffer=cfg.shuffle_buffer,
                    worker_offset=micro_done % n_workers, resume=data_state, mode=self.image_path,
                    aug=setup.train_aug, captions=captions)
                loader = make_loader(stream, in_process=cfg.workers == 0, pin_memory=dist.device.type == "cuda")
                failed_here: dict[int, int] = {}  # images this process could not decode, per worker
                t_log, seen_log = time.time(), 0
                for images, texts, meta, failed in self._device_batches(loader):
                    micro_done += 1
                    worker = int(meta[0])
                    if failed:
                        failed_here[worker] = failed_here.get(worker, 0) + failed
                    raw_pos, batches, worker_skipped = map(int, meta[1:4].tolist())
                    open_errors[(epoch, worker)] = int(meta[4])
                    data_state[worker] = WorkerState(raw_pos, batches, worker_skipped + failed_here.get(worker, 0))
                    sync = micro_done % cfg.accum == 0
                    stats.add(self._micro_step(images, texts, loss_fn, sync))
                    if not sync:
                        continue
                    lr = self.optimizer.param_groups[-1]["lr"]  # the lr this step used
                    self._optimizer_step()
                    step += 1
                    stats.end_step(step)
                    events.emit("step", global_batch)  # step boundary for observers (benchmarks/gpu)
                    seen += global_batch
                    seen_log += global_batch
                    end_of_epoch = micro_done >= micro_per_epoch
                    log_now = step % max(cfg.log_every, 1) == 0 or step >= stop_at
                    save_now = bool(cfg.save_every and step % cfg.save_every == 0) or end_of_epoch or step >= stop_at
                    eval_now = bool(eval_set is not None and cfg.eval_every and step % cfg.eval_every == 0)
                    if log_now or save_now or eval_now:  # the same steps on every rank: collectives inside
                        step_terms, skipped, logit_scale = self._check(stats, data_state)
                        last = {"loss": sum(step_terms.values()), **step_terms}
                        if log_now:
                            rate = seen_log / max(time.time() - t_log, 1e-9)
                            if dist.is_main:
                                self.metrics.append({"step": step, "epoch": epoch, **last, "lr": lr,
                                                     "samples_per_s": rate, "logit_scale": logit_scale,
                                                     "skipped": skipped})
                            t_log, seen_log = time.time(), 0
                    bar.update(step, rate, last["loss"])
                    if save_now:
                        self._save(step, epoch, micro_done, data_state, num_samples)
                        saved_step = step
                    if eval_now:
                        self._eval(eval_set, step)
                    if kill_at and step == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    if step >= stop_at:
                        break
                if micro_done >= micro_per_epoch:
                    epoch, micro_done, data_state = epoch + 1, 0, {}
        if saved_step != step:
            self._save(step, epoch, micro_done, data_state, num_samples)
        train_s = time.time() - t_train
        if eval_set is not None and (not cfg.eval_every or step % cfg.eval_every):
            self._eval(eval_set, step)
        if not dist.is_main:
            return None
        counts = {"steps": step, "total_steps": total_steps, "epochs": cfg.epochs, "world_size": dist.world_size,
                  "samples_seen": seen, "samples_per_s": seen / max(train_s, 1e-9), "skipped_samples": skipped,
                  "shard_open_errors": sum(open_errors.values()),
                  **{k: v for k, v in last.items()}}
        summary = Summary("train", counts=counts, details={
            "run": str(self.run_dir), "model": setup.name, "checkpoint": str(ckpt_mod.latest_checkpoint(self.run_dir)),
            "resumed_from": str(resume_from) if resume_from else None, "text_tower": self.text_tower}, seconds=time.time() - t0,
            message=f"trained {setup.name} for {step} steps; load it with --model {self.run_dir}")
        from .. import atomic

        atomic.write_json(self.run_dir / "summary.json", summary.to_dict())
        return summary

    def _check_resume_options(self, meta: dict[str, Any]) -> None:
        saved_dict = meta.get("config", {})
        saved = TrainConfig.from_dict(saved_dict)
        diff = self.cfg.differences(saved)
        # options a checkpoint predates (e.g. --decode) are not held against it
        diff = [k for k in diff if k not in ("model", "model_config", "output", "data", "pretrained") and k in saved_dict]
        if diff:
            shown = ", ".join(f"--{k.replace('_', '-')} {getattr(saved, k)!r} -> {getattr(self.cfg, k)!r}" for k in diff)
            raise InputError(f"--resume with other training options than the checkpoint's ({shown}); "
                             "use the original options or a new -o")

    # -- one step ----------------------------------------------------------------------------------
    def _device_batches(self, loader):
        """(images on the device, normalised; tokens on the device; meta; images that failed to decode),
        prepared a batch or two ahead in a thread when workers decode (gpu_batches.prefetched)."""
        dev, aug = self.dist.device, self.setup.train_aug

        def prepare(item):
            images, texts, meta = item
            failed = 0
            if isinstance(images, dict):  # uint8 crops and/or JPEG bytes + boxes
                images, failed = assemble_batch(images, aug, dev)
            else:
                images = images.to(dev, non_blocking=True)
            return images, self.trim_texts(texts).to(dev, non_blocking=True), meta, failed

        return prefetched(loader, prepare, dev, background=self.cfg.workers > 0)

    def _micro_step(self, images: torch.Tensor, texts: torch.Tensor, loss_fn, sync: bool) -> dict[str, torch.Tensor]:
        """Forward + backward of one micro-batch; its loss terms stay on the device (no sync)."""
        dev = self.dist.device
        images = images.to(dev, non_blocking=True)
        texts = texts.to(dev, non_blocking=True)
        ctx = self.model.no_sync() if (self.dist.distributed and not sync and hasattr(self.model, "no_sync")) \
            else contextlib.nullcontext()
        with ctx:
            with _autocast(self.cfg.precision, dev):
                out = self.model(images, texts)
                terms = compute_loss(loss_fn, out)
                loss = sum(terms.values())
            self.scaler.scale(loss / self.cfg.accum).backward()
        return {k: v.detach() for k, v in terms.items()}

    def _check(self, stats: StepStats, data_state: dict[int, WorkerState]) -> tuple[dict[str, float], int, float]:
        """Read back the last step: (loss terms averaged over ranks, skipped samples of all ranks, logit
        scale); stop with StageFailed when any rank's loss was not finite at this or an earlier step."""
        local_skipped = sum(s.skipped for s in data_state.values())
        terms, skipped, bad_step, extra = reduce_step_stats(
            self.dist, stats.terms, local_skipped, stats.bad_step,
            {"bad_value": stats.bad_value, "logit_scale": self.core.logit_scale.detach().float().exp()})
        if bad_step != NO_BAD_STEP:
            value = extra["bad_value"] if int(stats.bad_step) == bad_step else float("nan")
            good = ckpt_mod.latest_checkpoint(self.run_dir)
            raise StageFailed(f"loss became {value} at step {bad_step}; training stopped. Last good "
                              f"checkpoint: {good if good else 'none (no checkpoint was saved yet)'}")
        return terms, skipped, extra["logit_scale"]

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():  # as in CLIP: the temperature may not exceed 100
            self.core.logit_scale.clamp_(0, math.log(100))

    # -- outputs -----------------------------------------------------------------------------------
    def _save(self, step: int, epoch: int, micro: int, data_state: dict[int, WorkerState], num_samples: int) -> None:
        dist = self.dist
        rngs = all_gather_object(dist, ckpt_mod.rng_state())
        datas = all_gather_object(dist, {k: [s.raw_pos, s.batches, s.skipped] for k, s in data_state.items()})
        if dist.is_main:
            from ..models.openclip_loader import export_openclip_dir

            self.metrics.flush()  # before the checkpoint: a stored metrics.jsonl holds every line up to it
            state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rngs, "data": datas,
                     "step": step, "epoch": epoch, "micro": micro}
            meta = {"model_name": self.setup.name, "model_cfg": self.setup.model_cfg,
                    "config": self.cfg.to_dict(), "epoch": epoch, "num_samples": num_samples}
            ckpt_mod.save_checkpoint(self.run_dir, step, self.core, state, meta, keep=self.cfg.keep_checkpoints)
            export_openclip_dir(self.core, self.setup.model_cfg, self.run_dir / "model",
                                preprocess_cfg=self.setup.preprocess_cfg, tokenizer_dir=self.setup.tokenizer_dir)
        barrier(dist)

    def _open_eval(self):
        if not self.cfg.eval_data:
            return None
        from .evalset import open_eval_set

        return open_eval_set(self.cfg.eval_data)

    def _eval(self, eval_set, step: int) -> None:
        if self.dist.is_main:
            from ..inputs import Preprocess, from_openclip
            from .evaluation import evaluate_streamed

            setup, core, dev = self.setup, self.core, self.dist.device
            core.eval()

            def enc_img(x: torch.Tensor) -> torch.Tensor:
                with _autocast(self.cfg.precision, dev):
                    return core.encode_image(x.to(dev), normalize=True).float()

            def enc_txt(texts) -> torch.Tensor:
                with _autocast(self.cfg.precision, dev):
                    return core.encode_text(setup.tokenizer(list(texts)).to(dev), normalize=True).float().cpu()

            # the one image input pipeline, as `capcurate eval` runs it: the training run's decode workers
            # and decode (cpu, or nvJPEG on the GPU), not one core decoding every eval image with PIL
            pre = Preprocess(from_openclip(setup.preprocess_cfg), setup.preprocess_val)
            results = evaluate_streamed(eval_set, pre, enc_img, enc_txt, workers=int(self.cfg.workers),
                                        device=str(dev), decode=self.cfg.decode, model_name=setup.name)
            core.train()
            self.metrics.append({"step": step, "eval": {r["task"]: r["metrics"] for r in results}}, flush=True)
        barrier(self.dist)


__all__ = ["train", "TrainConfig", "ModelSetup", "KILL_ENV"]
