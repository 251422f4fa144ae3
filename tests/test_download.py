"""capcurate download: img2dataset against a local HTTP server, manifest, resume, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from http_fixtures import add_bad_cases, add_good_images, serve
from typer.testing import CliRunner

from capcurate.atomic import host_name
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.shards import index_tar
from capcurate.stages.download import download
from capcurate.stages.download.header import header_problem, jpeg_is_complete
from capcurate.stages.download.manifest import failure_reason
from capcurate.uid import make_uid

runner = CliRunner()


@pytest.fixture(scope="module")
def server():
    with serve(slow_seconds=8) as srv:
        yield srv


def write_csv(path, rows: list[dict]) -> str:
    pacsv.write_csv(pa.Table.from_pylist(rows), path)
    return str(path)


def test_download_keeps_every_good_image_and_counts_every_bad_one_with_its_reason(tmp_path, server):
    rows = add_good_images(server, 9)
    bad = add_bad_cases(server)
    rows += [{"url": b["url"], "caption": b["caption"]} for b in bad.values()]
    for i, r in enumerate(rows):
        r["source_id"] = i  # an extra input column: must be kept in the manifest
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)

    s = download(urls, tmp_path / "ds", timeout=3, threads=16, image_size=64, samples_per_shard=100)

    assert s.ok and (s.counts["attempted"], s.counts["ok"], s.counts["failed"]) == (15, 10, 5)
    assert s.details["failed_by_reason"] == {
        "HTTP 404": 1, "not an image": 1, "truncated image": 1, "image too large (not decoded)": 1, "timeout": 1}
    ds = Dataset(tmp_path / "ds")
    got = {r["url"]: r for r in ds.query("SELECT * FROM samples").to_pylist()}
    assert len(got) == 15
    for r in rows[:9] + [bad["redirect"]]:
        m = got[r["url"]]
        assert m["status"] == "success" and (m["width"], m["height"]) == (64, 64) and len(m["sha256"]) == 64
    for name, b in bad.items():
        if name != "redirect":
            assert got[b["url"]]["status"] != "success"
            assert b["expect"].lower() in failure_reason(None, got[b["url"]]["error_message"]).lower()
    assert got[rows[3]["url"]]["source_id"] == 3
    assert got[rows[3]["url"]]["uid"] == make_uid(rows[3]["url"], rows[3]["caption"])
    # every success has its image in the shard, and nothing else has one
    idx = index_tar(ds.shard_path("00000"))
    assert {k for k in idx.samples if idx.image_ext(k)} == {m["key"] for m in got.values() if m["status"] == "success"}
    assert ds.card.lineage("shards", "download")[-1]["finished"]


def test_download_cli_resumes_after_kill_without_duplicates(tmp_path, server):
    rows = [{"link": r["url"], "text": r["caption"]} for r in add_good_images(server, 12)]
    urls = write_csv(tmp_path / "urls.csv", rows)
    out = tmp_path / "ds"
    args = ["download", urls, "-o", str(out), "--url-col", "link", "--samples-per-shard", "5",
            "--threads", "8", "--image-size", "32", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)  # stdout holds only the JSON: img2dataset's chatter went to stderr
    assert summary["counts"]["attempted"] == 12 and summary["counts"]["shards"] == 3

    # what a kill -9 in the middle of shard 00001 leaves: a cut tar, no stats, no manifest, temp files
    ds = Dataset(out)
    tar = ds.shard_path("00001")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    (ds.shards_dir / "00001_stats.json").unlink()
    ds.samples_path("00001").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # a temp file names its writer (host~pid): this one's process is gone, so it is removed
    (ds.samples_dir / f".00001.parquet~{host_name()}~{int(dead.stdout)}~deadbeef.tmp").write_bytes(b"partial")
    (ds.shards_dir / "_tmp").mkdir()

    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    counts = json.loads(second.stdout)["counts"]
    assert (counts["shards_downloaded"], counts["shards_resumed_skipped"], counts["ok"]) == (1, 2, 12)
    n, uids, captions = ds.connect().execute(
        "SELECT count(*), count(DISTINCT uid), count(caption) FROM samples").fetchone()
    assert (n, uids, captions) == (12, 12, 12)
    assert not index_tar(tar).truncated and len(index_tar(tar).samples) == 5
    assert not list(ds.samples_dir.glob(".*")) and not (ds.shards_dir / "_tmp").exists()

    # finished: a third run downloads nothing; other output options are refused
    third = runner.invoke(app, args)
    assert json.loads(third.stdout)["counts"]["shards_downloaded"] == 0
    other = runner.invoke(app, [*args[:-3], "--image-size", "64"])
    assert other.exit_code == 3 and "image_size" in other.output


def test_missing_url_column_names_the_columns_that_exist(tmp_path):
    urls = write_csv(tmp_path / "u.csv", [{"link": "http://127.0.0.1/x.jpg", "alt": "x"}])
    r = runner.invoke(app, ["download", urls, "-o", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "'url' not found" in r.output and "link, alt" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "ds").exists()


@pytest.mark.parametrize("content", [b"url,caption\n", b""])
def test_empty_input_fails_and_writes_nothing(tmp_path, content):
    urls = tmp_path / "u.csv"
    urls.write_bytes(content)
    r = runner.invoke(app, ["download", str(urls), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "no rows" in r.output and not (tmp_path / "ds").exists()


def test_foreign_output_dir_is_refused_without_force(tmp_path):
    urls = write_csv(tmp_path / "u.csv", [{"url": "http://127.0.0.1:9/x.jpg"}])
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my files")
    r = runner.invoke(app, ["download", urls, "-o", str(out)])
    assert r.exit_code == 3 and "--force" in r.output and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_unknown_options_are_one_line_errors(tmp_path):
    urls = write_csv(tmp_path / "u.csv", [{"url": "http://127.0.0.1:9/x.jpg"}])
    r = runner.invoke(app, ["download", urls, "-o", str(tmp_path / "ds"), "--resize-mode", "stretch"])
    assert r.exit_code == 2 and "border" in r.output
    r = runner.invoke(app, ["download", str(tmp_path / "nope.xlsx"), "-o", str(tmp_path / "ds")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_header_guard_refuses_bombs_and_truncated_jpegs_without_decoding():
    from http_fixtures import make_image, png_bomb_header

    jpg = make_image(1, (64, 64))
    assert header_problem(jpg, 10**6) is None and jpeg_is_complete(jpg)
    assert "too large" in header_problem(png_bomb_header(), 10**12)
    assert "too large" in header_problem(make_image(2, (64, 64), "PNG"), 1000)
    assert "truncated" in header_problem(jpg[:-200], 10**6).lower()
    assert "not an image" in header_problem(b"<html></html>", 10**6)


def test_download_txt_url_list_has_no_captions(tmp_path, server):
    # a .txt list is one URL per line: tars carry <key>.jpg + <key>.json, the manifest NULL captions
    rows = add_good_images(server, 3)
    urls = tmp_path / "u.txt"
    urls.write_text("\n".join(r["url"] for r in rows) + "\n")
    s = download(urls, tmp_path / "ds", threads=4, image_size=32)
    assert s.counts["ok"] == 3
    with tarfile.open(tmp_path / "ds" / "shards" / "00000.tar") as tf:
        exts = sorted({m.name.split(".", 1)[1] for m in tf.getmembers()})
    assert exts == ["jpg", "json"]
    assert Dataset(tmp_path / "ds").connect().execute("SELECT count(caption) FROM samples").fetchone() == (0,)


def test_download_keeps_one_row_per_uid_when_the_url_list_repeats_a_row(tmp_path, server):
    rows = add_good_images(server, 4)
    rows.append(dict(rows[1]))  # the same (url, caption): the same uid
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    s = download(urls, tmp_path / "ds", timeout=3, threads=4, image_size=32, samples_per_shard=100)
    assert s.ok and s.counts["attempted"] == 5 and s.counts["duplicate_uids"] == 1
    ds = Dataset(tmp_path / "ds")
    got = ds.query("SELECT uid, count(*) AS n FROM samples GROUP BY uid").to_pylist()
    assert len(got) == 4 and all(r["n"] == 1 for r in got)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_encode_format_stores_images_in_that_format(tmp_path, server, fmt):
    from PIL import Image

    rows = add_good_images(server, 3)
    urls = write_csv(tmp_path / "u.csv", rows)
    r = runner.invoke(app, ["download", urls, "-o", str(tmp_path / "ds"), "--encode-format", fmt,
                            "--image-size", "32", "--distributor", "multiprocessing", "--timeout", "3"])
    assert r.exit_code == 0, r.output
    ds = Dataset(tmp_path / "ds")
    idx = index_tar(ds.shard_path("00000"))
    assert {idx.image_ext(k) for k in idx.samples} == {fmt}
    with tarfile.open(ds.shard_path("00000")) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(f".{fmt}"))
        assert Image.open(tar.extractfile(member)).format == {"png": "PNG", "webp": "WEBP"}[fmt]


def test_a_distributor_whose_package_is_missing_is_a_one_line_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pyspark") is not None:
        pytest.skip("pyspark is installed here")
    urls = write_csv(tmp_path / "u.csv", [{"url": "http://127.0.0.1:9/x.jpg"}])
    r = runner.invoke(app, ["download", urls, "-o", str(tmp_path / "ds"), "--distributor", "pyspark"])
    assert r.exit_code == 2 and "--distributor pyspark needs the pyspark package" in r.output
    assert not (tmp_path / "ds").exists()
