"""--stall-timeout bounds a URL's whole download, headers included; a retry or a second download never
works around an interrupted or live first run (local sockets on 127.0.0.1 only, bounded in time)."""

from __future__ import annotations

import platform
import socket
import subprocess
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_fixtures import add_good_images, serve
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.stages.download.stall import download_with_deadline

runner = CliRunner()


class TricklingServer:
    """Accepts connections and sends ``prefix`` one byte every ``every`` seconds, then trickles ``tail``
    bytes forever: a server that never finishes its status line or its headers."""

    def __init__(self, prefix: bytes, every: float = 0.1):
        self.prefix, self.every = prefix, every
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/img.jpg"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request
            data = self.prefix
            i = 0
            while not self.stop.wait(self.every):
                try:
                    conn.sendall(data[i:i + 1] if i < len(data) else b"x")
                except OSError:
                    return  # the client gave up
                i += 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("prefix", [b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Slow: "],
                         ids=["status_line", "headers"])
def test_stall_timeout_covers_a_trickled_status_line_and_headers(prefix):
    srv = TricklingServer(prefix)
    got: list = []
    worker = threading.Thread(target=lambda: got.append(download_with_deadline(
        (0, srv.url), 5, None, None, stall_timeout=1.0)), daemon=True)
    t0 = time.monotonic()
    try:
        worker.start()
        worker.join(timeout=8)  # today's code reads a byte every 0.1 s forever: no read ever times out
        assert not worker.is_alive(), "the URL held its thread past --stall-timeout"
    finally:
        srv.close()
    (key, body, error), = got
    assert key == 0 and body is None and error.startswith("stalled: ") and time.monotonic() - t0 < 3


@pytest.fixture(scope="module")
def server():
    with serve() as srv:
        yield srv


@pytest.fixture(scope="module")
def downloaded(server, tmp_path_factory):
    """One finished download (6 rows, 2 shards, one 404 in shard 00000) that each test copies."""
    tmp = tmp_path_factory.mktemp("downloaded")
    rows = add_good_images(server, 5) + [{"url": server.url("/gone/0.jpg"), "caption": "404"}]
    rows.insert(0, rows.pop())
    urls = tmp / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), urls)
    r = runner.invoke(app, ["download", str(urls), "-o", str(tmp / "ds"), *DOWNLOAD_OPTIONS])
    assert r.exit_code == 0, r.output
    return tmp / "ds", urls


DOWNLOAD_OPTIONS = ["--threads", "4", "--image-size", "32", "--samples-per-shard", "3", "--json"]


def _copy(downloaded, tmp_path):
    import shutil

    template, urls = downloaded
    out = tmp_path / "ds"
    shutil.copytree(template, out)
    return out, ["download", str(urls), "-o", str(out), *DOWNLOAD_OPTIONS]


def test_retry_failed_before_resuming_an_interrupted_download_is_refused(tmp_path, downloaded):
    """The interrupted last shard's number must not go to the retry's shard: it would pass for finished
    and its URLs would never be fetched."""
    out, args = _copy(downloaded, tmp_path)
    ds = Dataset(out)
    # what a kill in the middle of the last shard leaves: a cut tar, no stats, no manifest
    tar = ds.shard_path("00001")
    tar.write_bytes(tar.read_bytes()[:700])
    for p in (ds.shards_dir / "00001_stats.json", ds.shards_dir / "00001.parquet", ds.samples_path("00001")):
        p.unlink()
    retry = ["download", "-o", str(out), "--retry-failed", "--json"]
    r = runner.invoke(app, retry)
    assert r.exit_code == 2 and "did not finish (shard 00001 missing)" in r.output and "resume it" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert [e["stage"] for e in ds.card.lineage()] == ["download"]  # the refused retry left no entry
    assert tar.stat().st_size == 700 and not (ds.shards_dir / "00002_stats.json").exists()


def test_a_second_download_leaves_a_live_runs_partial_files_alone(tmp_path, downloaded):
    out, args = _copy(downloaded, tmp_path)
    ds = Dataset(out)
    live = subprocess.Popen(["sleep", "60"])  # stands for the first run's process, still downloading
    try:
        with ds.card.editing() as card:
            card["lineage"].append({"id": f"download-2026-01-01T00:00:00-{live.pid}-abcd1234", "stage": "download",
                                    "family": "shards", "name": "download", "host": platform.node(),
                                    "command": "capcurate download urls.parquet -o ds", "started": "2026-01-01",
                                    "finished": None, "parameters": card["lineage"][0]["parameters"],
                                    "counts": {}})
        (ds.shards_dir / "_tmp").mkdir()
        (ds.shards_dir / "_tmp" / "part").write_bytes(b"being written")
        (ds.shards_dir / "00002.tar").write_bytes(b"being written")
        for cmd in (args, ["download", "-o", str(out), "--retry-failed"]):
            r = runner.invoke(app, cmd)
            assert r.exit_code == 3 and f"pid {live.pid}" in r.output and len(r.output.strip().splitlines()) == 1
            assert (ds.shards_dir / "_tmp" / "part").exists() and (ds.shards_dir / "00002.tar").exists()
    finally:
        live.kill()
        live.wait()
    r = runner.invoke(app, args)  # the first run is over: what it left is cleaned up
    assert r.exit_code == 0, r.output
    assert not (ds.shards_dir / "_tmp").exists() and not (ds.shards_dir / "00002.tar").exists()
