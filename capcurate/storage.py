"""Where files live: a local path or an fsspec URL (``s3://``, ``gs://``, ``az://``, ``hf://``, ``file://``).

Every path a command takes goes through :func:`path`: a local path (or ``file://`` URL) comes back as a
plain :class:`pathlib.Path`, so everything local behaves exactly as before; a URL comes back as a
``UPath`` (universal_pathlib), which has the same API (``/``, ``name``, ``exists``, ``glob``, ``open``,
``read_bytes``...) over fsspec. What pathlib cannot say for object stores lives here:

- **commit**: ``atomic.atomic_path`` writes into a local temp file; on a store the finished file is then
  uploaded in one PUT or one multipart upload, which S3-like stores make visible only when complete, so
  an object that exists is whole (the same promise as rename on POSIX).
- **conditional writes** (:func:`create_exclusive`, :func:`read_versioned`, :func:`replace_if_match`):
  create-if-absent and compare-and-swap on the object's ETag (S3 ``If-None-Match``/``If-Match``). The
  card and its lock use them instead of ``fcntl``; liveness is a lease with an expiry (``card.py``).
- **reads**: ranged GETs for tar members (:func:`read_range`); a small file (sidecar Parquet, JSON) in one
  GET with no HEAD first (:func:`read_bytes`, :func:`read_table`); DuckDB through the same fsspec
  filesystem, each listing and small object fetched once per connection (:func:`register_duckdb`).
- **errors**: an unknown scheme, a missing backend package, missing credentials, a bucket that does not
  exist or a denied write become one-line ``InputError``s (exit 2), see :func:`explain`.

Listings are never cached across calls (``use_listings_cache=False``): many processes write one prefix at
once, and a cached listing would call a shard unfinished (or finished) after another process changed it.
The one exception is a DuckDB connection's snapshot, which lives for that connection's queries and is
dropped on every write this process makes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .errors import InputError

if TYPE_CHECKING:
    from upath import UPath

    StoragePath = Path | UPath
else:
    StoragePath = Any

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
LOCAL_SCHEMES = ("file", "local")
# schemes capcurate reads but never writes (a write is refused before any work)
READ_ONLY_SCHEMES = ("hf", "http", "https")
# the package each common scheme needs, for the one-line error when it is missing
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "abfss": "adlfs", "hf": "huggingface_hub"}
EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}


def scheme_of(p: Any) -> str:
    """'' for a local path, else the URL scheme in lower case ('s3', 'gs', 'file', ...)."""
    if isinstance(p, Path) and not _is_upath(p):
        return ""
    if _is_upath(p):
        return str(p.protocol or "").split(",")[0]
    m = _URL.match(str(p))
    return m.group(1).lower() if m else ""


def _is_upath(p: Any) -> bool:
    """A UPath that is not a plain local Path (local UPaths subclass pathlib.Path)."""
    try:
        from upath import UPath
    except ImportError:  # pragma: no cover - universal_pathlib is a dependency
        return False
    return isinstance(p, UPath) and not isinstance(p, Path)


def is_remote(p: Any) -> bool:
    """Whether ``p`` (a path, URL or UPath) is in a store rather than on a local filesystem."""
    return scheme_of(p) not in ("",) + LOCAL_SCHEMES


def fs_options(scheme: str) -> dict[str, Any]:
    """fsspec options capcurate passes for a scheme (endpoint and credentials come from the environment)."""
    opts: dict[str, Any] = {"use_listings_cache": False}
    if scheme in ("s3", "s3a") and os.environ.get("AWS_ENDPOINT_URL"):
        # botocore reads AWS_ENDPOINT_URL / AWS_* itself; naming the endpoint here puts it in fsspec's
        # instance-cache key, so one filesystem (one botocore client) serves every path of a process
        # (fsspec drops its cache in a forked child). A fresh one per path cost 177 ms a read against 25.
        opts["client_kwargs"] = {"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}
    if scheme in ("s3", "s3a") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        # credentials from elsewhere (a profile, an instance role, or none at all): not in the cache key,
        # so each path asks botocore afresh, as before
        opts["skip_instance_cache"] = True
    return opts


def path(p: str | os.PathLike | Any) -> StoragePath:
    """A local ``Path`` for a local path or ``file://`` URL, else a ``UPath`` for the URL.

    Raises ``InputError`` for an unknown scheme or a scheme whose fsspec backend is not installed.
    """
    if _is_upath(p):
        if str(p.protocol or "") in LOCAL_SCHEMES:
            return Path(p.path)
        return p
    if isinstance(p, Path):
        return p
    s = os.fspath(p) if not isinstance(p, str) else p
    m = _URL.match(s)
    if not m:
        return Path(s)
    scheme = m.group(1).lower()
    if scheme in LOCAL_SCHEMES:
        return Path(s[m.end():] if s[m.end():].startswith("/") else "/" + s[m.end():])
    import fsspec
    from upath import UPath

    if scheme not in fsspec.available_protocols():
        raise InputError(f"unknown URL scheme {scheme}:// in {s!r}: use a local path or one of s3://, gs://, "
                         "az://, hf://, file:// (any fsspec protocol)")
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        pkg = BACKENDS.get(scheme)
        hint = (f"pip install {pkg}" + (f" (or capcurate[{EXTRAS[pkg]}])" if pkg in EXTRAS else "")
                if pkg else str(e).splitlines()[0])
        raise InputError(f"{scheme}:// needs a filesystem package that is not installed: {hint}") from None
    return UPath(s, **fs_options(scheme))


def as_str(p: Any) -> str:
    """The path as the user would type it: a local path, or the full URL."""
    return str(p)


def local(p: Any) -> Path:
    """``p`` as a local Path; a URL is refused with a one-line error (for inputs that must be local)."""
    q = path(p)
    if is_remote(q):
        raise InputError(f"{q} must be a local path here")
    return q


def check_writable(p: Any) -> None:
    """Refuse (one line, exit 2) a write to a read-only scheme before any work is done."""
    s = scheme_of(p)
    if s in READ_ONLY_SCHEMES:
        raise InputError(f"{p}: {s}:// is read-only in capcurate; write to a local path or s3://, gs://, az://")


# -- the filesystem under a path -------------------------------------------------------------------
def filesystem(p: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for any path or URL."""
    q = path(p)
    if is_remote(q):
        return q.fs, q.path
    import fsspec

    return fsspec.filesystem("file"), str(q.absolute())


def ensure_dir(p: Any) -> None:
    """Create a local folder (with parents); object stores have no folders, so nothing is done there.

    Never calls a store's ``mkdir``: s3fs would create a missing *bucket*, and a typo in a bucket name
    must be an error, not a new bucket.
    """
    q = path(p)
    if not is_remote(q):
        q.mkdir(parents=True, exist_ok=True)


def rmtree(p: Any) -> None:
    """Remove a folder or prefix and everything under it; a missing one is fine."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        shutil.rmtree(q, ignore_errors=True)
        return
    with contextlib.suppress(FileNotFoundError):
        q.fs.rm(q.path, recursive=True)
    _wrote()


def remove(p: Any) -> None:
    """Delete one file or object; a missing one is fine."""
    _settle_for(p)
    q = path(p)
    with contextlib.suppress(FileNotFoundError):
        q.unlink()
    if is_remote(q):
        _wrote()


def list_names(p: Any, suffix: str = "") -> set[str]:
    """Names (not paths) of the files directly under folder/prefix ``p`` ending in ``suffix``: one listing.

    Hidden names (temp files) are left out. A missing folder gives an empty set.
    """
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        try:
            return {e.name for e in os.scandir(q) if e.name.endswith(suffix) and not e.name.startswith(".")}
        except (FileNotFoundError, NotADirectoryError):
            return set()
    try:
        entries = q.fs.ls(q.path, detail=False)
    except FileNotFoundError:
        return set()
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return {n for n in names if n.endswith(suffix) and not n.startswith(".")}


def list_entries(p: Any) -> list[str]:
    """Every name directly under folder/prefix ``p`` (files and folders, hidden ones too); [] when missing."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        try:
            return [e.name for e in os.scandir(q)]
        except (FileNotFoundError, NotADirectoryError):
            return []
    try:
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in q.fs.ls(q.path, detail=False)
                if e.rstrip("/") != q.path.rstrip("/")]
    except FileNotFoundError:
        return []


def list_dirs(p: Any) -> list[str]:
    """Names of the folders (common prefixes) directly under ``p``; [] when missing."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        try:
            return [e.name for e in os.scandir(q) if e.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
    try:
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in q.fs.ls(q.path, detail=True)
                if e.get("type") == "directory"]
    except FileNotFoundError:
        return []


def check_container(p: Any) -> None:
    """For a URL: raise a one-line ``InputError`` when its bucket/container does not exist."""
    q = path(p)
    if not is_remote(q):
        return
    bucket = q.path.split("/", 1)[0]
    try:
        ok = q.fs.exists(bucket)
    except Exception as e:  # credentials, endpoint: say so in one line
        raise InputError(explain(e) or f"{q}: {type(e).__name__}: {e}") from None
    if not ok:
        raise InputError(f"the bucket {scheme_of(q)}://{bucket} does not exist (create it first, or check the "
                         "name and AWS_ENDPOINT_URL)")


def exists(p: Any) -> bool:
    _settle_for(p)
    return path(p).exists()


def size(p: Any) -> int:
    _settle_for(p)
    return int(path(p).stat().st_size)


def read_bytes(p: Any) -> bytes:
    """A whole file's bytes: on a store one GET (``cat_file``), no HEAD first as ``open`` makes."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        return q.read_bytes()
    return q.fs.cat_file(q.path)


def map_reads(fn: Any, items: list[Any], *, remote: bool, at_once: int = 8) -> Iterator[Any]:
    """``fn(item)`` for each item, results in order. On a store up to ``at_once`` run at once: a GET is
    mostly waiting on the store (``fn`` must catch its own errors if one item may fail alone)."""
    if not remote or len(items) < 2:
        yield from map(fn, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(at_once, len(items)), thread_name_prefix="capcurate-read") as pool:
        yield from pool.map(fn, items)


def open_read(p: Any) -> IO[bytes]:
    """A binary, seekable reader (a local file, or a store object read in blocks by ranged GETs)."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        return open(q, "rb")
    return q.fs.open(q.path, "rb")


def read_range(p: Any, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``: one ``pread`` locally, one ranged GET on a store."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        with open(q, "rb") as f:
            return os.pread(f.fileno(), length, offset)
    return q.fs.cat_file(q.path, start=offset, end=offset + length)


def upload(local_file: Path, dest: Any) -> None:
    """Copy a finished local file to ``dest`` as one object (PUT, or multipart for large files)."""
    q = path(dest)
    check_writable(q)
    settle()  # after the uploads committed before it, as if they had been synchronous
    q.fs.put_file(str(local_file), q.path, **_upload_options(q, local_file))
    _wrote()


def _upload_options(q: Any, local_file: Path) -> dict[str, Any]:
    """Multipart parts sent 4 at a time for a big file on S3 (as boto3's transfer manager does): on the
    local server a 60 MB tar went up at 54 MB/s instead of 29 MB/s one part at a time."""
    if scheme_of(q) not in ("s3", "s3a") or os.path.getsize(local_file) <= UPLOAD_PART:
        return {}
    return {"chunksize": UPLOAD_PART, "max_concurrency": 4}


UPLOAD_PART = 16 * 2**20


def _wrote() -> None:
    """A write to a store: DuckDB connections of this process must not answer from an older listing."""
    from .duckdb_store import invalidate_all

    invalidate_all()


# -- write-behind ----------------------------------------------------------------------------------
class _WriteBehind:
    """One thread that runs commits (uploads) in the order they were made, at most ``depth`` queued.

    The order is what keeps the promise of synchronous commits: a stage that commits a shard's tar and
    then its manifest gets them on the store in that order, and a process killed at any moment leaves a
    prefix of its commits, as before. After a failed upload the later ones are not made (their temps are
    removed): the store then holds a prefix, the failure is raised by the next commit or by ``settle``.
    """

    def __init__(self, depth: int = 2):
        import queue

        self.queue: Any = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="capcurate-upload", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                commit, cleanup = item
                try:
                    if self.error is None:
                        commit()
                except BaseException as e:  # noqa: BLE001 - handed to the committing thread
                    self.error = e
                finally:
                    cleanup()
            finally:
                self.queue.task_done()

    def submit(self, commit: Any, cleanup: Any) -> None:
        self.raise_error()
        self.queue.put((commit, cleanup))

    def raise_error(self) -> None:
        # every time, not once: a caller that catches it per shard must not go on to commits that
        # would silently not be made
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()


_BEHIND: _WriteBehind | None = None
_BEHIND_USERS = 0
_BEHIND_GUARD = threading.Lock()


@contextlib.contextmanager
def write_behind() -> Iterator[None]:
    """Within this block, commits to a store (``atomic.atomic_path`` with a URL) upload in a background
    thread while the caller goes on to its next shard; uploads keep their order, at most two wait (bounded
    scratch). Every read of a store through this module waits for the uploads first (a process reads its
    own writes). On exit all uploads are done, or the first failure is raised. Nested blocks share one."""
    global _BEHIND, _BEHIND_USERS
    with _BEHIND_GUARD:
        if _BEHIND is None:
            _BEHIND = _WriteBehind()
        _BEHIND_USERS += 1
        mine = _BEHIND
    body_ok = False
    try:
        yield
        body_ok = True
    finally:
        with _BEHIND_GUARD:
            _BEHIND_USERS -= 1
            last = _BEHIND_USERS == 0
            if last:
                _BEHIND = None
        mine.queue.join()
        if last:
            mine.close()
        if body_ok:  # never mask the body's own exception
            mine.raise_error()


def commit_behind(commit: Any, cleanup: Any) -> bool:
    """Queue ``commit`` (then ``cleanup``) on the write-behind thread; False (nothing queued) outside a
    ``write_behind`` block, where the caller commits synchronously."""
    behind = _BEHIND
    if behind is None:
        return False
    behind.submit(commit, cleanup)
    return True


def _settle_for(p: Any) -> None:
    if _BEHIND is not None and is_remote(p):  # local reads never wait for uploads
        settle()


def settle() -> None:
    """Wait for this process's queued uploads (see ``write_behind``); raise the failure if one failed.
    The upload thread itself never waits (its own commit is what the queue waits for)."""
    behind = _BEHIND
    if behind is not None and threading.current_thread() is not behind.thread:
        behind.queue.join()
        behind.raise_error()


@contextlib.contextmanager
def local_copy(p: Any, scratch: str | os.PathLike | None = None) -> Iterator[Path]:
    """A local file holding ``p``'s bytes: ``p`` itself when local, else a download removed afterwards."""
    _settle_for(p)
    q = path(p)
    if not is_remote(q):
        yield q
        return
    import tempfile

    d = tempfile.mkdtemp(prefix="capcurate-stage-", dir=scratch)
    try:
        dst = Path(d) / q.name
        q.fs.get_file(q.path, str(dst))
        yield dst
    finally:
        shutil.rmtree(d, ignore_errors=True)


def download_tree(p: Any, dest: str | os.PathLike) -> Path:
    """Copy every file under folder/prefix ``p`` into the local folder ``dest`` (made if missing)."""
    _settle_for(p)
    q, out = path(p), Path(dest)
    if not is_remote(q):
        shutil.copytree(q, out, dirs_exist_ok=True)
        return out
    base = q.path.rstrip("/") + "/"
    for key in q.fs.find(q.path):
        if key.startswith(base):
            target = out / key[len(base):]
            target.parent.mkdir(parents=True, exist_ok=True)
            q.fs.get_file(key, str(target))
    return out


# -- Parquet ---------------------------------------------------------------------------------------
def read_table(p: Any, columns: list[str] | None = None, *, missing_ok: bool = False, **kwargs: Any) -> Any:
    """``pyarrow.parquet.read_table`` of a local path or URL (on a store: one GET of the whole object).

    ``missing_ok``: of ``columns``, read those the file has and leave the others out (no error).
    """
    import pyarrow.parquet as pq

    q = path(p)
    # Per-shard sidecar files are small: one GET of the whole object beats a HEAD plus ranged reads.
    source = q if not is_remote(q) else _buffer(q)
    if missing_ok and columns is not None:
        f = pq.ParquetFile(source)
        return f.read(columns=[c for c in columns if c in f.schema_arrow.names], **kwargs)
    return pq.read_table(source, columns=columns, **kwargs)


def _buffer(q: Any) -> Any:
    import pyarrow as pa

    return pa.BufferReader(read_bytes(q))


def read_schema(p: Any) -> Any:
    import pyarrow.parquet as pq

    q = path(p)
    if not is_remote(q):
        return pq.read_schema(q)
    return pq.read_schema(_buffer(q))


def read_metadata(p: Any) -> Any:
    import pyarrow.parquet as pq

    q = path(p)
    if not is_remote(q):
        return pq.read_metadata(q)
    return pq.read_metadata(_buffer(q))


def version_key(p: Any) -> tuple | None:
    """What changes whenever the file is rewritten (inode+size+mtime locally, the ETag on a store)."""
    _settle_for(p)
    q = path(p)
    try:
        if not is_remote(q):
            st = q.stat()
            return (str(q), st.st_ino, st.st_size, st.st_mtime_ns)
        info = q.fs.info(q.path)
    except FileNotFoundError:
        return None
    return (str(q), info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime"),
            info.get("size"), info.get("LastModified") or info.get("updated") or info.get("mtime"))


# -- conditional writes (object stores) ------------------------------------------------------------
def _is_precondition_failure(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return "PreconditionFailed" in text or "pre-conditions" in text or "412" in text


def create_exclusive(p: Any, data: bytes) -> bool:
    """Write ``data`` to ``p`` only if nothing is there (S3 ``If-None-Match: *``); False when it exists."""
    _settle_for(p)
    q = path(p)
    check_writable(q)
    try:
        q.fs.pipe_file(q.path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as e:
        if _is_precondition_failure(e):
            return False
        raise
    return True


def read_versioned(p: Any) -> tuple[bytes, str]:
    """(content, version tag) read together: the tag is what :func:`replace_if_match` compares."""
    _settle_for(p)
    q = path(p)
    if scheme_of(q) in ("s3", "s3a"):
        bucket, key, _ = q.fs.split_path(q.path)
        resp = q.fs.call_s3("get_object", Bucket=bucket, Key=key)
        body = resp["Body"]
        data = _read_body(q.fs, body)
        return data, resp["ETag"]
    data = q.fs.cat_file(q.path)
    return data, hashlib.sha256(data).hexdigest()


def _read_body(fs: Any, body: Any) -> bytes:
    from fsspec.asyn import sync

    async def _read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, _read)


def replace_if_match(p: Any, data: bytes, tag: str) -> bool:
    """Overwrite ``p`` with ``data`` only if it is still at version ``tag``; False when it changed.

    S3: one PUT with ``If-Match`` (atomic on the server). Other stores: the tag is re-read and compared
    just before the write; callers hold the card's lease lock around it, which is what makes it safe.
    """
    _settle_for(p)
    q = path(p)
    check_writable(q)
    if scheme_of(q) in ("s3", "s3a"):
        try:
            q.fs.pipe_file(q.path, data, IfMatch=tag)
        except (OSError, FileNotFoundError) as e:
            if _is_precondition_failure(e) or isinstance(e, FileNotFoundError):
                return False
            raise
        return True
    try:
        _, current = read_versioned(q)
    except FileNotFoundError:
        return False
    if current != tag:
        return False
    q.fs.pipe_file(q.path, data)
    return True


def delete_if_match(p: Any, tag: str) -> None:
    """Delete ``p`` if it is still at version ``tag`` (a lock released by its holder only)."""
    _settle_for(p)
    q = path(p)
    try:
        _, current = read_versioned(q)
    except FileNotFoundError:
        return
    if current == tag:
        with contextlib.suppress(FileNotFoundError):
            q.fs.rm_file(q.path)


# -- DuckDB ---------------------------------------------------------------------------------------
def register_duckdb(con: Any, p: Any) -> None:
    """Let DuckDB read URLs under ``p`` through the same fsspec filesystem (httpfs is not needed), with
    each listing and small object fetched once per connection (:mod:`capcurate.duckdb_store`)."""
    q = path(p)
    if is_remote(q):
        from .duckdb_store import SnapshotFileSystem

        con.register_filesystem(SnapshotFileSystem(q.fs))


# -- errors --------------------------------------------------------------------------------------
def explain(e: BaseException) -> str | None:
    """A one-line cause for a storage failure (credentials, bucket, permission), or None if not one."""
    name = type(e).__name__
    text = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return ("object storage credentials are missing: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or a "
                f"profile), and AWS_ENDPOINT_URL for a non-AWS server ({text})")
    if "NoSuchBucket" in text or "bucket does not exist" in text:
        return f"the bucket does not exist: {text}"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"permission denied by the storage: {text}"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"):
        return f"cannot reach the storage endpoint: {text}"
    return None
