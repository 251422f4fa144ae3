"""``capcurate ingest PATH -o DATASET``: adopt images that are already on disk into the dataset layout.

Three kinds of input, detected automatically (or named with ``kind``):
  img2dataset  a folder img2dataset wrote (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json): tars are
               copied (or hard-linked) as they are, the manifest is built as ``download`` builds it
  webdataset   one tar or a folder of tars with jpg/jpeg/png/webp (+ txt/json) members: one output
               shard per input tar, every sample re-keyed to a safe key (the old key is kept in
               ``source_key``), bytes copied without re-encoding
  images       a folder of image files with optional sidecar ``<name>.txt`` captions, re-sharded into
               tars of ``samples_per_shard``

Each output shard is one ShardJob (tar first, then samples/NNNNN.parquet as the completion marker), so
an interrupted ingest resumes and ``--part i/N`` splits the work.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic, storage
from ..dataset import Dataset, samples_schema
from ..engines import check_max_retries, connect_engine, run_job
from ..engines.paths import cluster_path
from ..errors import InputError
from ..images import DEFAULT_MAX_PIXELS
from ..shards import IMAGE_EXTS, TarShardWriter, index_tar
from ..summary import Summary
from ..uid import keep_first, make_uid
from ..uid_index import FirstSeen, SeenBefore
from .download.header import inspect_header
from .download.manifest import build_samples, finished_shards

KINDS = ("auto", "img2dataset", "webdataset", "images")
EXTRA = {"source_key": "string", "source": "string"}


def _store_listing(root: Any) -> list[str]:
    """Every file under a store prefix, as names relative to it (one recursive listing), hidden ones left out."""
    base = root.path.rstrip("/") + "/"
    names = [p[len(base):] for p in root.fs.find(root.path) if p.startswith(base)]
    return sorted(n for n in names if not any(part.startswith(".") for part in n.split("/")))


def _rel(src: Any, root: Any) -> str:
    """``src``'s name relative to the input root (its own name when the input is that one file)."""
    if str(src) == str(root):
        return src.name
    return str(src)[len(str(root).rstrip("/")) + 1:]


def detect_kind(path: Any) -> str:
    if storage.is_remote(path):
        if path.is_file():
            if path.suffix.lower() == ".tar":
                return "webdataset"
            raise InputError(f"{path}: expected a prefix, or a .tar file of webdataset shards")
        names = _store_listing(path)
        if not names:
            raise InputError(f"{path} does not exist (nothing under that prefix)")
        if any("/" not in n and n.endswith("_stats.json") for n in names) and any(
                "/" not in n and n.endswith(".tar") for n in names):
            return "img2dataset"
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        if any(n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS for n in names):
            return "images"
        raise InputError(f"{path}: found no img2dataset output, .tar shards or image files "
                         f"({', '.join(IMAGE_EXTS)})")
    if path.is_file():
        if path.suffix.lower() == ".tar":
            return "webdataset"
        raise InputError(f"{path}: expected a folder, or a .tar file of webdataset shards")
    if not path.is_dir():
        raise InputError(f"{path} does not exist")
    if any(path.glob("*_stats.json")) and any(path.glob("*.tar")):
        return "img2dataset"
    if any(path.rglob("*.tar")):
        return "webdataset"
    if any(p.suffix.lower().lstrip(".") in IMAGE_EXTS for p in path.rglob("*") if p.is_file()):
        return "images"
    raise InputError(f"{path}: found no img2dataset output, .tar shards or image files "
                     f"({', '.join(IMAGE_EXTS)})")


def _image_files(root: Any) -> list[Any]:
    if storage.is_remote(root):
        return [root / n for n in _store_listing(root) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                files.append(Path(dirpath) / f)
    return files


def _manifest_row(uid: str, key: str, shard: str, url: str | None, caption: str | None, status: str,
                  error: str | None, w: int | None, h: int | None, sha: str | None,
                  source_key: str, source: str) -> dict[str, Any]:
    return {"uid": uid, "key": key, "shard": shard, "url": url, "caption": caption, "status": status,
            "error_message": error, "width": w, "height": h, "original_width": w, "original_height": h,
            "sha256": sha, "source_key": source_key, "source": source}


@dataclass
class IngestJob:
    """One output shard per call; the samples parquet written last marks it finished."""

    ds: Dataset
    kind: str
    inputs: dict[str, Any]          # shard id -> input tar path / list of image paths / img2dataset shard
    root: Path
    uid_col: str = "uid"
    link: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    _schema: Any = field(default=None, repr=False)
    # uid -> first input shard, on local disk: filled once per process, in shard order (capcurate.uid_index)
    _index: FirstSeen | None = field(default=None, repr=False)
    _order: list[str] = field(default_factory=list, repr=False)
    _cursor: int = 0  # every input shard before _order[_cursor] is in _index
    _seen: Any = field(default=None, repr=False)  # SeenBefore of the shard being written

    def __getstate__(self) -> dict[str, Any]:
        # a job travels to Ray actors before it runs; each process builds its own index
        return {**self.__dict__, "_index": None, "_order": [], "_cursor": 0, "_seen": None}

    def output_path(self, shard_id: str) -> Path:
        return self.ds.samples_path(shard_id)

    def is_done(self, shard_id: str) -> bool:
        """A manifest that is there but not a readable Parquet file (0 bytes, garbage: damage from
        outside capcurate, whose own writes are atomic) does not finish its shard: it is written again.
        Asked only for the shards the listing shows (one footer read each, at resume)."""
        try:
            storage.read_metadata(self.ds.samples_path(shard_id))
        except Exception:  # noqa: BLE001 - gone, or pyarrow's ArrowInvalid/OSError for a file that is not Parquet
            return False
        return True

    def setup(self) -> None:
        import pyarrow as pa

        self._schema = samples_schema({k: getattr(pa, v)() for k, v in EXTRA.items()})

    def process(self, shard_id: str) -> dict[str, int]:
        self._seen = self.uids_before(shard_id)
        if self.kind == "img2dataset":
            counts = self._adopt_img2dataset(shard_id)
        elif self.kind == "webdataset":
            counts = self._rewrite_tar(shard_id, storage.path(self.inputs[shard_id]))
        else:
            return self._pack_images(shard_id, self.inputs[shard_id])
        if self._index is not None and shard_id not in self._index.shards:
            # every input uid of this shard went through _seen: a later shard need not read it again
            self._index.add(shard_id, self._seen.own)
        return counts

    # -- repeated uids: the first occurrence in (shard, row) order is kept -------------------------
    def close(self) -> None:
        """Remove this process's uid index (a scratch file)."""
        if self._index is not None:
            self._index.close()
            self._index = None

    def uids_before(self, shard_id: str) -> SeenBefore:
        """The uids of every input row of the shards before ``shard_id``, read from the inputs (not from
        the dataset: another --part may be writing those shards now), so any part decides alike. Each
        input shard is read once per process into an on-disk index; each uid is then one lookup."""
        if self.kind == "images":  # uid = hash(relative path, caption): never repeated
            return SeenBefore(None, shard_id)
        if self._index is None:
            self._index, self._order, self._cursor = FirstSeen(), sorted(self.inputs), 0
        while self._cursor < len(self._order) and self._order[self._cursor] < shard_id:
            sid = self._order[self._cursor]
            if sid not in self._index.shards:
                self._index.add(sid, self._read_input_uids(sid))
            self._cursor += 1
        return SeenBefore(self._index, shard_id)

    def _read_input_uids(self, sid: str) -> list[str]:
        if self.kind == "img2dataset":
            return build_samples(self.root / f"{sid}.parquet", sid, uid_col=self.uid_col).column("uid").to_pylist()
        src = storage.path(self.inputs[sid])
        rel = _rel(src, self.root)
        uids = []
        with storage.open_read(src) as fh:
            def read(ref) -> bytes:
                fh.seek(ref.offset)
                return fh.read(ref.size)

            for key, members in group_by_last_dot(index_tar(src).samples).items():
                if any(e in members for e in IMAGE_EXTS):
                    meta, caption = _meta_and_caption(members, read, Counter())
                    uids.append(self._uid(meta, caption, f"{rel}/{key}"))
        return uids

    def _uid(self, meta: dict[str, Any], caption: str | None, source: str) -> str:
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
        given = meta.get(self.uid_col)
        return str(given) if given not in (None, "") else make_uid(url or source, caption)

    # -- the three kinds ---------------------------------------------------------------------------
    def _adopt_img2dataset(self, sid: str) -> dict[str, int]:
        src_tar = self.root / f"{sid}.tar"
        dst = self.ds.shard_path(sid)
        with atomic.atomic_path(dst) as tmp:
            if storage.is_remote(src_tar):  # one GET into the temp that is then committed
                src_tar.fs.get_file(src_tar.path, str(tmp))
            else:
                try:
                    if not self.link:
                        raise OSError("copy requested")
                    os.link(src_tar, tmp)
                except OSError:  # other filesystem, or no --link: copy
                    shutil.copyfile(src_tar, tmp)
        table = build_samples(self.root / f"{sid}.parquet", sid, uid_col=self.uid_col)
        n = table.num_rows
        table = table.filter(keep_first(table.column("uid").to_pylist(), self._seen))
        atomic.write_parquet(self.ds.samples_path(sid), table)
        ok = sum(1 for s in table.column("status").to_pylist() if s == "success")
        return {"samples": table.num_rows, "ok": ok, "failed": table.num_rows - ok,
                "duplicate_uids": n - table.num_rows}

    def _add(self, writer: TarShardWriter, rows: list, counts: Counter, sid: str, source_key: str,
             source: str, data: bytes, ext: str, caption: str | None, meta: dict[str, Any]) -> None:
        key = f"{sid}{len(rows):06d}"  # digits only: no dots, no path parts, unique in the dataset
        url = meta.get("url") if isinstance(meta.get("url"), str) else None
        uid = self._uid(meta, caption, source)
        if uid in self._seen:  # a repeated input row: counted, kept once (its first occurrence)
            counts["duplicate_uids"] += 1
            return
        self._seen.add(uid)
        problem, _fmt, w, h = inspect_header(data, self.max_pixels)
        if problem:
            counts["bad_images"] += 1
            rows.append(_manifest_row(uid, key, sid, url, caption, "failed_to_decode", problem, None, None,
                                      None, source_key, source))
            return
        ext = "jpg" if ext == "jpeg" else ext
        info = {"uid": uid, "key": key, "url": url, "caption": caption, "source": source}
        members = {ext: data, "txt": (caption or "").encode("utf-8"), "json": json.dumps(info).encode()}
        writer.write(key, members)
        counts["ok"] += 1
        rows.append(_manifest_row(uid, key, sid, url, caption, "success", None, w, h,
                                  hashlib.sha256(data).hexdigest(), source_key, source))

    def _finish(self, sid: str, rows: list, counts: Counter) -> dict[str, int]:
        import pyarrow as pa

        atomic.write_parquet(self.ds.samples_path(sid), pa.Table.from_pylist(rows, schema=self._schema))
        counts["samples"] += len(rows)
        counts["failed"] += len(rows) - counts["ok"]
        return dict(counts)

    def _rewrite_tar(self, sid: str, src: Path) -> dict[str, int]:
        idx = index_tar(src)
        counts: Counter = Counter(truncated_tars=int(idx.truncated))
        rows: list[dict[str, Any]] = []
        rel = _rel(src, self.root)
        with TarShardWriter(self.ds.shard_path(sid)) as writer, storage.open_read(src) as fh:
            def read(ref) -> bytes:
                fh.seek(ref.offset)
                return fh.read(ref.size)

            for key, members in group_by_last_dot(idx.samples).items():
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                counts["non_image_members"] += sum(1 for e in members if e not in (*IMAGE_EXTS, "txt", "json"))
                if ext is None:
                    counts["samples_without_image"] += 1
                    continue
                meta, caption = _meta_and_caption(members, read, counts)
                self._add(writer, rows, counts, sid, key, f"{rel}/{key}", read(members[ext]), ext,
                          caption, meta)
        return self._finish(sid, rows, counts)

    def _pack_images(self, sid: str, files: list[str]) -> dict[str, int]:
        counts: Counter = Counter()
        rows: list[dict[str, Any]] = []
        with TarShardWriter(self.ds.shard_path(sid)) as writer:
            for rel in files:
                path = self.root / rel
                sidecar = path.with_suffix(".txt")
                caption = (sidecar.read_text(encoding="utf-8", errors="replace").strip()
                           if sidecar.is_file() else None)
                try:
                    data = path.read_bytes()
                except OSError as e:
                    counts["unreadable_files"] += 1
                    rows.append(_manifest_row(make_uid(rel, caption), f"{sid}{len(rows):06d}", sid, rel,
                                              caption, "failed_to_read", str(e), None, None, None, rel, rel))
                    continue
                self._add(writer, rows, counts, sid, rel, rel, data, path.suffix.lower().lstrip("."),
                          caption, {"url": rel})
        return self._finish(sid, rows, counts)


def _meta_and_caption(members: dict[str, Any], read: Any, counts: Counter) -> tuple[dict[str, Any], str | None]:
    """A webdataset sample's json metadata (a dict) and caption (its .txt, else the json's 'caption')."""
    meta: dict[str, Any] = {}
    if "json" in members:
        try:
            loaded = json.loads(read(members["json"]))
            meta = loaded if isinstance(loaded, dict) else {}
        except ValueError:
            counts["bad_json_members"] += 1
    caption = None
    if "txt" in members:
        caption = read(members["txt"]).decode("utf-8", errors="replace").strip()
    elif isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    return meta, caption


def group_by_last_dot(samples: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Regroup members by the name up to the LAST dot, in file order.

    webdataset splits at the first dot, so "photo.2021.jpg" and "photo.2021.txt" would be fields
    "2021.jpg"/"2021.txt" of key "photo" and no image would be found; file names with dots are common
    in shards made by hand, so ingest keys samples by the full stem.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, members in samples.items():
        for ext, ref in members.items():
            stem, _, last = f"{key}.{ext}".rpartition(".")
            out.setdefault(stem, {})[last.lower()] = ref
    return out


def plan_inputs(path: Path, kind: str, samples_per_shard: int) -> dict[str, Any]:
    """Output shard id -> what that shard reads."""
    if kind == "img2dataset":
        return {sid: sid for sid in finished_shards(path)}
    if kind == "webdataset":
        if path.is_file():
            tars = [path]
        elif storage.is_remote(path):
            tars = [path / n for n in _store_listing(path) if n.endswith(".tar")]
        else:
            tars = sorted(p for p in path.rglob("*.tar") if p.is_file())
        return {f"{i:05d}": str(t) for i, t in enumerate(tars)}
    files = [_rel(p, path) for p in _image_files(path)]
    return {f"{i // samples_per_shard:05d}": files[i:i + samples_per_shard]
            for i in range(0, len(files), samples_per_shard)}


def ingest(
    path: str | Path,
    output: str | Path,
    *,
    kind: str = "auto",
    samples_per_shard: int = 10000,
    uid_col: str = "uid",
    link: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    engine: str = "local",
    part: str | None = None,
    force: bool = False,
    overwrite: bool = False,
    max_retries: int = 2,
) -> Summary:
    """Adopt an img2dataset folder, webdataset tars or an image folder into a dataset directory."""
    t0 = time.perf_counter()
    check_max_retries(max_retries)
    if engine == "ray":  # actors do not share the driver's working directory: no relative paths
        path, output = cluster_path(path), cluster_path(output)
    path = storage.path(path)
    if kind not in KINDS:
        raise InputError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if samples_per_shard < 1:
        raise InputError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    if not path.exists():
        raise InputError(f"{path} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    root = path.parent if path.is_file() else path
    inputs = plan_inputs(path, kind, samples_per_shard)
    if not inputs:
        raise InputError(f"{path}: no {kind} input found to ingest (nothing was written)")

    connect_engine(engine)  # a Ray cluster that does not answer: one line, nothing written
    source = {"kind": kind, "path": str(path) if storage.is_remote(path) else str(path.resolve())}
    ds = Dataset.create(output, force=force, sources=[source])
    params = {"path": source["path"], "kind": kind, "uid_col": uid_col, "max_pixels": max_pixels,
              **({"samples_per_shard": samples_per_shard} if kind == "images" else {})}
    entry = ds.claim_images("ingest", params, overwrite=overwrite)
    for d in (ds.shards_dir, ds.samples_dir):
        atomic.clean_stale_temps(d)
    job = IngestJob(ds, kind, inputs, root, uid_col=uid_col, link=link, max_pixels=max_pixels)
    try:
        result = run_job(job, list(inputs), engine=engine, part=part, description=f"ingest {kind}",
                         max_retries=max_retries)
    finally:
        job.close()
    counts = {"kind": kind, **result.to_dict()}
    counts.pop("failed_shards", None)
    ds.card.finish_entry(entry, counts)
    con = ds.connect()
    try:
        total, ok = con.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'success') FROM manifest").fetchone()
    finally:
        con.close()
    details = {"dataset": str(ds.root), "dataset_samples": total, "dataset_images": ok}
    if result.failed:
        details["failed_shards"] = result.failed
    message = f"ingested {kind} from {path}: the dataset now has {ok:,} images"
    if counts.get("duplicate_uids"):
        message += (f"; {counts['duplicate_uids']:,} repeated input row(s) (a uid seen before) were "
                    "kept once")
    return Summary(stage="ingest", ok=not result.failed, counts=counts, details=details,
                   seconds=time.perf_counter() - t0, message=message)
