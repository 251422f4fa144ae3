"""The embedded engine: shards one after another in this process (DataLoader workers do the decoding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..progress import progress_bar

if TYPE_CHECKING:
    from . import EngineResult, ShardJob


def run_local(job: ShardJob, shard_ids: Sequence[str], result: EngineResult, *,
              description: str = "shards", fail_fast: bool = False) -> None:
    if not shard_ids:
        return
    job.setup()
    many = getattr(job, "process_many", None)
    if callable(many):  # one input stream across all shards: workers and read-ahead live for the run
        with progress_bar(len(shard_ids), description) as advance:
            for sid, outcome in many(list(shard_ids)):
                if isinstance(outcome, BaseException):
                    if fail_fast or isinstance(outcome, KeyboardInterrupt):
                        raise outcome
                    result.failed[sid] = f"{type(outcome).__name__}: {outcome}"
                else:
                    result.processed.append(sid)
                    result.counts.update(outcome or {})
                advance(1)
        return
    with progress_bar(len(shard_ids), description) as advance:
        for sid in shard_ids:
            try:
                counts = job.process(sid)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                if fail_fast:
                    raise
                result.failed[sid] = f"{type(e).__name__}: {e}"
            else:
                result.processed.append(sid)
                result.counts.update(counts or {})
            advance(1)
