"""What other download runs of a dataset mean for this one: live runs, and a first download not finished.

- A download (or ``--retry-failed``) cleans what killed runs left in ``shards/`` (img2dataset's ``_tmp``,
  tars without a stats file). Those are also what a *live* run is writing right now, so a run refuses to
  start while another download of the dataset may still be running (``card.may_be_running``: a live pid
  on this host, an unexpired lease on a store), naming it.
- ``--retry-failed`` numbers its shards after the last finished one (img2dataset's ``extend``). Before an
  interrupted download has been resumed, that number belongs to a shard the download has still to write,
  which would then pass for finished and its URLs never be fetched; so the retry is refused until every
  shard of the URL list is finished. How many there are is recorded in the download's lineage entry when
  it starts (``shards_expected``), since the interrupted run never finishes it.
"""

from __future__ import annotations

import math
from typing import Any

from ...card import may_be_running
from ...dataset import Dataset
from ...errors import DatasetError, OutputExistsError


def _describe(entry: dict[str, Any]) -> str:
    pid = str(entry.get("id", "")).rsplit("-", 2)
    who = f"pid {pid[1]}" if len(pid) == 3 and pid[1].isdigit() else entry.get("id")
    return (f"{entry.get('command') or 'capcurate download'} (host {entry.get('host')}, {who}, "
            f"started {entry.get('started')})")


def refuse_if_live(ds: Dataset, own: str) -> None:
    """Raise (after dropping this run's own entry ``own``) when another download of ``ds`` may be running."""
    live = [e for e in ds.card.read().get("lineage", [])
            if e.get("stage") == "download" and e.get("id") != own and may_be_running(e)]
    if live:
        ds.card.abandon_entry(own)
        raise OutputExistsError(f"another download into {ds.root} is running: {_describe(live[-1])}; wait for it "
                                "to finish (its partial shards are left alone)")


def record_expected(ds: Dataset, entry_id: str, shards: int) -> None:
    """Write how many shards the URL list makes into the download's lineage entry, as it starts."""
    with ds.card.editing() as card:
        for e in card["lineage"]:
            if e.get("id") == entry_id:
                e["shards_expected"] = shards
                break


def expected_shards(ds: Dataset, entry: dict[str, Any]) -> int | None:
    """How many shards the download of ``entry`` writes: as recorded, else from its source's row count
    (exact for a URL list of one file); None when neither is known."""
    if isinstance(entry.get("shards_expected"), int):
        return entry["shards_expected"]
    params = entry.get("parameters", {})
    per = params.get("samples_per_shard")
    for src in ds.card.read().get("sources", []):
        if src.get("kind") == "urls" and src.get("path") == params.get("urls") and isinstance(src.get("rows"), int):
            return math.ceil(src["rows"] / per) if per else None
    return None


def refuse_unfinished_download(ds: Dataset, entry: dict[str, Any], finished: set[str]) -> None:
    """--retry-failed: refuse while shards of the download itself are not finished (resume it first)."""
    n = expected_shards(ds, entry)
    if n is None:
        return
    missing = [f"{i:05d}" for i in range(n) if f"{i:05d}" not in finished]
    if missing:
        urls = entry.get("parameters", {}).get("urls") or "URLS"
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DatasetError(
            f"the download into {ds.root} did not finish (shard {', '.join(missing[:3])}{more} missing): resume it "
            f"first with `capcurate download {urls} -o {ds.root}`, then --retry-failed (a retry now would take "
            "the unfinished shard's number)")
