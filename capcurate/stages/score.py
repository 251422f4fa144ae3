"""``capcurate score``: CLIP similarity of every image with each of its caption columns.

Per shard: every downloaded image is decoded in DataLoader workers and embedded once; each selected
caption source (``raw`` = the manifest caption, or a ``captions/<name>`` run) is tokenised and embedded
in batches (identical texts once); the cosine similarity lands in ``scores/<name>/<shard>.parquet``:

    uid | score_<name>_<source> float32 ... | scores_<name>_<source> list<float32>
        | best_<name>_<source> int32 (with --num-captions > 1) | error_<name> string

A failed image or a NULL/empty caption gives a NULL score. Adding a caption source later rewrites
each shard file with the new columns added and the old ones kept: only the missing sources are
embedded, and the image embeddings are read back from ``embeddings/<name>/`` when they were saved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic, events, lineage, storage
from ..card import check_claim
from ..dataset import Dataset, check_name
from ..engines import process_via_many
from ..errors import InputError, StageFailed
from ..summary import Summary
from ..tar_damage import check_tar_read
from .score_columns import (
    RAW,
    load_image_embeddings,
    merge_columns,
    resolve_sources,
    save_embeddings,
    score_lists,
    score_source,
)

# --batch-size auto: a ViT-L/14 in bf16 is past its best throughput at 256 images and far from memory
# limits on any current GPU; on the CPU larger batches only add latency
GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 64
# how long one listing of an input or output folder answers "which shards have a file" (seconds): a
# folder is listed once per this, not probed once per shard
LISTING_TTL = 60.0


def score_column(name: str, source: str) -> str:
    return f"score_{name}_{source}"


# -- the per-shard job -----------------------------------------------------------------------------
@dataclass
class ScoreJob:
    """Scores one shard; picklable before ``setup`` so Ray actors can load the model themselves."""

    root: str   # the dataset, a local path or a URL (kept as text: the job is pickled to Ray actors)
    name: str
    model: str
    pretrained: str | None
    sources: list[str]
    num_captions: int = 1
    batch_size: int | str = "auto"
    workers: int | str = "auto"
    device: str = "auto"
    precision: str = "auto"
    save_embeddings: bool = False
    decode: str = "auto"
    compile: bool = False
    scratch: str | None = None   # where tars in object storage are staged (None: the system temp dir)
    claim: str | None = None     # this run's lineage entry: checked before each commit (card.check_claim)
    scorer: Any = field(default=None, repr=False)
    _listings: dict[str, tuple[float, set[str]]] = field(default_factory=dict, repr=False)

    @property
    def ds(self) -> Dataset:
        return Dataset(self.root, must_exist=False)

    @property
    def base(self) -> Any:
        """The dataset root as a path (a Path, or a UPath for a URL)."""
        return storage.path(self.root)

    def _names(self, folder: Any) -> set[str]:
        """Names of the files in ``folder``: one listing, reused for LISTING_TTL seconds."""
        key, now = str(folder), time.monotonic()
        hit = self._listings.get(key)
        if hit is None or now - hit[0] > LISTING_TTL:
            hit = self._listings[key] = (now, storage.list_names(folder))
        return hit[1]

    @property
    def uses_gpu(self) -> bool:
        """Whether a Ray actor of this job should reserve a GPU (device auto or cuda)."""
        return str(self.device) in ("auto", "") or str(self.device).startswith("cuda")

    def output_path(self, shard_id: str) -> Path:
        return self.base / "scores" / self.name / f"{shard_id}.parquet"

    def embeddings_dir(self) -> Path:
        return self.base / "embeddings" / self.name

    def available_sources(self, shard_id: str) -> list[str]:
        """Requested sources that have captions for this shard (a recaption run may be partial): one
        listing of each captions folder, not one existence check per shard."""
        return [s for s in self.sources
                if s == RAW or f"{shard_id}.parquet" in self._names(self.base / "captions" / s)]

    def missing_sources(self, shard_id: str) -> list[str] | None:
        """Available sources without a current column in the shard's file; None when there is no file."""
        import json

        try:
            meta = storage.read_metadata(self.output_path(shard_id))
        except Exception:  # missing, or damaged (0 bytes, garbage): made again, never a traceback
            return None
        raw = (meta.metadata or {}).get(lineage.META_KEY)
        try:
            recorded = json.loads(raw) if raw else {}
        except ValueError:
            recorded = {}
        recorded = recorded if isinstance(recorded, dict) else {}
        have = set(meta.schema.to_arrow_schema().names)
        # a column made from a manifest or captions file that changed since is missing too
        return [s for s in self.available_sources(shard_id) if score_column(self.name, s) not in have
                or lineage.stale_inputs(recorded, self.inputs_of(shard_id, s))]

    def inputs_of(self, shard_id: str, source: str) -> dict[str, Path]:
        """The files a score column of ``source`` is made from (capcurate.lineage names -> paths)."""
        files = {lineage.SAMPLES: self.base / "samples" / f"{shard_id}.parquet",
                 lineage.TAR: self.base / "shards" / f"{shard_id}.tar"}
        if source != RAW:
            files[lineage.captions_input(source)] = self.base / "captions" / source / f"{shard_id}.parquet"
        return files

    def is_done(self, shard_id: str) -> bool:
        """The shard's file exists and has a current column for every available source (one footer read;
        engines call this only for shards a listing found)."""
        return self.missing_sources(shard_id) == []

    def setup(self) -> None:
        if self.scorer is None:
            from ..devices import resolve_decode, resolve_device, resolve_precision, resolve_workers
            from ..models.scorers import load_scorer

            # resolved here, not on the driver: a Ray actor may sit on another kind of machine
            self.device = resolve_device(self.device)
            self.precision = resolve_precision(self.precision, self.device)
            self.workers = resolve_workers(self.workers)
            self.decode = resolve_decode(self.decode, self.device)
            if self.batch_size == "auto":
                self.batch_size = GPU_BATCH_SIZE if self.device.startswith("cuda") else CPU_BATCH_SIZE
            self.scorer = load_scorer(self.model, pretrained=self.pretrained, device=self.device,
                                      precision=self.precision, compile=self.compile)

    def placement(self) -> dict[str, Any]:
        """Where this worker runs, as resolved in setup (lineage records it per Ray actor)."""
        return {"device": self.device, "precision": self.precision, "workers": self.workers,
                "batch_size": self.batch_size, "decode": self.decode}

    # -- images --------------------------------------------------------------------------------
    def _stream(self, works: list[Any]) -> Any:
        from ..inputs import ImageStream, Preprocess

        sc = self.scorer
        return ImageStream(works, Preprocess(sc.spec, sc.preprocess), batch_size=int(self.batch_size),
                           workers=self.workers, device=self.device, dtype=sc.input_dtype, decode=self.decode,
                           scratch=self.scratch)

    def _encode_batch(self, pixels: Any) -> Any:
        """Embeddings left on the device: copied back once per shard, so no batch waits for the GPU."""
        return self.scorer.encode_images(pixels, to_cpu=False)

    # -- texts ---------------------------------------------------------------------------------
    def _embed_texts(self, texts: list[str]) -> dict[str, np.ndarray]:
        # similar lengths share a chunk, so a trimmed text tower (models/text_trim.py) runs short chunks
        unique = sorted(dict.fromkeys(texts), key=len)
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(unique), self.batch_size):
            chunk = unique[i:i + self.batch_size]
            out.update(zip(chunk, self.scorer.encode_texts(chunk).numpy(), strict=True))
        return out

    def _source_texts(self, shard_id: str, source: str, uids: list[str], raw: list[str | None],
                      inputs: dict[str, str] | None = None):
        """(first caption per row, caption list per row or None) aligned with the manifest rows; the
        fingerprint of the captions file read goes into ``inputs``."""
        if source == RAW:
            return raw, None
        try:
            table, fp = lineage.read_parquet(self.base / "captions" / source / f"{shard_id}.parquet")
        except FileNotFoundError:
            raise
        except Exception as e:  # the shard fails with what to do; the other shards go on
            raise StageFailed(f"captions/{source}/{shard_id}.parquet is damaged ({type(e).__name__}): run "
                              f"capcurate doctor --repair, then recaption --name {source}") from None
        if inputs is not None:
            inputs[lineage.captions_input(source)] = fp
        by_uid = dict(zip(table.column("uid").to_pylist(), table.column("caption").to_pylist(), strict=True))
        first = [by_uid.get(u) for u in uids]
        if self.num_captions <= 1 or "captions" not in table.column_names:
            return first, None
        lists = dict(zip(table.column("uid").to_pylist(), table.column("captions").to_pylist(), strict=True))
        return first, [(lists.get(u) or [])[: self.num_captions] for u in uids]

    def process(self, shard_id: str) -> dict[str, int]:
        return process_via_many(self, shard_id)

    def process_many(self, shard_ids: list[str]):
        """Yield ``(shard_id, counts)`` as each shard's file is written, or ``(shard_id, exception)``.

        Every shard's images go through one ``ImageStream``; a shard's texts are embedded and its file
        written as soon as its last image batch is back, while the stream prepares the next batches.
        """
        from ..devices import model_threads

        self.setup()
        with model_threads(self.device, self.workers):
            yield from self._score_shards(shard_ids)

    def _score_shards(self, shard_ids: list[str]):
        from ..inputs import ShardWork

        works, states = [], []
        for sid, state in self._open_shards(shard_ids):
            if isinstance(state, Exception):
                yield sid, state
                continue
            if state["reused"] is not None or not state["entries"]:
                yield sid, self._guarded_finish(state)
                continue
            works.append(ShardWork(sid, str(self.ds.shard_path(sid)), state["entries"]))
            states.append(state)
        if not works:
            return
        from concurrent.futures import ThreadPoolExecutor

        # a finished shard's texts (tokenising, the text tower), scores and file are done by one thread
        # beside the image stream, so the next images are decoded and embedded meanwhile
        with ThreadPoolExecutor(1, thread_name_prefix="capcurate-score-finish") as finisher:
            yield from self._stream_shards(works, states, finisher)

    def _open_shards(self, shard_ids: list[str]) -> Iterator[tuple[str, dict[str, Any] | Exception]]:
        """``_open_shard`` of each shard, in order. On a store the reads (a GET of each manifest, of each
        previous output's footer) are latency, not work: up to 8 shards are opened at once."""

        def opened(sid: str) -> tuple[str, dict[str, Any] | Exception]:
            try:
                return sid, self._open_shard(sid)
            except Exception as e:
                return sid, e

        remote = storage.is_remote(self.base)
        if remote and len(shard_ids) > 1:  # list once here, not once per thread
            self._names(self.output_path(shard_ids[0]).parent)
            for source in self.sources:
                if source != RAW:
                    self._names(self.base / "captions" / source)
        yield from storage.map_reads(opened, shard_ids, remote=remote)

    def _stream_shards(self, works: list[Any], states: list[Any], finisher: Any):
        from collections import deque
        from concurrent.futures import Future

        pending: deque = deque()  # (shard id, future) in completion order
        broken: dict[int, BaseException] = {}
        for batch in self._stream(works):
            for pos, rid, reason in batch.failed:
                states[pos]["errors"][int(rid)] = reason
            if batch.items:
                try:
                    out = self._encode_batch(batch.pixels)
                except Exception as e:  # the shards of this batch fail; the others go on
                    for pos, _ in batch.items:
                        broken.setdefault(pos, e)
                else:
                    rows_of: dict[int, list[int]] = {}
                    for j, (pos, rid) in enumerate(batch.items):
                        rows_of.setdefault(pos, []).append(j)
                        states[pos]["pending_rows"].append(int(rid))
                    for pos, js in rows_of.items():
                        # a shard's rows are one run of the batch: a slice is a view, while a list index
                        # would copy the index to the GPU, and that blocking copy waits for the GPU
                        whole = js[-1] - js[0] + 1 == len(js)
                        states[pos]["pending"].append(out[js[0]:js[-1] + 1] if whole else out[js])
                    events.emit("batch", len(batch.items))  # batch boundary for observers (benchmarks/gpu)
            for pos in batch.completed:
                st = states[pos]
                states[pos] = None  # free the shard's embeddings once written
                if pos in broken:
                    failed: Future = Future()
                    failed.set_result(broken.pop(pos))
                    pending.append((st["sid"], failed))
                else:
                    pending.append((st["sid"], finisher.submit(self._collect_and_finish, st)))
            # hand back finished shards in order; hold at most two in flight (their rows stay in memory)
            while pending and (len(pending) > 2 or pending[0][1].done()):
                sid, outcome = pending.popleft()
                yield sid, outcome.result()
        while pending:
            sid, outcome = pending.popleft()
            yield sid, outcome.result()

    def _collect_and_finish(self, state: dict[str, Any]) -> dict[str, int] | BaseException:
        try:
            self._collect(state)
            return self._finish_shard(state)
        except Exception as e:
            return e

    @staticmethod
    def _collect(state: dict[str, Any]) -> None:
        """Move a finished shard's device embeddings into its rows (the one sync per shard)."""
        if not state["pending"]:
            return
        import torch

        emb = torch.cat(state["pending"]).cpu().numpy()
        if state["emb"] is None or state["emb"].shape[1] != emb.shape[1]:
            state["emb"] = np.zeros((len(state["uids"]), emb.shape[1]), np.float32)
        state["emb"][state["pending_rows"]] = emb
        state["pending"], state["pending_rows"] = [], []

    def _open_shard(self, shard_id: str) -> dict[str, Any]:
        from ..inputs import success_entries

        manifest, samples_fp = lineage.read_parquet(self.ds.samples_path(shard_id),
                                                    columns=["uid", "key", "status", "caption"])
        uids = manifest.column("uid").to_pylist()
        out = self.output_path(shard_id)
        previous = None
        if out.name in self._names(out.parent):  # a listing, not a probe per shard
            try:
                previous = storage.read_table(out)
                previous.column("uid")
            except Exception:  # missing, or damaged: scored again
                previous = None
        # the tar's identity before any of it is read: a tar rewritten meanwhile makes this stale
        tar_id = lineage.tar_identity(self.ds.shard_path(shard_id))
        inputs = lineage.recorded_in(previous) if previous is not None else {}
        if previous is not None and (previous.column("uid").to_pylist() != uids
                                     or inputs.get(lineage.SAMPLES, samples_fp) != samples_fp
                                     or inputs.get(lineage.TAR, tar_id) != tar_id):
            previous, inputs = None, {}  # the manifest or the tar changed: score everything again
        inputs[lineage.SAMPLES] = samples_fp
        inputs[lineage.TAR] = tar_id
        missing = self.missing_sources(shard_id) if previous is not None else None
        todo = missing if missing is not None else self.available_sources(shard_id)
        emb_dir = self.embeddings_dir()
        reused = (load_image_embeddings(emb_dir, shard_id, uids, samples_fp, listed=self._names(emb_dir),
                                        tar_id=tar_id)
                  if self.save_embeddings else None)
        keys, status = manifest.column("key").to_pylist(), manifest.column("status").to_pylist()
        errors: list[str | None] = [None if s == "success" else f"not downloaded: {s}" for s in status]
        entries = success_entries(keys, status)
        emb = None  # allocated when the shard's embeddings come back (a window holds many shards)
        if reused is not None:
            emb, errors = reused
        return {"sid": shard_id, "uids": uids, "previous": previous, "todo": todo, "reused": reused,
                "errors": errors, "entries": entries, "emb": emb, "raw": manifest.column("caption").to_pylist(),
                "pending": [], "pending_rows": [], "inputs": inputs}

    def _guarded_finish(self, state: dict[str, Any]) -> dict[str, int] | BaseException:
        try:
            return self._finish_shard(state)
        except Exception as e:
            return e

    def _finish_shard(self, state: dict[str, Any]) -> dict[str, int]:
        shard_id, uids, previous, todo, reused = (state[k] for k in ("sid", "uids", "previous", "todo", "reused"))
        img_emb, errors = state["emb"], state["errors"]
        if img_emb is None:  # no image of the shard came back: every row carries its error
            img_emb = np.zeros((len(uids), self.scorer.embed_dim or 1), np.float32)
        delivered = {int(r) for r, _ in state["entries"]}
        for i in delivered:  # a row the stream never returned must not pass for a zero embedding
            if errors[i] is None and not img_emb[i].any() and reused is None:
                errors[i] = "image was not delivered"
        # a damaged tar fails the shard (nothing written, so a rerun after the repair redoes it)
        check_tar_read(f"shards/{shard_id}.tar", errors)
        ok = np.array([e is None for e in errors], bool)
        counts = {"images_scored": int(ok.sum()), "images_failed": int((~ok).sum()), "scores_written": 0,
                  "scores_null": 0, "images_reused": int(len(uids) if reused is not None else 0)}

        import pyarrow as pa

        columns: dict[str, pa.Array] = {}
        text_npys: dict[str, np.ndarray] = {}
        raw = state["raw"]
        for source in todo:
            first, lists = self._source_texts(shard_id, source, uids, raw, state["inputs"])
            col, txt = score_source(img_emb, ok, first, self._embed_texts)
            columns[score_column(self.name, source)] = col
            counts["scores_written"] += len(col) - col.null_count
            counts["scores_null"] += col.null_count
            text_npys[source] = txt
            if lists is not None:
                scores, best, txt_k = score_lists(img_emb, ok, lists, self._embed_texts)
                columns[f"scores_{self.name}_{source}"] = scores
                columns[f"best_{self.name}_{source}"] = best
                text_npys[source] = txt_k

        table = merge_columns(self.name, previous, uids, columns, errors)
        check_claim(self.root, self.claim)  # a run whose claim was voided stops here
        if self.save_embeddings:
            save_embeddings(self.embeddings_dir(), shard_id, uids, errors, img_emb, text_npys, reused is None,
                                  {k: state["inputs"][k] for k in (lineage.SAMPLES, lineage.TAR)})
        # last: this file marks the shard done; it records the inputs it was made from
        atomic.write_parquet(self.output_path(shard_id), lineage.stamp(table, state["inputs"]))
        return counts

# -- the stage driver ------------------------------------------------------------------------------
def score(dataset: str | Path, model: str, name: str, *, pretrained: str | None = None,
          captions: str | list[str] | None = None, num_captions: int = 1, batch_size: int | str = "auto",
          workers: int | str = "auto", device: str = "auto", precision: str = "auto", decode: str = "auto",
          save_embeddings: bool = False, engine: str = "local", part: str | None = None,
          overwrite: bool = False, num_actors: int | None = None, compile: bool = False,
          max_retries: int = 2, scratch: str | None = None) -> Summary:
    """Score every image against each selected caption column; writes ``scores/<name>/``."""
    from ..devices import parse_batch_size, resolve_placement, resolve_workers
    from ..engines import check_max_retries, connect_engine, parse_part
    from ..models.ref import parse_model_ref

    t0 = time.time()
    check_max_retries(max_retries)
    parse_part(part)  # before the model loads or the card changes
    ds = Dataset(dataset)
    check_name(name, "scorer name")
    if num_captions < 1:
        raise InputError(f"--num-captions must be at least 1, got {num_captions}")
    batch_size = parse_batch_size(batch_size)
    resolve_workers(workers)  # checked here, resolved where the job runs
    run_device, run_precision = resolve_placement(device, precision, decode, engine)
    sources = resolve_sources(ds, captions)
    ref = parse_model_ref(model, pretrained=pretrained)
    shard_ids = ds.shard_ids()
    if not shard_ids:
        raise InputError(f"{ds.root} has no manifest shards (samples/*.parquet): download or ingest first")

    # sources are not parameters: adding one later resumes and fills in only the new columns
    # the approximate decode changes scores; which exact decoder (cpu or gpu) ran does not, within 1e-3
    params = {"model": model, "pretrained": pretrained, "precision": run_precision, "num_captions": num_captions,
              "save_embeddings": save_embeddings, "draft_decode": decode == "draft"}
    out_dir = ds.family_dir("scores", name)

    def exists() -> bool:
        return bool(storage.list_names(out_dir, ".parquet"))

    def remove() -> None:
        ds.remove_family_output("scores", name)
        ds.remove_family_output("embeddings", name)

    # a name taken with other parameters is refused before the model loads (seconds to minutes)...
    ds.card.claim_output("scores", name, params, overwrite=overwrite, exists=exists())
    connect_engine(engine)  # a Ray cluster that does not answer: one line, nothing written
    if engine == "ray":  # actors do not share the driver's working directory: no relative paths
        from ..engines.paths import cluster_file, cluster_model_ref, cluster_path

        job = ScoreJob(cluster_path(str(ds.root)), name, cluster_model_ref(model), cluster_file(pretrained),
                       sources, num_captions, batch_size, workers, run_device, run_precision, save_embeddings,
                       decode, compile, cluster_path(scratch))
    else:
        job = ScoreJob(str(ds.root), name, model, pretrained, sources, num_captions, batch_size, workers,
                       run_device, run_precision, save_embeddings, decode, compile, scratch)
    if engine == "local":
        job.setup()  # a model that cannot load fails here: no entry written, no old output deleted
    # ...and claimed for good, old outputs removed on --overwrite, in one locked step with the entry
    mode, entry = ds.card.claim(stage="score", family="scores", name=name, params=params, overwrite=overwrite,
                                exists=exists, model=ref.describe(), remove=remove)
    job.claim = entry
    atomic.clean_stale_temps(out_dir)
    atomic.clean_stale_temps(ds.family_dir("embeddings", name))
    from ..engines import ActorSetupError, placement_summary, run_job

    options = {"num_actors": num_actors} if engine == "ray" and num_actors else {}
    try:
        result = run_job(job, shard_ids, engine=engine, part=part, description=f"score {name}",
                         max_retries=max_retries, **options)
    except ActorSetupError as e:
        if e.wrote_nothing:  # the model did not load on the actors: the name stays free
            ds.card.abandon_entry(entry)
        raise
    counts = result.to_dict()
    failed = counts.pop("failed_shards")
    # what ran: as each worker resolved it (under Ray, per actor), else the job's words
    placed = {"device": job.device, "workers": job.workers, "batch_size": job.batch_size, "decode": job.decode,
              **placement_summary(result.placements)}
    ds.card.finish_entry(entry, {k: v for k, v in counts.items()}, sources=sources, **placed)
    ok = not result.failed
    columns = [score_column(name, s) for s in sources]
    return Summary(
        stage="score", ok=ok, counts=counts,
        details={"name": name, "model": model, "sources": sources, "columns": columns,
                 "failed_shards": failed, "mode": mode},
        seconds=time.time() - t0,
        message=(f"scored {counts.get('images_scored', 0):,} images against {', '.join(sources)} "
                 f"into scores/{name}" + ("" if ok else f"; {len(failed)} shard(s) failed: re-run to retry")),
    )
