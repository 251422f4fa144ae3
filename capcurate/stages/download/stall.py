"""The ``--stall-timeout`` watchdog: no URL may hold a download thread longer than that.

img2dataset's ``timeout`` bounds each socket operation, not a download: a server that trickles a byte
every few seconds (or never ends a chunked body) keeps a thread, and with it its shard and the whole
run, busy forever (img2dataset issues #74, #164, #289, #402). Here each download reads its body in
chunks against a deadline; a URL that has not finished within ``stall_timeout`` seconds is abandoned
(its socket closed) and its row recorded as failed with ``stalled: ...``, so the shard completes and the
run exits cleanly. ``download --retry-failed --only stalled`` tries those rows again later.
"""

from __future__ import annotations

import io
import time
import urllib.request

from img2dataset.downloader import Downloader

# Set by the runner in the parent process before img2dataset builds its Downloader; the value travels
# to the worker processes inside the pickled instance (0: no watchdog).
STALL_TIMEOUT = 0.0
STALLED = "stalled"
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


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

    try:
        request = urllib.request.Request(url, data=None, headers={"User-Agent": agent})
        # no single read may outlast the deadline either
        with urllib.request.urlopen(request, timeout=min(timeout, stall_timeout)) as r:
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
        body.seek(0)
        return key, body, None
    except Exception as err:  # noqa: BLE001 (img2dataset's contract: the error becomes the row's message)
        if time.monotonic() - start >= stall_timeout:
            return stalled()
        return key, None, str(err)


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
