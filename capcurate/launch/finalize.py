"""What the finalize job of a launched array runs, once every task is over.

1. The stage once more over every shard (no ``--part``), in a child process with ``--json``: the
   stage's own completion path. Every shard is found written, so nothing is computed again; ``shard``
   writes manifest.json and sizes.json; a shard that is missing is done here (and counted, so it shows).
2. The lineage of the array is closed: a try stopped by preemption or the time limit never finished its
   lineage entry, and on another host nobody can tell it is over, so it would look like a run that is
   still writing. Such entries of this stage and name (``--part`` in their command, started after the
   launch) get ``finished`` and a note; the completion run's entry lists the part entries and sums
   their counts, so one entry describes the whole run.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from .. import storage
from ..card import CARD_NAME, Card, may_be_running, now
from ..errors import CapcurateError, StageFailed
from ..summary import Summary
from .stage_args import StageCall

INTERRUPTED_NOTE = ("this try ended without finishing (preempted, timed out and requeued, or killed); the shards "
                    "it did not write were written by a later try")


class CompletionRunFailed(CapcurateError):
    """The stage's completion run exited non-zero: the finalize job exits with the same code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def finalize(call: StageCall, *, since: str | None = None, python: str | None = None) -> Summary:
    """Run ``call`` over every shard, then close the lineage of its ``--part`` tries started after ``since``."""
    t0 = time.time()
    card = _card(call.dataset)
    before = {e["id"] for e in card.read().get("lineage", [])} if card is not None else set()
    completion = run_completion(call, python=python)
    closed = close_lineage(card, call.stage, before, since=since) if card is not None else None
    computed = int(completion.get("counts", {}).get("shards_processed", 0) or 0)
    counts = {"shards_computed_here": computed}
    if closed is not None:
        counts.update(part_entries=closed["parts"], entries_closed=closed["closed"],
                      entries_still_running=closed["running"])
    return Summary(stage="launch finalize", ok=bool(completion.get("ok", True)), counts=counts,
                   details={"completion": completion}, seconds=time.time() - t0,
                   message=_message(call.stage, completion, closed))


def _message(stage: str, completion: dict[str, Any], closed: dict[str, int] | None) -> str:
    counts = completion.get("counts", {})
    computed = int(counts.get("shards_processed", 0) or 0)
    out = [f"capcurate {stage}: {counts.get('shards_skipped', 0):,} shard(s) already written"]
    if computed:
        out.append(f"{computed:,} written by the finalize job itself (the array missed them)")
    if closed is not None:
        line = (f"lineage: {closed['parts']} part tr{'y' if closed['parts'] == 1 else 'ies'}, "
                f"{closed['closed']} unfinished one(s) closed")
        out.append(line + (f", {closed['running']} still running (left open)" if closed["running"] else ""))
    if stage == "shard":
        out.append("manifest.json written" if completion.get("details", {}).get("complete")
                   else "manifest.json NOT written (shards missing)")
    return "; ".join(out)


def _card(dataset: str | None) -> Card | None:
    if dataset is None:
        return None
    card = Card(dataset)
    return card if storage.path(dataset).joinpath(CARD_NAME).exists() else None


def run_completion(call: StageCall, *, python: str | None = None) -> dict[str, Any]:
    """``capcurate STAGE ARGS --json`` in a child process; its JSON summary, or its error and exit code."""
    cmd = [python or sys.executable, "-m", "capcurate", call.stage, *call.argv, "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    sys.stderr.write(res.stderr)  # progress and warnings belong in the job's log
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    if res.returncode not in (0, 1) or not lines:
        why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise CompletionRunFailed(f"capcurate {call.stage} {shlex.join(call.argv)} exited {res.returncode}: {why}",
                                  res.returncode or 1)
    try:
        summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise StageFailed(f"capcurate {call.stage} printed no JSON summary: {lines[-1][:200]}") from None
    return summary


def _epoch(iso: str | None) -> float | None:
    try:
        return _dt.datetime.fromisoformat(iso).timestamp() if iso else None
    except ValueError:
        return None


def provably_running(entry: dict[str, Any]) -> bool:
    """A try that is certainly still at work: a live process on this host, or a lease not yet run out.
    A try on another host without a lease cannot be asked; the finalize job runs after every task is over,
    so it is taken as over."""
    if entry.get("finished") is not None:
        return False
    lease = _epoch(entry.get("lease_until"))
    if lease is not None and lease > time.time():
        return True
    return entry.get("host") == platform.node() and may_be_running(entry)


def close_lineage(card: Card, stage: str, before: set[str], *, since: str | None) -> dict[str, int] | None:
    """Close the unfinished ``--part`` entries of the run the completion run just resumed (same family and
    name), started at or after ``since``, unless provably still running; record them on the completion
    entry. Returns counts, or None when the stage keeps no lineage in this card (shard records its run in
    the output's claim file)."""
    start = _epoch(since)
    if not any(e.get("id") not in before and e.get("stage") == stage for e in card.read().get("lineage", [])):
        return None  # nothing to record: leave the card as it is
    with card.editing() as data:
        lineage = data.get("lineage", [])
        new = [e for e in lineage if e.get("id") not in before and e.get("stage") == stage]
        if not new:
            return None
        final = new[-1]
        parts = [
            e for e in lineage
            if e.get("id") in before and e.get("stage") == stage and e.get("family") == final.get("family")
            and e.get("name") == final.get("name") and "--part" in (e.get("command") or "").split()
            and (start is None or (_epoch(e.get("started")) or 0) >= start)
        ]
        total: Counter = Counter()
        closed = running = 0
        for e in parts:
            if provably_running(e):
                running += 1
                continue
            if e.get("finished") is None:
                e["finished"] = now()
                e["closed_by"] = "launch finalize"
                e["note"] = INTERRUPTED_NOTE
                e.pop("lease_until", None)
                closed += 1
            else:
                total.update({k: v for k, v in (e.get("counts") or {}).items()
                              if isinstance(v, int) and not isinstance(v, bool)})
        final["parts"] = [e["id"] for e in parts]
        final["part_counts"] = dict(total)
    return {"closed": closed, "parts": len(parts), "running": running}
