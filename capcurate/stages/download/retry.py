"""``download --retry-failed [--only REASONS]``: the failed rows of a dataset, downloaded again.

The failed rows (by uid, optionally only those whose reason is listed) become a URL list that
img2dataset downloads into new shards numbered after the last one (its ``extend`` mode), with the
dataset's own output options. When a new shard is whole and in the manifest, the superseded copies of
its uids are dropped from the older manifest files, so every uid keeps exactly one row: the latest
attempt. A run killed in between leaves duplicates that the next ``--retry-failed`` (or
``capcurate doctor --repair``) resolves the same way before doing anything else. A retry is refused
while the download itself has unfinished shards (``runs``): resume the download first.

On a dataset in object storage img2dataset writes into a local staging folder where the store's shards
have placeholder stats files, so ``extend`` numbers the new shards after the store's last one, and each
finished shard is committed to the store (``remote.Committer``).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ... import atomic, storage
from ...dataset import Dataset, samples_schema
from ...errors import DatasetError, InputError
from ...summary import Summary
from .integrity import drop_duplicate_uids
from .manifest import clean_unfinished, failure_reason, finished_shards
from .remote import Committer, mark_done, staging_folder, store_ids
from .runner import Img2DatasetOptions, run_img2dataset
from .runs import refuse_if_live, refuse_unfinished_download

RETRY_INPUT = ".retry-input.parquet"


def parse_reasons(only: str | list[str] | None) -> list[str]:
    if not only:
        return []
    items = only.split(",") if isinstance(only, str) else list(only)
    return [r.strip() for r in items if r.strip()]


def manifest_table(ds: Dataset):
    """Every manifest row of the dataset, one table (files read in shard order)."""
    import pyarrow as pa

    tables = [storage.read_table(ds.samples_path(sid)) for sid in ds.shard_ids()]
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default")


def failed_rows(ds: Dataset, reasons: list[str]) -> tuple[Any, Counter]:
    """(the failed rows to retry, failed rows by reason over the whole manifest)."""
    import pyarrow as pa

    table = manifest_table(ds)
    if table is None:
        return None, Counter()
    status = table.column("status").to_pylist()
    messages = table.column("error_message").to_pylist()
    by_reason: Counter = Counter()
    picked = []
    wanted = {r.lower() for r in reasons}
    for i, (st, msg) in enumerate(zip(status, messages, strict=True)):
        if st == "success":
            continue
        reason = failure_reason(st, msg)
        by_reason[reason] += 1
        if not wanted or reason.lower() in wanted:
            picked.append(i)
    unknown = sorted(r for r in reasons if r.lower() not in {k.lower() for k in by_reason})
    if unknown:
        present = ", ".join(f"{k} ({n})" for k, n in by_reason.most_common()) or "none"
        raise InputError(f"--only {', '.join(unknown)}: no failed rows with that reason; reasons present: {present}")
    return table.take(pa.array(picked, pa.int64())), by_reason


def retry_failed_rows(output: str | Path, opts: Img2DatasetOptions, *, only: str | list[str] | None,
                      t0: float, scratch: str | Path | None = None) -> Summary:
    ds = Dataset(output)
    if not ds.remote:
        return _retry(ds, opts, only=only, t0=t0, staging=None)
    with staging_folder(scratch) as staging:
        return _retry(ds, opts, only=only, t0=t0, staging=staging)


def _retry(ds: Dataset, opts: Img2DatasetOptions, *, only: str | list[str] | None, t0: float,
           staging: Path | None) -> Summary:
    import pyarrow.parquet as pq

    from . import build_manifests, failure_counts

    entries = ds.card.lineage("shards", "download")
    if not entries:
        raise DatasetError(f"{ds.root} was not made by capcurate download: nothing to retry")
    params = entries[-1].get("parameters", {})
    # the dataset's own output options; speed options (threads, timeout, stall timeout) from this call
    for key in ("image_size", "resize_mode", "samples_per_shard", "encode_format", "encode_quality", "max_pixels"):
        if key in params:
            setattr(opts, key, params[key])
    reasons = parse_reasons(only)
    entry = ds.card.start_entry(stage="download", family=None, name=None,
                                params={"retry_failed": True, "only": reasons or None,
                                        "stall_timeout": opts.stall_timeout})
    try:  # a refusal or bad --only before any download leaves no lineage entry behind
        refuse_if_live(ds, entry)  # what it would clean next is what a live run is writing
        refuse_unfinished_download(ds, entries[-1], set(finished_shards(ds.shards_dir)))
        storage.ensure_dir(ds.shards_dir)
        cleaned = clean_unfinished(ds.shards_dir)
        atomic.clean_stale_temps(ds.samples_dir)
        resolved = drop_duplicate_uids(ds.samples_dir)  # what a killed retry left: the newest copy wins
        todo, before_reasons = failed_rows(ds, reasons)
    except BaseException:
        ds.card.abandon_entry(entry)
        raise
    n = 0 if todo is None else todo.num_rows
    before = finished_shards(ds.shards_dir)
    committer = Committer(ds, staging / "shards", uid_col="uid") if staging is not None else None
    rejected: dict[str, str] = {}
    t_dl = time.perf_counter()
    try:
        if n:
            base = {f.name for f in samples_schema({})}
            extras = [c for c in todo.column_names if c not in base]
            has_caption = params.get("caption_col") is not None
            cols = ["url", "uid", *(["caption"] if has_caption else []), *extras]
            path = (staging if staging is not None else ds.root) / RETRY_INPUT
            pq.write_table(todo.select(cols), path)
            run = dict(url_list=path, input_format="parquet", url_col="url",
                       caption_col="caption" if has_caption else None, extra_columns=["uid", *extras],
                       opts=opts, incremental_mode="extend")
            try:
                if committer is None:
                    run_img2dataset(output_folder=ds.shards_dir, **run)
                else:
                    # new shards are numbered after every shard id the store holds a file of
                    mark_done(committer.staging, store_ids(ds))
                    with committer.running():
                        run_img2dataset(output_folder=committer.staging, **run)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
    finally:
        download_seconds = time.perf_counter() - t_dl
        if committer is None:
            after = finished_shards(ds.shards_dir)
        else:
            after = {**before, **committer.committed}
            rejected.update(committer.rejected)
        new = sorted(s for s in after if s not in before)
        build_manifests(ds, new, uid_col="uid", rejected=rejected, finished=after)
        new = [s for s in new if s not in rejected]
        resolved += drop_duplicate_uids(ds.samples_dir)

    attempted = sum(int(after[s].get("count", 0)) for s in new)
    ok = sum(int(after[s].get("successes", 0)) for s in new)
    counts = {"retried": n, "attempted": attempted, "ok": ok, "failed": attempted - ok,
              "shards_downloaded": len(new), "superseded_rows_dropped": resolved,
              "images_per_second": round(attempted / download_seconds, 2) if download_seconds > 0 else 0.0}
    details: dict[str, Any] = {
        "dataset": str(ds.root), "only": reasons or None, "new_shards": new,
        "failed_before_by_reason": dict(before_reasons.most_common()),
        "failed_by_reason": failure_counts(ds), "download_seconds": round(download_seconds, 3)}
    if cleaned:
        details["removed_partial"] = cleaned
    if rejected:
        details["rejected_shards"] = rejected
    ds.card.finish_entry(entry, counts)
    unfinished = n and attempted < n
    message = (f"retried {n:,} failed rows of {ds.root}: {ok:,} downloaded now, {attempted - ok:,} failed again"
               if n else f"no failed rows to retry in {ds.root}")
    if unfinished:
        message += f"; {n - attempted:,} rows are in shards that did not finish: run again"
    return Summary(stage="download", ok=not unfinished, counts=counts, details=details,
                   seconds=time.perf_counter() - t0, message=message)
