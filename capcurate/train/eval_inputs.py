"""An eval set as shards of the one image input pipeline (``capcurate.inputs.ImageStream``).

The stream reads images from local tars by member offset, so ``eval_works`` turns any eval set into
local tars plus, per row, its label and its texts:

- webdataset (clip_benchmark's layout): its own tars, indexed once; only the small ``.cls``/``.txt``
  members are read here, the images are read by the stream's workers. Tars in object storage are first
  staged (downloaded once) into a scratch folder, as score stages a dataset's tars.
- Parquet: the images (bytes or files beside it) are packed into one tar in the scratch folder.

Rows are numbered in the order the serial reader (``EvalSet.samples``) yields them; the stream echoes
each row's number back, so embeddings are put back in that order and metrics do not depend on how the
workers interleave.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .. import storage
from ..errors import InputError
from ..inputs import ShardWork
from ..shards import index_tar
from .evalset import EvalSet


@dataclass
class EvalWorks:
    """What the stream needs (``works``) and what each row means (``labels``, ``texts``, by row number)."""

    works: list[ShardWork] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)      # -1: unlabelled
    texts: list[list[str]] = field(default_factory=list)

    def add(self, label: int | None, texts: list[str]) -> str:
        """Register one row; returns its id (the row number as a string, what the stream echoes)."""
        self.labels.append(-1 if label is None else int(label))
        self.texts.append(texts)
        return str(len(self.labels) - 1)


def _lines(data: bytes) -> list[str]:
    return [x.strip() for x in data.decode("utf-8", "replace").splitlines() if x.strip()]


def eval_tars(root: Any) -> list[Any]:
    """The webdataset layout's tars in clip_benchmark's order: ``0..nshards-1`` when nshards.txt says so,
    else every tar of ``test/`` sorted by name."""
    split = root / "test"
    names = storage.list_names(split) if storage.is_remote(split) else {p.name for p in split.iterdir()}
    n = _lines((split / "nshards.txt").read_bytes()) if "nshards.txt" in names else []
    return [split / f"{i}.tar" for i in range(int(n[0]))] if n else [split / t for t in sorted(names) if t.endswith(".tar")]


def _add_tar(out: EvalWorks, tar: str, shard_id: str) -> None:
    idx = index_tar(tar)
    entries = []
    with open(tar, "rb") as fh:
        for key, members in idx.samples.items():
            ext = idx.image_ext(key)
            if ext is None:  # the serial reader skips these too
                continue
            label = int(idx.read(key, "cls", fh).decode().strip()) if "cls" in members else None
            texts = _lines(idx.read(key, "txt", fh)) if "txt" in members else []
            entries.append((out.add(label, texts), key))
    out.works.append(ShardWork(shard_id, tar, entries))


def _pack_parquet(out: EvalWorks, root: Any, scratch: str) -> None:
    import pyarrow.parquet as pq

    from ..shards import TarShardWriter

    table = storage.read_table(root / "test.parquet") if storage.is_remote(root) else pq.read_table(root / "test.parquet")
    if "image" not in table.column_names:
        raise InputError(f"{root / 'test.parquet'} needs an 'image' column; found {', '.join(table.column_names)}")
    tar = f"{scratch}/images.tar"
    entries = []
    with TarShardWriter(tar) as w:
        for i, row in enumerate(table.to_pylist()):
            img = row["image"]
            if isinstance(img, bytes):
                data = img
            else:
                try:
                    data = (root / img).read_bytes()
                except FileNotFoundError:
                    raise InputError(f"eval image {img!r} listed in {root / 'test.parquet'} does not exist") from None
            caps = row.get("caption")
            texts = [caps] if isinstance(caps, str) else list(caps or [])
            key = f"{i:09d}"
            # the member name only has to be an image extension: decoding reads the format from the bytes
            w.write(key, {"jpg": data})
            entries.append((out.add(row.get("label"), [t for t in texts if t]), key))
    out.works.append(ShardWork("parquet", tar, entries))


@contextmanager
def eval_works(eval_set: EvalSet, scratch: str | None = None) -> Iterator[EvalWorks]:
    """The eval set as stream works; staged or packed tars live in a temp folder under ``scratch`` (default:
    the system temp dir) that is removed on exit."""
    from ..inputs.stream import stage_tar

    folder: str | None = None

    def temp() -> str:
        nonlocal folder
        if folder is None:
            folder = tempfile.mkdtemp(prefix="capcurate-eval-", dir=scratch)
        return folder

    try:
        out = EvalWorks()
        if eval_set.layout == "parquet":
            _pack_parquet(out, eval_set.root, temp())
        else:
            for i, tar in enumerate(eval_tars(eval_set.root)):
                local = stage_tar(str(tar), temp()) if storage.is_remote(tar) else str(tar)
                _add_tar(out, local, str(i))
        yield out
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
