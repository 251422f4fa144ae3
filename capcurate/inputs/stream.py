"""One image input pipeline for every inference stage: many shards in, model-ready batches out.

    works = [ShardWork("00000", "ds/shards/00000.tar", [(row_id, key), ...]), ...]
    for batch in ImageStream(works, Preprocess(spec), batch_size=256, workers=15, device="cuda"):
        out = model(batch.pixels)            # normalised, on the device, in the model's dtype
        batch.items                          # (shard position, row id) of each row of pixels
        batch.failed                         # (shard position, row id, reason): counted, never a crash
        batch.completed                      # shard positions whose every row has now been delivered

One DataLoader lives for the whole run, so its workers never restart between shards and the next
shard is read while the last batches of this one are still on the GPU. Workers read each image's bytes
at its tar offset and either

- ship a complete JPEG's bytes for batched nvJPEG decoding on the GPU (``decode="gpu"``), or
- decode on the CPU (libjpeg-turbo / libpng through torchvision, PIL for the rest) and resize/crop the
  uint8 image to the model's input size (``decode="cpu"``; ``"draft"`` lets libjpeg scale down while
  decoding: faster, approximate), or
- run the model's own processor when its preprocessing cannot be expressed as an ``ImageSpec``.

uint8 crosses the process boundary (4x less than float), normalisation runs once per batch on the
device, and a background thread prepares the next batch (decode, resize, normalise, host-to-device copy
on its own CUDA stream) while the model works on this one.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .decode import decode_cpu, decode_jpegs_gpu, gpu_decodable, read_header
from .spec import ImageSpec


@dataclass
class ShardWork:
    shard_id: str
    tar: str | Path
    entries: Sequence[tuple[str, str]]   # (row id echoed back, sample key in the tar)


@dataclass
class Preprocess:
    """What workers do to each image: a spec (fast path) or the model's own PIL transform (fallback)."""

    spec: ImageSpec | None = None
    fallback: Callable[[Any], torch.Tensor] | None = None   # PIL image -> normalised float tensor
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.spec is None and self.fallback is None:
            raise ValueError("Preprocess needs a spec or a fallback transform")


@dataclass
class Batch:
    items: list[tuple[int, str]]
    pixels: torch.Tensor | None
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


# -- worker side ----------------------------------------------------------------------------------
class _Images(Dataset):
    """Map-style over every entry of every shard, in order; item -> (index, kind, payload)."""

    def __init__(self, works: Sequence[ShardWork], pre: Preprocess, decode: str):
        self.works = [(str(w.tar), list(w.entries)) for w in works]
        self.starts = [0]
        for _, entries in self.works:
            self.starts.append(self.starts[-1] + len(entries))
        self.pre, self.decode = pre, decode
        self._open: dict[str, tuple[Any, Any]] = {}   # tar -> (index, file), per worker process

    def __len__(self) -> int:
        return self.starts[-1]

    def locate(self, g: int) -> tuple[int, int]:
        p = bisect.bisect_right(self.starts, g) - 1
        return p, g - self.starts[p]

    def _shard(self, tar: str):
        if tar not in self._open:
            from ..shards import index_tar

            if len(self._open) >= 4:  # the stream moves forward: close the oldest
                self._open.pop(next(iter(self._open)))[1].close()
            self._open[tar] = (index_tar(tar), open(tar, "rb"))  # noqa: SIM115 - cached per worker
        return self._open[tar]

    def __getitem__(self, g: int) -> tuple[int, str, Any]:
        p, i = self.locate(g)
        tar, entries = self.works[p]
        _, key = entries[i]
        try:
            index, fh = self._shard(tar)
            ext = index.image_ext(key)
            if ext is None:
                return g, "failed", "no image member in shard"
            return (g, *self._prepare(index.read(key, ext, fh)))
        except ImageDecodeError as e:
            return g, "failed", str(e)
        except OSError as e:
            return g, "failed", f"shard unreadable: {e}"
        except Exception as e:  # one odd image must never kill the batch
            return g, "failed", f"preprocessing failed: {type(e).__name__}: {e}"

    def _prepare(self, data: bytes) -> tuple[str, Any]:
        pre = self.pre
        if pre.spec is None:
            return "ready", pre.fallback(decode_image(data, max_pixels=pre.max_pixels))
        header = read_header(data, pre.max_pixels)
        if self.decode == "gpu" and gpu_decodable(data, header[0], header[1]):
            return "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.decode == "draft" and header[0] == "JPEG":
            from .decode import pil_to_tensor

            h, w = pre.spec.resized_size(header[3], header[2])
            img = pil_to_tensor(decode_image(data, max_pixels=pre.max_pixels, draft=(w, h)))
        else:
            img = decode_cpu(data, max_pixels=pre.max_pixels, header=header)
        return "u8", pre.spec.resize_crop(img).contiguous()


def _collate(items: list[tuple[int, str, Any]]) -> dict[str, Any]:
    """Few tensors per batch: each tensor crossing from a worker costs a shared-memory file descriptor,
    so JPEG bytes travel as one concatenated buffer plus their lengths, images as one stack."""
    out: dict[str, Any] = {"u8": [], "jpeg": [], "ready": [], "failed": []}
    for g, kind, payload in items:
        out[kind].append((g, payload))
    for kind in ("u8", "ready"):
        if out[kind]:
            out[kind] = ([g for g, _ in out[kind]], torch.stack([x for _, x in out[kind]]))
    if out["jpeg"]:
        parts = [x for _, x in out["jpeg"]]
        out["jpeg"] = ([g for g, _ in out["jpeg"]], torch.cat(parts), [len(x) for x in parts])
    out["last"] = max(g for g, _, _ in items)
    return out


# -- main-process side ----------------------------------------------------------------------------
class ImageStream:
    """Iterate model-ready ``Batch``es over ``works``; see the module docstring."""

    def __init__(self, works: Sequence[ShardWork], pre: Preprocess, *, batch_size: int, workers: int,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 decode: str = "cpu", prefetch: int = 2):
        if decode == "gpu" and pre.spec is None:
            decode = "cpu"  # the model's own processor needs PIL images
        self.works = list(works)
        self.pre = pre
        self.device = torch.device(device)
        self.dtype = dtype
        self.decode = decode
        self.batch_size = max(1, int(batch_size))
        self.workers = workers
        self.prefetch = prefetch
        self.dataset = _Images(self.works, pre, decode)

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self) -> DataLoader:
        n = len(self.dataset)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
                          pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if self.workers > 0 else None, persistent_workers=False)

    def _to_device(self, raw: dict[str, Any]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """Decode what is still bytes, resize, normalise: (indices, pixels, failures)."""
        spec, dev = self.pre.spec, self.device
        idx: list[int] = []
        parts: list[torch.Tensor] = []
        failed = [(g, reason) for g, reason in raw["failed"]]
        if raw["jpeg"]:
            gs, buffer, lengths = raw["jpeg"]
            decoded = decode_jpegs_gpu(list(torch.split(buffer, lengths)), dev)
            # images of one size are resized in one call: web shards repeat a few sizes, and one kernel
            # per image costs more launch time than pixels (8k vs 22k images/s at 512x384 on an H200)
            by_size: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
            for g, img in zip(gs, decoded, strict=True):
                if isinstance(img, str):
                    failed.append((g, img))
                else:
                    by_size.setdefault(tuple(img.shape[-2:]), []).append((g, img))
            for group in by_size.values():
                idx.extend(g for g, _ in group)
                stacked = torch.stack([img for _, img in group]) if len(group) > 1 else group[0][1][None]
                parts.append(spec.resize_crop(stacked))
        if raw["u8"]:
            gs, x = raw["u8"]
            idx.extend(gs)
            parts.append(x.to(dev, non_blocking=True))
        pixels = None
        if parts:
            pixels = spec.normalize(torch.cat(parts) if len(parts) > 1 else parts[0], self.dtype)
        if raw["ready"]:
            gs, x = raw["ready"]
            idx.extend(gs)
            ready = x.to(dev, self.dtype, non_blocking=True)
            pixels = ready if pixels is None else torch.cat([pixels, ready])
        return idx, pixels, failed

    def _prepared(self) -> Iterator[tuple[dict[str, Any], Any, Any]]:
        """Background thread: fetch from the loader and move to the device one or two batches ahead."""
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        q: queue.Queue = queue.Queue(maxsize=max(1, self.prefetch))
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                for raw in self._loader():
                    if stop.is_set():
                        break
                    if cuda:
                        with torch.cuda.stream(side):
                            ready = self._to_device(raw)
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        ready, event = self._to_device(raw), None
                    q.put((raw["last"], ready, event))
                q.put(done)
            except BaseException as e:  # surfaced in the consumer
                q.put(e)

        t = threading.Thread(target=work, name="capcurate-image-stream", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                last, ready, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    if ready[1] is not None:  # made on the side stream, used (and freed) on this one
                        ready[1].record_stream(current)
                yield last, ready, event
        finally:
            stop.set()
            while t.is_alive():  # unblock a producer waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    t.join(timeout=0.05)

    def __iter__(self) -> Iterator[Batch]:
        if not len(self.dataset):
            return
        ds = self.dataset
        next_shard = 0
        for last, (idx, pixels, failed), _ in self._prepared():
            items = [ds.locate(g) for g in idx]
            fails = [(*ds.locate(g), reason) for g, reason in failed]
            completed = []
            while next_shard < len(self.works) and ds.starts[next_shard + 1] <= last + 1:
                completed.append(next_shard)
                next_shard += 1
            yield Batch([(p, ds.works[p][1][i][0]) for p, i in items], pixels,
                        [(p, ds.works[p][1][i][0], r) for p, i, r in fails], completed)
        if next_shard < len(self.works):  # trailing shards with no entries
            yield Batch([], None, [], list(range(next_shard, len(self.works))))
