"""Which inputs a derived file was made from, and whether they are still the current ones.

Every per-shard file a stage derives from other files records, in its Parquet metadata under
``capcurate.inputs``, a fingerprint of each input file it read::

    captions/<name>/00003.parquet  {"samples": "<fp of samples/00003.parquet>",
                                    "tar": "<identity of shards/00003.tar>"}
    scores/<name>/00003.parquet    {"samples": ..., "tar": ...,
                                    "captions/blip": "<fp of captions/blip/00003.parquet>"}
    embeddings/<name>/00003.uids.parquet   {"samples": ..., "tar": ...}

A fingerprint is a hash of the input file's bytes, taken from the very bytes the stage read. A file is
*stale* when an input's current fingerprint differs from the recorded one (``ingest --overwrite`` wrote
new images, ``recaption --overwrite`` new captions); stages treat a stale file as not done and make it
again, and ``capcurate stats`` lists stale columns.

The image tar is fingerprinted apart from its manifest, because ``doctor --repair`` plus a re-ingest can
restore a byte-identical manifest over a new tar. Reading a whole tar just to hash it would double a
stage's I/O, so its fingerprint (``tar_identity``) is what changes whenever the tar is rewritten: size,
inode and mtime_ns locally, the ETag and size on a store; a missing tar has the identity ``"missing"``.

A derived file that cannot be read (0 bytes, garbage, cut off) counts as missing: its stage makes it
again (``capcurate doctor --repair`` moves such files aside first).

Files written before lineage was recorded carry no ``capcurate.inputs``; they count as fresh (nothing
says otherwise) and ``stats`` calls their lineage unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from . import storage

META_KEY = b"capcurate.inputs"
SAMPLES = "samples"
TAR = "tar"
MISSING = "missing"

_CACHE: dict[tuple, str] = {}


def captions_input(name: str) -> str:
    """The key under which a captions run is recorded as an input."""
    return f"captions/{name}"


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=12).hexdigest()


def fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint of a file's current content, or None when it does not exist."""
    path = storage.path(path)
    key = storage.version_key(path)  # a rewritten file is a new inode (rename) or a new ETag
    if key is None:
        return None
    fp = _CACHE.get(key)
    if fp is None:
        try:
            fp = fingerprint_bytes(storage.read_bytes(path))
        except FileNotFoundError:
            return None
        _CACHE[key] = fp
    return fp


def tar_identity(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a tar: it changes whenever the tar is rewritten, and never reads its bytes."""
    key = storage.version_key(path)
    if key is None:
        return MISSING
    return fingerprint_bytes(json.dumps([str(k) for k in key[1:]]).encode())


def folder_identity(folder: str | os.PathLike, suffix: str) -> str:
    """A cheap fingerprint of every ``*suffix`` file directly in ``folder`` (which files, and the identity
    of each as ``tar_identity`` takes it), from one listing: no file is read. Temps are not counted."""
    storage.settle()
    q = storage.path(folder)
    rows: list[tuple[str, str, str]] = []
    if not storage.is_remote(q):
        try:
            with os.scandir(q) as it:
                for e in it:
                    if e.name.endswith(suffix) and not e.name.startswith("."):
                        st = e.stat()
                        rows.append((e.name, f"{st.st_ino}:{st.st_mtime_ns}", str(st.st_size)))
        except (FileNotFoundError, NotADirectoryError):
            pass
    else:
        try:
            listing = q.fs.ls(q.path, detail=True, refresh=True)
        except FileNotFoundError:
            listing = []
        for info in listing:
            name = str(info.get("name", "")).rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix) and not name.startswith("."):
                tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
                rows.append((name, str(tag), str(info.get("size"))))
    return fingerprint_bytes(json.dumps(sorted(rows)).encode())


def current_fingerprint(name: str, path: str | os.PathLike) -> str | None:
    """The current fingerprint of input ``name`` at ``path`` (tars by identity, other files by content)."""
    return tar_identity(path) if name == TAR else fingerprint(path)


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> tuple[Any, str]:
    """(table, fingerprint) from one read of the file: the fingerprint is of exactly what was read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = storage.read_bytes(path)
    return pq.read_table(pa.BufferReader(data), columns=columns), fingerprint_bytes(data)


def stamp(table: Any, inputs: dict[str, str]) -> Any:
    """``table`` with ``inputs`` (input name -> fingerprint) recorded in its schema metadata."""
    meta = dict(table.schema.metadata or {})
    meta[META_KEY] = json.dumps(dict(sorted(inputs.items()))).encode()
    return table.replace_schema_metadata(meta)


def recorded_in(table: Any) -> dict[str, str]:
    """The inputs recorded in a table read from a derived file ({} when it records none)."""
    raw = (table.schema.metadata or {}).get(META_KEY)
    try:
        out = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def recorded_inputs(path: str | os.PathLike) -> dict[str, str] | None:
    """What a derived file says it was made from: None when the file is missing, {} when it does not say."""
    try:
        meta = storage.read_metadata(path).metadata or {}
    except FileNotFoundError:
        return None
    except Exception:  # 0 bytes, garbage, cut off: unreadable is as good as missing (it is made again)
        return None
    raw = meta.get(META_KEY)
    if not raw:
        return {}
    try:
        out = json.loads(raw)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def stale_inputs(recorded: dict[str, str], current: dict[str, str | os.PathLike]) -> list[str]:
    """Inputs named in ``current`` (name -> path) whose file changed since ``recorded`` was written.

    An input the record does not mention is not judged (a file from before lineage was recorded); an
    input file that is gone now counts as changed.
    """
    return [name for name, path in current.items()
            if name in recorded and recorded[name] != current_fingerprint(name, path)]


def is_fresh(path: str | os.PathLike, current: dict[str, str | os.PathLike]) -> bool:
    """Whether ``path`` exists and none of its inputs changed since it was made."""
    recorded = recorded_inputs(path)
    return recorded is not None and not stale_inputs(recorded, current)


# -- a dataset's view of freshness (for ``capcurate stats``) --------------------------------------
def staleness(ds: Any) -> dict[str, dict[str, Any]]:
    """Column -> {"stale_shards": [...], "missing_shards": [...], "unknown_shards": n} for every caption
    column (``cap_<name>``) and score column (``score_<name>_<source>``) of dataset ``ds``."""
    shard_ids = ds.shard_ids()
    out: dict[str, dict[str, Any]] = {}

    def note(col: str, sid: str, what: str) -> None:
        rec = out.setdefault(col, {"stale_shards": [], "missing_shards": [], "unknown_shards": 0})
        if what == "unknown":
            rec["unknown_shards"] += 1
        else:
            rec[f"{what}_shards"].append(sid)

    for name in ds.names("captions"):
        col = f"cap_{name}"
        out[col] = {"stale_shards": [], "missing_shards": [], "unknown_shards": 0}
        for sid in shard_ids:
            recorded = recorded_inputs(ds.family_dir("captions", name) / f"{sid}.parquet")
            if recorded is None:
                note(col, sid, "missing")
            elif not recorded:
                note(col, sid, "unknown")
            elif stale_inputs(recorded, {SAMPLES: ds.samples_path(sid), TAR: ds.shard_path(sid)}):
                note(col, sid, "stale")
    for name in ds.names("scores"):
        prefix = f"score_{name}_"
        files = {sid: ds.family_dir("scores", name) / f"{sid}.parquet" for sid in shard_ids}
        schemas = {sid: _schema_names(f) for sid, f in files.items()}
        columns = sorted({c for names in schemas.values() for c in names if c.startswith(prefix)})
        for col in columns:
            out[col] = {"stale_shards": [], "missing_shards": [], "unknown_shards": 0}
        for sid, f in files.items():
            recorded = recorded_inputs(f)
            have = schemas[sid] if recorded is not None else set()
            for col in columns:
                source = col[len(prefix):]
                current: dict[str, Any] = {SAMPLES: ds.samples_path(sid), TAR: ds.shard_path(sid)}
                if source != "raw":
                    current[captions_input(source)] = ds.family_dir("captions", source) / f"{sid}.parquet"
                if col not in have:
                    note(col, sid, "missing")
                elif not recorded:
                    note(col, sid, "unknown")
                elif stale_inputs(recorded, current):
                    note(col, sid, "stale")
    return out


def _schema_names(path: Any) -> set[str]:
    """The column names of a Parquet file; none when it is missing or unreadable."""
    try:
        return set(storage.read_schema(path).names)
    except Exception:
        return set()
