"""filter, mix, shard and report on a dataset in a bucket (a local S3 server) give the same selections, the
same training shard bytes and the same report as on local disk; shard resumes and splits into parts there."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from curate_fixtures import build_scored_dataset
from typer.testing import CliRunner

from capcurate.cli import app

runner = CliRunner()
MIXES = [
    ("raw", []), ("synthetic", ["--synthetic", "syn"]),
    ("raw-top+synthetic", ["--synthetic", "blip", "--score", "l14", "--top-fraction", "0.5"]),
    ("best", ["--score", "l14"]), ("both", ["--synthetic", "blip"]),
]


def cli(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


def _fs():
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def upload(local: Path, url: str) -> str:
    fs = _fs()
    for f in sorted(local.rglob("*")):
        if f.is_file() and not f.name.startswith(".capcurate.lock"):
            fs.put_file(str(f), f"{url.removeprefix('s3://')}/{f.relative_to(local)}")
    return url


def objects(url: str) -> dict[str, bytes]:
    fs = _fs()
    prefix = url.removeprefix("s3://")
    return {k[len(prefix) + 1:]: fs.cat_file(k) for k in fs.find(prefix)}


@pytest.fixture
def pair(tmp_path: Path, bucket: str) -> tuple[Path, str]:
    local = build_scored_dataset(tmp_path / "local")
    return local, upload(local, f"{bucket}/pool")


def test_filter_and_every_mix_on_a_bucket_equal_local(pair) -> None:
    local, url = pair
    for ds in (str(local), url):
        cli("filter", ds, "--score", "l14:raw", "--top-fraction", "0.5", "--name", "top")
        for strategy, extra in MIXES:
            cli("mix", ds, "--strategy", strategy, *extra, "--name", strategy.replace("-", "_").replace("+", "_"))
    stored = objects(url)
    for sel in sorted((local / "selections").glob("*.parquet")):
        import pyarrow as pa

        remote = pq.read_table(pa.BufferReader(stored[f"selections/{sel.name}"])).to_pylist()
        assert remote == pq.read_table(sel).to_pylist(), sel.name
    # the query view over the bucket sees the selections too
    res = runner.invoke(app, ["query", url, "SELECT count(*) AS n FROM selection_top", "--json"])
    assert res.exit_code == 0 and json.loads(res.output)[0]["n"] == pq.read_table(
        local / "selections" / "top.parquet").num_rows


def test_shard_from_and_to_a_bucket_is_byte_identical_with_parts_and_resume(pair, tmp_path: Path) -> None:
    local, url = pair
    for ds in (str(local), url):
        cli("mix", ds, "--strategy", "both", "--synthetic", "blip", "--name", "m")
    args = ["--selection", "m", "--samples-per-shard", "4", "--shuffle", "--seed", "7"]
    cli("shard", str(local), *args, "-o", str(tmp_path / "out"))
    want = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}
    want.pop("manifest.json")

    # bucket -> bucket in two parts; then part 0 again resumes (nothing rewritten)
    out = url.replace("/pool", "/out")
    first = cli("shard", url, *args, "-o", out, "--part", "0/2")
    assert first["counts"]["shards_processed"] >= 1
    cli("shard", url, *args, "-o", out, "--part", "1/2")
    again = cli("shard", url, *args, "-o", out, "--part", "0/2")
    assert again["counts"]["shards_processed"] == 0
    got = objects(out)
    assert {k: v for k, v in got.items() if k.endswith(".tar") or k == "sizes.json"} == want
    manifest = json.loads(got["manifest.json"])
    assert manifest["total_samples"] == sum(json.loads(want["sizes.json"]).values())

    # bucket dataset -> local folder, and local dataset -> bucket: the same bytes
    cli("shard", url, *args, "-o", str(tmp_path / "from_bucket"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "from_bucket").glob("*.tar")} == \
        {k: v for k, v in want.items() if k.endswith(".tar")}
    out2 = url.replace("/pool", "/out2")
    cli("shard", str(local), *args, "-o", out2)
    assert {k: v for k, v in objects(out2).items() if k.endswith(".tar")} == \
        {k: v for k, v in want.items() if k.endswith(".tar")}


def test_report_on_a_bucket_writes_the_same_page(pair, tmp_path: Path) -> None:
    local, url = pair
    cli("report", str(local), "-o", str(tmp_path / "local.html"))
    out = url.replace("/pool", "/report.html")
    cli("report", url, "-o", out)
    page = _fs().cat_file(out.removeprefix("s3://")).decode().replace(url, "DATASET").replace(": pool<", ": DS<")
    want = (tmp_path / "local.html").read_text().replace(str(local), "DATASET").replace(": local<", ": DS<")
    assert page.count("<img") == want.count("<img") > 5  # the thumbnails came out of the bucket's tars
    assert page == want
