"""Training shards in object storage: webdataset's ``gopen`` streams ``s3://``, ``gs://``, ``az://``,
``hf://``... through fsspec (the same filesystems and credentials as ``capcurate.storage``), never through a
``pipe:aws``/``gsutil`` subprocess.

webdataset 0.2.86 knows only pipe/http(s)/gs(gsutil)/ais; any other scheme fails with "no gopen handler
defined". :func:`register_gopen` adds a handler per fsspec scheme to ``webdataset.gopen.gopen_schemes``; it
is called where a training process or a DataLoader worker opens a shard, so forked and spawned workers
both have it. http(s) keeps webdataset's curl handler (its exit statuses are what the trainer reports).

A shard is read front to back in large ranged GETs (``BLOCK_SIZE`` each, read ahead), never downloaded
whole before the first sample is yielded.
"""

from __future__ import annotations

import os
from typing import IO, Any

# the schemes streamed through fsspec (http/https/pipe/ais stay with webdataset's own handlers)
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hf")
BLOCK_SIZE = 16 * 2**20  # bytes per ranged GET while streaming a tar

_filesystems: dict[tuple[str, int], Any] = {}


def _filesystem(scheme: str) -> Any:
    """One fsspec filesystem per scheme and process (a forked worker makes its own, with its own loop)."""
    import fsspec

    from .. import storage

    key = (scheme, os.getpid())
    fs = _filesystems.get(key)
    if fs is None:
        fs = fsspec.filesystem(scheme, **storage.fs_options(scheme))
        _filesystems[key] = fs
    return fs


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset gopen handler: a sequential reader of ``url`` through fsspec."""
    from .. import storage
    from ..errors import InputError

    if mode != "rb":
        raise ValueError(f"{url}: training shards are read only (mode {mode!r})")
    scheme = storage.scheme_of(url)
    try:
        fs = _filesystem(scheme)
        path = fs._strip_protocol(url)
        return fs.open(path, "rb", block_size=BLOCK_SIZE, cache_type="readahead")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {url}") from None
    except InputError:
        raise
    except Exception as e:
        cause = storage.explain(e)
        if cause:
            raise OSError(cause) from None
        raise


def register_gopen() -> None:
    """Make ``webdataset.gopen`` stream fsspec URLs (idempotent; cheap enough to call per shard)."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module (``webdataset.gopen`` is also a function)
    for scheme in FSSPEC_SCHEMES:
        if gopen.gopen_schemes.get(scheme) is not gopen_fsspec:
            gopen.gopen_schemes[scheme] = gopen_fsspec


def shard_name(url: str) -> str:
    """The last path component of a shard's path or URL: what seeds its samples, wherever it is stored."""
    return str(url).rstrip("/").rsplit("/", 1)[-1]
