"""Write labelled sets in the two webdataset layouts the pipeline reads.

- the eval set in clip_benchmark's ``wds`` layout: ``test/{i}.tar`` with ``<key>.jpg``, ``<key>.cls``
  (class index) and ``<key>.txt`` (retrieval caption), plus ``test/nshards.txt``, ``classnames.txt`` and
  ``zeroshot_classification_templates.txt``, so ``clip_benchmark eval --dataset wds/...`` reads it too;
- a retrieval view of the same eval set (``write_retrieval_view``): clip_benchmark runs retrieval only on
  a folder whose ``dataset_type.txt`` says ``retrieval``, and classification only on one with classnames,
  so the view links the same tars under a folder of its own;
- training shards (the seed split) in the layout ``capcurate shard`` writes: ``NNNNN.tar`` with
  ``<key>.jpg/.txt/.json``, ``manifest.json`` and open_clip's ``sizes.json``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import atomic
from ..shards import TarShardWriter


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_eval_set(out_dir: str | Path, samples: Iterable[dict[str, Any]], *, classnames: list[str],
                   templates: Iterable[str], shard_size: int = 1000) -> int:
    """``samples``: dicts with key, image (bytes), cls (int), caption; returns the number of shards."""
    out = Path(out_dir)
    n = 0
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        with TarShardWriter(out / "test" / f"{i}.tar") as w:
            for s in chunk:
                w.write(s["key"], {"jpg": s["image"], "cls": str(s["cls"]).encode(), "txt": s["caption"].encode()})
        n = i + 1
    atomic.write_bytes(out / "test" / "nshards.txt", f"{n}\n".encode())
    atomic.write_bytes(out / "classnames.txt", ("\n".join(classnames) + "\n").encode())
    atomic.write_bytes(out / "zeroshot_classification_templates.txt", ("\n".join(templates) + "\n").encode())
    return n


def write_retrieval_view(eval_dir: str | Path, view_dir: str | Path, split: str = "test") -> int:
    """``view_dir/<split>/`` links each tar of ``eval_dir/<split>/`` (relative symlinks; copies where the
    filesystem has none), plus nshards.txt and ``dataset_type.txt`` = retrieval; returns the shard count."""
    import os
    import shutil

    src, dst = Path(eval_dir) / split, Path(view_dir) / split
    dst.mkdir(parents=True, exist_ok=True)
    tars = sorted(src.glob("*.tar"), key=lambda p: int(p.stem) if p.stem.isdigit() else p.stem)
    for tar in tars:
        link = dst / tar.name
        if link.is_symlink() or link.exists():
            link.unlink()
        try:
            link.symlink_to(os.path.relpath(tar, dst))
        except OSError:
            shutil.copy2(tar, link)
    atomic.write_bytes(dst / "nshards.txt", f"{len(tars)}\n".encode())
    atomic.write_bytes(Path(view_dir) / "dataset_type.txt", b"retrieval\n")
    return len(tars)


def write_training_shards(out_dir: str | Path, samples: Iterable[dict[str, Any]], *, shard_size: int = 1000,
                          source: str = "") -> int:
    """``samples``: dicts with key, image (bytes), caption, meta (json-able); returns the sample count."""
    out = Path(out_dir)
    shards = []
    for i, chunk in enumerate(_chunks(samples, shard_size)):
        name = f"{i:05d}.tar"
        with TarShardWriter(out / name) as w:
            for s in chunk:
                w.write(s["key"], {"jpg": s["image"], "txt": s["caption"].encode(),
                                   "json": json.dumps(s["meta"], sort_keys=True).encode()})
        shards.append({"name": name, "samples": len(chunk)})
    total = sum(s["samples"] for s in shards)
    atomic.write_json(out / "manifest.json", {"shards": shards, "total_samples": total, "source": source})
    atomic.write_json(out / "sizes.json", {s["name"]: s["samples"] for s in shards})
    return total
