"""download, ingest, stats, query and doctor with the dataset (and the inputs) in a bucket (a local S3 server),
compared with the same commands on local disk."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_fixtures import add_good_images, serve
from test_chaos import write_inputs
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.shards import iter_samples

runner = CliRunner()


def cli(*args: str, code: int = 0) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout) if code == 0 else {}


def _fs():
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def manifest_rows(ds: str | Path) -> list[dict]:
    rows = Dataset(ds).query("SELECT * EXCLUDE (source) FROM manifest ORDER BY uid").to_pylist() \
        if "source" in Dataset(ds).columns("manifest") else \
        Dataset(ds).query("SELECT * FROM manifest ORDER BY uid").to_pylist()
    return rows


def images(ds: str | Path) -> dict[str, bytes]:
    d = Dataset(ds)
    out = {}
    for sid in d.shard_ids():
        for key, members in iter_samples(d.shard_path(sid)):
            out[key] = next(v for k, v in members.items() if k in ("jpg", "png", "webp"))
    return out


@pytest.fixture(scope="module")
def server():
    with serve() as srv:
        yield srv


def test_download_into_a_bucket_equals_local_and_resumes(server, bucket, tmp_path: Path) -> None:
    rows = add_good_images(server, 12)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    args = ["--samples-per-shard", "5", "--threads", "8", "--image-size", "32"]
    local = cli("download", str(urls), "-o", str(tmp_path / "ds"), *args)
    url = f"{bucket}/pool"
    remote = cli("download", str(urls), "-o", url, *args, "--scratch", str(tmp_path / "scratch"))
    assert remote["counts"]["ok"] == local["counts"]["ok"] == 12 and remote["counts"]["shards"] == 3
    assert manifest_rows(url) == manifest_rows(tmp_path / "ds")
    assert images(url) == images(tmp_path / "ds")
    assert not any((tmp_path / "scratch").iterdir())  # the staging folder is removed

    # a manifest lost alone is rebuilt from the shard's files (as on disk); a shard lost whole is downloaded
    # again and the others are skipped
    prefix = url.removeprefix("s3://")
    _fs().rm(f"{prefix}/samples/00002.parquet")
    rebuilt = cli("download", str(urls), "-o", url, *args)
    assert rebuilt["counts"]["shards_downloaded"] == 0 and Dataset(url).shard_ids() == ["00000", "00001", "00002"]
    _fs().rm([f"{prefix}/samples/00001.parquet", f"{prefix}/shards/00001.tar", f"{prefix}/shards/00001.parquet",
              f"{prefix}/shards/00001_stats.json"])
    again = cli("download", str(urls), "-o", url, *args)
    assert (again["counts"]["shards_downloaded"], again["counts"]["shards_resumed_skipped"]) == (1, 2)
    assert manifest_rows(url) == manifest_rows(tmp_path / "ds")
    assert cli("download", str(urls), "-o", url, *args)["counts"]["shards_downloaded"] == 0

    # the URL list itself may live in the bucket
    _fs().put_file(str(urls), f"{bucket.removeprefix('s3://')}/lists/urls.parquet")
    from_bucket = cli("download", f"{bucket}/lists/urls.parquet", "-o", f"{bucket}/pool2", *args)
    assert from_bucket["counts"]["ok"] == 12


def test_ingest_local_to_bucket_and_bucket_to_bucket_equal_local(bucket, tmp_path: Path) -> None:
    web = write_inputs(tmp_path / "web")
    cli("ingest", str(web), "-o", str(tmp_path / "ds"), "--kind", "webdataset")
    cli("ingest", str(web), "-o", f"{bucket}/a", "--kind", "webdataset")
    fs = _fs()
    for f in sorted(web.glob("*.tar")):
        fs.put_file(str(f), f"{bucket.removeprefix('s3://')}/web/{f.name}")
    counts = cli("ingest", f"{bucket}/web", "-o", f"{bucket}/b")["counts"]
    assert counts["kind"] == "webdataset" and counts["duplicate_uids"] == 2
    want = manifest_rows(tmp_path / "ds")
    assert manifest_rows(f"{bucket}/a") == want
    # the source path is part of each row ("source": the tar it came from): equal up to where the tars lie
    assert [{k: v for k, v in r.items() if k != "source_key"} for r in manifest_rows(f"{bucket}/b")] == \
        [{k: v for k, v in r.items() if k != "source_key"} for r in want]
    assert images(f"{bucket}/a") == images(f"{bucket}/b") == images(tmp_path / "ds")


def test_stats_query_and_doctor_on_a_bucket(bucket, tmp_path: Path) -> None:
    web = write_inputs(tmp_path / "web")
    url = f"{bucket}/pool"
    cli("ingest", str(web), "-o", url, "--kind", "webdataset")
    st = cli("stats", url)
    assert st["counts"]["samples"] == 6
    r = runner.invoke(app, ["query", url, "SELECT count(DISTINCT uid) AS n FROM samples", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == [{"n": 6}]
    out = cli("query", url, "SELECT uid FROM samples ORDER BY uid", "-o", f"{bucket}/out/uids.parquet")
    assert out["counts"]["rows"] == 6
    assert pq.read_table(pa.BufferReader(_fs().cat_file(f"{bucket.removeprefix('s3://')}/out/uids.parquet"))
                         ).num_rows == 6
    clean = cli("doctor", url)
    assert clean["ok"] and clean["counts"]["remaining"] == 0 and "no damage" in clean["message"]
    # damage: a manifest whose tar is gone; doctor finds it and --repair removes the manifest
    _fs().rm(f"{url.removeprefix('s3://')}/shards/00001.tar")
    found = runner.invoke(app, ["doctor", url, "--json"])
    assert "manifests_without_shard" in found.stdout and "samples/00001.parquet" in found.stdout
    cli("doctor", url, "--repair")
    assert Dataset(url).shard_ids() == ["00000", "00002"]


def test_bad_urls_are_one_line_errors_and_write_nothing(s3_server, bucket, tmp_path: Path) -> None:
    web = write_inputs(tmp_path / "web")
    for args, expected in ((["ingest", str(web), "-o", "s3://no-such-bucket-z/x"], "does not exist"),
                           (["ingest", str(web), "-o", "nosuch://b/x"], "unknown URL scheme"),
                           (["ingest", f"{bucket}/nothing-here", "-o", str(tmp_path / "o")], "does not exist")):
        r = runner.invoke(app, args)
        assert r.exit_code == 2 and expected in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "o").exists()
