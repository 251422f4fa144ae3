"""--engine ray runs the same per-shard job on Ray actors and writes the same files as the local engine."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from scorer_fixtures import save_tiny_openclip

from capcurate.stages.score import score

ray = pytest.importorskip("ray", reason="Ray is the optional scale-out engine: pip install 'capcurate[ray]'")


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_score_on_ray_actors_equals_local_engine(tmp_path, ray_cluster):
    cfg, weights = save_tiny_openclip(tmp_path / "model")
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(12)]
    samples.append({"caption": "broken", "image": b"not an image"})
    local = build_dataset(tmp_path / "local", samples, per_shard=4)
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)

    common = dict(pretrained=str(weights), name="tiny", batch_size=4, workers=0)
    score(local, f"openclip:{cfg}", **common)
    summary = score(remote, f"openclip:{cfg}", engine="ray", num_actors=2, **common)

    assert summary.ok and summary.counts["shards_processed"] == 4
    for shard in ("00000", "00001", "00002", "00003"):
        a = pq.read_table(local / "scores" / "tiny" / f"{shard}.parquet").to_pylist()
        b = pq.read_table(remote / "scores" / "tiny" / f"{shard}.parquet").to_pylist()
        assert [r["uid"] for r in a] == [r["uid"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            if ra["score_tiny_raw"] is None:
                assert rb["score_tiny_raw"] is None and rb["error_tiny"]
            else:
                assert rb["score_tiny_raw"] == pytest.approx(ra["score_tiny_raw"], abs=1e-5)

    # a second ray run finds every shard done and processes nothing
    again = score(remote, f"openclip:{cfg}", engine="ray", num_actors=2, **common)
    assert again.counts["shards_processed"] == 0 and again.counts["shards_skipped"] == 4


def test_recaption_on_ray_resolves_device_on_the_actor_and_equals_local(tmp_path, ray_cluster):
    from captioner_fixtures import build_tiny_blip

    from capcurate.stages.recaption import RecaptionJob, recaption
    from capcurate.stages.shard import ShardWriteJob

    ref = build_tiny_blip(tmp_path / "model")
    samples = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i)} for i in range(8)]
    local = build_dataset(tmp_path / "local", samples, per_shard=4)
    remote = tmp_path / "remote"
    shutil.copytree(local, remote)
    common = dict(model=ref, name="b", decoding="greedy", max_new_tokens=4, workers=0)
    recaption(local, **common)
    s = recaption(remote, engine="ray", **common)  # device/precision "auto" travel to the actors unresolved
    assert s.ok and s.counts["shards_processed"] == 2
    for shard in ("00000", "00001"):
        a = pq.read_table(local / "captions" / "b" / f"{shard}.parquet").to_pylist()
        b = pq.read_table(remote / "captions" / "b" / f"{shard}.parquet").to_pylist()
        assert a == b
    # model stages ask Ray for a GPU where there is one; shard copying never does
    assert RecaptionJob("r", "n", ref, None, None).uses_gpu
    assert not RecaptionJob("r", "n", ref, None, None, device="cpu").uses_gpu
    assert not getattr(ShardWriteJob, "uses_gpu", False)


class SlowCountingJob:
    """Writes one marker file per shard; the actor working on ``kill_shard`` kills itself (kill -9) the
    first time, after 0.2 s of work, as an out-of-memory kill or a lost node would end it."""

    def __init__(self, root, kill_shard: str | None = None, always_kill: bool = False):
        self.root, self.kill_shard, self.always_kill = root, kill_shard, always_kill

    def output_path(self, sid):
        return self.root / f"{sid}.done"

    def setup(self):
        pass

    def process(self, sid):
        import os
        import signal
        import time

        (self.root / f"{sid}.attempt.{os.getpid()}").touch()
        time.sleep(0.2)
        if sid == self.kill_shard and (self.always_kill or not (self.root / "killed").exists()):
            (self.root / "killed").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        self.output_path(sid).write_text(sid)
        return {"rows": 1}


def test_ray_replaces_a_killed_actor_and_retries_only_its_shard(tmp_path, ray_cluster):
    import sys

    from capcurate.engines import run_job

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the job class lives in this test file
    ids = [f"{i:05d}" for i in range(6)]
    result = run_job(SlowCountingJob(tmp_path, kill_shard="00002"), ids, engine="ray", num_actors=2,
                     max_retries=1)
    assert sorted(result.processed) == ids and not result.failed
    assert result.counts["rows"] == 6 and result.counts["ray_actors_replaced"] == 1
    attempts = {sid: len(list(tmp_path.glob(f"{sid}.attempt.*"))) for sid in ids}
    assert attempts == {**dict.fromkeys(ids, 1), "00002": 2}  # one shard of work lost, nothing else redone

    # an actor that dies every time: the shard fails after --max-retries, the other shards still finish
    again = tmp_path / "again"
    again.mkdir()
    result = run_job(SlowCountingJob(again, kill_shard="00001", always_kill=True), ids[:3], engine="ray",
                     num_actors=2, max_retries=0)
    assert sorted(result.processed) == ["00000", "00002"]
    assert "died 1 times (--max-retries 0)" in result.failed["00001"]


@pytest.mark.parametrize("command", ["recaption", "score", "ingest", "shard"])
def test_max_retries_must_not_be_negative(tmp_path, command):
    from typer.testing import CliRunner

    from capcurate.cli import app

    args = {"recaption": ["recaption", str(tmp_path), "--model", "hf:x", "--name", "n"],
            "score": ["score", str(tmp_path), "--model", "openclip:x", "--name", "n"],
            "ingest": ["ingest", str(tmp_path), "-o", str(tmp_path / "out")],
            "shard": ["shard", str(tmp_path), "--selection", "s", "-o", str(tmp_path / "out")]}[command]
    r = CliRunner().invoke(app, [*args, "--engine", "ray", "--max-retries", "-1"])
    assert r.exit_code == 2 and "--max-retries must be 0 or more, got -1" in r.output, r.output


def test_download_with_the_ray_distributor(tmp_path, ray_cluster):
    """img2dataset's ray distributor (``download --distributor ray``) fetches every shard on the cluster."""
    import pyarrow as pa
    from http_fixtures import add_good_images, serve

    from capcurate.dataset import Dataset
    from capcurate.stages.download import download

    with serve() as srv:
        rows = add_good_images(srv, 6)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "u.parquet")
        s = download(tmp_path / "u.parquet", tmp_path / "ds", timeout=3, threads=4, image_size=32,
                     samples_per_shard=3, distributor="ray")
    assert s.ok and (s.counts["ok"], s.counts["shards"]) == (6, 2)
    got = Dataset(tmp_path / "ds").query("SELECT url, status FROM manifest").to_pylist()
    assert sorted(r["url"] for r in got) == sorted(r["url"] for r in rows)
    assert {r["status"] for r in got} == {"success"}
