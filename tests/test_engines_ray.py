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
