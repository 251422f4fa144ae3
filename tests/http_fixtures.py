"""A local HTTP image server on 127.0.0.1 for download tests and the download benchmark.

It serves generated JPEG/PNG/WebP images plus the bad cases a web crawl meets: a 404, a text file
named .jpg, a truncated JPEG, a PNG whose header declares 30000x30000 pixels (a decompression bomb),
a response slower than the client's timeout, a redirect to a good image, a response that stalls
forever (a byte every fraction of a second, so no single read times out) and one that fails the first
time and works on retry.
"""

from __future__ import annotations

import io
import random
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CONTENT_TYPES = {"jpg": "image/jpeg", "png": "image/png", "webp": "image/webp", "txt": "text/plain"}


def make_image(seed: int, size: tuple[int, int] = (40, 30), fmt: str = "JPEG") -> bytes:
    """A deterministic small image (background colour + a rectangle)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
    ImageDraw.Draw(img).rectangle([x0, y0, x0 + size[0] // 3, y0 + size[1] // 3],
                                  fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb_header(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG that declares ``width x height`` pixels but carries almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


class ImageServer:
    """Routes: any path added with ``add``; ``/redirect/<path>`` answers 302 to ``<path>``;
    ``/slow/<path>`` waits ``slow_seconds`` before answering; ``/stall/<path>`` sends the headers, then
    one byte every ``trickle_seconds`` until the client gives up or the server stops; ``/flaky/<path>``
    answers 503 to its first request and serves ``<path>`` afterwards; everything else is a 404."""

    def __init__(self, slow_seconds: float = 3.0, trickle_seconds: float = 0.3):
        self.files: dict[str, tuple[bytes, str]] = {}
        self.slow_seconds = slow_seconds
        self.trickle_seconds = trickle_seconds
        self.requests = 0
        self.hits: dict[str, int] = {}
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests += 1
                path = self.path
                server.hits[path] = server.hits.get(path, 0) + 1
                if path.startswith("/flaky/"):
                    path = path[len("/flaky"):]
                    if server.hits[self.path] == 1:
                        self.send_error(503, "Service Unavailable")
                        return
                if path.startswith("/stall/"):
                    body, ctype = server.files.get(path[len("/stall"):], (b"x" * 1000, "image/jpeg"))
                    try:
                        self.send_response(200)
                        self.send_header("Content-Type", ctype)
                        self.send_header("Content-Length", str(len(body) * 1000))  # never reached
                        self.end_headers()
                        while not server.stopping.wait(server.trickle_seconds):
                            self.wfile.write(b"\0")
                            self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        pass  # the client gave up: the watchdog did its job
                    return
                if path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", path[len("/redirect"):])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path.startswith("/slow/"):
                    time.sleep(server.slow_seconds)
                    path = path[len("/slow"):]
                if path not in server.files:
                    self.send_error(404, "Not Found")
                    return
                body, ctype = server.files[path]
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default 5 drops connections from 64 download threads
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, path: str, body: bytes, content_type: str | None = None) -> str:
        ext = path.rsplit(".", 1)[-1]
        self.files[path] = (body, content_type or CONTENT_TYPES.get(ext, "application/octet-stream"))
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base + path

    def start(self) -> ImageServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def serve(slow_seconds: float = 3.0, trickle_seconds: float = 0.3) -> Iterator[ImageServer]:
    srv = ImageServer(slow_seconds, trickle_seconds).start()
    try:
        yield srv
    finally:
        srv.stop()


def add_good_images(srv: ImageServer, n: int, *, size: tuple[int, int] = (40, 30)) -> list[dict]:
    """n good images cycling JPEG/PNG/WebP; returns url rows with captions."""
    fmts = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")]
    rows = []
    for i in range(n):
        ext, fmt = fmts[i % 3]
        url = srv.add(f"/img/{i}.{ext}", make_image(i, size, fmt))
        rows.append({"url": url, "caption": f"good image {i}"})
    return rows


def add_bad_cases(srv: ImageServer) -> dict[str, dict]:
    """The issue's bad cases; returns name -> url row (with the expected outcome in 'expect')."""
    full = make_image(999, (64, 48), "JPEG")
    srv.add("/bad/text.jpg", b"<html>this is not an image</html>", "image/jpeg")
    srv.add("/bad/truncated.jpg", full[: len(full) * 2 // 3])
    srv.add("/bad/bomb.png", png_bomb_header())
    srv.add("/target/redirected.jpg", make_image(1234, (40, 30), "JPEG"))
    return {
        "missing": {"url": srv.url("/bad/missing.jpg"), "caption": "404", "expect": "HTTP 404"},
        "text": {"url": srv.url("/bad/text.jpg"), "caption": "text", "expect": "not an image"},
        "truncated": {"url": srv.url("/bad/truncated.jpg"), "caption": "cut", "expect": "truncated"},
        "bomb": {"url": srv.url("/bad/bomb.png"), "caption": "bomb", "expect": "too large"},
        "slow": {"url": srv.url("/slow/target/redirected.jpg"), "caption": "slow", "expect": "timeout"},
        "redirect": {"url": srv.url("/redirect/target/redirected.jpg"), "caption": "redirect",
                     "expect": "success"},
    }
