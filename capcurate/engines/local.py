"""The embedded engine: shards one after another in this process (DataLoader workers do the decoding)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..oserrors import stops_every_shard
from ..progress import progress_bar

if TYPE_CHECKING:
    from . import EngineResult, ShardJob


# shards per input stream: a stream holds every row of its shards (ids, keys, captions) in memory, so a
# pool of thousands of shards goes through in windows; a new window costs one worker start-up
STREAM_WINDOW = 16


def _streamed(many, shard_ids: list[str]):
    for i in range(0, len(shard_ids), STREAM_WINDOW):
        yield from many(shard_ids[i:i + STREAM_WINDOW])


def outcomes(job: ShardJob, shard_ids: list[str]):
    """``(shard_id, counts | exception)`` for each shard, as its file is written: through the job's
    ``process_many`` when it streams (one input pipeline for the whole window), else shard by shard.
    The Ray engine runs this inside each actor over the window of shards it was given."""
    many = getattr(job, "process_many", None)
    if callable(many):
        yield from many(shard_ids)
        return
    for sid in shard_ids:
        try:
            yield sid, job.process(sid)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            yield sid, e


def run_local(job: ShardJob, shard_ids: Sequence[str], result: EngineResult, *,
              description: str = "shards", fail_fast: bool = False) -> None:
    if not shard_ids:
        return
    job.setup()
    placement = getattr(job, "placement", None)
    if callable(placement):
        result.placements.append(placement())
    many = getattr(job, "process_many", None)
    if callable(many):  # one input stream across many shards: workers and read-ahead live across them
        with progress_bar(len(shard_ids), description) as advance:
            for sid, outcome in _streamed(many, list(shard_ids)):
                if isinstance(outcome, BaseException):
                    # a full disk or read-only output would fail every shard after this one too
                    if fail_fast or isinstance(outcome, KeyboardInterrupt) or stops_every_shard(outcome):
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
                if fail_fast or stops_every_shard(e):
                    raise
                result.failed[sid] = f"{type(e).__name__}: {e}"
            else:
                result.processed.append(sid)
                result.counts.update(counts or {})
            advance(1)
