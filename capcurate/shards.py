"""Byte-level reading and writing of webdataset tar shards.

Reading builds an index of member offsets once, so DataLoader workers can fetch any sample's bytes
with one seek+read (no tar parsing per sample, no decoding in the main process). Truncated or
corrupt tars yield what is readable and say what was lost; they never raise mid-run.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import storage
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

    path: Path  # or a UPath: a tar in object storage
    samples: dict[str, dict[str, MemberRef]] = field(default_factory=dict)
    truncated: bool = False
    error: str | None = None

    def image_ext(self, key: str) -> str | None:
        members = self.samples.get(key, {})
        return next((e for e in IMAGE_EXTS if e in members), None)

    def read(self, key: str, ext: str, fh: io.BufferedReader | None = None) -> bytes:
        """One member's bytes: from ``fh`` (``storage.open_read(path)``) when given, else one ranged read."""
        ref = self.samples[key][ext]
        if fh is None:
            return storage.read_range(self.path, ref.offset, ref.size)
        fh.seek(ref.offset)
        return fh.read(ref.size)


def index_tar(path: str | os.PathLike) -> ShardIndex:
    """Index a tar shard; a truncated or corrupt tar gives the members before the damage."""
    path = storage.path(path)
    idx = ShardIndex(path)
    file_size = storage.size(path)  # a missing tar raises FileNotFoundError, as before
    try:
        with storage.open_read(path) as src, tarfile.open(fileobj=src, mode="r:") as tf:
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
        with storage.open_read(path) as src, tarfile.open(fileobj=src, mode="r|") as tf:
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


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte header tarfile writes for a regular file (USTAR, mode 0644, owner 0 and '', mtime 0).

    Filled into a template (name, size, checksum) because ``TarInfo.tobuf`` costs ~25 us a member; a name
    over 100 bytes (tarfile splits it into prefix/name) or a size of 8 GiB or more goes through tarfile.
    """
    name_b = name.encode(tarfile.ENCODING, "surrogateescape")
    if len(name_b) > 100 or size >= 8**11:
        return _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
    buf = bytearray(_HEADER_TEMPLATE)  # its checksum field is 8 spaces, as the checksum rule counts it
    buf[: len(name_b)] = name_b
    buf[124:136] = b"%011o\0" % size
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
    return info


_HEADER_TEMPLATE = bytearray(_tarinfo("", 0).tobuf(tarfile.USTAR_FORMAT))
_HEADER_TEMPLATE[148:156] = b" " * 8
_ZEROS = memoryview(bytes(2 * tarfile.BLOCKSIZE))
_IOV_MAX = 1024


def _padding(size: int) -> memoryview:
    return _ZEROS[: -size % tarfile.BLOCKSIZE]


def _pwrite_all(fd: int, bufs: list, offset: int) -> None:
    """pwritev in chunks of at most IOV_MAX buffers, finishing any short write."""
    for i in range(0, len(bufs), _IOV_MAX):
        chunk = bufs[i : i + _IOV_MAX]
        size = sum(map(len, chunk))
        done = os.pwritev(fd, chunk, offset)
        if done < size:  # rare (a signal): write the rest plainly
            rest = memoryview(b"".join(chunk))[done:]
            while rest:
                n = os.pwrite(fd, rest, offset + done)
                rest, done = rest[n:], done + n
        offset += size


class TarShardWriter:
    """Write one tar shard atomically with reproducible headers (same input -> same bytes).

    The bytes are those of ``tarfile`` in USTAR format (mode 0644, mtime 0, empty owner names), written
    without it: one header from a template and one ``pwritev`` per sample (header, data, padding of every
    member), which is what makes copying 100 KB images cost little more than the copy itself.

    ``write`` appends samples in order. ``write_at`` puts a sample at a byte offset computed beforehand with
    ``sample_span``, so a caller that knows every sample's size can fill a shard in any order (``capcurate
    shard`` writes in the order it reads the sources); it must fill every span up to the end it uses, or
    the tar has a hole of zeros where a reader stops.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = storage.path(path)
        self._ctx = atomic_path(self.path)
        self._tmp = self._ctx.__enter__()
        self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        self._end = 0  # where the next appended sample goes; the trailer goes after the furthest sample
        self.count = 0
        self.bytes = 0

    @staticmethod
    def sample_span(sizes: Iterable[int]) -> int:
        """Bytes a sample takes in the tar, from the sizes of its members."""
        return sum(tarfile.BLOCKSIZE + size + (-size % tarfile.BLOCKSIZE) for size in sizes)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        self.write_at(self._end, key, members)

    def write_at(self, offset: int, key: str, members: dict[str, bytes]) -> None:
        bufs = []
        for ext, data in members.items():
            bufs += (ustar_header(f"{key}.{ext}", len(data)), data, _padding(len(data)))
            self.bytes += len(data)
        _pwrite_all(self._fd, bufs, offset)
        self._end = max(self._end, offset + sum(map(len, bufs)))
        self.count += 1

    def close(self) -> None:
        # tarfile's end of archive: two zero blocks, then zeros up to a multiple of its 10240-byte record
        end = self._end + 2 * tarfile.BLOCKSIZE
        record_pad = -end % tarfile.RECORDSIZE
        try:
            _pwrite_all(self._fd, [_ZEROS, bytes(record_pad)], self._end)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        os.close(self._fd)
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    def __enter__(self) -> TarShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
