"""A batch that raises is captioned again without the images at fault, so one image the model or its
processor refuses costs that image's row, never its batch or the shards the batch spans.

Two ways to find them: a captioner with ``screen(images, config)`` (the VLMs: their processor refuses an
image on its own, in milliseconds) names the refused images of a batch its processor refused; anything
else is found by halving the batch, about 2 log2(n) calls for one bad image among n, where retrying image
by image would take n (512 single-image generates on a GPU: minutes). The rest keep being captioned as
batches.
"""

from __future__ import annotations

from typing import Any

from .batch_search import _is_oom, caption_with_backoff

Row = tuple[Any, str | None]  # (the image's captions, or None; why not)


def _reason(e: BaseException) -> str:
    from ..models.captioners.base import ImageRejected

    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if isinstance(e, ImageRejected) else f"captioning failed: {type(e).__name__}: {line}"


def _take(batch: Any, idx: list[int]) -> Any:
    """The images at ``idx`` of a pixel tensor or a list of images."""
    if isinstance(batch, list):
        return [batch[i] for i in idx]
    import torch

    return batch[torch.tensor(idx, device=batch.device)]


def caption_rows(captioner: Any, batch: Any, config: Any, state: dict[str, int],
                 seeds: list[int] | None = None) -> list[Row]:
    """``(captions, None)`` or ``(None, reason)`` per image of ``batch`` (a pixel tensor or a list of images).

    Out of memory is ``caption_with_backoff``'s (smaller chunks); any other error splits the batch. When
    no image of the batch could be captioned and some failure was not a refused image (``ImageRejected``),
    the model itself is failing: the first such error is raised, so the batch's shards fail and a rerun
    retries them instead of storing an error row for every image."""
    from ..models.captioners.base import ImageRejected

    rows: list[Row | None] = [None] * len(batch)
    model_errors: list[BaseException] = []
    screen = getattr(captioner, "screen", None)

    def run(idx: list[int]) -> None:
        whole = len(idx) == len(batch)
        try:
            caps = caption_with_backoff(captioner, batch if whole else _take(batch, idx), config, state,
                                        None if seeds is None else [seeds[i] for i in idx])
        except Exception as e:
            if _is_oom(e):  # even one image does not fit: nothing smaller to try
                raise
            if len(idx) == 1:
                rows[idx[0]] = (None, _reason(e))
                if not isinstance(e, ImageRejected):
                    model_errors.append(e)
                return
            if isinstance(e, ImageRejected) and screen is not None:
                refused = screen(_take(batch, idx), config)
                if refused:
                    for j, why in refused.items():
                        rows[idx[j]] = (None, why)
                    run([i for j, i in enumerate(idx) if j not in refused])
                    return
            run(idx[:len(idx) // 2])
            run(idx[len(idx) // 2:])
            return
        for i, c in zip(idx, caps, strict=True):
            rows[i] = (c, None)

    run(list(range(len(batch))))
    if model_errors and all(r is not None and r[0] is None for r in rows):
        raise model_errors[0]
    return [r for r in rows if r is not None]
