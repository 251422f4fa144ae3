"""The columns ``capcurate score`` writes, and the embedding files it keeps: pure functions over arrays.

``score_source`` / ``score_lists`` turn image embeddings and a caption column into cosine-similarity
columns (a failed image or an empty caption gives NULL); ``merge_columns`` adds them to what a shard's
file already holds; ``save_embeddings`` / ``load_image_embeddings`` keep float16 embeddings under
``embeddings/<name>/`` so a caption column added later, dedup and clustering reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import atomic, lineage, storage
from ..dataset import Dataset
from ..errors import InputError

RAW = "raw"  # the manifest's own caption, as a caption source


def resolve_sources(ds: Dataset, captions: str | list[str] | None) -> list[str]:
    """``raw`` plus the requested (default: every) captions names; unknown names list the existing ones."""
    existing = [RAW, *ds.names("captions")]
    if captions is None or captions == "" or captions == []:
        return existing
    wanted = [c.strip() for c in captions.split(",")] if isinstance(captions, str) else list(captions)
    wanted = [c for c in dict.fromkeys(wanted) if c]
    unknown = [c for c in wanted if c not in existing]
    if unknown:
        raise InputError(
            f"unknown caption column(s) {', '.join(unknown)}: this dataset has {', '.join(existing)}"
        )
    return wanted


EmbedTexts = Callable[[list[str]], dict[str, np.ndarray]]


def save_npy(path: Path, array: np.ndarray) -> None:
    with atomic.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def load_npy(path: Any) -> np.ndarray:
    """A whole .npy from a local path or a URL (one GET)."""
    if not storage.is_remote(path):
        return np.load(path)
    import io

    return np.load(io.BytesIO(storage.path(path).read_bytes()))


def load_image_embeddings(emb_dir: Path, shard_id: str, uids: list[str], samples_fp: str | None = None,
                          listed: set[str] | None = None, tar_id: str | None = None):
    """Saved (embeddings, errors) of a shard if they exist, follow the manifest's row order and were made
    from the manifest whose fingerprint is ``samples_fp`` (capcurate.lineage). ``listed``: the names in
    ``emb_dir`` from one listing (else each file is checked). ``tar_id``: the tar's current identity
    (``lineage.tar_identity``); embeddings of another tar are not reused."""
    img, order = emb_dir / f"{shard_id}.image.npy", emb_dir / f"{shard_id}.uids.parquet"
    if listed is not None:
        if not (img.name in listed and order.name in listed):
            return None
    elif not (img.exists() and order.exists()):
        return None
    try:
        table = storage.read_table(order)
        if table.column("uid").to_pylist() != uids:
            return None
    except Exception:  # missing or damaged: embed again
        return None
    recorded = lineage.recorded_in(table)
    made_from = recorded.get(lineage.SAMPLES)
    if samples_fp is not None and made_from not in (None, samples_fp):
        return None  # the same uids with other images (re-ingested): embed again
    if tar_id is not None and recorded.get(lineage.TAR, tar_id) != tar_id:
        return None  # the tar was rewritten (a repair): embed again
    try:
        emb = load_npy(img)
        if len(emb) != len(uids):
            return None
    except Exception:  # missing or damaged
        return None
    return emb.astype(np.float32), table.column("error").to_pylist()


def valid_text(text: Any) -> bool:
    return isinstance(text, str) and bool(text.strip())


def score_source(img_emb: np.ndarray, ok: np.ndarray, texts: list[Any], embed: EmbedTexts):
    """(score column, text embeddings per row) of one caption per row."""
    import pyarrow as pa

    rows = [i for i, t in enumerate(texts) if ok[i] and valid_text(t)]
    table = embed([texts[i] for i in rows])
    txt = np.zeros_like(img_emb)
    for i in rows:
        txt[i] = table[texts[i]]
    sims = np.einsum("nd,nd->n", img_emb, txt).astype(np.float32)
    mask = np.ones(len(texts), bool)
    mask[rows] = False
    return pa.array(sims, pa.float32(), mask=mask), txt

def score_lists(img_emb: np.ndarray, ok: np.ndarray, lists: list[list[Any]], embed: EmbedTexts):
    """(scores list column, index of the best caption, text embeddings [rows, k, d]) of several per row."""
    import pyarrow as pa

    k = max((len(c) for c in lists), default=0)
    flat = [t for i, c in enumerate(lists) if ok[i] for t in c if valid_text(t)]
    table = embed(flat)
    txt = np.zeros((len(lists), k, img_emb.shape[1]), np.float32)
    scores: list[list[float | None] | None] = []
    best: list[int | None] = []
    for i, caps in enumerate(lists):
        if not ok[i] or not caps:
            scores.append(None)
            best.append(None)
            continue
        row: list[float | None] = []
        for j, t in enumerate(caps):
            if valid_text(t):
                txt[i, j] = table[t]
                row.append(float(np.dot(img_emb[i], txt[i, j])))
            else:
                row.append(None)
        scores.append(row)
        valid = [(s, j) for j, s in enumerate(row) if s is not None]
        best.append(max(valid)[1] if valid else None)
    return pa.array(scores, pa.list_(pa.float32())), pa.array(best, pa.int32()), txt

def merge_columns(name: str, previous: Any, uids: list[str], columns: dict[str, Any],
                  errors: list[str | None]) -> Any:
    """The shard's table: earlier columns kept, new ones added, ``error_<name>`` rewritten."""
    import pyarrow as pa

    error_col = f"error_{name}"
    data: dict[str, Any] = {"uid": pa.array(uids, pa.string())}
    if previous is not None:
        for c in previous.column_names:
            if c not in ("uid", error_col) and c not in columns:
                data[c] = previous.column(c)
    data.update(columns)
    data[error_col] = pa.array(errors, pa.string())
    return pa.table(data)

def save_embeddings(d: Path, shard_id: str, uids: list[str], errors: list[str | None], img_emb: np.ndarray,
                    text_npys: dict[str, np.ndarray], write_images: bool,
                    inputs: dict[str, str] | None = None) -> None:
    """float16 text embeddings per source, and (once) the image embeddings with their row order."""
    import pyarrow as pa

    for source, arr in text_npys.items():
        save_npy(d / f"{shard_id}.{source}.npy", arr.astype(np.float16))
    if write_images:
        save_npy(d / f"{shard_id}.image.npy", img_emb.astype(np.float16))
        atomic.write_parquet(d / f"{shard_id}.uids.parquet",
                             lineage.stamp(pa.table({"uid": pa.array(uids, pa.string()),
                                                     "error": pa.array(errors, pa.string())}), inputs or {}))
