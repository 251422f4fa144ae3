"""The memory a dedup run needs: anonymous memory (what the process allocated), not mapped file pages.

The resident set (``ru_maxrss``, ``VmHWM``) also counts the pages of the memory-mapped embedding files
that the page cache happens to hold, so it grows with the pool (~15 GB at 10M x 768) although the
kernel can drop those pages at any time. ``RssAnon`` (Linux ``/proc/self/status``) counts only the
process's own allocations; the kernel keeps no peak of it, so ``AnonPeak`` samples it from a thread.
"""

from __future__ import annotations

import resource
import sys
import threading
from types import TracebackType

SAMPLE_SECONDS = 0.01


def anon_mb() -> float | None:
    """The process's resident anonymous memory now, in MiB (None where /proc does not say)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, mapped file pages included, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class AnonPeak:
    """``with AnonPeak() as m: ...`` then ``m.peak_mb``: the largest anonymous memory sampled in the block
    (every ``SAMPLE_SECONDS``, and at both ends); the resident peak where anonymous memory is not known."""

    def __init__(self, every: float = SAMPLE_SECONDS):
        self.every = every
        self.peak_mb = 0.0
        self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capcurate-anon-peak", daemon=True)

    def _sample(self) -> None:
        now = anon_mb()
        self.peak_mb = max(self.peak_mb, now if now is not None else peak_rss_mb())

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> AnonPeak:
        self._sample()
        self.start_mb = self.peak_mb
        self._thread.start()
        return self

    @property
    def grown_mb(self) -> float:
        """How far the peak rose above the memory held when the block began."""
        return self.peak_mb - self.start_mb

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def release() -> None:
    """Hand memory freed by one phase back before the next: numpy's frees go to glibc's heap, which keeps
    them unless trimmed, and Arrow's to its own pool (mimalloc/jemalloc), which the other allocator cannot
    reuse, so each phase's peak would add up rather than overlap (about 40 bytes an image at 500k images).
    ``malloc_trim`` is what Dask's workers call for the same reason; both calls are no-ops elsewhere."""
    import ctypes
    import ctypes.util

    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except Exception:  # noqa: BLE001  (an old pyarrow without release_unused: nothing to hand back)
        pass
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        _LIBC = ctypes.CDLL(name) if name else False
    if _LIBC and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


_LIBC: object = None
