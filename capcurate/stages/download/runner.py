"""Calling ``img2dataset.download`` in-process, with the few adjustments capcurate needs.

- stdout stays clean for ``--json``: img2dataset and its spawned workers print progress to fd 1,
  so fd 1 is pointed at stderr for the duration of the call (workers inherit the descriptor).
- its SIGINT handler ends the process with ``sys.exit(0)``; we turn that back into
  KeyboardInterrupt (exit 130, "re-run to resume") and restore the previous handler afterwards.
- its Resizer is preceded by a header check (``guard``) so bombs and broken files are counted with
  a reason instead of being decoded.
- its Downloader downloads each URL under a deadline (``stall``, ``--stall-timeout``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Img2DatasetOptions:
    """The img2dataset arguments capcurate passes through (names follow capcurate's CLI)."""

    image_size: int = 256
    resize_mode: str = "border"
    processes: int = 1
    threads: int = 64
    timeout: int = 10
    retries: int = 0
    distributor: str = "multiprocessing"
    samples_per_shard: int = 10000
    encode_format: str = "jpg"
    encode_quality: int | None = None  # None: img2dataset's 95 for jpg/webp, PNG compression 9 for png
    max_pixels: int = 64_000_000
    stall_timeout: float = 0.0  # seconds a single URL may take in all; 0: no watchdog

    def effective_quality(self) -> int:
        if self.encode_quality is not None:
            return self.encode_quality
        return 9 if self.encode_format == "png" else 95

    def output_params(self) -> dict:
        """The options that change what lands on disk (a resume must use the same ones)."""
        return {"image_size": self.image_size, "resize_mode": self.resize_mode,
                "samples_per_shard": self.samples_per_shard, "encode_format": self.encode_format,
                "encode_quality": self.effective_quality(), "max_pixels": self.max_pixels}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send both Python-level and fd-level stdout (inherited by child processes) to stderr."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreters): Python-level redirection is all we can do
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def import_img2dataset():
    # albumentations (imported by img2dataset) checks PyPI for updates on import unless told not to
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import img2dataset

    return img2dataset


def run_img2dataset(*, url_list: Path, input_format: str, output_folder: Path, url_col: str,
                    caption_col: str | None, extra_columns: list[str], opts: Img2DatasetOptions,
                    incremental_mode: str = "incremental") -> None:
    """Download every shard of ``url_list`` that ``output_folder`` does not have yet (``incremental``), or
    all of it into new shards numbered after the last finished one (``extend``)."""
    img2dataset = import_img2dataset()
    # the module, not the function: img2dataset/__init__ re-exports a function named ``main``
    i2d_main = importlib.import_module("img2dataset.main")

    from . import guard, stall

    guard.MAX_PIXELS = opts.max_pixels
    stall.STALL_TIMEOUT = float(opts.stall_timeout)
    # OpenCV's own pixel limit, inherited by the workers: a second line of defence behind the guard
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(max(opts.max_pixels, 1)))
    original_resizer = getattr(i2d_main, "Resizer", None)
    original_downloader = getattr(i2d_main, "Downloader", None)
    if original_downloader is not None:
        i2d_main.Downloader = stall.GuardedDownloader
    previous_sigint = signal.getsignal(signal.SIGINT)
    if original_resizer is not None:
        i2d_main.Resizer = guard.GuardedResizer
    try:
        with stdout_to_stderr():
            img2dataset.download(
                url_list=str(url_list),
                input_format=input_format,
                output_folder=str(output_folder),
                output_format="webdataset",
                url_col=url_col,
                caption_col=caption_col,
                save_additional_columns=extra_columns or None,
                image_size=opts.image_size,
                resize_mode=opts.resize_mode,
                processes_count=opts.processes,
                thread_count=opts.threads,
                timeout=opts.timeout,
                retries=opts.retries,
                distributor=opts.distributor,
                number_sample_per_shard=opts.samples_per_shard,
                encode_format=opts.encode_format,
                encode_quality=opts.effective_quality(),
                incremental_mode=incremental_mode,
                compute_hash="sha256",
                extract_exif=False,
                enable_wandb=False,
            )
    except SystemExit as e:
        # img2dataset's SIGINT handler calls sys.exit(0): that is an interrupt, not a success
        raise KeyboardInterrupt from e
    finally:
        if original_resizer is not None:
            i2d_main.Resizer = original_resizer
        if original_downloader is not None:
            i2d_main.Downloader = original_downloader
        with contextlib.suppress(ValueError):  # not the main thread: img2dataset could not set it either
            signal.signal(signal.SIGINT, previous_sigint)
