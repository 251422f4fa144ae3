"""``capcurate shard``: write a selection as webdataset training shards, copying image bytes as they are.

Images are never decoded: each output sample's ``<key>.<ext>`` is the exact byte range of the source
tar member, read with forward seeks in (source shard, offset) order; ``<key>.txt`` is the selection's
caption and ``<key>.json`` holds uid, caption source and the sample's scores. ``--captions raw,blip``
also writes each of those captions under its own key of the ``.json`` (for train-time choice: ``capcurate
train --caption-keys``, open_clip's ``--json-text-key``), and manifest.json records the recipe (keys and,
from ``mix --strategy sample``, their probabilities). Each output shard is one
unit of work of ``capcurate.engines`` (written atomically, skipped when it exists), so a killed run
resumes, ``--part i/N`` splits the work and ``--engine ray`` spreads it. ``manifest.json`` and
open_clip's ``sizes.json`` are written when every shard exists.

Object storage (a dataset and/or ``-o`` that is a URL): the output prefix is listed once (finished
shards, the claim) instead of one existence check per shard, each output tar is uploaded whole when
written (invisible until complete, so a killed run resumes the same way), and the plan lives in a
private local scratch folder. Source tars in a bucket are staged once each to local scratch (one GET
per source tar, see ``shard_plan.stage_sources``), indexed there and then read with ``os.pread`` exactly as
local ones:
a selection, shuffled or not, draws every output shard from all over the sources, so reading members
straight from the bucket would cost one GET per sample. Scratch must hold the source tars the
selection uses (put ``TMPDIR`` on a large disk); with ``--engine ray`` the workers must share that
host's scratch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import __version__, atomic, lineage, storage
from ..dataset import Dataset, check_name
from ..engines import check_max_retries, connect_engine, parse_part, run_job, select_part
from ..errors import InputError, OutputExistsError, StageFailed
from ..shards import TarShardWriter
from ..summary import Summary
from .shard_plan import ShardPlan, build_plan

CLAIM_NAME = ".capcurate-shard.json"
OUR_FILES = ("manifest.json", "sizes.json", CLAIM_NAME)


def shard_name(index: int) -> str:
    return f"{index:05d}"


class ShardWriteJob:
    """One output shard per unit of work: gather its images from the source tars, write them in order."""

    def __init__(self, ds_root: Any, out: Any, plan: ShardPlan):
        self.ds_root = storage.path(ds_root)
        self.out = storage.path(out)
        self.plan = plan
        self._finished: set[str] | None = None

    def output_path(self, shard_id: str) -> Any:
        return self.out / f"{shard_id}.tar"

    def is_done(self, shard_id: str) -> bool:
        """Finished shards from one listing of the output folder/prefix (not one probe per shard)."""
        if self._finished is None:
            self._finished = storage.list_names(self.out, ".tar")
        return f"{shard_id}.tar" in self._finished

    def source_path(self, source_shard: str) -> Path:
        """A local file with the source tar's bytes: the tar itself, or its staged copy (bucket)."""
        staged = self.plan.staged_sources.get(source_shard)
        return staged if staged is not None else self.ds_root / "shards" / f"{source_shard}.tar"

    def setup(self) -> None:
        pass

    def process(self, shard_id: str) -> dict[str, int]:
        import pyarrow.dataset as pads

        rows = pads.dataset(self.plan.rows_dir(int(shard_id)), format="parquet")
        table = rows.to_table(columns=["position", "caption", "shard", "ext", "byte_offset", "byte_size", "meta"])
        table = table.sort_by("position")
        cols = {c: table[c].to_pylist() for c in table.column_names}
        keys = [f"{pos:09d}" for pos in cols["position"]]
        captions = [(c or "").encode("utf-8") for c in cols["caption"]]
        metas = [m.encode("utf-8") for m in cols["meta"]]
        sizes = cols["byte_size"]
        # every sample's place in the output tar is known from the sizes, so samples can be written in
        # the order the sources are read (each source tar once, front to back) with no reorder buffer
        offsets, end = [], 0
        for size, caption, meta in zip(sizes, captions, metas, strict=True):
            offsets.append(end)
            end += TarShardWriter.sample_span((size, len(caption), len(meta)))
        by_source = sorted(range(len(keys)), key=lambda i: (cols["shard"][i], cols["byte_offset"][i]))
        with TarShardWriter(self.output_path(shard_id)) as w:
            fd, open_shard = None, None
            try:
                for i in by_source:
                    if cols["shard"][i] != open_shard:
                        if fd is not None:
                            os.close(fd)
                        open_shard = cols["shard"][i]
                        fd = os.open(self.source_path(open_shard), os.O_RDONLY | os.O_CLOEXEC)
                    data = os.pread(fd, sizes[i], cols["byte_offset"][i])
                    if len(data) != sizes[i]:
                        raise StageFailed(f"source shard {open_shard}.tar changed while sharding")
                    w.write_at(offsets[i], keys[i], {cols["ext"][i]: data, "txt": captions[i], "json": metas[i]})
            finally:
                if fd is not None:
                    os.close(fd)
        return {"samples_written": w.count, "bytes_written": w.bytes}


def shard(
    dataset: str | Path | Dataset,
    selection: str,
    out: str | Path,
    *,
    samples_per_shard: int = 10000,
    min_shards: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    engine: str = "local",
    part: str | None = None,
    max_retries: int = 2,
    captions: str | list[str] | None = None,
) -> Summary:
    """Write ``selection`` of ``dataset`` as training shards ``out/00000.tar ...`` (see module docstring)."""
    t0 = time.time()
    check_max_retries(max_retries)
    parse_part(part)  # before -o is created
    connect_engine(engine)  # a Ray cluster that does not answer: one line, -o not created, no plan built
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    check_name(selection, "selection name")
    if selection not in ds.selection_names():
        raise InputError(f"no selection named {selection!r}; selections present: "
                         f"{', '.join(ds.selection_names()) or '(none)'}")
    if samples_per_shard < 1 or min_shards < 1:
        raise InputError("--samples-per-shard and --min-shards must be at least 1")
    recipe = caption_recipe(ds, selection, captions)
    out = storage.path(out)
    storage.check_writable(out)
    storage.check_container(out)
    claim = {
        "dataset": storage.as_str(ds.root) if ds.remote else str(ds.root.resolve()), "selection": selection,
        "selection_sha256": _file_sha256(ds.selection_path(selection)),
        "parameters": {"samples_per_shard": samples_per_shard, "min_shards": min_shards,
                       "shuffle": shuffle, "seed": seed if shuffle else None},
        # the plan reads the whole manifest (a uid's first shard) and the tars: parts of one output must
        # come from the same ones, or samples repeat and sizes.json disagrees with the tars (a repair between)
        "sources": source_fingerprints(ds, recipe["keys"] if recipe else None),
    }
    if recipe:
        claim["parameters"]["captions"] = recipe
    mode = _claim_out_dir(out, claim, overwrite=overwrite)
    atomic.clean_stale_temps(out)

    # the plan folder names its owner (host~pid) so that only a provably dead run's plan is removed; it
    # lies in -o when that is a local folder (as before), else in local scratch (a store has no folders)
    plan_parent = Path(tempfile.gettempdir()) if storage.is_remote(out) else out
    _remove_dead_plans(plan_parent)
    work = Path(tempfile.mkdtemp(prefix=f".plan{atomic.SEP}{atomic.owner_tag()}{atomic.SEP}", dir=plan_parent))
    try:
        plan = build_plan(ds, selection, work, samples_per_shard=samples_per_shard,
                          min_shards=min_shards, shuffle=shuffle, seed=seed,
                          captions=recipe["keys"] if recipe else None)
        ids = [shard_name(i) for i in range(len(plan.shard_sizes))]
        job = ShardWriteJob(ds.root, out, plan)
        todo = [i for i in select_part(ids, parse_part(part)) if not job.is_done(i)]
        if plan.staged_sources:  # keep only the source tars this run's shards read (bounded scratch)
            keep = set(plan.sources_for(todo))
            for sid in [s for s in plan.staged_sources if s not in keep]:
                plan.staged_sources.pop(sid).unlink(missing_ok=True)
        result = run_job(job, ids, engine=engine, part=part, description="shards", max_retries=max_retries)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    finished = storage.list_names(out, ".tar")  # one listing: other --part runs may have finished theirs
    complete = all(f"{i}.tar" in finished for i in ids)
    if complete:
        _write_index_files(out, plan, claim)
    missing = sum(plan.missing.values())
    counts = {
        "samples": plan.total, "shards": len(ids), "samples_per_shard": plan.samples_per_shard,
        "missing": missing, **{f"missing_{k}": v for k, v in plan.missing.items()},
        **result.to_dict(),
    }
    counts.pop("failed_shards", None)
    details = {
        "out": str(out), "mode": mode, "complete": complete, "failed_shards": result.failed,
        "missing_examples": plan.missing_examples, "damaged_source_shards": plan.damaged_sources,
    }
    message = (f"{plan.total:,} samples in {len(ids)} shards of up to {plan.samples_per_shard:,} -> {out}"
               f"{'' if complete else ' (incomplete: run the remaining parts, then manifest.json is written)'}")
    if missing:
        message += f"; {missing:,} selected rows have no image in the shards (see missing_*)"
    if ids and len(ids) < 8:
        message += f"; only {len(ids)} shards: a trainer can use at most {len(ids)} workers x ranks " \
                   "(pass --min-shards to split finer)"
    if result.failed:
        raise StageFailed(f"{len(result.failed)} shard(s) failed, first: {next(iter(result.failed.items()))}")
    return Summary(stage="shard", counts=counts, details=details, seconds=time.time() - t0, message=message)


def _claim_out_dir(out: Any, claim: dict, *, overwrite: bool) -> str:
    """'new', 'resume' (same dataset, selection content and parameters) or 'overwrite'; else refuse.

    One listing of ``out`` (a local folder or a store prefix) says what is there.
    """
    claim_path = out / CLAIM_NAME
    remote = storage.is_remote(out)
    if not remote and out.exists() and not out.is_dir():
        raise InputError(f"-o {out} exists and is not a directory")
    if remote and _is_object(out):
        raise InputError(f"-o {out} is an object, not a prefix")
    # plans and temp files of other parts running now are not outputs
    names = [n for n in storage.list_entries(out) if not n.startswith(".plan") and not atomic.is_temp_name(n)]
    mode = "new"
    if names:
        previous = json.loads(storage.path(claim_path).read_bytes()) if CLAIM_NAME in names else None
        if previous == claim:
            return "resume"
        if not overwrite:
            if previous is None:
                raise OutputExistsError(f"{out} is not empty and was not written by capcurate shard; "
                                        "choose another -o or pass --overwrite")
            changed = [k for k in ("dataset", "selection", "selection_sha256", "parameters")
                       if previous.get(k) != claim[k]]
            before = previous.get("sources") or {}
            changed += [f"sources.{k} (the dataset's {k} changed since: a repair or re-ingest?)"
                        for k in claim["sources"] if before.get(k) != claim["sources"][k]]
            raise OutputExistsError(f"{out} holds shards of another run or plan (differs in: "
                                    f"{', '.join(changed)}); choose another -o or pass --overwrite to rebuild it whole")
        for n in names:
            if n.endswith(".tar") or n in OUR_FILES:
                if remote:
                    storage.remove(out / n)
                else:
                    p = out / n
                    if p.is_file():
                        p.unlink()
        mode = "overwrite"
    storage.ensure_dir(out)
    atomic.write_json(claim_path, claim)
    return mode


def source_fingerprints(ds: Dataset, caption_keys: list[str] | None = None) -> dict[str, str]:
    """What the plan is made from beside the selection (one listing each): the manifests and the tars, every
    scorer's files (each sample's json carries every score column) and, with ``--captions``, the caption
    families whose texts go in (a re-score or re-caption between two ``--part`` runs would mix two plans)."""
    out = {"samples": lineage.folder_identity(ds.samples_dir, ".parquet"),
           "shards": lineage.folder_identity(ds.shards_dir, ".tar")}
    for name in ds.names("scores"):
        out[f"scores/{name}"] = lineage.folder_identity(ds.family_dir("scores", name), ".parquet")
    for key in caption_keys or []:
        if key != "raw":
            out[f"captions/{key}"] = lineage.folder_identity(ds.family_dir("captions", key), ".parquet")
    return out


def _is_object(p: Any) -> bool:
    """Whether a store URL names an object (not a prefix)."""
    with contextlib.suppress(FileNotFoundError, OSError):
        return bool(p.fs.isfile(p.path))
    return False


def _remove_dead_plans(out: Path) -> None:
    """Plans of killed runs would otherwise pile up. Only a plan whose owner is provably gone (this host,
    its pid no longer exists) is removed: live ones (other --part runs) and other hosts' stay."""
    for p in out.glob(f".plan{atomic.SEP}*"):
        owner = atomic.parse_owner(p.name)
        if owner is not None and atomic.owner_gone(*owner):
            shutil.rmtree(p, ignore_errors=True)


def _write_index_files(out: Any, plan: ShardPlan, claim: dict) -> None:
    """manifest.json (ours) and sizes.json (open_clip reads it instead of --train-num-samples)."""
    names = [f"{shard_name(i)}.tar" for i in range(len(plan.shard_sizes))]
    atomic.write_json(out / "sizes.json", dict(zip(names, plan.shard_sizes, strict=True)))
    atomic.write_json(out / "manifest.json", {
        "format": "capcurate-training-shards",
        "capcurate_version": __version__,
        "shards": [{"name": n, "samples": s} for n, s in zip(names, plan.shard_sizes, strict=True)],
        "total_samples": plan.total,
        "dataset": claim["dataset"], "selection": claim["selection"],
        "selection_sha256": claim["selection_sha256"], "parameters": claim["parameters"],
        "samples_per_shard": plan.samples_per_shard,
        "missing": plan.missing, "missing_examples": plan.missing_examples,
        "train_data": f"{out}/{{{names[0][:-4]}..{names[-1][:-4]}}}.tar" if names else None,
        # train-time caption choice: the .json keys of every sample and their probabilities (or None)
        "captions": claim["parameters"].get("captions"),
    })


# keys of every sample's .json that a caption name may not take
RESERVED_JSON_KEYS = ("uid", "caption_source", "scores", "source")


def caption_recipe(ds: Dataset, selection: str, captions: str | list[str] | None) -> dict | None:
    """{"keys": [...], "probs": [...] | None} for ``--captions``, or the recipe of a ``mix --strategy sample``
    selection when ``--captions`` is not given; None for a plain selection."""
    made_by = ds.card.lineage("selections", selection)
    params = made_by[-1].get("parameters", {}) if made_by else {}
    mixed = params.get("caption_keys")
    if captions is None or captions == "" or captions == []:
        if not mixed:
            return None
        return {"keys": list(mixed), "probs": params.get("caption_probs")}
    keys = [c.strip() for c in captions.split(",")] if isinstance(captions, str) else [str(c) for c in captions]
    if any(not k for k in keys) or len(set(keys)) != len(keys):
        raise InputError(f"--captions must be distinct caption names, got {captions!r}")
    known = ["raw", *ds.names("captions")]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise InputError(f"--captions {unknown[0]!r} is not a caption set; present: {', '.join(known)}")
    reserved = [k for k in keys if k in RESERVED_JSON_KEYS]
    if reserved:
        raise InputError(f"--captions {reserved[0]!r} would overwrite the .json's own {reserved[0]!r} field")
    probs = params.get("caption_probs") if mixed and list(mixed) == keys else None
    return {"keys": keys, "probs": probs}


def _file_sha256(path: Any) -> str:
    h = hashlib.sha256()
    with storage.open_read(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
