"""The dataset card (``capcurate.json``): format version, sources, and the lineage of every stage run.

Lineage is what lets a user ask "which model, weights and decoding made ``cap_blip``?" months later,
and what stops a re-run under the same name with other parameters from silently mixing outputs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import platform
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import __version__, atomic
from .errors import DatasetError, OutputExistsError

CARD_NAME = "capcurate.json"
FORMAT = "capcurate-dataset"
FORMAT_VERSION = 1


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_card(sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": now(),
        "capcurate_version": __version__,
        "sources": sources or [],
        "lineage": [],
    }


def normalise_params(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters as JSON would store them, so a comparison after a round trip is exact."""
    return json.loads(json.dumps(params, sort_keys=True, default=str))


class Card:
    """Read-modify-write access to ``capcurate.json`` under a file lock (several processes, one card)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = self.root / CARD_NAME

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        try:
            card = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DatasetError(f"{self.root} is not a capcurate dataset (no {CARD_NAME})") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.path} is not valid JSON: {e}") from None
        if card.get("format") != FORMAT:
            raise DatasetError(f"{self.path} is not a capcurate dataset card (format={card.get('format')!r})")
        if card.get("format_version", 0) > FORMAT_VERSION:
            raise DatasetError(
                f"{self.root} uses dataset format {card['format_version']}; this capcurate reads up to "
                f"{FORMAT_VERSION}: upgrade capcurate"
            )
        return card

    @contextlib.contextmanager
    def editing(self) -> Iterator[dict[str, Any]]:
        """Lock, read, let the caller mutate the dict, write atomically, unlock."""
        lock_path = self.root / ".capcurate.lock"
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                card = self.read()
                yield card
                atomic.write_json(self.path, card)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def create(self, sources: list[dict[str, Any]] | None = None) -> None:
        atomic.write_json(self.path, new_card(sources))

    # -- lineage -----------------------------------------------------------------------------------
    def lineage(self, family: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        entries = self.read().get("lineage", [])
        return [
            e for e in entries
            if (family is None or e.get("family") == family) and (name is None or e.get("name") == name)
        ]

    def claim_output(
        self, family: str, name: str, params: dict[str, Any], *, overwrite: bool, exists: bool
    ) -> str:
        """Decide what a stage run writing ``family/name`` may do; returns 'new', 'resume' or 'overwrite'.

        Same parameters as the last run of that name: resume (finished shards are skipped). Other
        parameters: refused unless ``overwrite``; the caller then deletes the old outputs.
        """
        params = normalise_params(params)
        previous = self.lineage(family, name)
        if not previous and not exists:
            return "new"
        if overwrite:
            return "overwrite"
        if not previous:
            raise OutputExistsError(
                f"{family}/{name} exists but has no lineage entry; pass --overwrite to replace it"
            )
        last = previous[-1]
        if last.get("parameters") != params:
            changed = sorted(
                k for k in set(params) | set(last.get("parameters", {}))
                if params.get(k) != last.get("parameters", {}).get(k)
            )
            raise OutputExistsError(
                f"{family}/{name} was made with other parameters (differs in: {', '.join(changed)}); "
                "choose another --name or pass --overwrite"
            )
        return "resume"

    def start_entry(
        self, *, stage: str, family: str | None, name: str | None, params: dict[str, Any],
        model: dict[str, Any] | None = None, replace: bool = False,
    ) -> str:
        """Append a lineage entry (finished=None) and return its id; ``replace`` drops older ones of that name."""
        # the random tail keeps ids unique when one process starts two runs within a second
        entry_id = f"{stage}-{now()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        entry = {
            "id": entry_id,
            "stage": stage,
            "family": family,
            "name": name,
            "command": " ".join(sys.argv) if sys.argv else None,
            "model": model,
            "parameters": normalise_params(params),
            "capcurate_version": __version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "started": now(),
            "finished": None,
            "counts": {},
        }
        with self.editing() as card:
            if replace:
                card["lineage"] = [
                    e for e in card["lineage"] if not (e.get("family") == family and e.get("name") == name)
                ]
            card["lineage"].append(entry)
        return entry_id

    def finish_entry(self, entry_id: str, counts: dict[str, Any], **extra: Any) -> None:
        with self.editing() as card:
            for e in card["lineage"]:
                if e["id"] == entry_id:
                    e["finished"] = now()
                    e["counts"] = counts
                    e.update(extra)
                    break

    def add_source(self, source: dict[str, Any]) -> None:
        with self.editing() as card:
            if source not in card["sources"]:
                card["sources"].append(source)
