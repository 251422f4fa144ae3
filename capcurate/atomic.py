"""Atomic file writes: write to a hidden temp name in the same folder, then rename.

A file that exists under its final name is therefore complete; that is what makes every stage
resumable by skipping finished shards. Temp names start with '.' so globs like '*.parquet' never
see a half-written file.

Many processes may write into one folder at once (``--part i/N`` runs of a SLURM array, Ray actors,
on one host or several sharing a filesystem). A temp name says who writes it
(``.<name>~<host>~<pid>~<token>.tmp``), so a cleaner removes only temps whose writer is provably gone:
written on this host by a process that no longer exists. Another host's temps are never touched.
A temp file that vanished before its rename is an error, never a success.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import storage
from .errors import StageFailed

SEP = "~"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def host_name() -> str:
    """This host's name as it appears in temp names (no separators, no path characters)."""
    return _UNSAFE.sub("_", platform.node() or "unknown-host")


def owner_tag() -> str:
    """``<host>~<pid>``: who owns a temp file or a scratch folder made by this process."""
    return f"{host_name()}{SEP}{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host (an EPERM answer means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def owner_gone(host: str, pid: int) -> bool:
    """True only when the owner is provably gone: on this host, and its process no longer exists.

    A pid that was reused by another process counts as alive (a leftover is kept, never a live file
    removed); another host's owner cannot be checked and is never judged gone.
    """
    return host == host_name() and pid != os.getpid() and not pid_alive(pid)


def parse_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temp file or scratch folder name that carries ``~<host>~<pid>~``, else None."""
    parts = name.rsplit(SEP, 3)  # the final name may hold a '~'; host and pid never do
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[1], int(parts[2])


def temp_path_for(path: Path) -> Path:
    """A unique hidden sibling of ``path`` (``.<name>~<host>~<pid>~<token>.tmp``) to write into first."""
    return path.with_name(f".{path.name}{SEP}{owner_tag()}{SEP}{uuid.uuid4().hex[:8]}.tmp")


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


# tests/test_chaos.py: "N:before" or "N:after" kills this process (SIGKILL, as kill -9 does) at its N-th
# file commit, before or after the rename; never set outside tests
_CHAOS = os.environ.get("CAPCURATE_CHAOS_KILL", "")
_commits = 0


def _chaos_point(phase: str) -> None:
    global _commits
    if not _CHAOS:
        return
    n, _, when = _CHAOS.partition(":")
    if phase == "before":
        _commits += 1
    if _commits == int(n) and phase == (when or "before"):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: Any) -> Iterator[Path]:
    """Yield a local temp path; on success it becomes ``path`` whole, on error it is removed.

    Local: the temp is a hidden sibling, fsynced and renamed. Object store (``path`` a URL): the temp is
    in a private local folder and is uploaded in one PUT or multipart upload, which the store makes
    visible only when complete. Either way a file that exists under its final name is whole.

    The caller must have written the temp file: a temp that is missing at the end (never written, or
    removed by someone else meanwhile) raises ``StageFailed`` and ``path`` is left as it was.
    """
    final = storage.path(path)
    if storage.is_remote(final):
        with _remote_atomic_path(final) as tmp:
            yield tmp
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        try:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            _chaos_point("before")
            os.replace(tmp, final)
            _chaos_point("after")
        except FileNotFoundError:
            raise StageFailed(
                f"the temporary file of {final} vanished before it was renamed (removed by another "
                "process?): nothing was written; run again"
            ) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def _remote_atomic_path(final: Any) -> Iterator[Path]:
    storage.check_writable(final)
    folder = Path(tempfile.mkdtemp(prefix=f"capcurate-{owner_tag()}-"))
    tmp = folder / final.name
    queued = False
    try:
        yield tmp
        if not tmp.exists():
            raise StageFailed(f"the temporary file of {final} vanished before its upload: nothing was "
                              "written; run again")

        def commit() -> None:
            _chaos_point("before")
            storage.upload(tmp, final)
            _chaos_point("after")

        # inside storage.write_behind (a run over many shards) the upload overlaps the next shard's work,
        # in commit order; elsewhere it is done here
        queued = storage.commit_behind(commit, lambda: shutil.rmtree(folder, ignore_errors=True))
        if not queued:
            commit()
    finally:
        if not queued:
            shutil.rmtree(folder, ignore_errors=True)


def write_bytes(path: Any, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: Any, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def write_parquet(path: Any, table: Any, **kwargs: Any) -> None:
    """Write a pyarrow Table atomically (zstd by default: small and fast to read in DuckDB)."""
    import pyarrow.parquet as pq

    kwargs.setdefault("compression", "zstd")
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def clean_stale_temps(folder: Any) -> int:
    """Remove the temp files in ``folder`` whose writer is provably gone; returns how many.

    Only temps written on this host by a process that no longer exists are removed. Temps of live
    processes (another ``--part`` writing now), of other hosts, and of older capcurate versions (whose
    names do not say the host) stay. An object store has no temps (uploads are all-or-nothing): 0.
    """
    n = 0
    p = storage.path(folder)
    if storage.is_remote(p) or not p.is_dir():
        return 0
    for f in p.glob(".*.tmp"):
        owner = parse_owner(f.name)
        if owner is None or not owner_gone(*owner):
            continue
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
            n += 1
    return n
