"""--stall-timeout bounds a URL's whole download, headers included; a retry or a second download never
works around an interrupted or live first run (local sockets on 127.0.0.1 only, bounded in time)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from capcurate.stages.download.stall import download_with_deadline


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
