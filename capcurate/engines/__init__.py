"""Engines run one per-shard function over many shards, skipping shards whose output exists.

A stage supplies a ``ShardJob``: ``setup()`` loads what every shard needs (a model) once per worker,
``process(shard_id)`` does one shard and writes its output atomically, ``output_path(shard_id)`` is the
file whose existence means "done". Which outputs exist is learnt from one listing of each output folder
per run (:func:`pending_shards`), never from one existence check per shard: on an object store that is
one LIST request per 1,000 shards instead of one HEAD per shard. The engine decides where ``process`` runs: in this process
(``local``) or on Ray actors (``ray``). Both produce the same files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .. import storage
from ..errors import CapcurateError, InputError

ENGINES = ("local", "ray")


class ShardJob(Protocol):
    def output_path(self, shard_id: str) -> Path: ...
    def setup(self) -> None: ...
    def process(self, shard_id: str) -> dict[str, int]: ...
    # Optional: ``process_many(shard_ids)`` yielding ``(shard_id, counts | exception)`` as each shard is
    # written; the local engine prefers it (one input stream across shards, no per-shard worker restarts).
    # Optional: ``placement() -> dict`` after setup: the device, precision, decode workers and batch size
    # this worker resolved, for lineage (a Ray actor resolves "auto" on its own machine).
    # Optional: ``is_done(shard_id) -> bool`` refines "output_path exists" as the completion test, for
    # a stage whose finished file can still lack work (score adds columns for a new caption source); it
    # is asked only about shards whose output the listing found.


def process_via_many(job: Any, shard_id: str) -> dict[str, int]:
    """``process(shard_id)`` of a job that streams: the one-shard case of its ``process_many``."""
    for _, outcome in job.process_many([shard_id]):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
    raise RuntimeError(f"shard {shard_id} produced no result")


def is_done(job: ShardJob, shard_id: str) -> bool:
    """One shard's completion test (one existence check; runs over many shards use pending_shards)."""
    check = getattr(job, "is_done", None)
    return bool(check(shard_id)) if callable(check) else job.output_path(shard_id).exists()


def pending_shards(job: ShardJob, shard_ids: Sequence[str], *, first: bool = False) -> list[str]:
    """The shards of ``shard_ids`` not done yet, in order: one listing per output folder, then the job's
    ``is_done`` for the shards whose output is there. ``first``: stop at the first pending shard."""
    listed: dict[str, set[str]] = {}
    check = getattr(job, "is_done", None)
    out = []
    for sid in shard_ids:
        p = job.output_path(sid)
        folder = str(p.parent)
        if folder not in listed:
            listed[folder] = storage.list_names(p.parent)
        done = p.name in listed[folder] and (not callable(check) or bool(check(sid)))
        if not done:
            out.append(sid)
            if first:
                break
    return out


@dataclass
class EngineResult:
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)   # already finished by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error (other shards still ran)
    counts: Counter = field(default_factory=Counter)
    placements: list[dict[str, Any]] = field(default_factory=list)  # one per worker that set the job up
    setup_seconds: float = 0.0  # Ray: from the first actor's creation until every actor was set up

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards_processed": len(self.processed),
            "shards_skipped": len(self.skipped),
            "shards_failed": len(self.failed),
            "failed_shards": self.failed,
            **dict(self.counts),
        }


class ActorSetupError(CapcurateError):
    """A worker could not set its job up (its model did not load): raised once, with that worker's error
    and its exit code (4 for a model that cannot be loaded), instead of failing every shard."""

    def __init__(self, message: str, exit_code: int = 1, *, wrote_nothing: bool = True):
        super().__init__(message)
        self.exit_code = exit_code
        self.wrote_nothing = wrote_nothing  # no shard of this run was written: the run can leave no trace


def connect_engine(engine: str) -> None:
    """Check the engine's name and reach it before a stage writes anything: for ``ray``, the cluster at
    ``$RAY_ADDRESS`` (a one-line error when it does not answer) or a private local one."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: choose local or ray")
    if engine == "ray":
        from .ray import connect

        connect()


def placement_summary(placements: list[dict[str, Any]]) -> dict[str, Any]:
    """What lineage records about where a job ran: device, precision, workers and batch size as resolved
    (one value when every worker agrees, else the sorted distinct values), and under Ray each actor's."""
    if not placements:
        return {}
    out: dict[str, Any] = {}
    for key in ("device", "precision", "workers", "batch_size", "decode"):
        values = sorted({p[key] for p in placements if p.get(key) is not None}, key=str)
        if values:
            out[key] = values[0] if len(values) == 1 else values
    if any("node" in p for p in placements):
        out["actors"] = placements
    return out


def parse_part(part: str | None) -> tuple[int, int] | None:
    """``"i/N"`` (0 <= i < N) -> (i, N); None means all shards."""
    if part in (None, ""):
        return None
    try:
        i_s, n_s = part.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise InputError(f"--part must look like i/N (e.g. 0/4), got {part!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--part {part}: need 0 <= i < N")
    return i, n


def select_part(shard_ids: Sequence[str], part: tuple[int, int] | None) -> list[str]:
    """A deterministic subset: shards at sorted positions p with p % N == i."""
    ids = sorted(shard_ids)
    if part is None:
        return ids
    i, n = part
    return [s for p, s in enumerate(ids) if p % n == i]


DEFAULT_MAX_RETRIES = 2


def check_max_retries(max_retries: int) -> int:
    if max_retries < 0:
        raise InputError(f"--max-retries must be 0 or more, got {max_retries}")
    return max_retries


def run_job(job: ShardJob, shard_ids: Sequence[str], *, engine: str = "local", part: str | None = None,
            description: str = "shards", max_retries: int = DEFAULT_MAX_RETRIES,
            **engine_options: Any) -> EngineResult:
    """Run ``job`` over ``shard_ids`` (restricted to ``part``) with the chosen engine.

    ``max_retries``: on Ray, how many times a shard whose actor died (killed, out of memory, node lost)
    is retried on a fresh actor; a shard that raises is recorded as failed at once (it would fail again).
    """
    check_max_retries(max_retries)
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}: choose local or ray")
    todo = select_part(shard_ids, parse_part(part))
    result = EngineResult()
    remaining = pending_shards(job, todo)
    pending = set(remaining)
    result.skipped.extend(s for s in todo if s not in pending)
    if engine == "local":
        from ..storage import write_behind
        from .local import run_local

        with write_behind():  # outputs in a store upload while the next shard is worked on
            run_local(job, remaining, result, description=description, **engine_options)
    else:
        from .ray import run_ray

        run_ray(job, remaining, result, description=description, max_retries=max_retries, **engine_options)
    return result
