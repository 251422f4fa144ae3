"""The whole quickstart chain at QUICKSTART_SCALE=tiny with the dataset, the training shards and the runs in a
bucket (a local S3 server), compared output by output with the same chain on local disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
from compare import near
from test_quickstart import QUICKSTART, TINY_STRATEGIES, _env, _failing_download

from capcurate import storage

STRATEGIES = TINY_STRATEGIES


def _run(tmp: Path, **extra: str) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    env = _failing_download(tmp, _env(tmp, QUICKSTART_SCALE="tiny", QUICKSTART_STRATEGIES=STRATEGIES,
                                      QUICKSTART_FETCH="ingest", **extra), "no img2dataset here")
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return tmp / "demo"


def _rows(folder: Path, drop: tuple[str, ...] = ()) -> list[dict]:
    t = pq.read_table(folder)
    rows = sorted(t.drop_columns([c for c in drop if c in t.column_names]).to_pylist(), key=lambda r: r["uid"])
    return near(rows)


def _images(tars: list[Path]) -> list[tuple[str, str]]:
    """(member name, sha256) of every member but the json (which names the input path) of some tars."""
    import tarfile

    out = []
    for t in tars:
        with tarfile.open(t) as tf:
            out += [(m.name, hashlib.sha256(tf.extractfile(m).read()).hexdigest()) for m in tf.getmembers()
                    if not m.name.endswith(".json")]
    return sorted(out)


def _members(tar: Path) -> list[tuple[str, object]]:
    """A training shard's members in order: bytes, but each sample's json with its scores within 1e-5
    (tests/compare.py). Two CPU runs of one scorer agree to ~1e-8, and the shard writes scores to 6
    decimals, so a score on the edge of a 6th-decimal step can differ by its last digit; the tables are
    compared the same way."""
    import tarfile

    out: list[tuple[str, object]] = []
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            data = tf.extractfile(m).read()
            if m.name.endswith(".json"):
                meta = json.loads(data)
                meta["scores"] = near(meta.get("scores") or {})
                out.append((m.name, meta))
            else:
                out.append((m.name, hashlib.sha256(data).hexdigest()))
    return out


@pytest.mark.slow
def test_tiny_quickstart_on_a_bucket_equals_the_local_run(tmp_path: Path, bucket: str,
                                                         tiny_quickstart_ingest) -> None:
    """Both runs ingest the world's pool shards (the world's uids), so every output can be compared exactly."""
    local, _ = tiny_quickstart_ingest
    store = f"{bucket}/qs"
    remote = _run(tmp_path / "bucket", QUICKSTART_STORE=store)
    assert (remote / "store.txt").read_text().strip() == store
    assert not (remote / "dataset").exists() and not (remote / "runs").exists()  # nothing local by mistake
    got = storage.download_tree(store, tmp_path / "fetched")

    # the dataset: manifest (less the input path), captions, scores, selections, image bytes
    ds_l, ds_b = local / "dataset", got / "dataset"
    # (the url names the port each run picked for its base URL, never served in ingest mode)
    assert _rows(ds_l / "samples", ("source", "url")) == _rows(ds_b / "samples", ("source", "url"))
    for sub in ("captions/coca", "scores/clip"):
        assert _rows(ds_l / sub) == _rows(ds_b / sub), sub
    sels = sorted(p.name for p in (ds_l / "selections").glob("*.parquet"))
    assert len(sels) == 5 and sels == sorted(p.name for p in (ds_b / "selections").glob("*.parquet"))
    for sel in sels:
        assert _rows(ds_l / "selections" / sel) == _rows(ds_b / "selections" / sel), sel
    assert _images(sorted((ds_l / "shards").glob("*.tar"))) == _images(sorted((ds_b / "shards").glob("*.tar")))

    # the training shards member for member (scores within 1e-5), and what train and eval made of them
    for s in STRATEGIES.split():
        tars = sorted((local / "shards" / s).glob("*.tar"))
        assert tars and [_members(p) for p in tars] == [_members(got / "shards" / s / p.name) for p in tars]
        assert json.loads((local / "shards" / s / "sizes.json").read_text()) == \
            json.loads((got / "shards" / s / "sizes.json").read_text())
        assert (got / "runs" / s / "checkpoints").is_dir() and (got / "runs" / s / "run.json").is_file()
        evals = [[{k: v for k, v in r.items() if k != "model"} for r in json.loads((d / "evals" / f"{s}.json")
                                                                              .read_text())] for d in (local, remote)]
        assert evals[0] == evals[1] and evals[0], s
    res_l, res_b = (json.loads((d / "results.json").read_text()) for d in (local, remote))
    assert res_l["rows"] == res_b["rows"] and res_l["pool_caption_accuracy"] == res_b["pool_caption_accuracy"]
    assert res_b["pool_caption_accuracy"]["synthetic"]["colour_and_shape"] is not None


def test_quickstart_refuses_a_store_prefix_that_is_not_empty(tmp_path: Path, bucket: str) -> None:
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe_file(f"{bucket.removeprefix('s3://')}/used/x", b"x")
    env = _env(tmp_path, QUICKSTART_SCALE="tiny", QUICKSTART_STORE=f"{bucket}/used")
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 3 and "is not empty" in res.stderr
