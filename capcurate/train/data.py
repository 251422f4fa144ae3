"""The training data pipeline: webdataset tar shards -> batches of (images, tokens), decoded in workers.

Determinism is the design constraint, because ``--resume`` must continue bit-exactly:

- every (rank, worker) pair reads its own slice of a per-epoch shard order fixed by the seed, and
  resamples shards with its own seeded RNG when there are fewer shards than workers x ranks;
- the shuffle buffer uses an RNG seeded by (seed, epoch, rank, worker);
- augmentation is seeded per sample from (seed, epoch, shard name, key), so a sample looks the same no
  matter which worker or rank decodes it (this is also what makes 2 ranks x B equal 1 rank x 2B), nor
  where the shards are stored: the shard's file name, not its path or URL, so the same shards in a
  bucket or in another folder train the same model;
- every batch carries its worker's position in the raw stream, so a checkpoint records where each
  worker stood and a resumed worker skips that many raw samples without decoding them.

Each worker yields exactly ``batches_per_worker`` batches per epoch (cycling over its shards), so an
epoch is measured in samples and all ranks take the same number of steps.

What a worker makes of an image depends on ``mode`` (see gpu_batches.py): ``"cpu"`` decodes to a uint8
tensor and crops/resizes it (shipped as uint8), ``"gpu"`` reads the header only and ships the JPEG's
bytes with its crop box for nvJPEG in the training process (other formats are decoded as in ``"cpu"``),
``"pil"`` runs the model's own PIL transform (shipped as float; for transforms with more than a crop).
The crop box is the same in all three for the same seed.

Caption choice (``--caption-keys raw,blip --caption-probs 0.2,0.8``, or the recipe ``capcurate shard``
wrote into manifest.json): each time a sample is read, one caption is drawn from its ``.json`` keys with
those probabilities, by a hash of (seed, epoch, shard, key): the same draw on any worker or rank, a new
draw every epoch. Keys a sample lacks (or holds empty) are left out of its draw; a sample with none of
them falls back to its ``.txt``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputError
from ..shards import IMAGE_EXTS
from .caption_choice import CaptionChoice, caption_uniform
from .gpu_batches import CropAug, pack_batch
from .shard_list import TEXT_EXTS
from .store_io import register_gopen, shard_name

# meta tensor carried with every batch: logical worker, raw position after it, batches done, skipped,
# shard opens that failed this epoch
META_FIELDS = ("worker", "raw_pos", "batches", "skipped", "open_errors")

log = logging.getLogger("capcurate.train")


class ShardsUnreadable(InputError):
    """No training shard could be opened for a whole cycle: the stream would otherwise wait forever."""


def one_line_cause(exc: BaseException) -> str:
    """The cause of an exception re-raised from a DataLoader worker (whose message holds the worker's
    traceback), as one line."""
    lines = [x.strip() for x in str(exc).strip().splitlines() if x.strip()]
    last = lines[-1] if lines else type(exc).__name__
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    return last[len(prefix):] if last.startswith(prefix) else last


# curl's exit statuses as webdataset's pipe reports them when the stream closes
CURL_EXITS = {6: "could not resolve host", 7: "could not connect", 22: "HTTP error status", 28: "timed out",
              35: "TLS handshake failed", 56: "connection reset"}


def _close(stream: Any) -> str | None:
    """Close a shard stream; the failure it reports (a pipe's exit status), as one line, or None."""
    if stream is None:
        return None
    try:
        stream.close()
    except Exception as e:
        status = re.search(r"exit (\d+)", str(e))
        if status and "curl" in str(e):
            code = int(status.group(1))
            return f"curl exit {code} ({CURL_EXITS.get(code, 'download failed')})"
        return _first_line(e)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _seed_of(*parts: Any) -> int:
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class WorkerState:
    """Where one logical worker stood after its last batch the trainer consumed."""

    raw_pos: int = 0
    batches: int = 0
    skipped: int = 0


@dataclass
class TrainStream(torch.utils.data.IterableDataset):
    """One epoch of batches for one rank; see the module docstring for the determinism rules."""

    urls: list[str]
    batch_size: int
    batches_per_worker: int
    transform: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    seed: int = 0
    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    worker_offset: int = 0   # physical worker i plays logical worker (i + offset) % W after a resume
    resume: dict[int, WorkerState] = field(default_factory=dict)
    mode: str = "pil"        # pil | cpu | gpu: what a worker does to an image (module docstring)
    aug: CropAug | None = None  # the transform as a crop spec; needed by cpu and gpu
    captions: CaptionChoice | None = None  # draw each sample's caption from its .json (module docstring)

    def __post_init__(self) -> None:
        super().__init__()
        if self.mode not in ("pil", "cpu", "gpu"):
            raise ValueError(f"TrainStream mode must be pil, cpu or gpu, got {self.mode!r}")
        if self.mode != "pil" and self.aug is None:
            raise ValueError(f"TrainStream mode {self.mode!r} needs a CropAug")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        phys, n = (info.id, info.num_workers) if info else (0, 1)
        if n != self.num_workers:
            raise RuntimeError(f"stream built for {self.num_workers} workers runs on {n}")
        logical = (phys + self.worker_offset) % n
        state = self.resume.get(logical, WorkerState())
        yield from self._batches(logical, state)

    def _shard_stream(self, gid: int, total: int) -> Iterator[dict[str, str]]:
        rng = random.Random(_seed_of(self.seed, self.epoch, "resample", gid))
        cycle = 0
        while True:
            if len(self.urls) < total:
                # fewer shards than readers: each reader draws shards with replacement
                yield {"url": rng.choice(self.urls)}
                continue
            order = list(self.urls)
            if self.shuffle_shards:
                random.Random(_seed_of(self.seed, self.epoch, "shards", cycle)).shuffle(order)
            for u in order[gid::total]:
                yield {"url": u}
            cycle += 1

    def _shards_per_cycle(self, gid: int, total: int) -> int:
        """How many shard opens make one full cycle of this reader's shards."""
        if len(self.urls) < total:
            return len(self.urls)  # draws with replacement: as many draws as there are shards
        return len(range(gid, len(self.urls), total))

    def _tar_members(self, gid: int, total: int, counter: dict[str, int]) -> Iterator[dict[str, Any]]:
        """Members of this reader's shards, cycling; a shard that cannot be opened (or yields nothing)
        is counted in ``counter["open_errors"]`` and logged once per shard. When a full cycle of this
        reader's shards failed, every shard is probed once: if none opens, ``ShardsUnreadable``."""
        import webdataset as wds

        def member_error(exn: Exception) -> bool:
            counter["skipped"] += 1  # a damaged member or tar: count it, keep going
            return True

        register_gopen()  # s3://, gs://... stream through fsspec, in this process or a worker
        per_cycle = self._shards_per_cycle(gid, total)
        logged: set[str] = set()
        failures: dict[str, str] = {}  # shards that failed since the last one that opened
        for src in self._shard_stream(gid, total):
            url, n, cause = src["url"], 0, "it holds no tar members"
            stream = None
            try:
                stream = wds.gopen(url)
                for member in wds.tariterators.tar_file_iterator(stream, handler=member_error):
                    member["__url__"] = url
                    n += 1
                    yield member
            except Exception as e:
                cause = _first_line(e)
                if n:
                    counter["skipped"] += 1  # cut off after some members: counted like a damaged tar
            closed = _close(stream)  # a failed download (curl's exit status) shows only when closed
            if closed and not n:
                cause = closed
            if n:
                failures.clear()
                continue
            counter["open_errors"] += 1
            failures[url] = cause
            if url not in logged:
                logged.add(url)
                log.warning("cannot open training shard %s: %s", url, cause)
            if len(failures) >= per_cycle and not self._any_shard_opens(failures):
                first = next(iter(failures.items()))
                raise ShardsUnreadable(
                    f"none of the {len(self.urls)} training shards could be opened "
                    f"(first: {first[0]}: {first[1]}); check the paths or URLs and that the server is up")
            if len(failures) >= per_cycle:
                failures.clear()  # another reader's shards open: this reader tries its next cycle

    def _any_shard_opens(self, known_bad: dict[str, str]) -> bool:
        """Whether some shard outside ``known_bad`` yields at least one tar member."""
        import webdataset as wds

        register_gopen()
        for url in self.urls:
            if url in known_bad:
                continue
            stream = None
            try:
                stream = wds.gopen(url)
                if next(iter(wds.tariterators.tar_file_iterator(stream)), None) is not None:
                    _close(stream)
                    return True
            except Exception as e:
                known_bad[url] = _first_line(e)
            known_bad[url] = _close(stream) or known_bad.get(url, "it holds no tar members")
        return False

    def _raw_samples(self, gid: int, total: int, counter: dict[str, int]) -> Iterator[dict[str, Any]]:
        import webdataset as wds

        def handler(exn: Exception) -> bool:
            counter["skipped"] += 1  # a damaged member or tar: count it, keep going
            return True

        files = self._tar_members(gid, total, counter)
        samples = wds.tariterators.group_by_keys(files, handler=handler)
        if self.shuffle_buffer > 1:
            rng = random.Random(_seed_of(self.seed, self.epoch, "buffer", gid))
            samples = wds.filters._shuffle(samples, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)
        return samples

    def sample_seed(self, sample: dict[str, Any]) -> int:
        """The seed of one sample's augmentation: the same whichever worker or rank reads it."""
        return _seed_of(self.seed, self.epoch, shard_name(sample.get("__url__", "")), sample["__key__"])

    def _decode(self, sample: dict[str, Any]) -> tuple[str, Any, str] | None:
        """(kind, payload, caption): ("float", tensor) in pil mode, ("u8", tensor) or ("jpeg", (bytes,
        box)) otherwise; None for a sample to skip."""
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        txt_ext = next((e for e in TEXT_EXTS if e in sample), None)
        if img_ext is None or txt_ext is None:
            return None
        try:
            text = self.caption_of(sample, txt_ext)
            data = sample[img_ext]
            seed = self.sample_seed(sample)
            if self.mode == "pil":
                return "float", self._pil_transform(data, seed), text
            return (*self._crop(data, seed), text)
        except Exception:  # any undecodable image or text is a counted skip, never a crash
            return None

    def caption_of(self, sample: dict[str, Any], txt_ext: str) -> str:
        """The sample's .txt, or with ``captions`` a draw among its .json caption keys."""
        if self.captions is not None and "json" in sample:
            meta = json.loads(sample["json"])
            u = caption_uniform(self.seed, self.epoch, "caption", shard_name(sample.get("__url__", "")),
                                sample["__key__"])
            picked = self.captions.pick(meta, u) if isinstance(meta, dict) else None
            if picked is not None:
                return picked[1]
        return sample[txt_ext].decode("utf-8").strip()

    def _pil_transform(self, data: bytes, seed: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # as torch.manual_seed, leaving CUDA's RNG alone
            random.seed(seed)
            pixels = self.transform(im)
        random.setstate(py_state)
        return pixels

    def _crop(self, data: bytes, seed: int) -> tuple[str, Any]:
        from ..inputs.decode import decode_cpu, gpu_decodable, read_header

        aug = self.aug
        assert aug is not None
        header = read_header(data)
        fmt, mode, w, h = header
        if self.mode == "gpu" and gpu_decodable(data, fmt, mode):
            return "jpeg", (data, aug.draw_box(h, w, seed))
        img = decode_cpu(data, header=header)
        return "u8", aug.crop(img, aug.draw_box(img.shape[-2], img.shape[-1], seed)).contiguous()

    def _batches(self, logical: int, state: WorkerState):
        gid = self.rank * self.num_workers + logical
        total = self.world_size * self.num_workers
        counter = {"skipped": state.skipped, "open_errors": 0}
        raw_pos, batches = 0, state.batches
        images: list[tuple[str, Any]] = []
        texts: list[str] = []
        if batches >= self.batches_per_worker:
            return
        for sample in self._raw_samples(gid, total, counter):
            raw_pos += 1
            if raw_pos <= state.raw_pos:
                continue  # consumed before the checkpoint: skip without decoding
            item = self._decode(sample)
            if item is None:
                counter["skipped"] += 1
                continue
            images.append((item[0], item[1]))
            texts.append(item[2])
            if len(images) == self.batch_size:
                batches += 1
                meta = torch.tensor([logical, raw_pos, batches, counter["skipped"], counter["open_errors"]],
                                    dtype=torch.long)
                yield self._pack(images), self.tokenizer(texts), meta
                images, texts = [], []
                if batches >= self.batches_per_worker:
                    return


    def _pack(self, images: list[tuple[str, Any]]) -> torch.Tensor | dict[str, torch.Tensor]:
        """float [n, 3, h, w] in pil mode, else gpu_batches.pack_batch's dict of uint8/bytes tensors."""
        if self.mode == "pil":
            return torch.stack([x for _, x in images])
        assert self.aug is not None
        return pack_batch(images, self.aug.size)


def batches_per_worker(num_samples: int, batch_size: int, world_size: int, workers: int, accum: int) -> int:
    """Batches each worker yields per epoch so that one epoch covers ``num_samples`` (rounded up) and
    the micro-batches per rank divide evenly into optimizer steps."""
    w = max(workers, 1)
    bpw = max(1, math.ceil(num_samples / (batch_size * world_size * w)))
    while (bpw * w) % accum:
        bpw += 1
    return bpw


def make_loader(stream: TrainStream, *, in_process: bool, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """``in_process`` decodes in the training process (``--workers 0``), else one process per worker."""
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=0 if in_process else stream.num_workers,
        pin_memory=pin_memory, persistent_workers=False,
    )
