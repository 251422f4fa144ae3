"""One image input pipeline for every inference stage: many shards in, model-ready batches out.

    works = [ShardWork("00000", "ds/shards/00000.tar", [(row_id, key), ...]), ...]
    for batch in ImageStream(works, Preprocess(spec), batch_size=256, workers=15, device="cuda"):
        out = model(batch.pixels)            # normalised, on the device, in the model's dtype
        batch.items                          # (shard position, row id) of each row of pixels
        batch.failed                         # (shard position, row id, reason): counted, never a crash
        batch.completed                      # shard positions whose every row has now been delivered

One DataLoader lives across all the shards it is given (the local engine gives it windows of 16), so
its workers never restart between them and the next shard is read while the last batches of this one
are still on the GPU. Workers read each image's bytes
at its tar offset and either

- ship a complete JPEG's bytes for batched nvJPEG decoding on the GPU (``decode="gpu"``), or
- decode on the CPU (libjpeg-turbo / libpng through torchvision, PIL for the rest) and resize/crop the
  uint8 image to the model's input size (``decode="cpu"``; ``"draft"`` lets libjpeg scale down while
  decoding: faster, approximate), or
- run the model's own processor when its preprocessing cannot be expressed as an ``ImageSpec``, or
- decode only (``Preprocess(native=True)``): images at their native size, for models whose processor
  must see the images and the text together (chat-template VLMs: image tokens depend on image size);
  the batch's ``images`` is then a list of uint8 ``[3, h, w]`` tensors and ``pixels`` is None.

uint8 crosses the process boundary (4x less than float), normalisation runs once per batch on the
device, and a background thread prepares the next batch (decode, resize, normalise, host-to-device copy
on its own CUDA stream) while the model works on this one.

Shards in object storage (a ``tar`` that is a URL): by default each tar is **staged**, downloaded once
into a local scratch folder (``scratch``, default the system temp dir) ahead of the workers by a thread
of the main process (the current shard and the next; a worker that gets there first waits on the tar's
file lock for that one download), then indexed and read locally; the main process deletes a staged tar as
soon as its shard is complete, and the folder at the end of the stream.
``stage=False`` reads members by ranged GETs instead (``storage.open_read``): on a local S3 server that
was slower (the index pass and the member reads each fetch the tar once; see
tests/test_storage_models.py and the engineer's report). Filesystem objects are made inside each worker
(``storage.path`` builds a fresh one per call), never inherited through the fork.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .. import storage
from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from .decode import as_tensor, decode_cpu, decode_jpegs_gpu, gpu_decodable, read_header
from .prefetch import prefetched
from .spec import ImageSpec


@dataclass
class ShardWork:
    shard_id: str
    tar: str | Path
    entries: Sequence[tuple[str, str]]   # (row id echoed back, sample key in the tar)


def success_entries(keys: Sequence[str], statuses: Sequence[str | None]) -> list[tuple[str, str]]:
    """(row number, key) of a manifest's downloaded rows: the row number is the id the stream echoes
    back, so repeated uids cannot collide."""
    return [(str(i), k) for i, (k, st) in enumerate(zip(keys, statuses, strict=True)) if st == "success"]


@dataclass
class Preprocess:
    """What workers do to each image: a spec (fast path) or the model's own PIL transform (fallback)."""

    spec: ImageSpec | None = None
    fallback: Callable[[Any], torch.Tensor] | None = None   # PIL image -> normalised float tensor
    max_pixels: int = DEFAULT_MAX_PIXELS
    native: bool = False   # decode only: uint8 images at native size, for a processor that needs them

    def __post_init__(self) -> None:
        if self.spec is None and self.fallback is None and not self.native:
            raise ValueError("Preprocess needs a spec, a fallback transform, or native=True")


@dataclass
class Batch:
    items: list[tuple[int, str]]
    pixels: torch.Tensor | None
    failed: list[tuple[int, str, str]] = field(default_factory=list)
    completed: list[int] = field(default_factory=list)
    images: list[torch.Tensor] | None = None   # native mode: decoded uint8 [3, h, w], one per item

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
        self.stage_dir: str | None = None   # set by ImageStream when tars in a store are staged locally

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
            if not storage.is_remote(tar):
                self._open[tar] = (index_tar(tar), open(tar, "rb"))  # noqa: SIM115 - cached per worker
            elif self.stage_dir is not None:
                local = stage_tar(tar, self.stage_dir)
                self._open[tar] = (index_tar(local), open(local, "rb"))  # noqa: SIM115 - cached per worker
            else:  # ranged GETs through a filesystem object made here, in this worker
                self._open[tar] = (index_tar(tar), storage.open_read(tar))
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
        if pre.native:
            return "native", decode_cpu(data, max_pixels=pre.max_pixels).contiguous()
        if pre.spec is None:
            return "ready", pre.fallback(decode_image(data, max_pixels=pre.max_pixels))
        header = read_header(data, pre.max_pixels)
        if self.decode == "gpu" and gpu_decodable(data, header[0], header[1]):
            return "jpeg", as_tensor(data)
        if self.decode == "draft" and header[0] == "JPEG":
            from .decode import pil_to_tensor

            h, w = pre.spec.resized_size(header[3], header[2])
            img = pil_to_tensor(decode_image(data, max_pixels=pre.max_pixels, draft=(w, h)))
        else:
            img = decode_cpu(data, max_pixels=pre.max_pixels, header=header)
        return "u8", pre.spec.resize_crop(img).contiguous()


def staged_name(tar: str) -> str:
    """The local file name of a staged tar: unique per URL, readable."""
    return f"{hashlib.sha1(tar.encode()).hexdigest()[:16]}-{tar.rstrip('/').rsplit('/', 1)[-1]}"


_STAGE_LOCKS: dict[str, threading.Lock] = {}
_STAGE_GUARD = threading.Lock()


def _forget_stage_locks() -> None:
    # a DataLoader worker forked while the stager thread held one of these would inherit it held forever
    global _STAGE_GUARD
    _STAGE_LOCKS.clear()
    _STAGE_GUARD = threading.Lock()


os.register_at_fork(after_in_child=_forget_stage_locks)


def stage_tar(tar: str, folder: str) -> str:
    """A local copy of the tar at URL ``tar`` in ``folder``, downloaded once whichever asks first.

    The first asker downloads into a temp name and renames it in place; the others wait and then find the
    finished file. Between processes (DataLoader workers, the main process's stager thread) the wait is a
    POSIX record lock (``lockf``): unlike ``flock`` it is not inherited by a child forked while it is held.
    Between threads of one process it is a ``threading.Lock`` per tar (record locks do not exclude those).
    """
    import fcntl

    dst = os.path.join(folder, staged_name(tar))
    if os.path.exists(dst):
        return dst
    with _STAGE_GUARD:
        mine = _STAGE_LOCKS.setdefault(dst, threading.Lock())
    with mine, open(dst + ".lock", "a") as lock:
        fcntl.lockf(lock, fcntl.LOCK_EX)
        if not os.path.exists(dst):
            src = storage.path(tar)  # a fresh filesystem object, made in this process
            tmp = f"{dst}.{os.getpid()}.part"
            try:
                src.fs.get_file(src.path, tmp)
                os.replace(tmp, dst)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
    return dst


class _Stager:
    """Downloads the stream's tars ahead of the workers, so decoding a shard never waits for its download.

    A thread in the main process stages tars in stream order, at most ``ahead`` shards beyond the oldest
    shard not yet complete (so scratch holds a bounded number of tars). A worker that reaches a tar first
    waits on that tar's lock for the download in flight instead of starting its own (``stage_tar``).
    A failed download is left to the worker that needs the tar: it retries and reports per image.
    """

    def __init__(self, tars: list[str], folder: str, ahead: int = 2):
        self.tars, self.folder, self.ahead = tars, folder, max(1, ahead)
        self.done = 0
        self.stopped = False
        self.cv = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="capcurate-stage-tars", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for pos, tar in enumerate(self.tars):
            with self.cv:
                while not self.stopped and pos >= self.done + self.ahead:
                    self.cv.wait()
                if self.stopped:
                    return
                if pos < self.done:  # already complete (a shard with nothing to read)
                    continue
            with contextlib.suppress(Exception):
                stage_tar(tar, self.folder)

    def advance(self, done: int) -> None:
        with self.cv:
            self.done = done
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()
        self.thread.join(timeout=60)


def _collate(items: list[tuple[int, str, Any]]) -> dict[str, Any]:
    """Few tensors per batch: each tensor crossing from a worker costs a shared-memory file descriptor,
    so JPEG bytes travel as one concatenated buffer plus their lengths, images as one stack."""
    out: dict[str, Any] = {"u8": [], "jpeg": [], "ready": [], "native": [], "failed": []}
    for g, kind, payload in items:
        out[kind].append((g, payload))
    if out["native"]:  # images of many sizes: one flat buffer plus their shapes
        parts = [x for _, x in out["native"]]
        out["native"] = ([g for g, _ in out["native"]], torch.cat([x.reshape(-1) for x in parts]),
                         [tuple(x.shape) for x in parts])
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
                 decode: str = "cpu", prefetch: int = 2, stage: bool = True, scratch: str | None = None):
        if decode == "gpu" and (pre.spec is None or pre.native):
            decode = "cpu"  # the model's own processor runs on host images
        self.works = list(works)
        self.pre = pre
        self.device = torch.device(device)
        self.dtype = dtype
        self.decode = decode
        self.batch_size = max(1, int(batch_size))
        self.workers = workers
        self.prefetch = prefetch
        self.dataset = _Images(self.works, pre, decode)
        # tars in object storage: staged to local scratch (one download each), or ranged GETs
        self.stage = stage and any(storage.is_remote(str(w.tar)) for w in self.works)
        self.scratch = scratch
        self._stager: _Stager | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def _loader(self) -> DataLoader:
        n = len(self.dataset)
        batches = [list(range(i, min(i + self.batch_size, n))) for i in range(0, n, self.batch_size)]
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers, collate_fn=_collate,
                          pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if self.workers > 0 else None, persistent_workers=False)

    def _to_device(self, raw: dict[str, Any]) -> tuple[list[int], Any, list[tuple[int, str]]]:
        """Decode what is still bytes, resize, normalise: (indices, pixels, failures); in native mode the
        pixels are the list of decoded images, left on the host for the model's processor."""
        if raw["native"]:
            gs, buffer, shapes = raw["native"]
            sizes = [c * h * w for c, h, w in shapes]
            images = [x.view(shape) for x, shape in zip(torch.split(buffer, sizes), shapes, strict=True)]
            return list(gs), images, list(raw["failed"])
        if self.pre.native:
            return [], None, list(raw["failed"])
        spec, dev = self.pre.spec, self.device
        idx: list[int] = []
        parts: list[torch.Tensor] = []
        failed = list(raw["failed"])
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

    def __iter__(self) -> Iterator[Batch]:
        if not len(self.dataset):
            return
        ds = self.dataset
        if self.stage:
            import tempfile

            if self.scratch is not None:
                os.makedirs(self.scratch, exist_ok=True)
            ds.stage_dir = tempfile.mkdtemp(prefix="capcurate-tars-", dir=self.scratch)
            self._stager = _Stager([t for t, _ in ds.works], ds.stage_dir)
        try:
            yield from self._batches(ds)
        finally:
            if self._stager is not None:
                self._stager.close()
                self._stager = None
            if ds.stage_dir is not None:
                shutil.rmtree(ds.stage_dir, ignore_errors=True)
                ds.stage_dir = None

    def _unstage(self, pos: int) -> None:
        """Delete a complete shard's staged tar (no worker reads it again; open handles stay valid)."""
        folder = self.dataset.stage_dir
        if folder is None:
            return
        name = os.path.join(folder, staged_name(self.dataset.works[pos][0]))
        for f in (name, name + ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f)

    def _batches(self, ds: _Images) -> Iterator[Batch]:
        next_shard = 0
        batches = prefetched(self._loader(), lambda raw: (raw["last"], *self._to_device(raw)), self.device,
                             depth=self.prefetch)
        for last, idx, pixels, failed in batches:
            items = [ds.locate(g) for g in idx]
            fails = [(*ds.locate(g), reason) for g, reason in failed]
            completed = []
            while next_shard < len(self.works) and ds.starts[next_shard + 1] <= last + 1:
                completed.append(next_shard)
                self._unstage(next_shard)
                next_shard += 1
            if completed and self._stager is not None:
                self._stager.advance(next_shard)
            native = isinstance(pixels, list)
            yield Batch([(p, ds.works[p][1][i][0]) for p, i in items], None if native else pixels,
                        [(p, ds.works[p][1][i][0], r) for p, i, r in fails], completed,
                        images=pixels if native else None)
        if next_shard < len(self.works):  # trailing shards with no entries
            yield Batch([], None, [], list(range(next_shard, len(self.works))))
