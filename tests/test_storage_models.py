"""recaption, score, dedup and the cluster filter on a dataset in a bucket (a local S3 server) give the same
rows as on a local copy; completion is one listing of the output folder; tar reads (staged or ranged) agree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from typer.testing import CliRunner

from capcurate import storage
from capcurate.cli import app

runner = CliRunner()


def cli(*args: str) -> dict:
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def samples() -> list[dict]:
    """14 rows in 3 shards: 10 images, an exact copy, a resized copy, a corrupt image, a dead link."""
    out = [{"caption": f"a photo of thing {i}", "image": make_image_bytes(i, size=(40, 28))} for i in range(10)]
    out.append({"caption": "a copy", "image": make_image_bytes(3, size=(40, 28))})
    out.append({"caption": "a bigger copy", "image": make_image_bytes(5, size=(80, 56))})
    out.append({"caption": "corrupt", "image": b"not an image"})
    out.append({"caption": "dead link", "status": "failed_to_download"})
    return out


def pair(tmp_path: Path, bucket: str) -> tuple[Path, str]:
    """The same dataset twice: in a local folder and written directly at a bucket URL."""
    local = build_dataset(tmp_path / "local", samples(), per_shard=5)
    url = f"{bucket}/pool"
    build_dataset(url, samples(), per_shard=5)
    return local, url


def rows(root, rel: str) -> list[dict]:
    return storage.read_table(storage.path(str(root)) / rel).to_pylist()


def assert_same_files(local: Path, url: str, folder: str, approx: bool = False) -> None:
    names = storage.list_names(storage.path(url) / folder, ".parquet")
    assert names == storage.list_names(local / folder, ".parquet") and names
    for n in sorted(names):
        a, b = rows(local, f"{folder}/{n}"), rows(url, f"{folder}/{n}")
        assert [r["uid"] for r in a] == [r["uid"] for r in b]
        for ra, rb in zip(a, b, strict=True):
            if approx:
                assert ra.keys() == rb.keys()
                for k, v in ra.items():
                    if isinstance(v, float):
                        assert rb[k] == pytest.approx(v, abs=1e-6), (n, k)
                    else:
                        assert rb[k] == v, (n, k)
            else:
                assert ra == rb, n


@pytest.fixture(scope="module")
def blip_ref(tmp_path_factory):
    from captioner_fixtures import build_tiny_blip

    return build_tiny_blip(tmp_path_factory.mktemp("blip"))


@pytest.fixture(scope="module")
def clip_ref(tmp_path_factory):
    from scorer_fixtures import save_tiny_openclip

    cfg, weights = save_tiny_openclip(tmp_path_factory.mktemp("clip"))
    return f"openclip:{cfg}", str(weights)


CAPTION = ["--decoding", "greedy", "--max-new-tokens", "5", "--batch-size", "4", "--device", "cpu"]


def test_recaption_on_a_bucket_equals_local_with_parts_resume_and_workers(tmp_path, bucket, blip_ref):
    local, url = pair(tmp_path, bucket)
    scratch = tmp_path / "scratch"
    cli("recaption", str(local), "--model", blip_ref, "--name", "x", "--workers", "0", *CAPTION)
    # part 0 of 2 in forked DataLoader workers (tars staged once into --scratch), then the rest resumes
    first = cli("recaption", url, "--model", blip_ref, "--name", "x", "--workers", "2", "--part", "0/2",
                "--scratch", str(scratch), *CAPTION)
    assert first["counts"]["shards_processed"] == 2
    assert storage.list_names(storage.path(url) / "captions" / "x") == {"00000.parquet", "00002.parquet"}
    rest = cli("recaption", url, "--model", blip_ref, "--name", "x", "--workers", "0", "--scratch", str(scratch),
               *CAPTION)
    assert (rest["counts"]["shards_processed"], rest["counts"]["shards_skipped"]) == (1, 2)
    assert rest["counts"]["images_captioned"] == 5 and rest["counts"]["images_failed"] == 0
    assert_same_files(local, url, "captions/x")
    assert list(scratch.iterdir()) == []  # staged tars and their folder are gone
    assert cli("recaption", url, "--model", blip_ref, "--name", "x", *CAPTION)["counts"]["shards_skipped"] == 3


def test_score_on_a_bucket_equals_local_with_embeddings_parts_and_a_new_source(tmp_path, bucket, blip_ref,
                                                                               clip_ref):
    local, url = pair(tmp_path, bucket)
    model, weights = clip_ref
    common = ["--model", model, "--pretrained", weights, "--name", "y", "--batch-size", "4", "--device", "cpu",
              "--save-embeddings"]
    cli("score", str(local), *common, "--workers", "0")
    part = cli("score", url, *common, "--workers", "2", "--part", "1/2")
    assert part["counts"]["shards_processed"] == 1
    rest = cli("score", url, *common, "--workers", "0")
    assert (rest["counts"]["shards_processed"], rest["counts"]["shards_skipped"]) == (2, 1)
    assert_same_files(local, url, "scores/y", approx=True)
    assert_same_files(local, url, "embeddings/y", approx=True)
    for n in ("00000", "00001", "00002"):
        a = np.load(local / "embeddings" / "y" / f"{n}.image.npy")
        b = np.load(storage.path(f"{url}/embeddings/y/{n}.image.npy").open("rb"))
        np.testing.assert_array_equal(a, b)

    # a new caption source: every shard is not done any more (is_done's new-source check), the image
    # embeddings are read back from the bucket, and only the new column is computed
    for root in (str(local), url):
        cli("recaption", root, "--model", blip_ref, "--name", "x", "--workers", "0", *CAPTION)
    cli("score", str(local), *common, "--workers", "0")
    again = cli("score", url, *common, "--workers", "0")
    assert again["counts"]["shards_processed"] == 3 and again["counts"]["images_reused"] == 14
    assert "score_y_x" in rows(url, "scores/y/00000.parquet")[0]
    assert_same_files(local, url, "scores/y", approx=True)
    assert cli("score", url, *common)["counts"]["shards_skipped"] == 3


def test_dedup_and_cluster_filter_on_a_bucket_equal_local(tmp_path, bucket, clip_ref):
    from capcurate.dataset import Dataset
    from capcurate.stages.cluster_filter import ClusterFilter, target_clusters
    from capcurate.stages.score import score

    local, url = pair(tmp_path, bucket)
    model, weights = clip_ref
    for root in (local, url):
        score(root, model, "y", pretrained=weights, batch_size=4, workers=0, device="cpu", save_embeddings=True)
    args = ["--name", "d", "--exact", "--near", "--captions", "--semantic", "y", "--eps", "0.5", "--clusters", "2",
            "--workers", "2"]
    a, b = cli("dedup", str(local), *args), cli("dedup", url, *args)
    assert a["counts"] == b["counts"] and a["counts"]["exact duplicates"] == 1
    assert a["counts"]["near duplicates"] >= 1
    assert rows(local, "selections/d.parquet") == rows(url, "selections/d.parquet")
    assert rows(local, "dedup/d.parquet") == rows(url, "dedup/d.parquet")

    targets = tmp_path / "targets.npy"
    np.save(targets, np.load(local / "embeddings" / "y" / "00000.image.npy")[:2].astype(np.float32))
    import pyarrow as pa

    eligible = pa.array([r["uid"] for r in rows(local, "samples/00000.parquet")]
                        + [r["uid"] for r in rows(local, "samples/00001.parquet")], pa.string())
    cf = ClusterFilter("y", targets=str(targets), clusters=2, language="")
    kept_local, _ = target_clusters(Dataset(local), cf, eligible)
    kept_bucket, details = target_clusters(Dataset(url), cf, eligible)
    assert kept_local.num_rows > 0 and kept_local.to_pylist() == kept_bucket.to_pylist()
    assert details["missing_embedding_shards"] == []


class _Job:
    """A ShardJob whose outputs may only be found by listing: a per-shard existence check fails the test."""

    def __init__(self, root, done_check=None):
        self.root = storage.path(root)
        self.done_check = done_check

    def output_path(self, sid):
        p = self.root / "out" / f"{sid}.parquet"
        return _NoProbe(p)


class _NoProbe:
    def __init__(self, p):
        self.p, self.parent, self.name = p, p.parent, p.name

    def exists(self):
        raise AssertionError("one existence check per shard: the engine must list the output folder once")


def test_completion_is_one_listing_of_the_output_folder(bucket, monkeypatch):
    from capcurate import atomic, engines

    for sid in ("00001", "00003"):
        atomic.write_bytes(storage.path(f"{bucket}/ds/out/{sid}.parquet"), b"x")
    calls = []
    real = storage.list_names
    monkeypatch.setattr(storage, "list_names", lambda p, suffix="": calls.append(str(p)) or real(p, suffix))
    ids = [f"{i:05d}" for i in range(5)]
    assert engines.pending_shards(_Job(f"{bucket}/ds"), ids) == ["00000", "00002", "00004"]
    assert calls == [f"{bucket}/ds/out"]
    # is_done refines the listing and is asked only about shards whose output is there
    asked = []
    job = _Job(f"{bucket}/ds")
    job.is_done = lambda sid: asked.append(sid) or sid == "00003"
    assert engines.pending_shards(job, ids) == ["00000", "00001", "00002", "00004"]
    assert asked == ["00001", "00003"]
    assert engines.pending_shards(job, ids, first=True) == ["00000"]
    result = engines.run_job(type("J", (_Job,), {"setup": lambda s: None,
                                                  "process": lambda s, sid: {"n": 1}})(f"{bucket}/ds"),
                             ids, part="0/2")
    assert result.processed == ["00000", "00002", "00004"] and result.skipped == []


@pytest.mark.parametrize("workers", [0, 2])
def test_staged_and_ranged_tar_reads_give_the_local_batches(tmp_path, bucket, workers):
    from capcurate.inputs import ImageStream, Preprocess, ShardWork, success_entries
    from capcurate.inputs.spec import ImageSpec

    local, url = pair(tmp_path, bucket)
    spec = ImageSpec(16, (16, 16), "bilinear", (0.5,) * 3, (0.5,) * 3)

    def collect(root, **kw):
        works = []
        for sid in ("00000", "00001", "00002"):
            m = pq.read_table(local / "samples" / f"{sid}.parquet").to_pylist()
            works.append(ShardWork(sid, f"{root}/shards/{sid}.tar",
                                   success_entries([r["key"] for r in m], [r["status"] for r in m])))
        items, failed, pixels, completed = [], [], [], []
        for b in ImageStream(works, Preprocess(spec), batch_size=3, workers=workers, **kw):
            items += b.items
            failed += [(p, r) for p, r, _ in b.failed]
            completed += b.completed
            if b.pixels is not None:
                pixels.append(b.pixels)
        return items, failed, completed, np.concatenate([x.numpy() for x in pixels])

    want = collect(str(local))
    scratch = tmp_path / "scratch"
    for got in (collect(url, scratch=str(scratch)), collect(url, stage=False)):
        assert got[:3] == want[:3] and len(want[0]) == 12 and len(want[1]) == 1
        np.testing.assert_array_equal(got[3], want[3])
    assert list(scratch.iterdir()) == []


def test_score_on_ray_actors_on_a_bucket_equals_local(tmp_path, bucket, clip_ref):
    """Ray started by the driver: actors inherit AWS_* from the driver's environment and get the URL."""
    ray = pytest.importorskip("ray")
    from capcurate.stages.score import score

    local, url = pair(tmp_path, bucket)
    model, weights = clip_ref
    common = dict(pretrained=weights, batch_size=4, workers=0, device="cpu")
    score(local, model, "y", **common)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        s = score(url, model, "y", engine="ray", num_actors=2, **common)
    finally:
        ray.shutdown()
    assert s.ok and s.counts["shards_processed"] == 3, s.details
    assert_same_files(local, url, "scores/y", approx=True)
