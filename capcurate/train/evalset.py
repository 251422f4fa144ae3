"""Reading an evaluation set: clip_benchmark's webdataset layout, or Parquet + an images folder.

    EVAL/test/0.tar ... (+ nshards.txt)   members <key>.jpg|png|webp, <key>.cls, <key>.txt
    EVAL/test.parquet                    columns image (path relative to EVAL, or bytes), label, caption
    EVAL/classnames.txt                  one class name per line (zero-shot classification)
    EVAL/zeroshot_classification_templates.txt   one template per line with {c}

EVAL may be a URL (``s3://bucket/evalsets/x``): its folders are listed once, text files read whole, tars
streamed front to back and Parquet read through ``storage``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import storage
from ..errors import InputError
from ..shards import IMAGE_EXTS, iter_samples

DEFAULT_TEMPLATES = ["a photo of a {c}.", "a {c}."]


@dataclass
class EvalSample:
    image: bytes
    label: int | None
    texts: list[str]


@dataclass
class EvalSet:
    root: Any  # a local Path, or a UPath for a URL
    name: str
    classnames: list[str]
    templates: list[str]
    layout: str  # "webdataset" | "parquet"

    def samples(self) -> Iterator[EvalSample]:
        if self.layout == "parquet":
            yield from _parquet_samples(self.root)
        else:
            yield from _wds_samples(self.root)


def _lines(path: Any, listed: set[str] | None = None) -> list[str]:
    """The non-empty lines of a text file; [] when it does not exist (``listed``: the names of its folder,
    from one listing, so a store is not asked about each file)."""
    if storage.is_remote(path):
        if listed is not None and path.name not in listed:
            return []
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [x.strip() for x in text.splitlines() if x.strip()]
    return [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.is_file() else []


def open_eval_set(path: str | Path, split: str = "test") -> EvalSet:
    root = storage.path(path)
    if storage.is_remote(root):
        return _open_remote(root, split)
    if not root.is_dir():
        raise InputError(f"eval set {root} is not a directory")
    if (root / split).is_dir() and any((root / split).glob("*.tar")):
        layout = "webdataset"
    elif (root / f"{split}.parquet").is_file():
        layout = "parquet"
    else:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:8]) or "nothing"
        raise InputError(f"eval set {root}: expected {split}/*.tar (clip_benchmark webdataset) or "
                         f"{split}.parquet; found {found}")
    return _eval_set(root, layout)


def _open_remote(root: Any, split: str) -> EvalSet:
    entries = set(storage.list_entries(root))
    if split in entries and storage.list_names(root / split, ".tar"):
        layout = "webdataset"
    elif f"{split}.parquet" in entries:
        layout = "parquet"
    else:
        if not entries:
            storage.check_container(root)
            raise InputError(f"eval set {root} does not exist (nothing under that prefix)")
        found = ", ".join(sorted(entries)[:8])
        raise InputError(f"eval set {root}: expected {split}/*.tar (clip_benchmark webdataset) or "
                         f"{split}.parquet; found {found}")
    return _eval_set(root, layout, entries)


def _eval_set(root: Any, layout: str, listed: set[str] | None = None) -> EvalSet:
    templates = _lines(root / "zeroshot_classification_templates.txt", listed) or DEFAULT_TEMPLATES
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise InputError(f"template {bad[0]!r} has no {{c}} placeholder for the class name")
    return EvalSet(root, root.name, _lines(root / "classnames.txt", listed), templates, layout)


def _wds_samples(root: Any) -> Iterator[EvalSample]:
    split = root / "test"
    if storage.is_remote(split):
        names = storage.list_names(split)
        n = _lines(split / "nshards.txt", names)
        tars = [split / f"{i}.tar" for i in range(int(n[0]))] if n else \
            [split / t for t in sorted(x for x in names if x.endswith(".tar"))]
    else:
        n = _lines(split / "nshards.txt")
        tars = [split / f"{i}.tar" for i in range(int(n[0]))] if n else sorted(split.glob("*.tar"))
    for tar in tars:
        for _key, members in iter_samples(tar):
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                continue
            label = int(members["cls"].decode().strip()) if "cls" in members else None
            texts = _lines_of(members.get("txt", b""))
            yield EvalSample(members[ext], label, texts)


def _lines_of(data: bytes) -> list[str]:
    return [x.strip() for x in data.decode("utf-8", "replace").splitlines() if x.strip()]


def _parquet_samples(root: Any) -> Iterator[EvalSample]:
    import pyarrow.parquet as pq

    table = storage.read_table(root / "test.parquet") if storage.is_remote(root) else pq.read_table(root / "test.parquet")
    if "image" not in table.column_names:
        raise InputError(f"{root / 'test.parquet'} needs an 'image' column; found {', '.join(table.column_names)}")
    for row in table.to_pylist():
        img = row["image"]
        data = img if isinstance(img, bytes) else (root / img).read_bytes()
        caps = row.get("caption")
        texts = [caps] if isinstance(caps, str) else list(caps or [])
        yield EvalSample(data, row.get("label"), [t for t in texts if t])
