"""``capcurate doctor DATASET [--repair]``: find, count and (where safe) repair what crashes leave.

Checks, each reported with a count and the files involved:

- ``orphan_temp_files``: hidden temp files whose writer (host~pid in the name) is gone from this host;
  temps of live writers or other hosts are listed as ``live_temp_files`` and never touched.
- ``unfinished_shard_files``: img2dataset's ``_tmp/`` and tars/parquets of shards it never finished.
- ``shards_without_manifest``: ``shards/N.tar`` with no ``samples/N.parquet``.
- ``manifests_without_shard``: ``samples/N.parquet`` with no ``shards/N.tar``.
- ``truncated_shards``: tars cut off mid-member, or holding fewer images than the manifest's successes.
- ``duplicate_uids``: uids with more than one manifest row (``duplicate_rows`` rows too many).
- ``damaged_card``: ``capcurate.json`` unreadable (not JSON, not UTF-8, not a card).
- ``unfinished_runs``: lineage entries left unfinished by runs that are over (killed, their node lost).
- ``damaged_manifests``: ``samples/N.parquet`` that cannot be read (0 bytes, garbage, cut off).
- ``damaged_derived_files``: captions, scores, embeddings (``.parquet``, ``.npy``), selections and dedup
  outputs that cannot be read (``doctor_files``).

``--repair`` fixes what is safe: orphan temps and unfinished files are removed; a finished, whole
download shard gets its manifest built; a damaged or unaccounted-for shard is removed with its manifest
(and img2dataset's record of it) so the same download (or ingest) command fetches it again; duplicate
uids keep one row, the one in the newest shard (a ``--retry-failed`` shard supersedes older ones).
Damaged files are moved into ``.quarantine/`` first (a damaged manifest's shard is then a shard without
manifest, repaired as above; a damaged derived file is made again by its stage); a damaged card is
quarantined and replaced by a fresh one; unfinished runs that are over are closed.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

from .. import atomic, storage
from ..dataset import Dataset
from ..errors import DatasetError
from ..summary import Summary
from .doctor_files import (
    card_problem,
    close_runs,
    damaged_derived,
    damaged_manifests,
    quarantine,
    repair_card,
    unfinished_runs,
)
from .download.integrity import drop_duplicate_uids, duplicate_uids, remove_shard_files, shard_problem
from .download.manifest import SHARD_RE, build_samples, finished_shards

CHECKS = ("orphan_temp_files", "unfinished_shard_files", "shards_without_manifest", "manifests_without_shard",
          "truncated_shards", "duplicate_uids", "damaged_card", "unfinished_runs", "damaged_manifests",
          "damaged_derived_files")
# what the first repair pass handles (moved aside, replaced, closed) before the shard checks run again
_FIRST = ("damaged_card", "unfinished_runs", "damaged_manifests", "damaged_derived_files")
_SID = re.compile(r"^\d+$")


def _temps(root: Any) -> tuple[list[Path], list[Path]]:
    """(temps whose writer is provably gone, temps that must stay) anywhere in the dataset (an object store
    has none: its uploads are all or nothing)."""
    orphan, live = [], []
    if storage.is_remote(root):
        return orphan, live
    for f in sorted(root.rglob(".*.tmp")):
        owner = atomic.parse_owner(f.name)
        (orphan if owner is not None and atomic.owner_gone(*owner) else live).append(f)
    return orphan, live


def _truncated(ds: Dataset, sid: str) -> str | None:
    """Why shard ``sid``'s tar does not hold its manifest's images, or None."""
    from ..shards import index_tar

    try:
        idx = index_tar(ds.shard_path(sid))
    except Exception as e:
        return f"unreadable ({type(e).__name__})"
    images = sum(1 for k in idx.samples if idx.image_ext(k))
    if idx.truncated:
        return f"cut off after {images} images"
    try:
        status = storage.read_table(ds.samples_path(sid), columns=["status"]).column("status").to_pylist()
    except Exception as e:  # a damaged manifest is its own check's business
        return f"its manifest is unreadable ({type(e).__name__})"
    want = sum(1 for s in status if s == "success")
    if images < want:
        return f"holds {images} images, its manifest counts {want} successes"
    return None


def examine(ds: Dataset) -> dict[str, Any]:
    """Every problem found, by check: a list of (file, reason) pairs, or counts for duplicate uids."""
    card_why = card_problem(ds.root)
    downloaded = card_why is None and bool(ds.card.lineage("shards", "download"))
    orphan, live = _temps(ds.root)
    bad_manifests = damaged_manifests(ds.root)
    found: dict[str, Any] = {
        "orphan_temp_files": [(str(p.relative_to(ds.root)), "writer gone") for p in orphan],
        "live_temp_files": [str(p.relative_to(ds.root)) for p in live],
        "damaged_card": [("capcurate.json", card_why)] if card_why else [],
        "unfinished_runs": unfinished_runs(ds.card) if card_why is None else [],
        "damaged_manifests": bad_manifests,
        "damaged_derived_files": damaged_derived(ds.root),
    }
    unfinished: list[tuple[str, str]] = []
    shard_names = storage.list_entries(ds.shards_dir)  # one listing of each folder
    finished = finished_shards(ds.shards_dir) if shard_names else {}
    if downloaded and shard_names:
        if "_tmp" in shard_names:
            unfinished.append(("shards/_tmp", "img2dataset's temp folder"))
        for name in sorted(shard_names):
            m = SHARD_RE.match(name)
            if m and m.group(1) not in finished:
                unfinished.append((f"shards/{name}", "shard img2dataset did not finish"))
    found["unfinished_shard_files"] = unfinished
    tars = {n[:-4] for n in shard_names if n.endswith(".tar") and _SID.match(n[:-4])}
    unreadable = {Path(f).stem for f, _ in bad_manifests}
    manifests = {s for s in ds.shard_ids() if _SID.match(s)}
    unfinished_ids = {Path(f).stem.split("_")[0] for f, _ in unfinished}
    found["shards_without_manifest"] = [
        (f"shards/{s}.tar", "finished, manifest missing" if s in finished else "no manifest")
        for s in sorted(tars - manifests) if s not in unfinished_ids]
    found["manifests_without_shard"] = [(f"samples/{s}.parquet", "its tar is missing")
                                        for s in sorted(manifests - tars)]
    found["truncated_shards"] = [(f"shards/{s}.tar", why) for s in sorted((tars & manifests) - unreadable)
                                 if (why := _truncated(ds, s)) is not None]
    # duplicates are counted over readable manifests only: --repair quarantines the others first
    per_file, repeated = duplicate_uids(ds.samples_dir) if manifests and not unreadable else ({}, 0)
    found["duplicate_uids"] = repeated
    found["duplicate_rows"] = sum(per_file.values())
    found["duplicate_rows_by_file"] = per_file
    found["_downloaded"] = downloaded
    found["_finished"] = finished
    return found


def _repair_files(ds: Dataset, found: dict[str, Any]) -> dict[str, int]:
    """The first pass: the card, unfinished runs, and every damaged file moved aside."""
    done = dict.fromkeys(_FIRST, 0)
    if found["damaged_card"]:
        repair_card(ds.root)
        done["damaged_card"] = 1
    if found["unfinished_runs"]:
        done["unfinished_runs"] = close_runs(ds.card, [i for i, _ in found["unfinished_runs"]])
    for key in ("damaged_manifests", "damaged_derived_files"):
        for rel, _ in found[key]:
            with contextlib.suppress(FileNotFoundError):
                quarantine(ds.root, rel)
                done[key] += 1
    return done


def _repair(ds: Dataset, found: dict[str, Any]) -> dict[str, int]:
    done = dict.fromkeys(CHECKS, 0)
    if any(found[k] for k in _FIRST):
        done.update(_repair_files(ds, found))
        live = found["live_temp_files"]
        found = examine(ds)  # a quarantined manifest leaves a shard without manifest, repaired below
        found["live_temp_files"] = live
    for rel, _ in found["orphan_temp_files"]:
        with contextlib.suppress(FileNotFoundError):
            (ds.root / rel).unlink()
            done["orphan_temp_files"] += 1
    for rel, _ in found["unfinished_shard_files"]:
        p = ds.root / rel
        if rel.endswith("_tmp"):
            storage.rmtree(p)
        else:
            storage.remove(p)
        done["unfinished_shard_files"] += 1

    def forget(sid: str) -> None:  # the next download / ingest run fetches this shard again
        if found["_downloaded"]:
            remove_shard_files(ds.shards_dir, sid)
        storage.remove(ds.shard_path(sid))
        storage.remove(ds.samples_path(sid))

    finished = found["_finished"]
    uid_col = (ds.card.lineage("shards", "download")[-1].get("parameters", {}).get("uid_col")
               if found["_downloaded"] else None)
    for rel, _ in found["shards_without_manifest"]:
        sid = Path(rel).stem
        if sid in finished and shard_problem(ds.shards_dir, sid, finished[sid]) is None:
            atomic.write_parquet(ds.samples_path(sid), build_samples(ds.shards_dir / f"{sid}.parquet", sid,
                                                                     uid_col=uid_col))
        else:
            forget(sid)
        done["shards_without_manifest"] += 1
    for key in ("manifests_without_shard", "truncated_shards"):
        for rel, _ in found[key]:
            forget(Path(rel).stem)
            done[key] += 1
    if found["duplicate_uids"] or done["shards_without_manifest"]:  # a rebuilt manifest may repeat uids
        done["duplicate_uids"] = drop_duplicate_uids(ds.samples_dir)
    return done


def doctor(dataset: str | Path, *, repair: bool = False, reset_card: bool = False) -> Summary:
    """Report (and with ``repair`` fix) crash damage in a dataset directory; see the module docstring.

    A damaged card is never replaced unasked (its lineage would be lost): it is a one-line error (exit 2)
    unless ``reset_card``, which quarantines it, writes a fresh card and implies ``repair``.
    """
    t0 = time.perf_counter()
    repair = repair or reset_card
    try:
        ds = Dataset(dataset)
    except DatasetError as e:
        if card_problem(storage.path(dataset)) is None or not reset_card:
            if card_problem(storage.path(dataset)) is not None:
                raise DatasetError(f"{e}; capcurate doctor --reset-card moves it into .quarantine/ and "
                                   "writes a fresh card (its lineage is lost)") from None
            raise  # not a dataset at all: one line, exit 2
        ds = Dataset(dataset, must_exist=False)  # its card is damaged and may be reset
    found = examine(ds)
    counts = {k: (found[k] if k == "duplicate_uids" else len(found[k])) for k in CHECKS}
    counts["duplicate_rows"] = found["duplicate_rows"]
    counts["live_temp_files"] = len(found["live_temp_files"])
    problems = sum(v for k, v in counts.items() if k in CHECKS)
    details: dict[str, Any] = {k: [f"{f}: {why}" for f, why in found[k]] for k in CHECKS if k != "duplicate_uids"
                               and found[k]}
    if found["duplicate_rows_by_file"]:
        details["duplicate_rows_by_file"] = found["duplicate_rows_by_file"]
    if found["live_temp_files"]:
        details["live_temp_files"] = found["live_temp_files"]  # another process may be writing them now
    details["dataset"] = str(ds.root)
    if repair and problems:
        repaired = _repair(ds, found)
        details["repaired"] = repaired
        left = examine(ds)
        remaining = sum(left[k] if k == "duplicate_uids" else len(left[k]) for k in CHECKS)
        counts["remaining"] = remaining
        message = (f"repaired {ds.root}: {_describe(counts)}"
                   + ("; run the same download/ingest command to fetch removed shards again"
                      if any(repaired[k] for k in ("shards_without_manifest", "manifests_without_shard",
                                                   "truncated_shards")) else "")
                   + ("; quarantined files are in .quarantine/: run their stages again to remake them"
                      if repaired["damaged_derived_files"] else ""))
        ok = remaining == 0
    else:
        counts["remaining"] = problems
        ok = problems == 0
        message = f"{ds.root}: no damage found" if ok else \
            f"{ds.root}: {_describe(counts)}; run with --repair to fix what is safe"
    return Summary(stage="doctor", ok=ok, counts=counts, details=details,
                   seconds=time.perf_counter() - t0, message=message)


def _describe(counts: dict[str, int]) -> str:
    parts = [f"{counts[k]} {k.replace('_', ' ')}" for k in CHECKS if counts.get(k)]
    return ", ".join(parts) or "nothing to do"


__all__ = ["doctor", "examine", "CHECKS"]
