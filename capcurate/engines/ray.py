"""Ray engine: the same ``ShardJob`` on a pool of Ray actors, each loading its model once.

Connects to an existing cluster when RAY_ADDRESS is set (``ray start --head`` / KubeRay), otherwise
starts a local one. An actor of a job whose ``uses_gpu`` is true reserves one GPU where the cluster has
GPUs; other jobs (shard, ingest) reserve none. Device, precision and decode workers are resolved by
each actor in ``job.setup()``, on the machine it runs on.

An actor works on one shard at a time, so an actor that dies (kill -9, out of memory, a lost node)
loses at most that shard: it is replaced by a fresh actor and the shard is queued again, up to
``max_retries`` times per shard. A shard whose job raises is recorded as failed at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..progress import progress_bar

if TYPE_CHECKING:
    from . import EngineResult, ShardJob

log = logging.getLogger("capcurate.engines")


def run_ray(job: ShardJob, shard_ids: Sequence[str], result: EngineResult, *, description: str = "shards",
            num_actors: int | None = None, num_gpus: float | None = None, num_cpus: float = 1,
            fail_fast: bool = False, max_retries: int = 2) -> None:
    if not shard_ids:
        return
    try:
        import ray
        from ray.exceptions import RayActorError
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'capcurate[ray]'") from None

    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    resources = ray.cluster_resources()
    if num_gpus is None:
        # a GPU per actor only for jobs that run a model on one; copying or indexing shards needs none
        wants_gpu = bool(getattr(job, "uses_gpu", False))
        num_gpus = 1 if wants_gpu and resources.get("GPU", 0) >= 1 else 0
    if num_actors is None:
        num_actors = int(resources.get("GPU", 0)) if num_gpus else max(1, int(resources.get("CPU", 1) // num_cpus))
    num_actors = max(1, min(num_actors, len(shard_ids)))

    @ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)
    class _Worker:
        def __init__(self, job: Any):
            self.job = job
            self.job.setup()

        def process(self, sid: str) -> tuple[str, dict[str, int] | None, str | None]:
            try:
                return sid, self.job.process(sid), None
            except Exception as e:  # reported per shard; the others go on
                return sid, None, f"{type(e).__name__}: {e}"

    queue = deque(shard_ids)
    deaths: Counter = Counter()  # shard -> how many actors died working on it
    idle = [_Worker.remote(job) for _ in range(num_actors)]
    running: dict[Any, tuple[Any, str]] = {}  # task ref -> (actor, shard): one shard per actor at a time
    with progress_bar(len(shard_ids), f"{description} (ray x{num_actors})") as advance:
        while queue or running:
            while queue and idle:
                actor, sid = idle.pop(), queue.popleft()
                running[actor.process.remote(sid)] = (actor, sid)
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor, sid = running.pop(ref)
            try:
                _, counts, err = ray.get(ref)
            except RayActorError as e:
                deaths[sid] += 1
                result.counts["ray_actors_replaced"] += 1
                with contextlib.suppress(Exception):
                    ray.kill(actor)
                idle.append(_Worker.remote(job))
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if deaths[sid] <= max_retries:
                    log.warning("shard %s: its Ray actor died (%s); retrying on a fresh actor (%d of %d)",
                                sid, cause, deaths[sid], max_retries)
                    queue.appendleft(sid)
                    continue
                counts, err = None, f"its Ray actor died {deaths[sid]} times (--max-retries {max_retries}): {cause}"
            else:
                idle.append(actor)
            if err is not None:
                if fail_fast:
                    raise RuntimeError(f"shard {sid}: {err}")
                result.failed[sid] = err
            else:
                result.processed.append(sid)
                result.counts.update(counts or {})
            advance(1)
