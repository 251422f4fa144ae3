"""``capcurate download URLS -o DATASET``: img2dataset downloads, capcurate builds the manifest.

    urls.py     inspect the URL list (format, columns, rows) and plan the columns
    runner.py   call img2dataset.download in-process (stdout, SIGINT, resizer guard)
    guard.py    header check before decoding: bombs, non-images, truncated JPEGs
    manifest.py img2dataset's per-shard parquet + stats -> samples/NNNNN.parquet; failure reasons
    stall.py    --stall-timeout: a deadline on each URL's whole download, in img2dataset's workers
    integrity.py a finished shard is whole before it enters the manifest; one row per uid
    retry.py    --retry-failed: the failed rows (by uid) into new shards
    runs.py     a live download is never cleaned up under; a retry waits for the download to finish
    remote.py   -o s3://...: a local staging folder, each finished shard committed to the store
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ... import atomic, storage
from ...dataset import Dataset
from ...errors import InputError
from ...images import DEFAULT_MAX_PIXELS
from ...summary import Summary
from .integrity import drop_duplicate_uids, remove_shard_files, shard_problem
from .manifest import build_samples, clean_unfinished, failure_reason, finished_shards
from .remote import Committer, fetch_url_list, mark_done, staging_folder
from .runner import Img2DatasetOptions, run_img2dataset
from .runs import record_expected, refuse_if_live
from .urls import plan_columns, read_url_list

RESIZE_MODES = ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no")
ENCODE_FORMATS = ("jpg", "png", "webp")
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")


def _check_options(opts: Img2DatasetOptions) -> None:
    def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise InputError(f"--{name} {value!r}: expected one of {', '.join(allowed)}")

    one_of("resize-mode", opts.resize_mode, RESIZE_MODES)
    one_of("encode-format", opts.encode_format, ENCODE_FORMATS)
    one_of("distributor", opts.distributor, DISTRIBUTORS)
    if opts.stall_timeout < 0:
        raise InputError(f"--stall-timeout must be 0 (off) or more seconds, got {opts.stall_timeout:g}")
    for name, value in (("image-size", opts.image_size), ("processes", opts.processes),
                        ("threads", opts.threads), ("timeout", opts.timeout),
                        ("samples-per-shard", opts.samples_per_shard)):
        if value < 1:
            raise InputError(f"--{name} must be at least 1, got {value}")
    if opts.retries < 0:
        raise InputError(f"--retries must be 0 or more, got {opts.retries}")
    if opts.distributor != "multiprocessing" and importlib.util.find_spec(opts.distributor) is None:
        extra = "pip install 'capcurate[ray]'" if opts.distributor == "ray" else "pip install pyspark"
        raise InputError(f"--distributor {opts.distributor} needs the {opts.distributor} package: {extra}")


def build_manifests(ds: Dataset, shard_ids: list[str], *, uid_col: str | None,
                    rejected: dict[str, str] | None = None,
                    finished: dict[str, dict[str, Any]] | None = None) -> int:
    """Write samples/NNNNN.parquet for finished shards that lack one; returns how many were written.

    A shard whose tar is cut off or short of its stats' successes never enters the manifest: its files
    are removed (so the next run downloads it again) and it is listed in ``rejected`` with the reason.
    ``finished``: the shards' stats when the caller has them (else one listing of shards/).
    """
    written = 0
    if finished is None:
        finished = finished_shards(ds.shards_dir)
    have = set(ds.shard_ids())  # one listing, not one probe per shard
    for sid in shard_ids:
        if sid in have:
            continue
        problem = shard_problem(ds.shards_dir, sid, finished.get(sid, {}))
        if problem is not None:
            remove_shard_files(ds.shards_dir, sid)
            if rejected is not None:
                rejected[sid] = problem
            continue
        table = build_samples(ds.shards_dir / f"{sid}.parquet", sid, uid_col=uid_col)
        atomic.write_parquet(ds.samples_path(sid), table)
        written += 1
    return written


def failure_counts(ds: Dataset) -> dict[str, int]:
    """Failed rows of the manifest grouped by a short reason, most frequent first."""
    if not ds.shard_ids():
        return {}
    con = ds.connect()
    try:
        rows = con.execute(
            "SELECT status, error_message, count(*) FROM manifest WHERE status <> 'success' GROUP BY 1, 2"
        ).fetchall()
    finally:
        con.close()
    reasons: Counter = Counter()
    for status, message, n in rows:
        reasons[failure_reason(status, message)] += n
    return dict(reasons.most_common())


def download(
    urls: str | Path | None,
    output: str | Path,
    *,
    url_col: str = "url",
    caption_col: str | None = None,
    uid_col: str | None = "uid",
    image_size: int = 256,
    resize_mode: str = "border",
    processes: int = 1,
    threads: int = 64,
    timeout: int = 10,
    retries: int = 0,
    distributor: str = "multiprocessing",
    samples_per_shard: int = 10000,
    encode_format: str = "jpg",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    force: bool = False,
    overwrite: bool = False,
    stall_timeout: float = 0.0,
    retry_failed: bool = False,
    only: str | list[str] | None = None,
    scratch: str | Path | None = None,
) -> Summary:
    """Download the images of a URL list into a dataset directory (resumes when run again).

    ``caption_col`` defaults to 'caption' or 'text' when the input has one; ``uid_col`` is used when the
    input has that column, else uid = hash(url, caption). Every other input column is kept.
    ``stall_timeout`` (seconds, 0 = off) abandons a URL whose whole download takes longer (reason
    ``stalled``). ``retry_failed`` downloads the failed rows of ``output`` again into new shards (only
    those whose reason is in ``only`` when given); the output options are the dataset's own.
    ``output`` (and ``urls``) may be URLs (``s3://...``): img2dataset then writes into a local staging
    folder under ``scratch`` and each finished shard is committed to the store (see ``remote``).
    """
    t0 = time.perf_counter()
    opts = Img2DatasetOptions(
        image_size=image_size, resize_mode=resize_mode, processes=processes, threads=threads,
        timeout=timeout, retries=retries, distributor=distributor, samples_per_shard=samples_per_shard,
        encode_format=encode_format, max_pixels=max_pixels, stall_timeout=stall_timeout,
    )
    _check_options(opts)
    if only and not retry_failed:
        raise InputError("--only chooses which failed rows --retry-failed downloads again: add --retry-failed")
    if retry_failed:
        from .retry import retry_failed_rows

        return retry_failed_rows(output, opts, only=only, t0=t0, scratch=scratch)
    if urls is None:
        raise InputError("download needs a URL list (or --retry-failed to retry the failed rows of -o DATASET)")
    storage.check_writable(output)
    remote_in = storage.is_remote(storage.path(urls))
    remote_out = storage.is_remote(storage.path(output))
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(staging_folder(scratch)) if remote_in or remote_out else None
        return _download(urls, output, staging, remote_in=remote_in, remote_out=remote_out, opts=opts,
                         url_col=url_col, caption_col=caption_col, uid_col=uid_col, force=force,
                         overwrite=overwrite, t0=t0)


def _download(urls: str | Path, output: str | Path, staging: Path | None, *, remote_in: bool, remote_out: bool,
              opts: Img2DatasetOptions, url_col: str, caption_col: str | None, uid_col: str | None,
              force: bool, overwrite: bool, t0: float) -> Summary:
    url_list = read_url_list(fetch_url_list(str(urls), staging) if remote_in and staging else urls)
    if url_list.num_rows == 0:
        raise InputError(f"{urls} has no rows: nothing to download (nothing was written)")
    plan = plan_columns(url_list, url_col, caption_col, uid_col)

    source = {"kind": "urls", "path": str(urls) if remote_in else str(Path(urls).resolve()),
              "rows": url_list.num_rows}
    ds = Dataset.create(output, force=force, sources=[source])
    params = {"urls": source["path"], "url_col": plan.url_col, "caption_col": plan.caption_col,
              "uid_col": plan.uid_col, **opts.output_params()}
    entry = ds.claim_images("download", params, overwrite=overwrite)
    refuse_if_live(ds, entry)  # what it would clean next is what a live run is writing
    expected = [f"{i:05d}" for i in url_list.expected_shards(opts.samples_per_shard)]
    record_expected(ds, entry, len(expected))  # a retry must not take an unfinished shard's number
    storage.ensure_dir(ds.shards_dir)
    cleaned = clean_unfinished(ds.shards_dir)
    atomic.clean_stale_temps(ds.samples_dir)

    redownload: dict[str, str] = {}
    finished = finished_shards(ds.shards_dir)
    have = set(ds.shard_ids())  # one listing of samples/, not one probe per shard
    for sid, stats in finished.items():  # finished, but never entered the manifest
        if sid not in have and (why := shard_problem(ds.shards_dir, sid, stats)):
            remove_shard_files(ds.shards_dir, sid)  # downloaded again by this run
            redownload[sid] = why
    before = {s: v for s, v in finished.items() if s not in redownload}
    todo = [s for s in expected if s not in before]
    committer = Committer(ds, staging / "shards", uid_col=plan.uid_col) if remote_out and staging else None
    t_dl = time.perf_counter()
    try:
        if todo and committer is None:  # skipping the call saves img2dataset's start-up on a finished dataset
            run_img2dataset(url_list=url_list.path, input_format=url_list.input_format,
                            output_folder=ds.shards_dir, url_col=plan.url_col, caption_col=plan.caption_col,
                            extra_columns=plan.extra, opts=opts)
        elif todo and committer is not None:
            mark_done(committer.staging, before)  # img2dataset skips the shards the store has
            with committer.running():
                run_img2dataset(url_list=url_list.path, input_format=url_list.input_format,
                                output_folder=committer.staging, url_col=plan.url_col,
                                caption_col=plan.caption_col, extra_columns=plan.extra, opts=opts)
    finally:
        # also after Ctrl-C: shards img2dataset finished are adopted now, the rest on the next run
        download_seconds = time.perf_counter() - t_dl
        t_man = time.perf_counter()
        rejected: dict[str, str] = {}
        if committer is None:
            after = finished_shards(ds.shards_dir)
        else:  # the store's shards: those it had, and those committed now (no second listing)
            after = {**before, **committer.committed}
            rejected.update(committer.rejected)
        build_manifests(ds, [s for s in expected if s in after], uid_col=plan.uid_col, rejected=rejected,
                        finished=after)
        after = {s: v for s, v in after.items() if s not in rejected}
        # a URL list that repeats a row (or a uid) gives each uid one row: the samples view joins on uid
        duplicate_rows = drop_duplicate_uids(ds.samples_dir)
        manifest_seconds = time.perf_counter() - t_man

    new = [s for s in expected if s in after and s not in before]
    missing = [s for s in expected if s not in after]
    done = [after[s] for s in expected if s in after]
    attempted = sum(int(s.get("count", 0)) for s in done)
    ok = sum(int(s.get("successes", 0)) for s in done)
    this_run = sum(int(after[s].get("count", 0)) for s in new)
    ips = this_run / download_seconds if download_seconds > 0 and this_run else 0.0
    counts = {
        "attempted": attempted,
        "ok": ok,
        "failed": attempted - ok,
        "shards": len(done),
        "shards_downloaded": len(new),
        "shards_resumed_skipped": len(done) - len(new),
        "shards_unfinished": len(missing),
        "images_per_second": round(ips, 2),
        "duplicate_uids": duplicate_rows,
    }
    details = {
        "failed_by_reason": failure_counts(ds),
        "dataset": str(ds.root),
        "download_seconds": round(download_seconds, 3),
        "manifest_seconds": round(manifest_seconds, 3),
    }
    if plan.dropped:
        details["dropped_columns"] = plan.dropped  # img2dataset reserves these names for itself
    if cleaned:
        details["removed_partial"] = cleaned
    if redownload:
        details["redownloaded_damaged"] = redownload
    if rejected:
        details["rejected_shards"] = rejected  # finished by img2dataset but not whole: downloaded again next run
    ds.card.finish_entry(entry, counts)
    ok_run = not missing
    message = f"downloaded {ok:,} of {attempted:,} images into {ds.root}"
    if missing:
        message += f"; {len(missing)} shard(s) did not finish ({', '.join(missing[:5])}): run again to retry"
    return Summary(stage="download", ok=ok_run, counts=counts, details=details,
                   seconds=time.perf_counter() - t0, message=message)


__all__ = ["download", "build_manifests", "failure_counts"]
