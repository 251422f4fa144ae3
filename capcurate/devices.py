"""The defaults every command shares: which device, which precision, how many decode workers.

One place, so ``--device``, ``--precision`` and ``--workers`` mean the same thing in recaption, score,
eval and train: device ``auto`` is cuda when a GPU is visible, precision ``auto`` is bf16 on a GPU and
fp32 on the CPU, workers ``auto`` is one per core this process may use, less one for the main process.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from .errors import InputError

PRECISIONS = ("fp32", "bf16", "fp16")
DECODES = ("auto", "cpu", "gpu", "draft")


# the CPUs a scheduler gave this process when it does not pin them (a Ray actor's num_cpus): set by
# capcurate.engines.ray in each actor, so decode workers and torch threads fit the share, not the node
CPUS_ENV = "CAPCURATE_CPUS"


def available_cpus() -> int:
    """Cores this process may run on (a SLURM or container CPU mask counts, not the machine's total;
    ``$CAPCURATE_CPUS`` when a scheduler set it)."""
    given = os.environ.get(CPUS_ENV, "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str | None) -> str:
    """``None``/``auto`` -> cuda when available, else cpu; anything else is checked and returned."""
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA GPU is visible to this process (use --device cpu)")
    try:
        torch.device(device)
    except RuntimeError:
        raise InputError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    return device


def resolve_precision(precision: str | None, device: str) -> str:
    """``auto`` -> bf16 on a GPU (fp16 where the GPU has no bf16), fp32 on the CPU."""
    if precision in (None, "", "auto"):
        if not device.startswith("cuda"):
            return "fp32"
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be auto, {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def resolve_workers(workers: int | str | None, *, reserve: int = 1) -> int:
    """``auto`` -> one decode process per usable core minus ``reserve`` for the main process."""
    n = int_or_auto(workers, "--workers", minimum=0)
    return max(1, available_cpus() - reserve) if n == "auto" else n


def resolve_decode(decode: str | None, device: str) -> str:
    """``auto`` -> gpu (nvJPEG batches) when the model runs on CUDA, else cpu."""
    decode = decode or "auto"
    if decode not in DECODES:
        raise InputError(f"--decode must be one of {', '.join(DECODES)}, got {decode!r}")
    if decode == "auto":
        return "gpu" if device.startswith("cuda") else "cpu"
    if decode == "gpu" and not device.startswith("cuda"):
        raise InputError("--decode gpu needs --device cuda")
    return decode


def int_or_auto(value: int | str | None, option: str, *, minimum: int) -> int | str:
    """An int >= ``minimum`` or ``"auto"`` (None and "" mean auto); anything else is a one-line error."""
    if value in (None, "", "auto"):
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{option} must be an integer >= {minimum} or 'auto', got {value!r}") from None
    if n < minimum:
        raise InputError(f"{option} must be an integer >= {minimum} or 'auto', got {n}")
    return n


def positive_or_auto(value: int | str | None, option: str) -> int | str:
    """A positive int or ``"auto"``."""
    return int_or_auto(value, option, minimum=1)


def parse_batch_size(batch_size: int | str | None) -> int | str:
    """A positive int or ``"auto"``."""
    return positive_or_auto(batch_size, "--batch-size")


@contextlib.contextmanager
def model_threads(device: str, workers: int) -> Iterator[None]:
    """On the CPU, leave the decode workers their cores: torch's default of one thread per core makes its
    OpenMP threads spin against the workers, which is ten times slower on a busy small machine."""
    import torch

    before = torch.get_num_threads()
    if str(device) == "cpu" and workers > 0:
        torch.set_num_threads(max(1, available_cpus() - workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_placement(device: str | None, precision: str | None, decode: str | None,
                      engine: str = "local") -> tuple[str, str]:
    """(device, precision) a stage records, its words checked. Under ``--engine ray`` they stay as
    given (``auto`` included): each actor resolves them on its own machine in the job's ``setup``."""
    if engine == "ray":
        resolve_decode(decode, "cuda")  # only the words: the actor's device decides the rest
        if precision not in (None, "", "auto"):
            resolve_precision(precision, "cpu")
        return device or "auto", precision or "auto"
    run_device = resolve_device(device)
    resolve_decode(decode, run_device)
    return run_device, resolve_precision(precision, run_device)
