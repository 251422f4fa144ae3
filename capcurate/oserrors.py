"""Operating-system failures a user causes, as one line and an exit code.

A full disk mid-run (or a file over the process's size limit) is the stage failing (exit 1: free space and re-run, finished shards are kept); an
output on a read-only file system or one the user may not write is bad input (exit 2). The OSError may
arrive wrapped (pyarrow, a DataLoader worker, ``raise ... from``), so the exception's chain is searched;
pyarrow's own IO errors carry no errno, only the C library's message.
"""

from __future__ import annotations

import errno

# errno -> (what happened, exit code)
KNOWN = {
    errno.ENOSPC: ("no space left on the device", 1),
    errno.EDQUOT: ("disk quota exceeded", 1),
    errno.EFBIG: ("file too large for the file system (or the process's file size limit)", 1),
    errno.EROFS: ("read-only file system", 2),
    errno.EACCES: ("permission denied", 2),
    errno.EPERM: ("operation not permitted", 2),
}
# the C library's messages, for errors that lost their errno on the way (pyarrow's ArrowIOError)
MESSAGES = {
    "no space left on device": errno.ENOSPC,
    "disk quota exceeded": errno.EDQUOT,
    "file too large": errno.EFBIG,
    "read-only file system": errno.EROFS,
    "permission denied": errno.EACCES,
}


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen and len(seen) < 20:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def explain_os_error(e: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for a disk-full or not-writable failure anywhere in ``e``'s chain, else None."""
    for x in _chain(e):
        code = _code(x)
        if code is None:
            continue
        what, exit_code = KNOWN[code]
        where = getattr(x, "filename", None) or None
        hint = "; free some space and re-run the same command (finished shards are kept)" if exit_code == 1 \
            else "; choose a location you can write to"
        return f"{what}{f': {where}' if where else ''}{hint}", exit_code
    return None


# a full disk or a read-only file system fails every shard alike: engines stop at the first
WHOLE_RUN = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _code(x: BaseException) -> int | None:
    # DuckDB's IOException (COPY ... TO) is no OSError but carries the same message
    if not isinstance(x, OSError) and type(x).__name__ != "IOException":
        return None
    code = getattr(x, "errno", None)
    if code in KNOWN:
        return code
    low = str(x).lower()
    return next((c for msg, c in MESSAGES.items() if msg in low), None)


def stops_every_shard(e: BaseException) -> bool:
    """Whether ``e`` (a shard's failure) will fail every other shard too: a full disk, a read-only output."""
    return any(_code(x) in WHOLE_RUN for x in _chain(e))


def explain_unicode_error(e: BaseException) -> str | None:
    """One line for a file that should be UTF-8 text (a card, a URL list, a config) and is not."""
    for x in _chain(e):
        if isinstance(x, UnicodeDecodeError):
            return f"a file that should be UTF-8 text is not: {x}"
    return None
