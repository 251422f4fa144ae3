"""filter --cluster: the kept set equals a direct re-implementation of DataComp's image-based clustering
rule; composes with --from-selection + top fraction; targets embedded with the scorer's own model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import build_dataset, make_image_bytes
from test_dedup import write_embeddings
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app

runner = CliRunner()
CAPTIONS = ["a red car parked on the street", "two dogs playing in the park", "fr", "x y",
            "le chat est sur la table de la cuisine", "a bowl of fresh fruit on a wooden table"]


def caption(i: int) -> str:
    return CAPTIONS[i % len(CAPTIONS)] + ("" if i % len(CAPTIONS) in (2, 3) else f" number {i}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """90 images in 3 shards with 6 well-separated embedding blobs, scores for a top-fraction step."""
    rng = np.random.default_rng(1)
    ds = build_dataset(tmp_path_factory.mktemp("clu") / "ds",
                       [{"uid": f"u{i:02d}", "caption": caption(i), "image": make_image_bytes(i)} for i in range(90)],
                       per_shard=30)
    centres = rng.normal(size=(6, 16))
    x = centres[rng.integers(0, 6, 90)] + rng.normal(scale=0.3, size=(90, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embeddings(ds, "emb", x, 30)
    for s in range(3):
        uids = [f"u{i:02d}" for i in range(30 * s, 30 * s + 30)]
        atomic.write_parquet(ds / "scores" / "emb" / f"{s:05d}.parquet", pa.table({
            "uid": uids, "score_emb_raw": pa.array(rng.random(30), pa.float32())}))
    targets = centres[:2] / np.linalg.norm(centres[:2], axis=1, keepdims=True)
    np.save(ds.parent / "targets.npy", targets.astype(np.float32))
    return ds, x


def datacomp_rule(x: np.ndarray, captions: list[str], targets: np.ndarray, k: int, train: int, seed: int) -> set[str]:
    """DataComp's rule written out directly: caption filter, faiss k-means, argmax-dot target clusters."""
    import faiss
    import py3langid

    ok = np.array([py3langid.classify(c)[0] == "en" and len(c.split()) > 1 and len(c) > 5 for c in captions])
    eligible = np.flatnonzero(ok)
    pick = np.sort(np.random.default_rng(seed).choice(len(eligible), size=train, replace=False)) \
        if train < len(eligible) else np.arange(len(eligible))
    sample = x.astype(np.float16).astype(np.float32)[eligible[pick]]
    clus = faiss.Clustering(x.shape[1], k)
    clus.niter, clus.seed, clus.max_points_per_centroid = 20, seed, 10_000_000
    index = faiss.IndexFlatL2(x.shape[1])
    clus.train(sample, index)
    centroids = faiss.vector_float_to_array(clus.centroids).reshape(k, -1)
    target_ids = set(np.argmax(targets @ centroids.T, axis=1).tolist())
    labels = np.argmax(x.astype(np.float16).astype(np.float32) @ centroids.T, axis=1)
    return {f"u{i:02d}" for i in range(len(x)) if ok[i] and labels[i] in target_ids}


def test_cluster_filter_equals_datacomp_rule(pool):
    ds, x = pool
    res = runner.invoke(app, ["filter", str(ds), "--cluster", "emb", "--targets", str(ds.parent / "targets.npy"),
                              "--clusters", "6", "--sample-ratio", "0.9", "--train-size", "50", "--seed", "2",
                              "--name", "img_based", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    kept = set(pq.read_table(ds / "selections" / "img_based.parquet").column("uid").to_pylist())
    n_eligible = out["details"]["cluster"]["caption_filtered_embedded"]
    train = min(50, round(0.9 * n_eligible))
    assert kept == datacomp_rule(x, [caption(i) for i in range(90)], np.load(ds.parent / "targets.npy"), 6, train, 2)
    assert 0 < len(kept) < 90 and out["details"]["cluster"]["target_clusters"] >= 1
    assert out["details"]["cluster"]["peak_memory_mb"] > 0

    # DataComp-1B's recipe: image-based clustering, then the CLIP-score top 30% of what it kept
    res = runner.invoke(app, ["filter", str(ds), "--from-selection", "img_based", "--score", "emb:raw",
                              "--top-fraction", "0.3", "--name", "img_and_clip", "--json"])
    assert res.exit_code == 0, res.output
    both = set(pq.read_table(ds / "selections" / "img_and_clip.parquet").column("uid").to_pylist())
    assert both < kept and abs(len(both) - 0.3 * len(kept)) <= 1


@pytest.mark.parametrize("args, message", [
    (["--cluster", "emb"], "exactly one of --targets"),
    (["--cluster", "emb", "--targets", "t.npy", "--sample-ratio", "0"], "--sample-ratio"),
    (["--cluster", "emb", "--targets", "missing.npy"], "no such file"),
    (["--cluster", "nope", "--targets", "t.npy"], "no saved image embeddings"),
    (["--cluster", "emb", "--targets", "t.npy", "--clusters", "500"], "k-means needs"),
    (["--cluster", "emb", "--target-classes", "classes.txt"], "no lineage entry"),
])
def test_cluster_filter_bad_input_is_one_line(pool, args, message):
    ds, _ = pool
    args = [a.replace("t.npy", str(ds.parent / "targets.npy")).replace("classes.txt", str(ds.parent / "targets.npy"))
            for a in args]
    res = runner.invoke(app, ["filter", str(ds), *args, "--name", "bad"])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_cluster_targets_embedded_with_the_scorers_model(tmp_path, tiny_openclip):
    """score --save-embeddings with a tiny CLIP, then targets given as a dataset of images and as class names."""
    from capcurate import score

    cfg, weights = tiny_openclip
    ds = build_dataset(tmp_path / "ds", [{"caption": f"a photo of thing number {i}", "image": make_image_bytes(i)}
                                         for i in range(24)], per_shard=12)
    score(ds, f"openclip:{cfg}", "tiny", pretrained=str(weights), workers=0, save_embeddings=True)
    targets = build_dataset(tmp_path / "targets", [{"caption": "t", "image": make_image_bytes(i)} for i in range(3)])
    (tmp_path / "classes.txt").write_text("car\ndog\n")
    for extra in (["--targets", str(targets)], ["--target-classes", str(tmp_path / "classes.txt")]):
        res = runner.invoke(app, ["filter", str(ds), "--cluster", "tiny", *extra, "--clusters", "3",
                                  "--name", "c", "--overwrite", "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)["details"]["cluster"]
        assert info["targets"] == (3 if "--targets" in extra else 2) and info["in_target_clusters"] >= 1


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory):
    from scorer_fixtures import save_tiny_openclip

    return save_tiny_openclip(tmp_path_factory.mktemp("openclip"))
