"""A batch that raises is captioned again in halves, down to single images, so one image the model or its
processor refuses costs that image's row, never its batch or the shards the batch spans.

Halving finds one bad image among n in about 2 log2(n) calls, where retrying image by image would take n
(512 single-image generates on a GPU: minutes); the good halves keep being captioned as batches.
"""

from __future__ import annotations

from typing import Any

from .batch_search import _is_oom, caption_with_backoff

Row = tuple[Any, str | None]  # (the image's captions, or None; why not)


def _reason(e: BaseException) -> str:
    from ..models.captioners.base import ImageRejected

    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if isinstance(e, ImageRejected) else f"captioning failed: {type(e).__name__}: {line}"


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

    def run(lo: int, hi: int) -> None:
        try:
            caps = caption_with_backoff(captioner, batch[lo:hi], config, state,
                                        None if seeds is None else seeds[lo:hi])
        except Exception as e:
            if _is_oom(e):  # even one image does not fit: nothing smaller to try
                raise
            if hi - lo == 1:
                rows[lo] = (None, _reason(e))
                if not isinstance(e, ImageRejected):
                    model_errors.append(e)
                return
            mid = (lo + hi) // 2
            run(lo, mid)
            run(mid, hi)
            return
        rows[lo:hi] = [(c, None) for c in caps]

    run(0, len(batch))
    if model_errors and all(r is not None and r[0] is None for r in rows):
        raise model_errors[0]
    return [r for r in rows if r is not None]
