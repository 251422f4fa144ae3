"""Batches of preprocessed images read straight from a dataset shard, decoded in DataLoader workers.

Shared by every inference stage (recaption, score): the stage passes the model's preprocessing
callable; workers seek to each image's bytes with the shard index, decode safely and transform.
A sample that fails is returned with its reason instead of a tensor, so a bad image costs one row,
never a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .shards import ShardIndex, index_tar


@dataclass
class ImageBatch:
    uids: list[str]              # uids whose image decoded, in the order of ``pixels``
    pixels: Any                  # stacked tensor (or whatever the collate of the transform gives)
    failed: list[tuple[str, str]]  # (uid, reason) of samples whose image could not be used


class ShardImageDataset(Dataset):
    """Map-style dataset over (uid, key) pairs of one tar shard."""

    def __init__(self, index: ShardIndex, entries: Sequence[tuple[str, str]],
                 transform: Callable[[Any], Any], max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: tuple[int, int] | None = None):
        self.index = index
        self.entries = list(entries)
        self.transform = transform
        self.max_pixels = max_pixels
        self.draft = draft
        self._fh = None  # opened lazily in each worker process

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> tuple[str, Any, str | None]:
        uid, key = self.entries[i]
        ext = self.index.image_ext(key)
        if ext is None:
            return uid, None, "no image member in shard"
        try:
            if self._fh is None:
                self._fh = open(self.index.path, "rb")  # noqa: SIM115 - lives as long as the worker
            img = decode_image(self.index.read(key, ext, self._fh), max_pixels=self.max_pixels, draft=self.draft)
            return uid, self.transform(img), None
        except ImageDecodeError as e:
            return uid, None, str(e)
        except Exception as e:  # a transform that chokes on one odd image must not kill the run
            return uid, None, f"preprocessing failed: {type(e).__name__}: {e}"


def _collate(items: list[tuple[str, Any, str | None]]) -> ImageBatch:
    ok = [(u, x) for u, x, err in items if err is None]
    failed = [(u, err) for u, _, err in items if err is not None]
    pixels = torch.stack([x for _, x in ok]) if ok else None
    return ImageBatch([u for u, _ in ok], pixels, failed)


def iter_image_batches(
    shard_path: str | Path,
    entries: Sequence[tuple[str, str]],
    transform: Callable[[Any], Any],
    *,
    batch_size: int,
    num_workers: int = 2,
    index: ShardIndex | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: tuple[int, int] | None = None,
) -> Iterator[ImageBatch]:
    """Yield ``ImageBatch``es in entry order. ``transform`` must return a tensor per image.

    ``draft``: see ``capcurate.images.decode_image`` (JPEGs decoded at a reduced scale, at least this size).
    """
    index = index or index_tar(shard_path)
    ds = ShardImageDataset(index, entries, transform, max_pixels, draft)
    if not len(ds):
        return
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )
    yield from loader
