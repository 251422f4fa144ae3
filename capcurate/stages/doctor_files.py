"""``capcurate doctor``'s checks of file kinds beyond tars and manifests, and the quarantine.

A file that cannot be read (0 bytes, garbage, cut off) is found by reading only what proves it whole:
a Parquet footer, a ``.npy`` header against the file's size. ``--repair`` moves it aside into
``.quarantine/<its path>`` (never deleted: a person may want it), so its stage finds it missing and makes
it again. The card is checked too: unreadable (repaired by a fresh card, the old one quarantined) and
lineage entries left unfinished by runs that are over (repaired by closing them).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

from .. import atomic, storage
from ..card import CARD_NAME, Card, may_be_running, new_card, now
from ..errors import DatasetError

QUARANTINE = ".quarantine"
# folders of derived files: (folder, depth) where depth 2 means <folder>/<name>/<file>
DERIVED = (("captions", 2), ("scores", 2), ("embeddings", 2), ("selections", 1), ("dedup", 1))


def parquet_problem(path: Any) -> str | None:
    """Why a Parquet file is unreadable (its footer), or None."""
    try:
        storage.read_metadata(path)
    except FileNotFoundError:
        return None  # removed meanwhile: nothing to repair
    except Exception as e:
        return f"unreadable Parquet ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"
    return None


def npy_problem(path: Any) -> str | None:
    """Why a ``.npy`` file is unreadable: a bad header, or fewer bytes than its header promises."""
    import numpy as np

    try:
        head = io.BytesIO(storage.read_range(path, 0, 4096))
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(head)
        want = head.tell() + int(np.prod(shape)) * dtype.itemsize
        have = storage.size(path)
    except FileNotFoundError:
        return None
    except Exception as e:
        return f"unreadable .npy ({type(e).__name__})"
    return None if have >= want else f"cut off: {have} of {want} bytes"


def _problem(path: Any, name: str) -> str | None:
    if name.endswith(".parquet"):
        return parquet_problem(path)
    if name.endswith(".npy"):
        return npy_problem(path)
    return None


def damaged_manifests(root: Any) -> list[tuple[str, str]]:
    """(samples/N.parquet, reason) for each manifest that cannot be read."""
    folder = root / "samples"
    return [(f"samples/{n}", why) for n in sorted(storage.list_names(folder, ".parquet"))
            if not n.startswith(".") and (why := parquet_problem(folder / n)) is not None]


def _derived_files(root: Any) -> list[str]:
    """Paths (relative to ``root``) of every file under the derived folders, hidden ones and .quarantine
    left out: one recursive listing of the dataset on a store (each missing prefix would cost its own
    requests), a walk of each folder locally."""
    tops = tuple(f"{top}/" for top, _ in DERIVED)
    if storage.is_remote(root):
        storage.settle()
        try:
            found = root.fs.find(root.path)
        except FileNotFoundError:
            return []
        prefix = str(root.path).rstrip("/") + "/"
        rels = [f[len(prefix):] for f in found if f.startswith(prefix)]
    else:
        rels = [os.path.relpath(os.path.join(d, n), root) for top, _ in DERIVED
                for d, _, names in os.walk(root / top) for n in names]
    return sorted(r for r in rels if r.startswith(tops) and not any(p.startswith(".") for p in r.split("/")))


def damaged_derived(root: Any) -> list[tuple[str, str]]:
    """(relative path, reason) for each captions, scores, embeddings, selection or dedup file that cannot
    be read."""
    depth = dict(DERIVED)
    return [(rel, why) for rel in _derived_files(root) if rel.count("/") == depth[rel.split("/", 1)[0]]
            and (why := _problem(root / rel, rel)) is not None]


def card_problem(root: Any) -> str | None:
    """Why the card cannot be read, or None (a missing card is not this check's business)."""
    card = Card(root)
    if not card.exists():
        return None
    try:
        card.read()
    except DatasetError as e:
        return str(e)
    return None


def unfinished_runs(card: Card) -> list[tuple[str, str]]:
    """(entry id, what) for lineage entries left unfinished by runs that are over (killed, lost)."""
    return [(e["id"], f"{e.get('stage')} {e.get('family')}/{e.get('name')} started {e.get('started')}, "
                      "its process is gone")
            for e in card.read().get("lineage", []) if e.get("finished") is None and not may_be_running(e)]


def quarantine(root: Any, rel: str) -> str:
    """Move ``root/rel`` to ``root/.quarantine/rel`` (a number added if that is taken); returns where."""
    dest = root / QUARANTINE / rel
    n = 1
    while storage.exists(dest):
        dest = root / QUARANTINE / f"{rel}.{n}"
        n += 1
    src = root / rel
    if storage.is_remote(root):
        src.fs.mv(src.path, dest.path)
    else:
        os.makedirs(dest.parent, exist_ok=True)
        os.replace(src, dest)
    return str(dest)


def repair_card(root: Any) -> None:
    """An unreadable card is quarantined and replaced by a fresh one (its lineage is lost: stages then ask
    for --overwrite over outputs they cannot trace)."""
    quarantine(root, CARD_NAME)
    if storage.is_remote(root):
        storage.create_exclusive(root / CARD_NAME, (json.dumps(new_card(), indent=2) + "\n").encode())
    else:
        atomic.write_json(root / CARD_NAME, new_card())


def close_runs(card: Card, ids: list[str]) -> int:
    """Close the given unfinished entries (``interrupted: "gone"``); returns how many were closed."""
    closed = 0
    with card.editing() as c:
        for e in c.get("lineage", []):
            if e.get("id") in ids and e.get("finished") is None and not may_be_running(e):
                e["finished"], e["interrupted"] = now(), "gone (closed by capcurate doctor --repair)"
                e.pop("lease_until", None)
                closed += 1
    return closed
