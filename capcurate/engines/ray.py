"""Ray engine: the same ``ShardJob`` on a pool of Ray actors, each loading its model once.

Where it runs: the cluster at ``$RAY_ADDRESS`` (``ray start --head`` / KubeRay; ``host:port``,
``ray://host:port`` or ``auto``) when that is set, else a private local Ray instance started for this run.
Never Ray's default of attaching to whatever cluster ``ray start`` left on this machine: that may be
another user's. A ``RAY_ADDRESS`` that does not answer is a one-line error before anything is written.

Each actor sets the job up once (loads the model) and reports where it runs: the device, precision,
decode workers and batch size it resolved from ``auto`` on its own machine, which lineage records per
actor. Decode workers and torch threads are sized from the CPUs Ray assigned the actor (its
``num_cpus``), not the node's cores. A set-up that fails (a model that cannot be loaded) fails the run
once, with the actor's own error and exit code, before any shard is handed out; it is not retried per shard.

Shards go out once every actor of the pool is set up. An actor is given a window of shards at a time and streams them through the job's ``process_many`` (one
image input pipeline, so decode workers are not restarted per shard); each shard is reported as its file
is written. An actor that dies (kill -9, out of memory, a lost node) loses only the shards of its window
not reported yet: the one in progress counts a death and is retried on a fresh actor up to
``max_retries`` times, the others are queued again. A shard whose job raises is recorded as failed at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import CapcurateError, InputError
from ..progress import progress_bar
from .local import STREAM_WINDOW, outcomes

if TYPE_CHECKING:
    from . import EngineResult, ShardJob

log = logging.getLogger("capcurate.engines")

ADDRESS_ENV = "RAY_ADDRESS"
PROBE_SECONDS = 5.0
# Environment the actors get from the driver: a real cluster's worker nodes were started by `ray start` with
# their own environment, where the driver's storage endpoint and credentials (AWS_ENDPOINT_URL, ...), Hugging
# Face settings (HF_HUB_OFFLINE, HF_HOME) and capcurate's own settings are not set. (Like any runtime_env,
# the values are visible in Ray's job info.)
FORWARD_PREFIXES = ("AWS_", "CAPCURATE_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "FSSPEC_", "AZURE_STORAGE_",
                    "GOOGLE_APPLICATION_CREDENTIALS")
NOT_FORWARDED = {"CAPCURATE_CPUS", "CAPCURATE_CHAOS_KILL"}  # each actor's CPUs come from Ray; a test hook


def forwarded_env() -> dict[str, str]:
    """The driver's variables that the actors get (``FORWARD_PREFIXES``, less ``NOT_FORWARDED``)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARD_PREFIXES) and k not in NOT_FORWARDED}


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'capcurate[ray]'") from None
    return ray


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def probe_address(address: str) -> None:
    """Raise InputError unless something listens at ``address`` (``host:port``, ``ray://host:port``):
    Ray itself would retry a dead address for minutes before giving up."""
    if address == "auto":
        return
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"{ADDRESS_ENV}={address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise InputError(f"{ADDRESS_ENV}={address} does not answer ({e.strerror or _one_line(e)}): start the "
                         f"Ray cluster there (ray start --head), or unset {ADDRESS_ENV} to run on a private "
                         "local Ray instance") from None


def connect() -> None:
    """Join ``$RAY_ADDRESS``'s cluster, or start a private local one; nothing when already connected."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = os.environ.get(ADDRESS_ENV, "").strip()
    if not address:
        # "local" always starts a new instance; Ray's default would join a cluster found on this machine
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        return
    probe_address(address)
    try:
        ray.init(address=address, log_to_driver=False)
    except Exception as e:  # ConnectionError, an auth token the cluster wants, a version mismatch
        raise InputError(f"{ADDRESS_ENV}={address}: cannot join the Ray cluster ({_one_line(e)})") from None


class ShardActor:
    """One Ray actor: sets the job up once, then streams the windows of shards it is given."""

    def __init__(self, job: Any):
        import ray

        from ..devices import CPUS_ENV, available_cpus

        ctx = ray.get_runtime_context()
        cpus = ctx.get_assigned_resources().get("CPU")
        if cpus:  # "auto" workers and torch threads follow the CPUs Ray gave this actor
            os.environ[CPUS_ENV] = str(max(1, int(cpus)))
        self.job = job
        self.error: tuple[int, str] | None = None
        self.placement: dict[str, Any] = {"node": ctx.get_node_id(), "host": socket.gethostname(),
                                          "pid": os.getpid(), "cpus": available_cpus()}
        try:
            job.setup()
        except Exception as e:  # reported once by ready(); the actor stays up so the driver sees why
            code = e.exit_code if isinstance(e, CapcurateError) else 1
            self.error = (code, _one_line(e) if isinstance(e, CapcurateError) else f"{type(e).__name__}: {_one_line(e)}")
            return
        placement = getattr(job, "placement", None)
        if callable(placement):
            self.placement.update(placement())

    def ready(self) -> tuple[tuple[int, str] | None, dict[str, Any]]:
        return self.error, self.placement

    def run_window(self, shard_ids: list[str]):
        """Yield ``(shard_id, counts, error)`` per shard as its file is written."""
        for sid, outcome in outcomes(self.job, shard_ids):
            if isinstance(outcome, BaseException):
                yield sid, None, f"{type(outcome).__name__}: {outcome}"
            else:
                yield sid, outcome, None


@dataclass
class _Window:
    actor: Any
    shard_ids: list[str]
    reported: set[str] = field(default_factory=set)

    def unreported(self) -> list[str]:
        return [s for s in self.shard_ids if s not in self.reported]


def window_size(n_shards: int, n_actors: int) -> int:
    """Shards per hand-out: an even share, at most the local engine's stream window (memory bound)."""
    return max(1, min(STREAM_WINDOW, math.ceil(n_shards / max(1, n_actors))))


def run_ray(job: ShardJob, shard_ids: Sequence[str], result: EngineResult, *, description: str = "shards",
            num_actors: int | None = None, num_gpus: float | None = None, num_cpus: float = 1,
            fail_fast: bool = False, max_retries: int = 2, window: int | None = None) -> None:
    from . import ActorSetupError

    if not shard_ids:
        return
    ray = _ray()
    from ray.exceptions import RayActorError, RayTaskError

    connect()
    resources = ray.cluster_resources()
    if num_gpus is None:
        # a GPU per actor only for jobs that run a model on one; copying or indexing shards needs none
        wants_gpu = bool(getattr(job, "uses_gpu", False))
        num_gpus = 1 if wants_gpu and resources.get("GPU", 0) >= 1 else 0
    if num_actors is None:
        num_actors = int(resources.get("GPU", 0)) if num_gpus else max(1, int(resources.get("CPU", 1) // num_cpus))
    num_actors = max(1, min(num_actors, len(shard_ids)))
    window = window or window_size(len(shard_ids), num_actors)
    actor_class = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus,
                             runtime_env={"env_vars": forwarded_env()})(ShardActor)

    queue = deque(shard_ids)
    deaths: Counter = Counter()  # shard -> how many actors died working on it
    setup_deaths = 0
    starting: dict[Any, Any] = {}  # ready() ref -> actor still setting up
    running: dict[Any, _Window] = {}  # streaming generator -> its window
    idle: list[Any] = []
    actors: list[Any] = []

    def start_actor() -> None:
        actor = actor_class.remote(job)
        actors.append(actor)
        starting[actor.ready.remote()] = actor

    def replace(actor: Any) -> None:
        result.counts["ray_actors_replaced"] += 1
        with contextlib.suppress(Exception):
            ray.kill(actor)
        start_actor()

    t0 = time.perf_counter()
    for _ in range(num_actors):
        start_actor()
    try:
        with progress_bar(len(shard_ids), f"{description} (ray x{num_actors})") as advance:
            while queue or running:
                # no shard goes out before every first actor is set up: a model that cannot load fails
                # the run before anything is written, and the work spreads over the whole pool
                while queue and idle and len(result.placements) >= num_actors:
                    actor = idle.pop()
                    ids = [queue.popleft() for _ in range(min(window, len(queue)))]
                    running[actor.run_window.options(num_returns="streaming").remote(ids)] = _Window(actor, ids)
                (ready,), _ = ray.wait([*starting, *running], num_returns=1)
                if ready in starting:
                    actor = starting.pop(ready)
                    try:
                        error, placement = ray.get(ready)
                    except RayActorError as e:  # died while loading (out of memory, node lost)
                        setup_deaths += 1
                        if setup_deaths > max_retries:
                            raise ActorSetupError(f"Ray actors died while setting up {setup_deaths} times "
                                                  f"(--max-retries {max_retries}): {_one_line(e)}",
                                                  wrote_nothing=not result.processed) from None
                        replace(actor)
                        continue
                    if error is not None:  # fail fast, once, with the actor's own error and exit code
                        code, message = error
                        raise ActorSetupError(f"{message} (Ray actor on {placement.get('host')})", code,
                                              wrote_nothing=not result.processed)
                    result.placements.append(placement)
                    if len(result.placements) == num_actors:
                        result.setup_seconds = time.perf_counter() - t0
                    idle.append(actor)
                    continue
                win = running[ready]
                try:
                    sid, counts, err = ray.get(next(ready))
                except StopIteration:
                    running.pop(ready)
                    idle.append(win.actor)
                    for sid in win.unreported():  # a job whose process_many skipped a shard
                        result.failed[sid] = "the job produced no result for this shard"
                        advance(1)
                    continue
                except RayTaskError as e:  # the job raised outside a shard: its window's shards fail
                    running.pop(ready)
                    idle.append(win.actor)
                    cause = getattr(e, "cause", None)  # the job's own exception, not Ray's wrapper text
                    why = f"{type(cause).__name__}: {_one_line(cause)}" if cause is not None else _one_line(e)
                    for sid in win.unreported():
                        if fail_fast:
                            raise RuntimeError(f"shard {sid}: {why}") from None
                        result.failed[sid] = why
                        advance(1)
                    continue
                except RayActorError as e:
                    running.pop(ready)
                    lost = win.unreported()
                    replace(win.actor)
                    if not lost:  # died after its last shard was reported: nothing to redo
                        continue
                    blamed, rest = lost[0], lost[1:]  # the shard in progress; the rest never started
                    deaths[blamed] += 1
                    queue.extendleft(reversed(rest))
                    if deaths[blamed] <= max_retries:
                        log.warning("shard %s: its Ray actor died (%s); retrying on a fresh actor (%d of %d)",
                                    blamed, _one_line(e), deaths[blamed], max_retries)
                        queue.appendleft(blamed)
                        continue
                    sid, counts = blamed, None
                    err = f"its Ray actor died {deaths[blamed]} times (--max-retries {max_retries}): {_one_line(e)}"
                win.reported.add(sid)
                if err is not None:
                    if fail_fast:
                        raise RuntimeError(f"shard {sid}: {err}")
                    result.failed[sid] = err
                else:
                    result.processed.append(sid)
                    result.counts.update(counts or {})
                advance(1)
    finally:
        # free their CPUs/GPUs now, not when the driver's handles are collected: an idle actor exits
        # cleanly (its scratch files are removed at exit), one still working is killed
        busy = {id(w.actor) for w in running.values()}
        for actor in actors:
            with contextlib.suppress(Exception):
                if id(actor) in busy:
                    ray.kill(actor)
                else:
                    actor.__ray_terminate__.remote()
