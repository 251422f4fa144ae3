"""Input row: JPEG -> the captioner's input size as uint8, one core, like for like.

capcurate's decode worker path (``capcurate.inputs.decode.decode_cpu`` + ``ImageSpec.resize_crop``, what
each worker of the shared input stream runs) against PIL decode + resize to uint8, and against the model's
HF image processor with rescale and normalise off (so it too stops at the resized image). On CUDA also the
GPU path (nvJPEG batch decode + batched resize); on the CPU that side is skipped, with the reason.
Gate: same count and shape, and capcurate's pixels within 3 grey levels (mean) of PIL's.
"""

from __future__ import annotations

import io
from typing import Any

from .config import Cfg
from .runner import Measure, Row, timed

MEAN_LEVELS_TOL = 3.0


def rows(cfg: Cfg, jpegs: list[bytes], blip_ref: str) -> list[Row]:
    import numpy as np
    import torch
    from PIL import Image

    from capcurate.inputs.decode import as_tensor, decode_cpu, decode_jpegs_gpu
    from capcurate.models.captioners import load_captioner

    captioner = load_captioner(blip_ref, device="cpu", dtype="fp32")
    spec = captioner.image_spec
    processor = captioner.processor.image_processor
    h, w = spec.output_size
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[
        spec.interpolation
    ]
    pil_out: list[Any] = []

    def one_core(fn):
        def side(rep: int) -> Measure:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a decode worker's share: one core
            try:
                out, seconds = timed(lambda: [fn(j) for j in jpegs], "cpu")
            finally:
                torch.set_num_threads(threads)
            return Measure(len(out), seconds, out)

        return side

    def ours(j: bytes) -> Any:
        return spec.resize_crop(decode_cpu(j))

    def pil(j: bytes) -> Any:
        img = Image.open(io.BytesIO(j)).convert("RGB").resize((w, h), resample)
        return np.asarray(img)

    def hf(j: bytes) -> Any:
        img = Image.open(io.BytesIO(j)).convert("RGB")
        return processor(img, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]

    def pil_recorded(rep: int) -> Measure:
        m = one_core(pil)(rep)
        pil_out[:] = m.output
        return m

    def gate(out: list[Any]) -> list[str]:
        bad = []
        if len(out) != len(jpegs):
            bad.append(f"{len(out)} outputs for {len(jpegs)} images")
        shapes = {tuple(t.shape) for t in out}
        if shapes != {(3, h, w)} or any(t.dtype != torch.uint8 for t in out):
            bad.append(f"outputs {shapes}, expected uint8 (3, {h}, {w})")
        elif pil_out:
            diff = float(
                np.mean(
                    [
                        np.abs(t.permute(1, 2, 0).numpy().astype(np.float32) - p.astype(np.float32)).mean()
                        for t, p in zip(out, pil_out, strict=True)
                    ]
                )
            )
            if diff > MEAN_LEVELS_TOL:
                bad.append(f"pixels differ from PIL's by {diff:.2f} levels on average (> {MEAN_LEVELS_TOL})")
        return bad

    baselines: dict[str, Any] = {
        "pil_decode_resize_uint8": pil_recorded,
        "hf_processor_rescale_normalize_off": one_core(hf),
    }
    skipped = {}
    if cfg.device.startswith("cuda"):
        dev = torch.device(cfg.device)
        encoded = [as_tensor(j) for j in jpegs]

        def gpu(rep: int) -> Measure:
            def run() -> list[Any]:
                return [spec.resize_crop(x) for x in decode_jpegs_gpu(encoded, dev)]

            out, seconds = timed(run, cfg.device)
            return Measure(len(out), seconds)

        baselines["capcurate_gpu_nvjpeg_resize"] = gpu
    else:
        skipped["capcurate_gpu_nvjpeg_resize"] = "nvJPEG needs CUDA"
    return [
        Row(
            family="input",
            name="input_uint8_one_core",
            unit="images",
            what=f"{len(jpegs)} JPEGs {cfg.image_size[0]}x{cfg.image_size[1]} -> uint8 {h}x{w}, one core",
            capcurate=one_core(ours),
            baselines=baselines,
            gate=gate,
            skipped=skipped,
            target=">= 2x per core against PIL + processor stopping at uint8",
        )
    ]
