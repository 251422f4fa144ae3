"""Requests to a store: DuckDB's per-connection snapshot and write-behind uploads (local S3 server)."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from capcurate import atomic, storage
from capcurate.duckdb_store import SnapshotFileSystem


class CountingFS:
    """Passes every call to the real filesystem and counts them by name."""

    def __init__(self, fs: Any):
        self._fs = fs
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._fs, name)
        if not callable(value) or name.startswith("_"):
            return value

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args, **kwargs)

        return counted


def _parquet(rows: list[str]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"uid": rows}), buf)
    return buf.getvalue()


def test_duckdb_reads_each_listing_and_object_once_per_connection_and_sees_its_own_writes(bucket: str) -> None:
    root = storage.path(f"{bucket}/t")
    for i in range(3):
        atomic.write_bytes(root / f"{i}.parquet", _parquet([f"{i}-{j}" for j in range(4)]))
    spy = CountingFS(root.fs)
    con = duckdb.connect()
    con.register_filesystem(SnapshotFileSystem(spy))  # type: ignore[arg-type]
    query = f"SELECT count(*), count(DISTINCT uid) FROM read_parquet('{bucket}/t/*.parquet')"
    assert con.execute(query).fetchall() == [(12, 12)]
    assert con.execute(query + " WHERE uid LIKE '1-%'").fetchall() == [(4, 4)]
    # the real filesystem: one listing, one GET per object; no HEAD (info), no ranged opens
    assert spy.calls.get("glob") == 1 and spy.calls.get("cat_file") == 3, spy.calls
    assert not spy.calls.get("info") and not spy.calls.get("open"), spy.calls
    # a write through the storage layer drops the snapshot: the next query lists again and sees it
    atomic.write_bytes(root / "3.parquet", _parquet(["3-0"]))
    assert con.execute(query).fetchall() == [(13, 13)]
    assert spy.calls["glob"] == 2 and spy.calls["cat_file"] == 4, spy.calls  # only the new object fetched
    # an object rewritten by this process is fetched again (its version changed)
    atomic.write_bytes(root / "0.parquet", _parquet(["0-0"]))
    assert con.execute(query).fetchall() == [(10, 10)]
    assert spy.calls["cat_file"] == 5, spy.calls


def test_duckdb_opens_an_object_above_the_cache_bound_on_the_store(bucket: str) -> None:
    root = storage.path(f"{bucket}/big")
    atomic.write_bytes(root / "0.parquet", _parquet([f"u{j}" for j in range(2000)]))
    spy = CountingFS(root.fs)
    con = duckdb.connect()
    con.register_filesystem(SnapshotFileSystem(spy, budget=1024))  # type: ignore[arg-type]
    assert con.execute(f"SELECT count(*) FROM '{bucket}/big/0.parquet'").fetchall() == [(2000,)]
    assert spy.calls.get("open", 0) >= 1 and not spy.calls.get("cat_file"), spy.calls


def test_write_behind_uploads_in_commit_order_and_reads_wait_for_them(bucket: str, monkeypatch) -> None:
    order: list[str] = []
    real_upload = storage.upload

    def slow_upload(local: Path, dest: Any) -> None:
        time.sleep(0.2)  # the caller must not wait for this
        real_upload(local, dest)
        order.append(str(dest).rsplit("/", 1)[-1])

    monkeypatch.setattr(storage, "upload", slow_upload)
    root = f"{bucket}/wb"
    t0 = time.perf_counter()
    with storage.write_behind():
        for i in range(3):
            atomic.write_bytes(f"{root}/{i}.bin", bytes([i]) * 10)
        queued_in = time.perf_counter() - t0
        # a read through the storage layer waits for this process's uploads: it sees all three
        assert storage.list_names(root) == {"0.bin", "1.bin", "2.bin"}
    assert order == ["0.bin", "1.bin", "2.bin"]
    assert queued_in < 0.5, "the commits waited for their uploads"
    assert storage.read_bytes(f"{root}/2.bin") == b"\x02" * 10


def _deny_upload_of(name: str, monkeypatch) -> None:
    """Every upload goes through but the one of ``name``, which the store refuses."""
    real_upload = storage.upload

    def failing(local: Path, dest: Any) -> None:
        if str(dest).endswith(name):
            raise PermissionError("denied")
        real_upload(local, dest)

    monkeypatch.setattr(storage, "upload", failing)


def test_write_behind_failure_is_raised_and_later_commits_are_not_made(bucket: str, monkeypatch) -> None:
    _deny_upload_of("1.bin", monkeypatch)
    root = f"{bucket}/wbf"
    with pytest.raises(PermissionError, match="denied"), storage.write_behind():
        for i in range(4):  # the failure reaches a later commit, or the block's end
            atomic.write_bytes(f"{root}/{i}.bin", b"x")
    names = storage.list_names(root)
    assert "0.bin" in names and "1.bin" not in names and "3.bin" not in names  # a prefix of the commits
    assert not any(t.name == "capcurate-upload" for t in threading.enumerate())  # the thread ended


def test_a_file_above_the_part_size_goes_up_in_parallel_parts_and_comes_back_whole(bucket: str) -> None:
    import os

    data = os.urandom(storage.UPLOAD_PART + 3 * 2**20)  # two parts, the second one short
    atomic.write_bytes(f"{bucket}/big/blob.bin", data)
    assert storage.read_bytes(f"{bucket}/big/blob.bin") == data


def test_write_behind_failure_caught_at_one_commit_still_fails_the_block(bucket: str, monkeypatch) -> None:
    """The local engine records a shard's exception and goes on: the later commits, which are not made,
    must not pass for done, so the block's end raises the failure again."""
    _deny_upload_of("0.bin", monkeypatch)
    root = f"{bucket}/wbc"
    caught = 0
    with pytest.raises(PermissionError, match="denied"), storage.write_behind():
        for i in range(4):
            try:
                atomic.write_bytes(f"{root}/{i}.bin", b"x")
            except PermissionError:
                caught += 1  # as run_local does with a shard's exception
            time.sleep(0.05)
    assert caught >= 1 and storage.list_names(root) == set()
