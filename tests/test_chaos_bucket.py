"""Chaos on object storage: the scenarios of test_chaos.py with the dataset and the training shards in a
bucket (a local S3 server). Parallel parts, kill -9 at seeded random commits (before or after an upload or a
conditional card write) then resume, and the overwrite chain must all give exactly the content of the clean
sequential run on local disk.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import fsspec
from test_chaos import STAGES, chaos_seed, content, finish, replayable, world  # noqa: F401, F811  (world: the module fixture, reused)
from test_chaos import cli as local_cli

from capcurate import storage
from capcurate.stages.query import stats


def cli(args: list[str], *, kill: str | None = None):
    # the S3 endpoint and credentials were put in os.environ by the s3_server fixture after test_chaos
    # captured its ENV: pass them on
    import test_chaos

    test_chaos.ENV.update({k: v for k, v in os.environ.items() if k.startswith("AWS_")})
    return local_cli(args, kill=kill)


def download(url: str, dest: Path) -> Path:
    """A local copy of a bucket prefix, to compare with content() exactly as the local tests do."""
    return storage.download_tree(url, dest)


def test_bucket_concurrent_parts_of_every_stage_equal_a_sequential_local_run(world, bucket, tmp_path):  # noqa: F811
    pipe, ds, out = world["pipe"], f"{bucket}/ds", f"{bucket}/out"
    for stage in STAGES:
        args = pipe.args(stage, world["web"], ds, out)
        if stage == "mix":
            finish([cli(args)])
            continue
        finish([cli([*args, "--part", f"{i}/2"]) for i in range(2)])
    assert not fsspec.filesystem("s3", skip_instance_cache=True).exists(f"{bucket}/ds/.capcurate.lock".removeprefix("s3://"))
    assert content(download(ds, tmp_path / "ds"), download(out, tmp_path / "out")) == world["ref"]


def test_bucket_kill_9_at_random_commits_then_resume_equals_a_sequential_local_run(world, bucket, tmp_path):  # noqa: F811
    seed = chaos_seed()
    rng = random.Random(seed)
    pipe, ds, out = world["pipe"], f"{bucket}/ds", f"{bucket}/out"
    points: list[str] = []
    with replayable(seed, points):
        for stage in STAGES:
            args = pipe.args(stage, world["web"], ds, out)
            point = f"{rng.randint(1, 3)}:{rng.choice(['before', 'after'])}"
            points.append(f"{stage}={point}")
            if stage in ("recaption", "shard"):
                finish([cli([*args, "--part", "0/2"], kill=point)], killed=True)
                finish([cli([*args, "--part", "1/2"])])
            else:
                finish([cli(args, kill=point)], killed=True)
            finish([cli(args)])
        assert content(download(ds, tmp_path / "ds"), download(out, tmp_path / "out")) == world["ref"]


def test_bucket_overwrite_chain_recomputes_what_changed(world, bucket, tmp_path):  # noqa: F811
    pipe, ds, out = world["pipe"], f"{bucket}/ds", f"{bucket}/out"
    for stage in STAGES[:-1]:
        finish([cli(pipe.args(stage, world["web"], ds, out))])
    finish([cli([*pipe.args("ingest", world["web_new"], ds, out), "--overwrite"])])
    assert set(stats(ds).details["stale_columns"]) == {"cap_blip", "score_s_raw", "score_s_blip"}
    (rec,) = finish([cli(pipe.args("recaption", world["web_new"], ds, out))])
    assert rec["counts"]["shards_processed"] == 3
    (sc,) = finish([cli(pipe.args("score", world["web_new"], ds, out))])
    assert sc["counts"]["shards_processed"] == 3
    assert stats(ds).details["stale_columns"] == {}
    for stage in ("mix", "shard"):
        finish([cli([*pipe.args(stage, world["web_new"], ds, out), "--overwrite"])])
    assert content(download(ds, tmp_path / "ds"), download(out, tmp_path / "out")) == world["ref_new"]

