"""Downloading into object storage (``-o s3://...``) and URL lists that live there.

img2dataset writes into a local staging folder (``--scratch DIR``, default a temp folder, removed at the
end); its post-processing (stats, the integrity check, ``_tmp``) stays POSIX. Each shard it finishes is
checked there and committed to the store while the download goes on: ``shards/NNNNN.tar`` first, then
img2dataset's ``NNNNN.parquet`` and ``NNNNN_stats.json``, and ``samples/NNNNN.parquet`` last (the
manifest is the completion marker, as locally). Each object is one PUT or multipart upload, visible only
when complete. The committed shard's local files are then removed, so the staging folder holds only the
shards in flight, not the pool.

A resumed run lists the store once: shards already there get a placeholder stats file in the staging
folder, so img2dataset's ``incremental`` mode skips them and its ``extend`` mode (``--retry-failed``)
numbers new shards after them; no uid is downloaded into two shards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ... import atomic, storage
from ...errors import InputError
from .integrity import remove_shard_files, shard_problem
from .manifest import SHARD_RE, STATS_SUFFIX, build_samples, finished_shards

# a stats file img2dataset counts as "done" (it globs *.json) but capcurate does not (no "count")
PLACEHOLDER = b'{"capcurate": "this shard is committed to the object store"}\n'
COMMIT_INTERVAL = 1.0


@contextlib.contextmanager
def staging_folder(scratch: str | Path | None) -> Iterator[Path]:
    """A private local folder under ``scratch`` (default: the system temp folder), removed afterwards."""
    if scratch is not None:
        scratch = storage.local(scratch)
        scratch.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=f"capcurate-download-{atomic.owner_tag()}-",
                              dir=str(scratch) if scratch is not None else None))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fetch_url_list(urls: str, staging: Path) -> Path:
    """A URL list (file or folder of files) in a store, copied into ``staging``; returns the local path."""
    q = storage.path(urls)
    try:
        info = q.fs.info(q.path)
    except FileNotFoundError:
        storage.check_container(q)
        raise InputError(f"URL list {urls} does not exist") from None
    except Exception as e:  # credentials, endpoint: one line
        raise InputError(storage.explain(e) or f"{urls}: {type(e).__name__}: {e}") from None
    dest = staging / "url-list"
    dest.mkdir(parents=True, exist_ok=True)
    if info.get("type") == "directory":
        folder = dest / q.name
        folder.mkdir()
        for name in sorted(storage.list_names(q)):
            with contextlib.suppress(IsADirectoryError):
                q.fs.get_file(f"{q.path.rstrip('/')}/{name}", str(folder / name))
        return folder
    local = dest / q.name
    q.fs.get_file(q.path, str(local))
    return local


def store_ids(ds: Any) -> set[str]:
    """Every shard id the store holds a file of (shards/ and samples/: two listings)."""
    ids = {m.group(1) for n in storage.list_names(ds.shards_dir) if (m := SHARD_RE.match(n))}
    ids |= {n[: -len(".parquet")] for n in storage.list_names(ds.samples_dir, ".parquet")}
    return {s for s in ids if s.isdigit()}


def mark_done(staging: Path, ids: Iterable[str]) -> None:
    """Placeholder stats files: img2dataset skips (incremental) or numbers after (extend) these shards."""
    staging.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        (staging / f"{sid}{STATS_SUFFIX}").write_bytes(PLACEHOLDER)


class Committer:
    """Checks and commits the shards img2dataset finished in ``staging`` to the dataset in the store."""

    def __init__(self, ds: Any, staging: Path, *, uid_col: str | None):
        self.ds = ds
        self.staging = staging
        self.uid_col = uid_col
        self.committed: dict[str, dict[str, Any]] = {}
        self.rejected: dict[str, str] = {}
        self.error: BaseException | None = None
        self._lock = threading.Lock()

    def commit_ready(self) -> list[str]:
        """Commit every finished shard not committed yet; returns their ids."""
        new = []
        with self._lock:
            for sid, stats in finished_shards(self.staging).items():
                if sid in self.committed:
                    continue
                problem = shard_problem(self.staging, sid, stats)
                if problem is not None:  # cut off or short: never enters the manifest, fetched next run
                    remove_shard_files(self.staging, sid)
                    self.rejected[sid] = problem
                    continue
                table = build_samples(self.staging / f"{sid}.parquet", sid, uid_col=self.uid_col)
                # tar first, the manifest last: a shard with a manifest in the store is whole
                for name in (f"{sid}.tar", f"{sid}.parquet", f"{sid}{STATS_SUFFIX}"):
                    storage.upload(self.staging / name, self.ds.shards_dir / name)
                atomic.write_parquet(self.ds.samples_path(sid), table)
                for name in (f"{sid}.tar", f"{sid}.parquet"):
                    with contextlib.suppress(FileNotFoundError):
                        (self.staging / name).unlink()
                (self.staging / f"{sid}{STATS_SUFFIX}").write_bytes(PLACEHOLDER)
                self.committed[sid] = stats
                new.append(sid)
        return new

    @contextlib.contextmanager
    def running(self, interval: float = COMMIT_INTERVAL) -> Iterator[None]:
        """Commit finished shards every ``interval`` seconds in a thread while the body runs, and once more
        at the end (also after Ctrl-C: what img2dataset finished is kept)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.commit_ready()
                except BaseException as e:  # noqa: BLE001 (raised in the main thread after the download)
                    self.error = e
                    return

        thread = threading.Thread(target=loop, name="capcurate-commit", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if self.error is not None:
                raise self.error
            self.commit_ready()
