"""download --stall-timeout, --retry-failed [--only], and whole shards only, against a local server that
stalls forever on some URLs and fails others the first time (127.0.0.1 only, bounded in time)."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_fixtures import add_good_images, make_image, serve
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def server():
    with serve(trickle_seconds=0.2) as srv:
        yield srv


def manifest(root) -> list[dict]:
    return Dataset(root).query("SELECT * FROM manifest ORDER BY shard, key").to_pylist()


def test_stalled_urls_fail_as_stalled_and_retry_failed_fetches_exactly_the_chosen_reasons(tmp_path, server):
    rows = add_good_images(server, 4)
    server.add("/flakytarget/x.jpg", make_image(77, (40, 30)))
    rows += [{"url": server.url("/stall/img/0.jpg"), "caption": "stalls forever"},
             {"url": server.url("/flaky/flakytarget/x.jpg"), "caption": "503 first"},
             {"url": server.url("/nothing/here.jpg"), "caption": "404"}]
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    out = tmp_path / "ds"
    base = ["download", "-o", str(out), "--threads", "8", "--timeout", "5", "--json"]

    t0 = time.monotonic()
    first = runner.invoke(app, [*base[:1], str(urls), *base[1:], "--image-size", "32", "--samples-per-shard", "4",
                                "--stall-timeout", "1.5"])
    assert first.exit_code == 0, first.output
    assert time.monotonic() - t0 < 60  # the stalled URL was abandoned, the run ended cleanly
    s = json.loads(first.stdout)
    assert s["details"]["failed_by_reason"] == {"stalled": 1, "HTTP 503": 1, "HTTP 404": 1}

    # --only names a reason that no row has: one line listing the reasons present
    r = runner.invoke(app, [*base, "--retry-failed", "--only", "tmeout"])
    assert r.exit_code == 2 and "reasons present: " in r.output and "stalled (1)" in r.output
    r = runner.invoke(app, [*base[:1], str(urls), *base[1:], "--only", "stalled"])
    assert r.exit_code == 2 and "add --retry-failed" in r.output

    hits_404 = server.hits["/nothing/here.jpg"]
    retry = runner.invoke(app, [*base, "--retry-failed", "--only", "HTTP 503"])
    assert retry.exit_code == 0, retry.output
    rs = json.loads(retry.stdout)
    assert (rs["counts"]["retried"], rs["counts"]["ok"], rs["counts"]["shards_downloaded"]) == (1, 1, 1)
    assert rs["details"]["new_shards"] == ["00002"]
    assert server.hits["/nothing/here.jpg"] == hits_404  # only the chosen reason was downloaded again
    got = manifest(out)
    assert len(got) == 7 and len({r["uid"] for r in got}) == 7  # the retried row replaced its old copy
    flaky = next(r for r in got if r["caption"] == "503 first")
    assert flaky["status"] == "success" and flaky["shard"] == "00002" and (flaky["width"], flaky["height"]) == (32, 32)

    # everything else once more: still failed, still one row per uid, nothing left to retry for 503s
    again = runner.invoke(app, [*base, "--retry-failed", "--stall-timeout", "1"])
    assert again.exit_code == 0, again.output
    a = json.loads(again.stdout)
    assert a["counts"]["retried"] == 2 and a["details"]["failed_by_reason"] == {"stalled": 1, "HTTP 404": 1}
    got = manifest(out)
    assert len(got) == 7 and len({r["uid"] for r in got}) == 7
    doc = runner.invoke(app, ["doctor", str(out), "--json"])
    assert doc.exit_code == 0 and json.loads(doc.stdout)["counts"]["remaining"] == 0, doc.output


def test_a_truncated_finished_shard_never_enters_the_manifest_and_is_downloaded_again(tmp_path, server):
    rows = add_good_images(server, 6)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    out = tmp_path / "ds"
    args = ["download", str(urls), "-o", str(out), "--threads", "4", "--image-size", "32",
            "--samples-per-shard", "3", "--json"]
    assert runner.invoke(app, args).exit_code == 0
    ds = Dataset(out)
    # a crash between img2dataset's stats file and our manifest, with the tar damaged on disk
    tar = ds.shard_path("00001")
    tar.write_bytes(tar.read_bytes()[:1500])
    ds.samples_path("00001").unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert "00001" in s["details"]["redownloaded_damaged"] and s["counts"]["shards_downloaded"] == 1
    got = manifest(out)
    assert len(got) == 6 and all(x["status"] == "success" for x in got)


def test_stall_timeout_must_not_be_negative(tmp_path):
    r = runner.invoke(app, ["download", str(tmp_path / "u.csv"), "-o", str(tmp_path / "ds"),
                            "--stall-timeout", "-1"])
    assert r.exit_code == 2 and "--stall-timeout must be 0 (off) or more" in r.output
    r = runner.invoke(app, ["download", "-o", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "needs a URL list" in r.output
    r = runner.invoke(app, ["download", "-o", str(tmp_path / "nope"), "--retry-failed"])
    assert r.exit_code == 2 and "does not exist" in r.output
