"""The storage layer: local paths unchanged, URLs through fsspec, commits and the card on a local S3 server."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow as pa
import pytest

from capcurate import atomic, storage
from capcurate.card import Card
from capcurate.dataset import Dataset
from capcurate.errors import DatasetError, InputError, StageFailed


def test_local_paths_stay_plain_paths(tmp_path: Path) -> None:
    assert type(storage.path(str(tmp_path))) is type(tmp_path)
    assert storage.path(f"file://{tmp_path}") == tmp_path
    assert not storage.is_remote(tmp_path)
    assert storage.is_remote("s3://bucket/x") and storage.scheme_of("gs://b/x") == "gs"


def test_unknown_scheme_and_read_only_scheme_are_one_line_errors() -> None:
    with pytest.raises(InputError, match="unknown URL scheme nosuch://"):
        storage.path("nosuch://bucket/x")
    with pytest.raises(InputError, match="read-only"):
        storage.check_writable("hf://datasets/x/y")


def test_s3_keeps_both_slashes_and_lists_once(bucket: str) -> None:
    root = storage.path(f"{bucket}/pool")
    assert str(root) == f"{bucket}/pool"
    for i in range(3):
        atomic.write_bytes(root / "samples" / f"{i:05d}.parquet", b"x")
    assert storage.list_names(root / "samples", ".parquet") == {"00000.parquet", "00001.parquet", "00002.parquet"}
    assert storage.list_dirs(root) == ["samples"]
    assert storage.list_names(root / "nothing-here") == set()
    storage.rmtree(root / "samples")
    assert storage.list_names(root / "samples") == set()


def test_atomic_write_to_s3_is_invisible_until_complete(bucket: str) -> None:
    dest = storage.path(f"{bucket}/d/table.parquet")
    with pytest.raises(RuntimeError), atomic.atomic_path(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert not dest.exists()
    atomic.write_parquet(dest, pa.table({"a": [1, 2, 3]}))
    assert storage.read_table(dest).column("a").to_pylist() == [1, 2, 3]
    assert storage.read_range(dest, 0, 4) == b"PAR1"


def test_conditional_writes(bucket: str) -> None:
    p = f"{bucket}/c/obj"
    assert storage.create_exclusive(p, b"one")
    assert not storage.create_exclusive(p, b"two")
    data, tag = storage.read_versioned(p)
    assert data == b"one"
    assert storage.replace_if_match(p, b"three", tag)
    assert not storage.replace_if_match(p, b"four", tag)  # the version moved on
    assert storage.read_versioned(p)[0] == b"three"


def test_missing_bucket_and_credentials_are_one_line_errors(s3_server: str, monkeypatch) -> None:
    with pytest.raises(InputError, match="bucket s3://no-such-bucket-x does not exist"):
        Dataset.create("s3://no-such-bucket-x/pool")
    with pytest.raises(InputError, match="does not exist"):
        Dataset("s3://no-such-bucket-x/pool")


def test_missing_credentials_is_a_one_line_error(bucket: str, monkeypatch, tmp_path: Path) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(InputError, match="credentials"):
        Dataset.create(f"{bucket}/pool")


def test_a_dataset_that_is_not_there_is_a_dataset_error(bucket: str) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        Dataset(f"{bucket}/nothing")


def test_dataset_card_on_s3_survives_concurrent_edits(bucket: str) -> None:
    ds = Dataset.create(f"{bucket}/pool", sources=[{"kind": "t"}])
    assert isinstance(ds.card, Card) and ds.card.remote
    errors: list[BaseException] = []

    def add(i: int) -> None:
        try:
            Dataset(f"{bucket}/pool").card.add_source({"kind": f"s{i}"})
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sources = Dataset(f"{bucket}/pool").card.read()["sources"]
    assert sorted(s["kind"] for s in sources) == ["s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "t"]
    assert not storage.path(f"{bucket}/pool/.capcurate.lock").exists()  # the lock object is released


def test_a_lock_left_by_a_dead_holder_expires(bucket: str, monkeypatch) -> None:
    import time

    from capcurate import card as card_mod

    ds = Dataset.create(f"{bucket}/pool")
    lock = storage.path(f"{bucket}/pool/.capcurate.lock")
    lock.write_bytes(json.dumps({"owner": "dead-node~1~x", "expires": time.time() - 1}).encode())
    ds.card.add_source({"kind": "after"})  # takes the expired lock over instead of waiting forever
    assert {"kind": "after"} in ds.card.read()["sources"]
    # a holder on this host whose process is gone is over before its expiry
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    lock.write_bytes(json.dumps({"owner": "me", "host": atomic.host_name(), "pid": dead,
                                 "expires": time.time() + 3600}).encode())
    t0 = time.time()
    ds.card.add_source({"kind": "after a kill"})
    assert time.time() - t0 < 5 and {"kind": "after a kill"} in ds.card.read()["sources"]
    monkeypatch.setattr(card_mod, "LOCK_SECONDS", 0.2)
    lock.write_bytes(json.dumps({"owner": "live~1~x", "host": "another-host", "pid": 1,
                                 "expires": time.time() + 3600}).encode())
    with pytest.raises(StageFailed, match="has been held"):
        ds.card.add_source({"kind": "blocked"})


def test_an_unfinished_entry_from_a_lost_node_stops_holding_its_name_when_its_lease_expires(bucket: str) -> None:
    from capcurate.card import may_be_running

    ds = Dataset.create(f"{bucket}/pool")
    _mode, entry_id = ds.card.claim(stage="mix", family="selections", name="m", params={"a": 1},
                                    overwrite=False, exists=False, exclusive=True)
    with ds.card.editing() as card:  # as if written by another host that was then lost
        e = next(e for e in card["lineage"] if e["id"] == entry_id)
        e["host"] = "lost-node"
        e["lease_until"] = "2000-01-01T00:00:00+00:00"
    e = ds.card.lineage("selections", "m")[0]
    assert not may_be_running(e)
    # another run can now take the name with --overwrite (it was refused while the lease held)
    mode, _ = ds.card.claim(stage="mix", family="selections", name="m", params={"a": 2}, overwrite=True,
                            exists=False, exclusive=True)
    assert mode == "overwrite"


def test_shard_index_reads_members_with_ranged_gets(bucket: str, tmp_path: Path) -> None:
    from capcurate.shards import TarShardWriter, index_tar, iter_samples

    url = f"{bucket}/shards/00000.tar"
    with TarShardWriter(url) as w:
        for i in range(5):
            w.write(f"k{i}", {"jpg": bytes([i]) * (1000 + i), "txt": f"cap {i}".encode()})
    idx = index_tar(url)
    assert not idx.truncated and sorted(idx.samples) == [f"k{i}" for i in range(5)]
    assert idx.read("k3", "jpg") == bytes([3]) * 1003
    with storage.open_read(url) as fh:
        assert idx.read("k4", "txt", fh) == b"cap 4"
    assert [k for k, _ in iter_samples(url)] == [f"k{i}" for i in range(5)]


def test_a_scheme_whose_package_is_missing_names_the_install() -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(InputError, match=r"gs:// needs .*pip install gcsfs"):
        storage.path("gs://bucket/pool")


def test_file_urls_are_local_datasets(tmp_path: Path) -> None:
    ds = Dataset.create(f"file://{tmp_path}/pool")
    assert ds.root == tmp_path / "pool" and (tmp_path / "pool" / "capcurate.json").is_file()


def test_cli_errors_for_storage_are_one_line_exit_2(s3_server: str, bucket: str) -> None:
    from typer.testing import CliRunner

    from capcurate.cli import app

    runner = CliRunner()
    for args, expected in (
        (["stats", "s3://no-such-bucket-y/pool"], "bucket s3://no-such-bucket-y does not exist"),
        (["stats", "nosuch://b/pool"], "unknown URL scheme"),
        (["stats", f"{bucket}/missing"], "does not exist"),
    ):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert expected in res.output and "Traceback" not in res.output


def test_a_denied_write_is_a_one_line_error_with_exit_2(bucket: str, tmp_path: Path, monkeypatch) -> None:
    """moto's server does not enforce IAM, so the store's answer to a PUT is simulated: s3fs raises
    PermissionError for 403 AccessDenied, and that must reach the user as one line, exit 2."""
    from typer.testing import CliRunner

    from capcurate.cli import app

    ds = Dataset.create(f"{bucket}/pool")

    def denied(local_file, dest):
        raise PermissionError(f"Access Denied: PutObject on {dest}")

    monkeypatch.setattr(storage, "upload", denied)
    res = CliRunner().invoke(app, ["query", str(ds.root), "SELECT 1 AS one", "-o", f"{bucket}/out/one.csv"])
    assert res.exit_code == 2 and "permission denied by the storage" in res.output
    assert "Traceback" not in res.output and not storage.path(f"{bucket}/out/one.csv").exists()
