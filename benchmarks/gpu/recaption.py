"""Recaption rows: ``capcurate.recaption`` against capcurate's own SDPA-patched captioner on ready tensors
(the ceiling: the stage's target is >= 90% of it), greedy at a fixed length and with the default decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bound import count_flops
from .config import Cfg, stage_options
from .runner import Measure, Row, timed, timed_stage


def stage_captions(ds: Path, name: str) -> list[dict[str, Any]]:
    from capcurate.dataset import Dataset

    return Dataset(ds).query(f"SELECT uid, caption, error FROM captions_{name}").to_pylist()


def ready_pixels(captioner: Any, jpegs: list[bytes], device: str) -> Any:
    """The images as the model takes them, already on the device (decode and resize are not timed)."""
    import torch

    from capcurate.inputs.decode import decode_cpu

    spec = captioner.image_spec
    batch = torch.stack([spec.resize_crop(decode_cpu(j)) for j in jpegs]).to(device)
    return spec.normalize(batch, captioner.dtype)


def length_gate(n_images: int, tokens: int | None, max_tokens: int):
    """Every image captioned once, without error, non-empty; with ``tokens`` set, every caption exactly
    that many generated tokens, else none over ``max_tokens``. Lengths come from the stage's own count
    of generated tokens (``tokens_generated``): re-tokenising the stored text would not give them back,
    since decoding drops special tokens and cleaning collapses whitespace."""

    def gate(out: tuple[list[dict[str, Any]], dict[str, Any]]) -> list[str]:
        rows, counts = out
        bad = []
        if len(rows) != n_images or counts.get("images_captioned") != n_images:
            bad.append(
                f"{len(rows)} caption rows, {counts.get('images_captioned')} captioned, for {n_images} images"
            )
        errors = [r["error"] for r in rows if r["error"]]
        if errors:
            bad.append(f"{len(errors)} images failed, e.g. {errors[0]}")
        empty = sum(not (r["caption"] or "").strip() for r in rows)
        if empty:
            bad.append(f"{empty} empty captions")
        made = counts.get("tokens_generated", 0)
        if tokens is not None and made != n_images * tokens:
            bad.append(f"{made} tokens generated for {n_images} captions of exactly {tokens}")
        if made > n_images * max_tokens or made == 0:
            bad.append(f"{made} tokens generated for {n_images} captions of at most {max_tokens}")
        return bad

    return gate


def rows(
    cfg: Cfg, ds: Path, jpegs: list[bytes], blip_ref: str, beam_ds: Path, beam_jpegs: list[bytes]
) -> list[Row]:
    import torch

    import capcurate
    from capcurate.models.captioners import load_captioner
    from capcurate.models.captioners.base import DecodingConfig

    dtype = "bf16" if cfg.device.startswith("cuda") else "fp32"
    captioner = load_captioner(blip_ref, device=cfg.device, dtype=dtype)
    options = {"batch_size": cfg.stage_batch, **stage_options(cfg)}
    out = []
    for tag, data, images, kw in (
        ("greedy", ds, jpegs, dict(decoding="greedy", min_new_tokens=cfg.tokens, max_new_tokens=cfg.tokens)),
        (
            "beam_default",
            beam_ds,
            beam_jpegs,  # the CLI's defaults: beam 3, up to 30 tokens
            {"max_new_tokens": cfg.beam_max_tokens} if cfg.beam_max_tokens else {},
        ),
    ):
        dec = DecodingConfig(**kw)
        pixels = ready_pixels(captioner, images, cfg.device)

        def ours(rep: int, data: Path = data, kw: dict = kw, tag: str = tag) -> Measure:
            summary, seconds, clock = timed_stage(
                lambda: capcurate.recaption(
                    data, model=blip_ref, name=f"bench_{tag}", **options, overwrite=True, **kw
                ),
                cfg.device,
            )
            if not summary.ok:
                raise RuntimeError(f"recaption failed: {summary.message}")
            got = stage_captions(data, f"bench_{tag}")
            return Measure(len(got), seconds, (got, summary.counts), clock.steady_per_s())

        def ceiling(rep: int, pixels: Any = pixels, dec: DecodingConfig = dec) -> Measure:
            caps: list[Any] = []

            def run() -> None:
                with torch.inference_mode():
                    for i in range(0, pixels.shape[0], cfg.gen_batch):
                        caps.extend(captioner.caption(pixels[i : i + cfg.gen_batch], dec))

            _, seconds = timed(run, cfg.device)
            if len(caps) != pixels.shape[0]:
                raise RuntimeError(f"the ceiling captioned {len(caps)} of {pixels.shape[0]} images")
            if dec.decoding == "greedy" and any(c.tokens != [dec.max_new_tokens] for c in caps):
                raise RuntimeError(f"the ceiling's captions are not all {dec.max_new_tokens} tokens long")
            return Measure(len(caps), seconds, caps)

        def flops(pixels: Any = pixels, dec: DecodingConfig = dec) -> dict[str, Any]:
            """The ceiling's call (capcurate's own model) on its first batch of ready images: the vision
            encoder, the prompt and every generated token (every beam), divided by the images."""
            x = pixels[: cfg.gen_batch]
            with torch.inference_mode():
                total, caps, parts = count_flops(lambda: captioner.caption(x, dec), grad=False)
            tokens = sum(sum(c.tokens) for c in caps) / max(1, len(caps))
            vision = sum(v for k, v in parts.items() if "vision" in k.lower())  # e.g. BlipVisionModel
            return {
                "per_item": total / x.shape[0],
                "vision_per_item": vision / x.shape[0] if vision else None,
                "tokens_per_image": tokens,
                "batch": int(x.shape[0]),
                "how": f"FlopCounterMode over captioner.caption on {x.shape[0]} ready images, "
                f"{tokens:.1f} generated tokens per image",
            }

        fixed = cfg.tokens if tag == "greedy" else None
        out.append(
            Row(
                family="recaption",
                name=f"recaption_{tag}",
                unit="images",
                what=f"BLIP-{cfg.blip} shape, {len(images)} JPEGs, "
                + (
                    f"greedy exactly {cfg.tokens} tokens"
                    if fixed
                    else f"default decoding (beam 3, <= {dec.max_new_tokens} tokens)"
                ),
                capcurate=ours,
                baselines={"ceiling_own_model_ready_tensors": ceiling},
                gate=length_gate(len(images), fixed, dec.max_new_tokens),
                target=">= 90% of the ceiling (capcurate's own SDPA-patched model on ready device tensors)",
                device=cfg.device,
                precision=dtype,
                flops=flops,
            )
        )
    return out


def vlm_row(cfg: Cfg, ds: Path, jpegs: list[bytes], vlm_ref: str) -> Row:
    """A chat-template VLM (Qwen2-VL): ``capcurate.recaption`` against ``generate`` on the processor's
    ready inputs (built by capcurate's own captioner before the clock starts), greedy, exactly N tokens."""
    import torch

    import capcurate
    from capcurate.inputs.decode import decode_cpu
    from capcurate.models.captioners import load_captioner
    from capcurate.models.captioners.base import DecodingConfig

    dtype = "bf16" if cfg.device.startswith("cuda") else "fp32"
    captioner = load_captioner(vlm_ref, device=cfg.device, dtype=dtype)
    kw = dict(decoding="greedy", min_new_tokens=cfg.tokens, max_new_tokens=cfg.tokens)
    dec = captioner.prepare(DecodingConfig(**kw))  # fills the default instruction, as the stage does
    images = [decode_cpu(j) for j in jpegs]
    ready = [
        captioner.build_inputs(images[i : i + cfg.vlm_batch], dec)
        for i in range(0, len(images), cfg.vlm_batch)
    ]
    options = {"batch_size": cfg.stage_batch, **stage_options(cfg)}

    def ours(rep: int) -> Measure:
        summary, seconds, clock = timed_stage(
            lambda: capcurate.recaption(ds, model=vlm_ref, name="bench_vlm", **options, overwrite=True, **kw),
            cfg.device,
        )
        if not summary.ok:
            raise RuntimeError(f"recaption failed: {summary.message}")
        return Measure(
            len(images), seconds, (stage_captions(ds, "bench_vlm"), summary.counts), clock.steady_per_s()
        )

    def generate_alone(rep: int) -> Measure:
        new: list[int] = []

        def run() -> None:
            with torch.inference_mode():
                for inputs in ready:
                    out = captioner.model.generate(**inputs, **captioner.generate_kwargs(dec))
                    new.extend([out.shape[1] - inputs["input_ids"].shape[1]] * out.shape[0])

        _, seconds = timed(run, cfg.device)
        if new != [cfg.tokens] * len(images):
            raise RuntimeError(
                f"generate made {sorted(set(new))} new tokens per image, asked for {cfg.tokens}"
            )
        return Measure(len(new), seconds)

    def flops() -> dict[str, Any]:
        """generate on the first batch of ready processor inputs (vision, prompt, every new token)."""
        inputs = ready[0]
        with torch.inference_mode():
            total, out, _ = count_flops(
                lambda: captioner.model.generate(**inputs, **captioner.generate_kwargs(dec)), grad=False
            )
        n = int(out.shape[0])
        return {
            "per_item": total / n,
            "batch": n,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "how": f"FlopCounterMode over generate on {n} ready processor inputs, {cfg.tokens} new tokens",
        }

    return Row(
        family="recaption",
        name="recaption_vlm",
        unit="images",
        what=f"Qwen2-VL {cfg.vlm} shape, {len(images)} JPEGs, greedy exactly {cfg.tokens} tokens",
        capcurate=ours,
        baselines={"generate_on_ready_processor_inputs": generate_alone},
        gate=length_gate(len(images), cfg.tokens, cfg.tokens),
        target="report images/s and tokens/s",
        device=cfg.device,
        precision=dtype,
        flops=flops,
    )
