"""The dataset card (``capcurate.json``): format version, sources, and the lineage of every stage run.

Lineage is what lets a user ask "which model, weights and decoding made ``cap_blip``?" months later,
and what stops a re-run under the same name with other parameters from silently mixing outputs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from . import __version__, atomic, storage
from .errors import DatasetError, OutputExistsError, StageFailed

CARD_NAME = "capcurate.json"
LOCK_NAME = ".capcurate.lock"
FORMAT = "capcurate-dataset"
FORMAT_VERSION = 1
# A run's lineage entry holds a lease (``lease_until``) it renews every third of this; a run on a lost node
# stops holding its name once the lease runs out. Local datasets too: on a shared file system (Slurm
# array tasks on several nodes) another host's pid cannot be asked. On an object store the card's lock is a
# lease object as well.
LEASE_SECONDS = float(os.environ.get("CAPCURATE_LEASE_SECONDS", "600"))
LOCK_SECONDS = float(os.environ.get("CAPCURATE_LOCK_SECONDS", "60"))


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


# lineage entries this process started and has not finished: entry id -> the starting thread's ident
_RUNNING: dict[str, int] = {}
# ... and the card each is on, so an interrupted process can close them (close_interrupted)
_RUNNING_CARDS: dict[str, Card] = {}


def _epoch(iso: str) -> float:
    return _dt.datetime.fromisoformat(iso).timestamp()


def may_be_running(entry: dict[str, Any]) -> bool:
    """Whether the run behind an unfinished lineage entry may still be writing (False once it is known over).

    A finished entry is over. An unfinished one from this host is over when its process is gone (the id
    carries the pid), or, from this very process, when the thread that started it is the one asking now
    (that call raised before finishing) or is gone. An entry from another host is over once its lease
    expired; other hosts' entries without one (written by capcurate before leases were kept on local
    datasets) cannot be checked: running.
    """
    if entry.get("finished") is not None:
        return False
    parts = str(entry.get("id", "")).rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or entry.get("host") != platform.node():
        lease = entry.get("lease_until")
        if lease:
            try:
                return time.time() < _epoch(lease)
            except ValueError:
                return True
        return True
    pid = int(parts[1])
    if pid != os.getpid():
        return atomic.pid_alive(pid)
    owner = _RUNNING.get(entry["id"])
    if owner is None or owner == threading.get_ident():
        return False
    return any(t.ident == owner for t in threading.enumerate())


def describe_run(entry: dict[str, Any]) -> str:
    """A run as a user can find it: host, pid, start time (and its command line)."""
    parts = str(entry.get("id", "")).rsplit("-", 2)
    pid = parts[1] if len(parts) == 3 and parts[1].isdigit() else "?"
    text = f"host {entry.get('host', '?')}, pid {pid}, started {entry.get('started', '?')}"
    return text + (f": {entry['command']}" if entry.get("command") else "")


def refuse_live_writers(family: str, name: str, previous: list[dict[str, Any]], why: str) -> None:
    """Raise OutputExistsError (exit 3) naming a run of ``family/name`` that may still be writing."""
    busy = [e for e in previous if may_be_running(e)]
    if busy:
        raise OutputExistsError(f"{family}/{name} is being written by another run right now "
                                f"({describe_run(busy[-1])}); {why}")


def _differing(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


class Card:
    """Read-modify-write access to ``capcurate.json`` under a file lock (several processes, one card)."""

    def __init__(self, root: Any):
        self.root = storage.path(root)
        self.remote = storage.is_remote(self.root)
        self.path = self.root / CARD_NAME
        # (family, name) -> what claim_output saw: ids of all entries of that name, and of the void ones
        self._claims: dict[tuple[str, str], tuple[set[str], set[str]]] = {}

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> dict[str, Any]:
        try:
            return self._parse(storage.read_bytes(self.path))
        except FileNotFoundError:
            raise DatasetError(f"{self.root} is not a capcurate dataset (no {CARD_NAME})") from None

    def _parse(self, data: bytes) -> dict[str, Any]:
        try:
            card = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{self.path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.path} is not valid JSON: {e}") from None
        if not isinstance(card, dict):
            raise DatasetError(f"{self.path} is not a capcurate dataset card (not a JSON object)")
        if card.get("format") != FORMAT:
            raise DatasetError(f"{self.path} is not a capcurate dataset card (format={card.get('format')!r})")
        if card.get("format_version", 0) > FORMAT_VERSION:
            raise DatasetError(
                f"{self.root} uses dataset format {card['format_version']}; this capcurate reads up to "
                f"{FORMAT_VERSION}: upgrade capcurate"
            )
        return card

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the card's lock (other processes' ``editing`` and ``claim_output`` wait).

        Local: ``fcntl.flock`` on ``.capcurate.lock``. Object store: a lease object of that name, made
        with create-if-absent; one whose lease ran out (its holder died) is taken over by compare-and-swap.
        """
        if self.remote:
            with _lease_lock(self.root / LOCK_NAME):
                yield
            return
        import fcntl

        lock_path = self.root / LOCK_NAME
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def editing(self) -> Iterator[dict[str, Any]]:
        """Lock, read, let the caller mutate the dict, write atomically, unlock.

        On an object store the write is also conditional on the card being the version read (If-Match):
        a holder whose lock lease ran out cannot overwrite a newer card.
        """
        with self.locked():
            if not self.remote:
                atomic.clean_stale_temps(self.root)  # a card write killed before its rename left one
                card = self.read()
                yield card
                atomic.write_json(self.path, card)
                return
            try:
                data, tag = storage.read_versioned(self.path)
            except FileNotFoundError:
                raise DatasetError(f"{self.root} is not a capcurate dataset (no {CARD_NAME})") from None
            card = self._parse(data)
            yield card
            atomic._chaos_point("before")
            if not storage.replace_if_match(self.path, _card_bytes(card), tag):
                raise StageFailed(f"{self.path} changed while this process held its lock (lock lease of "
                                  f"{LOCK_SECONDS:.0f} s ran out?): nothing was written; run again")
            atomic._chaos_point("after")

    def create(self, sources: list[dict[str, Any]] | None = None) -> bool:
        """Write a new card; on an object store only if none exists (False when another process won)."""
        if self.remote:
            return storage.create_exclusive(self.path, _card_bytes(new_card(sources)))
        atomic.write_json(self.path, new_card(sources))
        return True

    # -- lineage -----------------------------------------------------------------------------------
    def lineage(self, family: str | None = None, name: str | None = None) -> list[dict[str, Any]]:
        return _select(self.read().get("lineage", []), family, name)

    def claim(
        self, *, stage: str, family: str, name: str, params: dict[str, Any], overwrite: bool,
        exists: bool | Callable[[], bool], model: dict[str, Any] | None = None,
        remove: Callable[[], None] | None = None, exclusive: bool = False,
    ) -> tuple[str, str]:
        """Claim ``family/name`` and start its lineage entry in one locked step; returns (mode, entry id).

        ``mode`` is 'new', 'resume' or 'overwrite' (the rule of ``claim_output``). ``exists`` (a bool, or
        a callable asked under the lock) says whether outputs of that name are on disk. With 'overwrite',
        ``remove`` deletes the old outputs under the lock before the entry is written, so a run killed
        while deleting leaves the old lineage in place and nobody resumes into half-deleted outputs.
        Entries of runs that wrote nothing and are over are dropped: they do not hold the name.
        A run that then writes nothing at all (its model did not load) calls ``abandon_entry``.

        ``exclusive``: outputs written whole in one go (a selection file) rather than shard by shard, so
        two runs cannot share the work: refused while another run of that name may still be writing.
        ``overwrite`` is refused likewise (exit 3, naming the live run's host, pid and start): deleting a
        live run's outputs would let it go on writing files of the old parameters under the new entry.
        """
        params = normalise_params(params)
        with self.editing() as card:
            if not self.remote:  # a run of this name killed before a rename left its temp; it is gone now
                for folder in (self.root / family, self.root / family / name):
                    atomic.clean_stale_temps(folder)
            previous = _select(card.get("lineage", []), family, name)
            if exclusive or overwrite:  # --overwrite would delete what a live run is writing: never
                refuse_live_writers(family, name, previous, "wait for it to finish or choose another --name")
            mode, void = _decide(family, name, params, previous,
                                 overwrite=overwrite, exists=exists() if callable(exists) else exists, model=model)
            if mode == "overwrite":
                if remove is not None:
                    remove()
                void = {e["id"] for e in previous}
            card["lineage"] = [e for e in card["lineage"] if e.get("id") not in void]
            entry = self._new_entry(stage, family, name, params, model)
            card["lineage"].append(entry)
        self._running(entry["id"])
        return mode, entry["id"]

    def _running(self, entry_id: str) -> None:
        _RUNNING[entry_id] = threading.get_ident()
        _RUNNING_CARDS[entry_id] = self
        _LeaseKeeper.keep(self, entry_id)

    @contextlib.contextmanager
    def writing(self, entry_id: str) -> Iterator[None]:
        """Around the one write of a claimed output: if it fails, nothing was written, so the entry is
        dropped (``abandon_entry``) and the name is free again."""
        try:
            yield
        except BaseException:
            self.abandon_entry(entry_id)
            raise

    def abandon_entry(self, entry_id: str) -> None:
        """Remove an entry whose run wrote nothing (it failed before its first output): the name is free."""
        _RUNNING.pop(entry_id, None)
        _RUNNING_CARDS.pop(entry_id, None)
        with self.editing() as card:
            card["lineage"] = [e for e in card["lineage"] if e.get("id") != entry_id]

    def claim_output(
        self, family: str, name: str, params: dict[str, Any], *, overwrite: bool, exists: bool
    ) -> str:
        """Decide what a stage run writing ``family/name`` may do; returns 'new', 'resume' or 'overwrite'.

        Same parameters as the last run of that name: resume (finished shards are skipped). Other
        parameters: refused unless ``overwrite``; the caller then deletes the old outputs. A run that
        wrote nothing (``exists`` is false) and is over (finished, or its process gone) does not hold the
        name: with other parameters the claim is 'new' and ``start_entry`` replaces its entries.

        Prefer ``claim``, which also starts the entry under the same lock. Here the card is read under
        its lock, and ``start_entry`` (same Card, same family/name) checks again under the lock that no
        run with other parameters took the name in between.
        """
        params = normalise_params(params)
        with self.locked():
            previous = _select(self.read().get("lineage", []), family, name)
        if overwrite:  # refused before the caller loads a model; ``claim`` checks again under the lock
            refuse_live_writers(family, name, previous, "wait for it to finish or choose another --name")
        mode, void = _decide(family, name, params, previous, overwrite=overwrite, exists=exists)
        self._claims[(family, name)] = ({e["id"] for e in previous}, void)
        return mode

    def _new_entry(self, stage: str, family: str | None, name: str | None, params: dict[str, Any],
                   model: dict[str, Any] | None) -> dict[str, Any]:
        # the random tail keeps ids unique when one process starts two runs within a second
        return {
            "id": f"{stage}-{now()}-{os.getpid()}-{uuid.uuid4().hex[:8]}",
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
            "lease_until": _lease_until(),
        }

    def start_entry(
        self, *, stage: str, family: str | None, name: str | None, params: dict[str, Any],
        model: dict[str, Any] | None = None, replace: bool = False,
    ) -> str:
        """Append a lineage entry (finished=None) and return its id; ``replace`` drops older ones of that name."""
        entry = self._new_entry(stage, family, name, params, model)
        entry_id = entry["id"]
        claim = self._claims.pop((family, name), None) if family is not None and name is not None else None
        with self.editing() as card:
            if replace:
                card["lineage"] = [
                    e for e in card["lineage"] if not (e.get("family") == family and e.get("name") == name)
                ]
            elif claim is not None:
                seen, void = claim
                card["lineage"] = [e for e in card["lineage"] if e.get("id") not in void]
                for e in _select(card["lineage"], family, name):
                    if e.get("id") not in seen and e.get("parameters") != entry["parameters"]:
                        changed = _differing(entry["parameters"], e.get("parameters", {}))
                        raise OutputExistsError(
                            f"{family}/{name} was just claimed by another run with other parameters "
                            f"(differs in: {', '.join(changed)}); choose another --name or pass --overwrite"
                        )
            card["lineage"].append(entry)
        self._running(entry_id)
        return entry_id

    def finish_entry(self, entry_id: str, counts: dict[str, Any], **extra: Any) -> None:
        """Close a run's entry; StageFailed when the entry is gone (another run took the name over)."""
        _RUNNING.pop(entry_id, None)
        _RUNNING_CARDS.pop(entry_id, None)
        with self.editing() as card:
            for e in card["lineage"]:
                if e["id"] == entry_id:
                    e["finished"] = now()
                    e["counts"] = counts
                    e.pop("lease_until", None)
                    e.update(extra)
                    return
        if extra.get("interrupted") is None:
            raise StageFailed(_voided(entry_id, self.path))

    def check_claim(self, entry_id: str) -> None:
        """Raise StageFailed when this run's entry is no longer on the card: another run voided the claim
        (``--overwrite`` after this run's lease ran out), so what this run writes would be mislabelled.
        Stages call it before each commit."""
        if not any(e.get("id") == entry_id for e in self.read().get("lineage", [])):
            raise StageFailed(_voided(entry_id, self.path))

    def renew_leases(self, entry_ids: list[str]) -> None:
        """Push the lease of this process's running entries forward (``_LeaseKeeper``)."""
        with self.editing() as card:
            for e in card["lineage"]:
                if e.get("id") in entry_ids and e.get("finished") is None:
                    e["lease_until"] = _lease_until()

    def add_source(self, source: dict[str, Any]) -> None:
        with self.editing() as card:
            if source not in card["sources"]:
                card["sources"].append(source)


def _voided(entry_id: str, card_path: Any) -> str:
    return (f"this run's claim ({entry_id}) was voided: another run took its name over in {card_path} "
            "(--overwrite after this run's lease ran out?); its outputs may be replaced, run again")


def check_claim(root: str | None, entry_id: str | None) -> None:
    """``Card(root).check_claim(entry_id)``; nothing when the job was given no claim (library use)."""
    if root is not None and entry_id is not None:
        Card(root).check_claim(entry_id)


def close_interrupted(signal_name: str) -> list[str]:
    """Close the lineage entries this process left unfinished because it was interrupted (SIGINT, SIGTERM):
    ``finished`` is set with ``interrupted: <signal>`` so the card says the run is over and why; its
    finished shards are kept and the same command resumes. Returns the closed entry ids."""
    closed = []
    for entry_id in list(_RUNNING):
        card = _RUNNING_CARDS.get(entry_id)
        if card is not None:
            card.finish_entry(entry_id, {}, interrupted=signal_name)
            closed.append(entry_id)
    return closed


# What a loaded model records about a request (``describe_request``) that changes its output without being
# a parameter: the resolution a VLM's processor was set to. A resume with another would mix two kinds of
# output under one name. (Not the template text: some chat templates write today's date into it, and a
# resume the next day must not be refused for that.)
REQUEST_KEYS = ("pixel_budget",)


def _request_changes(model: dict[str, Any] | None, last: dict[str, Any]) -> list[str]:
    """The request keys on which the run claiming now differs from ``last`` (empty when unknown)."""
    before = last.get("model") or {}
    if not model or "template_text" not in model or "template_text" not in before:
        return []  # not a templated request, or not loaded here (a Ray driver): nothing to compare
    changed = [k for k in REQUEST_KEYS if k in before and before[k] != model.get(k)]
    # recorded before capcurate set a pixel budget by default: that run kept the processor's own resolution
    if "pixel_budget" not in before and model.get("pixel_budget") is not None:
        changed.append("pixel_budget (earlier: the processor's own)")
    return changed


def _decide(family: str, name: str, params: dict[str, Any], previous: list[dict[str, Any]], *,
            overwrite: bool, exists: bool, model: dict[str, Any] | None = None) -> tuple[str, set[str]]:
    """(mode, ids of void entries) for a claim of ``family/name`` given its earlier entries; may refuse.

    ``model``: what the loaded model records (``Card.claim``); a resume must also agree on ``REQUEST_KEYS``."""
    if not previous and not exists:
        return "new", set()
    if overwrite:
        return "overwrite", set()
    if not previous:
        raise OutputExistsError(f"{family}/{name} exists but has no lineage entry; pass --overwrite to replace it")
    last = previous[-1]
    if last.get("parameters") != params and not exists:
        # nothing was written: only a run that may still be writing holds the name
        held = [e for e in previous if may_be_running(e)]
        if not held:
            return "new", {e["id"] for e in previous}
        last = held[-1]
    if last.get("parameters") != params:
        changed = _differing(params, last.get("parameters", {}))
        raise OutputExistsError(
            f"{family}/{name} was made with other parameters (differs in: {', '.join(changed)}); "
            "choose another --name or pass --overwrite"
        )
    request = _request_changes(model, last) if exists else []
    if request:
        raise OutputExistsError(
            f"{family}/{name} was made with another request to the model (differs in: {', '.join(request)}: "
            "a new transformers version or capcurate default); pass the earlier values (--max-pixels, "
            "--prompt), choose another --name or pass --overwrite"
        )
    return "resume", set()


def _select(entries: list[dict[str, Any]], family: str | None, name: str | None) -> list[dict[str, Any]]:
    return [
        e for e in entries
        if (family is None or e.get("family") == family) and (name is None or e.get("name") == name)
    ]


def _lease_until(seconds: float | None = None) -> str:
    t = time.time() + (LEASE_SECONDS if seconds is None else seconds)
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def _card_bytes(card: dict[str, Any]) -> bytes:
    return (json.dumps(card, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8")


@contextlib.contextmanager
def _lease_lock(lock: Any) -> Iterator[None]:
    """Mutual exclusion on an object store: a lock object made by create-if-absent, with an expiry.

    A lock whose expiry passed (its holder died mid-edit), or whose holder is a process of this host that
    no longer exists, is taken over by a compare-and-swap on the version that was read, so two waiters
    cannot both take it over. Released by deleting it if it is
    still ours. Waits with jittered backoff; never forever: a lock still held after ten of its leases is
    an error.
    """
    me = f"{atomic.owner_tag()}~{uuid.uuid4().hex[:8]}"
    deadline = time.time() + 10 * LOCK_SECONDS
    delay = 0.02
    while True:
        body = json.dumps({"owner": me, "host": atomic.host_name(), "pid": os.getpid(),
                           "expires": time.time() + LOCK_SECONDS}).encode()
        if storage.create_exclusive(lock, body):
            break
        try:
            data, tag = storage.read_versioned(lock)
            held = json.loads(data.decode("utf-8"))
            # the expiry is the rule; a holder on this host whose process is gone is over at once
            expired = float(held.get("expires", 0)) < time.time() or atomic.owner_gone(
                str(held.get("host")), int(held.get("pid", os.getpid())))
        except FileNotFoundError:
            continue  # released between our two calls: try to create it again
        except (ValueError, AttributeError):
            expired, tag = True, tag  # unreadable lock object: treat as abandoned
        if expired and storage.replace_if_match(lock, body, tag):
            break
        if time.time() > deadline:
            raise StageFailed(f"{lock} has been held for over {10 * LOCK_SECONDS:.0f} s; if no capcurate "
                              "process uses this dataset, delete that object")
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            data, tag = storage.read_versioned(lock)
            if json.loads(data.decode("utf-8")).get("owner") == me:
                storage.delete_if_match(lock, tag)


class _LeaseKeeper:
    """One daemon thread per card that renews the leases of this process's running entries."""

    _threads: dict[str, _LeaseKeeper] = {}
    _guard = threading.Lock()

    def __init__(self, card: Card):
        self.card = card
        self.ids: set[str] = set()
        self.thread = threading.Thread(target=self._loop, name="capcurate-lease", daemon=True)

    @classmethod
    def keep(cls, card: Card, entry_id: str) -> None:
        with cls._guard:
            keeper = cls._threads.get(str(card.path))
            if keeper is None or not keeper.thread.is_alive():
                keeper = cls._threads[str(card.path)] = cls(card)
                keeper.ids.add(entry_id)
                keeper.thread.start()
            else:
                keeper.ids.add(entry_id)

    def _loop(self) -> None:
        while True:
            time.sleep(LEASE_SECONDS / 3)
            with self._guard:
                self.ids &= set(_RUNNING)
                ids = list(self.ids)
                if not ids:
                    self._threads.pop(str(self.card.path), None)
                    return
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease has slack
                self.card.renew_leases(ids)
