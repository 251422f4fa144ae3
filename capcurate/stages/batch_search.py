"""Batch sizes that fit: the one-time search ``--batch-size auto`` does on a GPU, and the out-of-memory
back-off that keeps a run going when a batch still does not fit (longer captions, larger images)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import StageFailed


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def caption_with_backoff(captioner: Any, batch: Any, config: Any, state: dict[str, int],
                         seeds: list[int] | None = None) -> list[list[str]]:
    """Caption a batch (pixel tensor or list of images) in chunks of ``state['chunk']``; on out-of-memory
    halve the chunk and go on. With per-image ``seeds`` the chunking cannot change a caption."""
    out: list[list[str]] = []
    i = 0
    while i < len(batch):
        chunk = state["chunk"]
        try:
            if seeds is None:
                out.extend(captioner.caption(batch[i:i + chunk], config))
            else:
                out.extend(captioner.caption(batch[i:i + chunk], config, seeds[i:i + chunk]))
            i += chunk
        except RuntimeError as e:
            if not _is_oom(e) or chunk == 1:
                raise
            _free_cuda_memory()
            state["chunk"] = max(1, chunk // 2)
            state["oom_backoffs"] = state.get("oom_backoffs", 0) + 1
    return out


def find_batch_size(try_batch: Any, *, start: int = 8, limit: int = 1024) -> int:
    """Largest batch size (up to ``limit``) for which ``try_batch(n)`` does not run out of memory.

    Doubles from ``start`` until a failure, then bisects between the last success and that failure.
    """
    ok, bad = 0, None
    n = start
    while n <= limit:
        try:
            try_batch(n)
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            _free_cuda_memory()
            bad = n
            break
        ok, n = n, n * 2
    if ok == 0 and bad is not None:  # even ``start`` fails: search below it
        lo, hi = 0, bad
    elif bad is None:
        return ok
    else:
        lo, hi = ok, bad
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            try_batch(mid)
            lo = mid
        except RuntimeError as e:
            if not _is_oom(e):
                raise
            _free_cuda_memory()
            hi = mid
    if lo == 0:
        raise StageFailed("even a batch of 1 image does not fit in device memory")
    return lo


@contextmanager
def uncompiled(captioner: Any) -> Iterator[None]:
    """``--compile`` off while probing: the eager tower and a dynamic KV cache (no larger than the compiled
    graphs' memory) instead of one compilation per probed batch size."""
    from ..models.compiling import eager

    static = getattr(captioner, "static_cache", False)
    if static:
        captioner.static_cache = False
    try:
        with eager(getattr(captioner, "model", None)):
            yield
    finally:
        if static:
            captioner.static_cache = static


def probe_image(captioner: Any) -> Any:
    """A VLM's cost grows with image size: the probe is a square image of the most pixels the budget the
    captioner runs at lets one image keep (``--max-pixels`` or its default), never a fixed guess."""
    import math

    import torch

    side = max(28, math.isqrt(int(captioner.probe_pixels)))
    return torch.full((3, side, side), 127, dtype=torch.uint8)


def probe_batch_size(captioner: Any, config: Any, limit: int) -> int:
    """Search the largest batch that fits on the GPU with a worst-case (max_new_tokens) generation."""
    with uncompiled(captioner):
        return _probe(captioner, config, limit)


def _probe(captioner: Any, config: Any, limit: int) -> int:
    import torch

    spec = captioner.image_spec
    probe = type(config)(**{**config.__dict__, "min_new_tokens": config.max_new_tokens})
    if captioner.input_kind == "images":
        grey = probe_image(captioner)

        def try_images(n: int) -> None:
            captioner.caption([grey] * n, probe)
            torch.cuda.synchronize()

        return find_batch_size(try_images, limit=limit)
    if spec is not None:
        h, w = spec.output_size
        one = spec.normalize(torch.full((1, 3, h, w), 127, dtype=torch.uint8), torch.float32)[0]
    else:
        from PIL import Image

        one = captioner.preprocess(Image.new("RGB", (256, 256), (127, 127, 127)))

    def try_batch(n: int) -> None:
        captioner.caption(one.unsqueeze(0).expand(n, *one.shape).contiguous(), probe)
        torch.cuda.synchronize()

    return find_batch_size(try_batch, limit=limit)
