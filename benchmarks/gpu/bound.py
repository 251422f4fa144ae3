"""The FLOP bound and GPU busy of a row.

*FLOPs per item* are counted, not derived: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention, 2 FLOPs per multiply-add; element-wise work, norms and the optimizer step are
not counted) over one real call of the row's own model on the row's own inputs, run once outside the timed
repeats and divided by the items it processed.

*The bound* is the card's peak dense tensor-core FLOP/s at the row's precision, from NVIDIA's datasheets
(``PEAK``); ``fraction_of_bound`` = capcurate's median items/s x FLOPs per item / peak. Unknown cards and the
CPU have no peak (None).

*GPU busy* is NVML's ``utilization.gpu``: the percentage of the last sample period (1/6 s to 1 s, by card)
in which one or more kernels ran. ``BusySampler`` polls it every 100 ms (pynvml, from ``nvidia-ml-py``,
when importable; else ``nvidia-smi -lms 100`` in a subprocess) while a repeat runs. Anything that goes
wrong in sampling gives None, never an exception: a CPU run has no sampler at all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

# Peak dense FLOP/s (no 2:4 sparsity) by card, from NVIDIA's datasheets: H100 (SXM5, PCIe, NVL) "NVIDIA H100
# Tensor Core GPU" datasheet; H200 (SXM, NVL) "NVIDIA H200 Tensor Core GPU" datasheet; A100 (SXM4 and PCIe
# alike) "NVIDIA A100 Tensor Core GPU" datasheet. The datasheets list tensor-core rates with sparsity
# (marked *); dense is half of those. fp32 is the non-tensor-core rate (a row running fp32 matmuls with TF32
# allowed is bounded by tf32). Matched in order against torch.cuda.get_device_name: the first key that is a
# substring wins, so the NVL and PCIe variants come before the plain name (H100 SXM5 reports
# "NVIDIA H100 80GB HBM3", H200 SXM "NVIDIA H200").
T = 1e12
PEAK: dict[str, dict[str, float]] = {
    "H200 NVL": {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60.0 * T},
    "H200": {"bf16": 989.5 * T, "fp16": 989.5 * T, "tf32": 494.5 * T, "fp32": 67.0 * T},
    "H100 NVL": {"bf16": 835.5 * T, "fp16": 835.5 * T, "tf32": 417.5 * T, "fp32": 60.0 * T},
    "H100 PCIe": {"bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378.0 * T, "fp32": 51.0 * T},
    "H100": {"bf16": 989.5 * T, "fp16": 989.5 * T, "tf32": 494.5 * T, "fp32": 67.0 * T},
    "A100": {"bf16": 312.0 * T, "fp16": 312.0 * T, "tf32": 156.0 * T, "fp32": 19.5 * T},
}


def peak_flops(card: str, precision: str) -> tuple[str, float] | None:
    """(table key, peak dense FLOP/s) of ``card`` at ``precision`` (bf16, fp16, tf32, fp32), or None."""
    for key, rates in PEAK.items():
        if key.lower() in (card or "").lower():
            rate = rates.get(_matmul_precision(precision))
            return (key, rate) if rate else None
    return None


def _matmul_precision(precision: str) -> str:
    """fp32 matmuls run on TF32 tensor cores when torch allows it; amp_bf16 etc. name their dtype."""
    p = precision.lower().replace("amp_", "")
    if p == "fp32":
        with contextlib.suppress(Exception):
            import torch

            if torch.backends.cuda.matmul.allow_tf32:
                return "tf32"
    return p


def fraction_of_bound(per_s: float | None, flops_per_item: float | None, peak: float | None) -> float | None:
    """items/s x FLOPs/item / peak FLOP/s; None when any is unknown or zero."""
    if not per_s or not flops_per_item or not peak:
        return None
    return per_s * flops_per_item / peak


# -- counting --------------------------------------------------------------------------------------
def _cpu_sdpa(q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _cpu_sdpa_backward(g: Any, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(g, q, k, v)


def count_flops(fn: Callable[[], Any], grad: bool = True) -> tuple[float, Any, dict[str, float]]:
    """(FLOPs, result, FLOPs by outermost module called, by class name: e.g. "BlipVisionModel" and
    "BlipTextLMHeadModel" for BLIP's generate) of ``fn()`` under FlopCounterMode.

    ``grad``: autograd on, as the old benchmarks/gpu.py counted: without it nn.MultiheadAttention (open_clip's
    ViTs) takes its fused inference fast path, whose projections the counter does not see (-36% on
    ViT-L-14). The CPU's flash attention kernel is counted as the CUDA kernels are (torch's table lacks it).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    custom = {}
    for name, formula in (
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_sdpa),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_sdpa_backward),
    ):
        if hasattr(aten, name):
            custom[getattr(aten, name)] = formula
    with torch.set_grad_enabled(grad), FlopCounterMode(display=False, custom_mapping=custom) as fc:
        out = fn()
    parts = {
        name: float(sum(ops.values()))
        for name, ops in fc.get_flop_counts().items()
        if "." not in name and name != "Global" and sum(ops.values())
    }
    return float(fc.get_total_flops()), out, parts


# -- GPU busy --------------------------------------------------------------------------------------
def _nvml_index() -> int:
    """NVML numbers every GPU of the machine; torch's device 0 is the first of CUDA_VISIBLE_DEVICES."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


class BusySampler:
    """``utilization.gpu`` every ``interval`` seconds between ``start()`` and ``stop()``, stamped with
    ``time.time()``. ``enabled=False`` (the CPU) samples nothing; so does a machine with neither pynvml nor
    nvidia-smi. ``stop()`` returns the samples; ``mean()`` averages them over a time window."""

    def __init__(self, enabled: bool, interval: float = 0.1):
        self.enabled, self.interval = enabled, interval
        self.samples: list[tuple[float, float]] = []
        self.source: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> BusySampler:
        if not self.enabled:
            return self
        try:
            self._start_nvml()
        except Exception:
            try:
                self._start_smi()
            except Exception:
                self.source = None
        return self

    def _start_nvml(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(_nvml_index())
            pynvml.nvmlDeviceGetUtilizationRates(handle)  # fails here, not in the thread, when unsupported
        except Exception:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            raise

        def poll() -> None:
            try:
                while not self._stop.is_set():
                    u = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                    self.samples.append((time.time(), float(u)))
                    self._stop.wait(self.interval)
            except Exception:
                pass
            finally:
                with contextlib.suppress(Exception):
                    pynvml.nvmlShutdown()

        self.source = "pynvml"
        self._thread = threading.Thread(target=poll, name="gpu-busy", daemon=True)
        self._thread.start()

    def _start_smi(self) -> None:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return
        self._proc = subprocess.Popen(
            [
                smi,
                "-i",
                str(_nvml_index()),
                "--query-gpu=timestamp,utilization.gpu",
                "--format=csv,noheader,nounits",
                "-lms",
                str(max(1, int(self.interval * 1000))),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

        def read() -> None:  # the timestamps nvidia-smi prints, not arrival: a pipe may deliver in blocks
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                with contextlib.suppress(ValueError):
                    ts, util = (x.strip() for x in line.split(","))
                    t = datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    self.samples.append((t, float(util)))

        self.source = "nvidia-smi"
        self._thread = threading.Thread(target=read, name="gpu-busy-smi", daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[float, float]]:
        self._stop.set()
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.terminate()
                try:
                    self._proc.wait(5)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(5)
        if self._thread is not None:
            self._thread.join(5)
        return self.samples

    def mean(self, t0: float | None = None, t1: float | None = None) -> float | None:
        """Mean busy % of the samples stamped in [t0, t1] (all of them by default); None without any."""
        inside = [u for t, u in self.samples if (t0 is None or t >= t0) and (t1 is None or t <= t1)]
        return sum(inside) / len(inside) if inside else None


def mean_or_none(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return sum(got) / len(got) if got else None
