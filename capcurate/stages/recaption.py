"""``capcurate recaption``: new captions for every image of a dataset, one Parquet file per shard.

    captions/<name>/<shard>.parquet   uid, caption (first caption; NULL when the image failed),
                                      captions (list<string>), error (NULL when ok)

Images come from ``capcurate.inputs.ImageStream``: one loader across all shards, JPEGs decoded in
batches on the GPU (nvJPEG) or in CPU workers, the model's preprocessing replayed on tensors; the model
only sees ready batches. Chat-template VLMs get decoded images at native size instead, and their own
processor builds each batch's inputs (``Captioner.input_kind``). Sampling is seeded per image from
(--seed, uid), so captions do not depend on batch size, order or ``--part``. Each shard file is written atomically,
so a killed run resumes by skipping finished shards; ``--part i/N`` and ``--engine ray`` come from
``capcurate.engines``. Lineage records the model, its resolved weights and the decoding parameters.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__, atomic, events, lineage, storage
from ..card import check_claim
from ..dataset import Dataset, check_name
from ..engines import process_via_many
from ..errors import InputError
from ..summary import Summary
from ..tar_damage import check_tar_read
from .batch_search import probe_batch_size
from .caption_retry import caption_rows

log = logging.getLogger(__name__)

FAMILY = "captions"
CPU_BATCH_SIZE = 16  # --batch-size auto on CPU: large enough to amortise Python overhead, small for latency
# --style dense asks for a paragraph: 80-150 tokens with the VLMs we run; below this most would be cut
DENSE_MIN_NEW_TOKENS = 160


def captions_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("uid", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("error", pa.string()),
    ])


# --batch-size auto on a GPU searches up to this: past it generation gains little throughput, while each
# batch holds more host memory and a longer stall at the end of the run
GPU_BATCH_LIMIT = 512


@dataclass
class RecaptionJob:
    """The per-shard work (a ``capcurate.engines.ShardJob``); the model loads once per worker in setup.

    ``process_many`` streams every shard through one ``capcurate.inputs.ImageStream`` (workers live
    across shards, batches span shard boundaries); ``process`` is the one-shard case the Ray engine uses.
    """

    root: str
    name: str
    model: str
    pretrained: str | None
    decoding: Any  # DecodingConfig
    batch_size: int | str = "auto"
    workers: int | str = "auto"
    device: str = "auto"
    precision: str = "auto"
    decode: str = "auto"
    trust_remote_code: bool = False
    compile: bool = False
    scratch: str | None = None   # where tars in object storage are staged (None: the system temp dir)
    claim: str | None = None     # this run's lineage entry: checked before each commit (card.check_claim)
    _captioner: Any = field(default=None, repr=False)
    _batch: int = 0
    _state: dict[str, int] = field(default_factory=dict)
    _inputs: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)  # shard -> what it read
    batch_note: str = ""

    @property
    def uses_gpu(self) -> bool:
        """Whether a Ray actor of this job should reserve a GPU (device auto or cuda)."""
        return str(self.device) in ("auto", "") or str(self.device).startswith("cuda")

    def output_path(self, shard_id: str) -> Path:
        return storage.path(self.root) / FAMILY / self.name / f"{shard_id}.parquet"

    def is_done(self, shard_id: str) -> bool:
        """Done when the file exists and was made from the shard's current manifest and tar (lineage)."""
        root = storage.path(self.root)
        return lineage.is_fresh(self.output_path(shard_id),
                                {lineage.SAMPLES: root / "samples" / f"{shard_id}.parquet",
                                 lineage.TAR: root / "shards" / f"{shard_id}.tar"})

    def setup(self) -> None:
        if self._captioner is not None:
            return
        from ..devices import resolve_device, resolve_precision, resolve_workers
        from ..models.captioners import load_captioner

        # resolved here, not on the driver: a Ray actor may sit on another kind of machine
        self.device = resolve_device(self.device)
        self.precision = resolve_precision(self.precision, self.device)
        self.workers = resolve_workers(self.workers)
        self._captioner = load_captioner(self.model, pretrained=self.pretrained, device=self.device,
                                         dtype=self.precision, trust_remote_code=self.trust_remote_code,
                                         compile=self.compile)
        # the request this model runs: default instruction for --style, options it cannot honour refused
        self.decoding = self._captioner.prepare(self.decoding)
        self._batch, self.batch_note = self._resolve_batch_size()
        self._state = {"chunk": self._batch}

    def placement(self) -> dict[str, Any]:
        """Where this worker runs, as resolved in setup (lineage records it per Ray actor)."""
        return {"device": self.device, "precision": self.precision, "workers": self.workers,
                "batch_size": self._batch, "batch_size_note": self.batch_note}

    def _resolve_batch_size(self) -> tuple[int, str]:
        if self.batch_size != "auto":
            return int(self.batch_size), "given"
        if not self.device.startswith("cuda"):
            return CPU_BATCH_SIZE, f"auto on {self.device}: default {CPU_BATCH_SIZE} (no memory search off-GPU)"
        n = probe_batch_size(self._captioner, self.decoding, GPU_BATCH_LIMIT)
        return n, f"auto: largest batch that fits, up to {GPU_BATCH_LIMIT}: {n}"

    @property
    def captioner(self) -> Any:
        self.setup()
        return self._captioner

    def process(self, shard_id: str) -> dict[str, int]:
        return process_via_many(self, shard_id)

    def _stream(self, works: list[Any]) -> Any:
        from ..devices import resolve_decode
        from ..inputs import ImageStream, Preprocess

        cap = self._captioner
        # VLMs get decoded images at native size: their processor builds the inputs per batch
        pre = Preprocess(native=True) if cap.input_kind == "images" else Preprocess(cap.image_spec, cap.preprocess)
        return ImageStream(works, pre, batch_size=self._batch,
                           workers=self.workers, device=self.device, dtype=cap.dtype,
                           decode=resolve_decode(self.decode, self.device), scratch=self.scratch)

    def process_many(self, shard_ids: list[str]):
        """Yield ``(shard_id, counts)`` as each shard's file is written, or ``(shard_id, exception)``."""
        from ..inputs import ShardWork, success_entries

        self.setup()
        root = storage.path(self.root)
        works, rows_of = [], []

        def opened(sid: str) -> tuple[str, Any]:
            try:
                manifest, fp = lineage.read_parquet(root / "samples" / f"{sid}.parquet",
                                                    columns=["uid", "key", "status"])
                # the tar's identity before any of it is read: a tar rewritten meanwhile makes this stale
                return sid, (manifest, {lineage.SAMPLES: fp,
                                        lineage.TAR: lineage.tar_identity(root / "shards" / f"{sid}.tar")})
            except Exception as e:  # an unreadable manifest fails its shard only
                return sid, e

        for sid, got in storage.map_reads(opened, shard_ids, remote=storage.is_remote(root)):
            if isinstance(got, Exception):
                yield sid, got
                continue
            manifest, self._inputs[sid] = got
            rows = manifest.to_pylist()
            entries = success_entries([r["key"] for r in rows], [r["status"] for r in rows])
            if not entries:
                yield sid, self._write(sid, rows, {})
                continue
            works.append(ShardWork(sid, str(root / "shards" / f"{sid}.tar"), entries))
            rows_of.append(rows)
        if not works:
            return
        from ..devices import model_threads

        with model_threads(self.device, self.workers):
            yield from self._caption_works(works, rows_of)

    def _caption_works(self, works: list[Any], rows_of: list[list[dict[str, Any]]]):
        from ..models.captioners import image_seed

        cfg = self.decoding
        results: dict[int, dict[int, tuple[list[str] | None, str | None]]] = {p: {} for p in range(len(works))}
        broken: dict[int, BaseException] = {}
        for batch in self._stream(works):
            for pos, rid, reason in batch.failed:
                results[pos][int(rid)] = (None, reason)
            if batch.items:
                try:
                    # one seed per image (hash of --seed and uid): captions do not depend on the batch
                    seeds = [image_seed(cfg.seed, rows_of[pos][int(rid)]["uid"]) for pos, rid in batch.items] \
                        if cfg.sampling else None
                    inputs = batch.images if batch.images is not None else batch.pixels
                    # an image the model refuses is a row with the reason; the rest of its batch is captioned
                    rows = caption_rows(self._captioner, inputs, cfg, self._state, seeds)
                except Exception as e:  # the model itself fails: the shards of this batch fail, others go on
                    for pos, _ in batch.items:
                        broken.setdefault(pos, e)
                else:
                    for (pos, rid), row in zip(batch.items, rows, strict=True):
                        results[pos][int(rid)] = row
                    events.emit("batch", len(rows))  # batch boundary for observers (benchmarks/gpu)
            for pos in batch.completed:
                sid = works[pos].shard_id
                done = results.pop(pos)
                if pos in broken:
                    yield sid, broken.pop(pos)
                    continue
                try:
                    yield sid, self._write(sid, rows_of[pos], done)
                except Exception as e:
                    yield sid, e

    def _write(self, shard_id: str, rows: list[dict[str, Any]],
               results: dict[int, tuple[list[str] | None, str | None]]) -> dict[str, int]:
        import pyarrow as pa

        out: dict[str, list[Any]] = {"uid": [], "caption": [], "captions": [], "error": []}
        counts = {"images_captioned": 0, "images_failed": 0, "not_downloaded": 0, "tokens_generated": 0,
                  "captions_truncated": 0}
        for i, r in enumerate(rows):
            caps, err = results.get(i, (None, None))
            if r["status"] != "success":
                err = f"no image (download status {r['status']})"
                counts["not_downloaded"] += 1
            elif caps is None:
                err = err or "image was not delivered"
                counts["images_failed"] += 1
            else:
                counts["images_captioned"] += 1
                counts["tokens_generated"] += sum(getattr(caps, "tokens", None) or ())
                counts["captions_truncated"] += getattr(caps, "truncated", 0)
            out["uid"].append(r["uid"])
            out["caption"].append(caps[0] if caps else None)
            out["captions"].append(list(caps) if caps else None)
            out["error"].append(err)
        # a damaged tar fails the shard (nothing written, so a rerun after the repair redoes it)
        check_tar_read(f"shards/{shard_id}.tar", (r for _, r in results.values()))
        table = pa.Table.from_pydict(out, schema=captions_schema())
        check_claim(self.root, self.claim)  # a run whose claim was voided stops here
        atomic.write_parquet(self.output_path(shard_id), lineage.stamp(table, self._inputs.pop(shard_id, {})))
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
    system: str | None = None,
    style: str | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    seed: int = 0,
    batch_size: int | str = "auto",
    workers: int | str = "auto",
    device: str = "auto",
    precision: str = "auto",
    decode: str = "auto",
    compile: bool = False,
    trust_remote_code: bool = False,
    engine: str = "local",
    part: str | None = None,
    overwrite: bool = False,
    fail_fast: bool = False,
    max_retries: int = 2,
    scratch: str | None = None,
) -> Summary:
    """Caption every image of ``dataset`` with ``model`` into ``captions/<name>/``; returns a Summary."""
    from ..devices import parse_batch_size, resolve_placement, resolve_workers
    from ..engines import (
        ActorSetupError,
        check_max_retries,
        connect_engine,
        parse_part,
        pending_shards,
        placement_summary,
        run_job,
        select_part,
    )

    check_max_retries(max_retries)
    from ..models.captioners import DecodingConfig
    from ..models.ref import parse_model_ref

    t0 = time.time()
    check_name(name, "captions name")
    batch_size = parse_batch_size(batch_size)
    resolve_workers(workers)  # checked here, resolved where the job runs (a Ray actor counts its own cores)
    run_device, run_precision = resolve_placement(device, precision, decode, engine)
    parse_part(part)
    cfg = DecodingConfig(decoding=decoding, num_beams=num_beams, top_p=top_p, top_k=top_k,
                         temperature=temperature, repetition_penalty=repetition_penalty,
                         min_new_tokens=min_new_tokens, max_new_tokens=max_new_tokens,
                         num_captions=num_captions, length_penalty=length_penalty, prompt=prompt, seed=seed,
                         system=system, style=style, max_pixels=max_pixels, min_pixels=min_pixels)
    ref = parse_model_ref(model, pretrained)
    warnings = []
    if style == "dense" and max_new_tokens < DENSE_MIN_NEW_TOKENS:
        warnings.append(f"--style dense with --max-new-tokens {max_new_tokens}: most dense captions will be cut "
                        f"(give them {DENSE_MIN_NEW_TOKENS} or more)")
    for w in warnings:
        log.warning("warning: %s", w)
    ds = Dataset(dataset)
    shard_ids = ds.shard_ids()
    if not shard_ids:
        raise InputError(f"{ds.root} has no samples/*.parquet: download or ingest images first")

    # precision changes the captions; device, workers, decode and batch size do not
    params = {"model": model, "pretrained": pretrained, "precision": run_precision, **cfg.to_params()}
    out_dir = ds.family_dir(FAMILY, name)

    def exists() -> bool:
        return bool(storage.list_names(out_dir, ".parquet"))

    # a name taken with other parameters is refused before the model loads (seconds to minutes)
    planned = ds.card.claim_output(FAMILY, name, params, overwrite=overwrite, exists=exists())
    connect_engine(engine)  # a Ray cluster that does not answer: one line, nothing written
    root, job_model, job_pretrained, job_scratch = str(ds.root), model, pretrained, scratch
    if engine == "ray":  # actors do not share the driver's working directory: no relative paths
        from ..engines.paths import cluster_file, cluster_model_ref, cluster_path

        root, job_model = cluster_path(root), cluster_model_ref(model)
        job_pretrained, job_scratch = cluster_file(pretrained), cluster_path(scratch)
    job = RecaptionJob(root, name, job_model, job_pretrained, cfg, batch_size=batch_size, workers=workers,
                       device=run_device, precision=run_precision, decode=decode,
                       trust_remote_code=trust_remote_code, compile=compile, scratch=job_scratch)
    model_info: dict[str, Any] = dict(ref.describe())
    todo = select_part(shard_ids, parse_part(part))
    if engine == "local" and (planned == "overwrite" or pending_shards(job, todo, first=True)):
        job.setup()  # load first: an unloadable model leaves no entry and deletes no old output
        model_info.update(job.captioner.describe())
        # the exact text the model sees (template applied) and the generate() arguments
        model_info.update(job.captioner.describe_request(job.decoding))
    # claimed for good, old outputs removed on --overwrite, in one locked step with the lineage entry
    mode, entry = ds.card.claim(stage="recaption", family=FAMILY, name=name, params=params, overwrite=overwrite,
                                exists=exists, model=model_info,
                                remove=lambda: ds.remove_family_output(FAMILY, name))
    job.claim = entry
    atomic.clean_stale_temps(out_dir)
    try:
        result = run_job(job, shard_ids, engine=engine, part=part, description=f"recaption {name}",
                         fail_fast=fail_fast, max_retries=max_retries)
    except ActorSetupError as e:
        if e.wrote_nothing:  # the model did not load on the actors: the name stays free
            ds.card.abandon_entry(entry)
        raise
    counts = result.to_dict()
    failed = counts.pop("failed_shards")
    # what ran: as each worker resolved it (under Ray, per actor), else the job's words
    placed = {"device": job.device, "workers": job.workers, "batch_size": job._batch or batch_size,
              "batch_size_note": job.batch_note, **placement_summary(result.placements)}
    ds.card.finish_entry(entry, counts, capcurate_version=__version__, oom_backoffs=job._state.get("oom_backoffs", 0),
                         **placed)
    seconds = time.time() - t0
    n_img = counts.get("images_captioned", 0)
    ok = not failed
    msg = (f"captioned {n_img:,} images into captions/{name} ({mode}); "
           f"{counts.get('images_failed', 0):,} failed (undecodable or refused: see the error column), "
           f"{len(failed)} shard(s) failed")
    if counts.get("captions_truncated"):
        msg += f"; {counts['captions_truncated']:,} captions hit --max-new-tokens {max_new_tokens}"
    return Summary(
        stage="recaption", ok=ok, counts=counts, seconds=seconds, message=msg,
        details={"name": name, "mode": mode, "model": model, "decoding": cfg.decoding,
                 "batch_size": job._batch or batch_size, "batch_size_note": job.batch_note,
                 "images_per_second": round(n_img / seconds, 2) if seconds > 0 else None,
                 # generated tokens over the run's wall clock (loading included, as images_per_second)
                 "tokens_per_second": round(counts.get("tokens_generated", 0) / seconds, 1)
                 if seconds > 0 and counts.get("tokens_generated") else None,
                 **({"pixel_budget": model_info["pixel_budget"]} if model_info.get("pixel_budget") else {}),
                 **({"warnings": warnings} if warnings else {}),
                 **({"failed_shards": failed} if failed else {})},
    )
