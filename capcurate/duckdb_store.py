"""DuckDB's view of a dataset in object storage: each listing and each small object fetched once.

DuckDB reads URLs through an fsspec filesystem registered on its connection (its httpfs extension
cannot be installed offline, and would not share our credentials and endpoint anyway). Handed the
store's filesystem as it is, DuckDB asks for a file's size and modification time and opens it again
for every query, and each of those is a request (a HEAD per ``open``/``size``/``modified``, then ranged
GETs): querying one small Parquet file costs 6-10 requests, a dataset of 8 shards ~600 per stage.

:class:`SnapshotFileSystem` answers DuckDB from what one listing returned (sizes, ETags, times) and keeps
the bytes of small objects (sidecar Parquet: kilobytes to a few MB per shard) for the life of the
connection, keyed by their version (ETag), in an LRU bounded by ``CAPCURATE_DUCKDB_CACHE_MB`` (default 256). Objects above the bound are
opened on the store as before. The snapshot is a consistent view for the queries of one connection;
any write made through :mod:`capcurate.storage` in this process drops every snapshot (and queued
uploads are waited for first), so a stage that writes and then queries sees its own writes.
"""

from __future__ import annotations

import io
import os
import threading
import weakref
from collections import OrderedDict
from typing import Any

from fsspec import AbstractFileSystem

_LIVE: weakref.WeakSet[SnapshotFileSystem] = weakref.WeakSet()
_LIVE_GUARD = threading.Lock()


def settle() -> None:
    from .storage import settle as wait_for_uploads

    wait_for_uploads()  # this process's queued uploads first: DuckDB reads what the process wrote


def _version(info: dict[str, Any]) -> Any:
    """What changes whenever the object is rewritten (the ETag on S3, the generation/md5 on GCS...)."""
    for field in ("ETag", "etag", "md5Hash", "generation", "version_id"):
        if info.get(field):
            return info[field]
    return (info.get("size"), info.get("LastModified") or info.get("mtime") or info.get("updated"))


def cache_bytes() -> int:
    return int(float(os.environ.get("CAPCURATE_DUCKDB_CACHE_MB", "256")) * 2**20)


def invalidate_all() -> None:
    """Forget every snapshot's listings and bytes (called on each write through the storage layer)."""
    with _LIVE_GUARD:
        live = list(_LIVE)
    for snap in live:
        snap.invalidate()


class SnapshotFileSystem(AbstractFileSystem):
    """A read-mostly wrapper of a store's fsspec filesystem, for one DuckDB connection."""

    cachable = False  # one per connection: fsspec must not hand the same instance to another

    def __init__(self, fs: AbstractFileSystem, budget: int | None = None):
        super().__init__()
        self.fs = fs
        self.protocol = fs.protocol
        self.budget = cache_bytes() if budget is None else budget
        self._lock = threading.Lock()  # DuckDB calls from its worker threads
        self._info: dict[str, dict[str, Any]] = {}
        self._globs: dict[str, list[str]] = {}
        self._bytes: OrderedDict[tuple[str, Any], bytes] = OrderedDict()
        self._held = 0
        with _LIVE_GUARD:
            _LIVE.add(self)

    # identity, not fsspec's token equality: two connections' snapshots are never the same object
    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def invalidate(self) -> None:
        with self._lock:
            # listings and sizes are forgotten; bytes stay, keyed by version: an object the next listing
            # shows unchanged (same ETag) is not fetched again
            self._info.clear()
            self._globs.clear()

    # -- what DuckDB asks -----------------------------------------------------------------------
    def glob(self, path: str, **kwargs: Any) -> Any:
        settle()
        if kwargs.get("detail"):
            return self.fs.glob(path, **kwargs)
        with self._lock:
            hit = self._globs.get(path)
        if hit is not None:
            return list(hit)
        found = self.fs.glob(path, detail=True)
        with self._lock:
            for name, info in found.items():
                self._info[self._strip_protocol(name)] = info
            self._globs[path] = names = list(found)
        return list(names)

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        settle()
        key = self._strip_protocol(path)
        with self._lock:
            hit = self._info.get(key)
        if hit is not None:
            return hit
        info = self.fs.info(path, **kwargs)
        with self._lock:
            self._info[key] = info
        return info

    def size(self, path: str) -> int:
        return int(self.info(path)["size"])

    def modified(self, path: str) -> Any:
        info = self.info(path)
        for field in ("LastModified", "mtime", "updated", "last_modified"):
            if info.get(field) is not None:
                return info[field]
        return self.fs.modified(path)

    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
            return True
        except FileNotFoundError:
            return False

    def unstrip_protocol(self, name: str) -> str:
        return self.fs.unstrip_protocol(name)

    def _strip_protocol(self, path: str) -> str:  # type: ignore[override]
        return self.fs._strip_protocol(path)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        return self.fs.ls(path, detail=detail, **kwargs)

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        settle()
        if "r" not in mode:  # DuckDB writing (COPY ... TO a URL): straight through, then forget
            invalidate_all()
            return self.fs.open(path, mode, **kwargs)
        info = self.info(path)
        if int(info["size"]) > self.budget // 4:  # a big object: read it in blocks on the store, as before
            return self.fs.open(path, mode, **kwargs)
        key = (self._strip_protocol(path), _version(info))
        with self._lock:
            data = self._bytes.get(key)
            if data is not None:
                self._bytes.move_to_end(key)
        if data is None:
            data = self.fs.cat_file(path)  # one GET, no HEAD
            with self._lock:
                if key not in self._bytes:
                    self._bytes[key] = data
                    self._held += len(data)
                    while self._held > self.budget and len(self._bytes) > 1:
                        _, old = self._bytes.popitem(last=False)
                        self._held -= len(old)
        return io.BytesIO(data)
