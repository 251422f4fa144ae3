"""The ``--stall-timeout`` watchdog: no URL may hold a download thread longer than that.

img2dataset's ``timeout`` bounds each socket operation, not a download: a server that trickles a byte
every few seconds (or never ends a chunked body) keeps a thread, and with it its shard and the whole
run, busy forever (img2dataset issues #74, #164, #289, #402). The same holds before the body: a server
that trickles its status line or headers a byte at a time never lets one read time out. Here every
socket a URL's download opens (redirects included) is registered with a watchdog timer that shuts it
down when ``stall_timeout`` seconds have passed since the download began, wherever the client is
waiting then (connect, status line, headers, body); the body is also read in chunks against the same
deadline. The URL's row is recorded as failed with ``stalled: ...``, so the shard completes and the run
exits cleanly. ``download --retry-failed --only stalled`` tries those rows again later.
"""

from __future__ import annotations

import functools
import http.client
import io
import socket
import threading
import time
import urllib.request

from img2dataset.downloader import Downloader

# Set by the runner in the parent process before img2dataset builds its Downloader; the value travels
# to the worker processes inside the pickled instance (0: no watchdog).
STALL_TIMEOUT = 0.0
STALLED = "stalled"
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


class Deadline:
    """Shuts down every socket registered with it once ``seconds`` have passed (a blocked read then
    returns or raises at once); ``cancel`` when the download is over."""

    def __init__(self, seconds: float):
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if not self.expired:
                return
        _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._sockets)
        for sock in socks:
            _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.add(self.sock)


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, deadline: Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()  # the TLS socket: shutting it down ends a stalled handshake's reads as well
        self._deadline.add(self.sock)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self._deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self._deadline = deadline

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self._deadline), req,
                            context=self._context)


def open_with_deadline(request: urllib.request.Request, *, timeout: float, deadline: Deadline):
    """``urlopen`` whose sockets (each redirect's too) the ``deadline`` shuts down when it expires."""
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
    return opener.open(request, timeout=timeout)


def download_with_deadline(row, timeout, user_agent_token, disallowed_header_directives, *, stall_timeout: float):
    """img2dataset's ``download_image`` with a deadline on the whole download, not only on each read."""
    from img2dataset.downloader import is_disallowed

    key, url = row
    start = time.monotonic()
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"

    def stalled() -> tuple:
        return key, None, f"{STALLED}: no complete response after {time.monotonic() - start:.1f} s " \
                          f"(--stall-timeout {stall_timeout:g})"

    deadline = Deadline(stall_timeout)
    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        # no single read may outlast the deadline either
        with open_with_deadline(request, timeout=min(timeout, stall_timeout), deadline=deadline) as r:
            if disallowed_header_directives and is_disallowed(r.headers, user_agent_token,
                                                              disallowed_header_directives):
                return key, None, "Use of image disallowed by X-Robots-Tag directive"
            body = io.BytesIO()
            while True:
                if time.monotonic() - start > stall_timeout:
                    return stalled()
                chunk = r.read1(65536)
                if not chunk:
                    break
                body.write(chunk)
        if deadline.expired:  # the watchdog's shutdown reads as the end of the body: it is cut off
            return stalled()
        body.seek(0)
        return key, body, None
    except Exception as err:  # noqa: BLE001 (img2dataset's contract: the error becomes the row's message)
        if deadline.expired or time.monotonic() - start >= stall_timeout:
            return stalled()
        return key, None, str(err)
    finally:
        deadline.cancel()


class GuardedDownloader(Downloader):
    """img2dataset's Downloader whose worker downloads each URL under ``download_with_deadline``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall_timeout = STALL_TIMEOUT

    def __call__(self, row):
        if self.stall_timeout > 0:
            import functools

            import img2dataset.downloader as i2d_downloader

            # in the worker process: img2dataset's retry loop looks the function up at call time
            i2d_downloader.download_image = functools.partial(download_with_deadline,
                                                              stall_timeout=self.stall_timeout)
        return super().__call__(row)
