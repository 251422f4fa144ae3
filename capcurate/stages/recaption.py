"""``capcurate recaption``: new captions for every image of a dataset, one Parquet file per shard.

    captions/<name>/<shard>.parquet   uid, caption (first caption; NULL when the image failed),
                                      captions (list<string>), error (NULL when ok)

Images are read straight from the shards and decoded + preprocessed in DataLoader workers
(``capcurate.imageloader``); the model only sees ready batches. Each shard file is written atomically,
so a killed run resumes by skipping finished shards; ``--part i/N`` and ``--engine ray`` come from
``capcurate.engines``. Lineage records the model, its resolved weights and the decoding parameters.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, atomic
from ..dataset import Dataset, check_name
from ..errors import InputError, StageFailed
from ..summary import Summary

FAMILY = "captions"
CPU_BATCH_SIZE = 16  # --batch-size auto on CPU: large enough to amortise Python overhead, small for latency


def captions_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("uid", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("error", pa.string()),
    ])


def batch_seed(seed: int, shard_id: str, batch_index: int) -> int:
    """A seed per (shard, batch): sampling is reproducible whatever order or part shards run in."""
    return (seed * 1_000_003 + zlib.crc32(shard_id.encode()) * 7919 + batch_index) % (2**63)


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def caption_with_backoff(captioner: Any, pixels: Any, config: Any, state: dict[str, int]) -> list[list[str]]:
    """Caption a batch in chunks of ``state['chunk']``; on out-of-memory halve the chunk and go on."""
    out: list[list[str]] = []
    i = 0
    while i < pixels.shape[0]:
        chunk = state["chunk"]
        try:
            out.extend(captioner.caption(pixels[i:i + chunk], config))
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


def _probe_batch_size(captioner: Any, config: Any) -> int:
    """Search the largest batch that fits on the GPU with a worst-case (max_new_tokens) generation."""
    import torch
    from PIL import Image

    one = captioner.preprocess(Image.new("RGB", (256, 256), (127, 127, 127)))
    probe = type(config)(**{**config.__dict__, "min_new_tokens": config.max_new_tokens})

    def try_batch(n: int) -> None:
        captioner.caption(one.unsqueeze(0).expand(n, *one.shape).contiguous(), probe)
        torch.cuda.synchronize()

    return find_batch_size(try_batch)


@dataclass
class RecaptionJob:
    """The per-shard work (a ``capcurate.engines.ShardJob``); the model loads once per worker in setup."""

    root: str
    name: str
    model: str
    pretrained: str | None
    decoding: Any  # DecodingConfig
    batch_size: int | str = "auto"
    num_workers: int = 2
    device: str = "cpu"
    dtype: str = "fp32"
    trust_remote_code: bool = False
    _captioner: Any = field(default=None, repr=False)
    _batch: int = 0
    _state: dict[str, int] = field(default_factory=dict)
    batch_note: str = ""

    def output_path(self, shard_id: str) -> Path:
        return Path(self.root) / FAMILY / self.name / f"{shard_id}.parquet"

    def setup(self) -> None:
        if self._captioner is not None:
            return
        from ..models.captioners import load_captioner

        self._captioner = load_captioner(self.model, pretrained=self.pretrained, device=self.device,
                                         dtype=self.dtype, trust_remote_code=self.trust_remote_code)
        self._batch, self.batch_note = self._resolve_batch_size()
        self._state = {"chunk": self._batch}

    def _resolve_batch_size(self) -> tuple[int, str]:
        if self.batch_size != "auto":
            return int(self.batch_size), "given"
        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE, f"auto on {self.device}: default {CPU_BATCH_SIZE} (no memory search off-GPU)"
        n = _probe_batch_size(self._captioner, self.decoding)
        return n, f"auto: largest batch that fits is {n}"

    @property
    def captioner(self) -> Any:
        self.setup()
        return self._captioner

    def process(self, shard_id: str) -> dict[str, int]:
        import pyarrow.parquet as pq
        import torch

        from ..imageloader import iter_image_batches

        self.setup()
        root = Path(self.root)
        manifest = pq.read_table(root / "samples" / f"{shard_id}.parquet", columns=["uid", "key", "status"])
        rows = manifest.to_pylist()
        entries = [(r["uid"], r["key"]) for r in rows if r["status"] == "success"]
        results: dict[str, tuple[list[str] | None, str | None]] = {}
        if entries:
            batches = iter_image_batches(root / "shards" / f"{shard_id}.tar", entries,
                                         self._captioner.preprocess, batch_size=self._batch,
                                         num_workers=self.num_workers)
            for b_i, batch in enumerate(batches):
                for uid, reason in batch.failed:
                    results[uid] = (None, reason)
                if not batch.uids:
                    continue
                if self.decoding.sampling:
                    torch.manual_seed(batch_seed(self.decoding.seed, shard_id, b_i))
                caps = caption_with_backoff(self._captioner, batch.pixels, self.decoding, self._state)
                for uid, c in zip(batch.uids, caps, strict=True):
                    results[uid] = (c, None)
        out = {"uid": [], "caption": [], "captions": [], "error": []}
        counts = {"images_captioned": 0, "images_failed": 0, "not_downloaded": 0}
        for r in rows:
            caps, err = results.get(r["uid"], (None, None))
            if r["status"] != "success":
                err = f"no image (download status {r['status']})"
                counts["not_downloaded"] += 1
            elif caps is None:
                counts["images_failed"] += 1
            else:
                counts["images_captioned"] += 1
            out["uid"].append(r["uid"])
            out["caption"].append(caps[0] if caps else None)
            out["captions"].append(caps)
            out["error"].append(err)
        import pyarrow as pa

        atomic.write_parquet(self.output_path(shard_id), pa.Table.from_pydict(out, schema=captions_schema()))
        return counts


def recaption(
    dataset: str | Path,
    *,
    model: str,
    name: str,
    pretrained: str | None = None,
    decoding: str = "beam",
    num_beams: int = 3,
    top_p: float = 0.9,
    top_k: int = 50,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    max_new_tokens: int = 30,
    num_captions: int = 1,
    length_penalty: float = 1.0,
    prompt: str | None = None,
    seed: int = 0,
    batch_size: int | str = "auto",
    num_workers: int = 2,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    engine: str = "local",
    part: str | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
) -> Summary:
    """Caption every image of ``dataset`` with ``model`` into ``captions/<name>/``; returns a Summary."""
    import torch

    from ..engines import parse_part, run_job, select_part
    from ..models.captioners import DTYPES, DecodingConfig
    from ..models.ref import parse_model_ref

    t0 = time.time()
    check_name(name, "captions name")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if batch_size != "auto":
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise InputError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}") from None
        if batch_size < 1:
            raise InputError(f"--batch-size must be a positive integer or 'auto', got {batch_size}")
    parse_part(part)
    cfg = DecodingConfig(decoding=decoding, num_beams=num_beams, top_p=top_p, top_k=top_k,
                         temperature=temperature, repetition_penalty=repetition_penalty,
                         min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                         num_captions=num_captions, length_penalty=length_penalty, prompt=prompt, seed=seed)
    ref = parse_model_ref(model, pretrained)
    ds = Dataset(dataset)
    shard_ids = ds.shard_ids()
    if not shard_ids:
        raise InputError(f"{ds.root} has no samples/*.parquet: download or ingest images first")

    params = {"model": model, "pretrained": pretrained, "dtype": dtype, **cfg.to_params()}
    out_dir = ds.family_dir(FAMILY, name)
    exists = out_dir.is_dir() and any(out_dir.glob("*.parquet"))
    mode = ds.card.claim_output(FAMILY, name, params, overwrite=overwrite, exists=exists)
    if mode == "overwrite":
        ds.remove_family_output(FAMILY, name)
    atomic.clean_stale_temps(out_dir)

    job = RecaptionJob(str(ds.root), name, model, pretrained, cfg, batch_size=batch_size,
                       num_workers=num_workers, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    model_info: dict[str, Any] = dict(ref.describe())
    todo = select_part(shard_ids, parse_part(part))
    if engine == "local" and any(not job.output_path(s).exists() for s in todo):
        job.setup()  # load before the lineage entry so an unloadable model leaves no trace in the card
        model_info.update(job.captioner.describe())
    entry = ds.card.start_entry(stage="recaption", family=FAMILY, name=name, params=params, model=model_info,
                                replace=mode == "overwrite")
    result = run_job(job, shard_ids, engine=engine, part=part, description=f"recaption {name}",
                     fail_fast=fail_fast)
    counts = result.to_dict()
    failed = counts.pop("failed_shards")
    ds.card.finish_entry(entry, counts, capcurate_version=__version__, device=device,
                         batch_size=job._batch or batch_size, batch_size_note=job.batch_note,
                         oom_backoffs=job._state.get("oom_backoffs", 0))
    seconds = time.time() - t0
    n_img = counts.get("images_captioned", 0)
    ok = not failed
    msg = (f"captioned {n_img:,} images into captions/{name} ({mode}); "
           f"{counts.get('images_failed', 0):,} undecodable, {len(failed)} shard(s) failed")
    return Summary(
        stage="recaption", ok=ok, counts=counts, seconds=seconds, message=msg,
        details={"name": name, "mode": mode, "model": model, "decoding": cfg.decoding,
                 "batch_size": job._batch or batch_size, "batch_size_note": job.batch_note,
                 "images_per_second": round(n_img / seconds, 2) if seconds > 0 else None,
                 **({"failed_shards": failed} if failed else {})},
    )
