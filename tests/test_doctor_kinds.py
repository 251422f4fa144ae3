"""capcurate doctor checks every file kind of a dataset directory and --repair quarantines or fixes each
(issue 22, items 5 and 6), without tracebacks."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import build_dataset, make_image_bytes
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.card import Card
from capcurate.cli import app
from capcurate.stages.doctor import doctor
from capcurate.stages.ingest import ingest

runner = CliRunner()


def _doctor(root, *extra):
    r = runner.invoke(app, ["doctor", str(root), "--json", *extra])
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    return r.exit_code, json.loads(r.stdout) if r.stdout.strip().startswith("{") else r.output


def test_a_zero_byte_or_garbage_manifest_is_found_repaired_and_reingested(tmp_path):
    from test_chaos import write_inputs

    web = write_inputs(tmp_path / "web")
    root = tmp_path / "ds"
    ingest(web, root, kind="webdataset", samples_per_shard=3)
    want = {p.name: pq.read_table(p).to_pylist() for p in (root / "samples").glob("*.parquet")}
    (root / "samples" / "00001.parquet").write_bytes(b"")
    (root / "samples" / "00002.parquet").write_bytes(b"PAR1 but garbage")
    code, found = _doctor(root)
    assert code == 1 and found["counts"]["damaged_manifests"] == 2
    code, fixed = _doctor(root, "--repair")
    assert code == 0 and fixed["details"]["repaired"]["damaged_manifests"] == 2, fixed
    assert (root / ".quarantine" / "samples" / "00001.parquet").read_bytes() == b""
    ingest(web, root, kind="webdataset", samples_per_shard=3)  # fetches the removed shards again
    assert {p.name: pq.read_table(p).to_pylist() for p in (root / "samples").glob("*.parquet")} == want
    assert doctor(root).ok


def _npy(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, values)
    return buf.getvalue()


def test_every_derived_file_kind_the_card_and_stray_temps_are_checked_and_repaired(tmp_path):
    samples = [{"caption": f"thing {i}", "image": make_image_bytes(i)} for i in range(8)]
    root = build_dataset(tmp_path / "ds", samples, per_shard=4)
    good = pa.table({"uid": ["a"], "score_s_raw": [0.5]})
    files = {
        "captions/blip/00000.parquet": b"",                                   # 0 bytes
        "scores/s/00000.parquet": b"not parquet",                            # garbage
        "embeddings/s/00000.image.npy": _npy(np.zeros((4, 8), np.float32))[:100],  # cut off
        "selections/sel.parquet": b"PAR1PAR1",                               # garbage
        "dedup/d.parquet": b"",                                              # 0 bytes
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    buf = io.BytesIO()
    pq.write_table(good, buf)
    (root / "scores" / "s" / "00001.parquet").write_bytes(buf.getvalue()[:-20])  # cut off: footer gone
    files["scores/s/00001.parquet"] = b""
    pq.write_table(good, root / "captions" / "blip" / "00001.parquet")             # sound: kept
    (root / "embeddings" / "s" / "00001.image.npy").write_bytes(_npy(np.zeros((4, 8), np.float32)))
    dead = "score-2026-01-01T00:00:00+00:00-999999999-abcd1234"
    with Card(root).editing() as c:
        c["lineage"].append({"id": dead, "stage": "score", "family": "scores", "name": "s",
                             "host": atomic.host_name(), "started": "2026-01-01", "finished": None})
    (root / "scores" / "s" / f".00002.parquet~{atomic.host_name()}~999999999~x.tmp").write_bytes(b"x")

    code, found = _doctor(root)
    assert code == 1, found
    c = found["counts"]
    assert (c["damaged_derived_files"], c["unfinished_runs"], c["orphan_temp_files"]) == (6, 1, 1), c
    assert "no damage found" not in json.dumps(found)
    code, fixed = _doctor(root, "--repair")
    assert code == 0 and fixed["counts"]["remaining"] == 0, fixed
    for rel in files:
        assert not (root / rel).exists() and (root / ".quarantine" / rel).exists(), rel
    assert (root / "captions" / "blip" / "00001.parquet").exists()
    entry = next(e for e in Card(root).read()["lineage"] if e["id"] == dead)
    assert entry["finished"] and "doctor" in entry["interrupted"]
    assert doctor(root).ok


def test_a_damaged_card_is_named_and_reset_card_quarantines_it_for_a_fresh_one(tmp_path):
    root = build_dataset(tmp_path / "ds", [{"caption": "x", "image": make_image_bytes(0)}], per_shard=4)
    (root / "capcurate.json").write_bytes(b"\xff\xfe not json")
    for extra in ((), ("--repair",)):  # never replaced unasked: its lineage would be lost
        code, said = _doctor(root, *extra)
        assert code == 2 and "--reset-card" in said and len(said.strip().splitlines()) == 1, said
    assert (root / "capcurate.json").read_bytes() == b"\xff\xfe not json"
    code, fixed = _doctor(root, "--reset-card")
    assert code == 0 and fixed["details"]["repaired"]["damaged_card"] == 1, fixed
    assert Card(root).read()["lineage"] == [] and (root / ".quarantine" / "capcurate.json").exists()
    assert os.path.getsize(root / "samples" / "00000.parquet") > 0


def test_on_a_bucket_a_damaged_scores_file_is_quarantined(bucket):
    import fsspec

    from capcurate.dataset import Dataset

    root = f"{bucket}/ds"
    Dataset.create(root)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe(f"{root}/scores/s/00000.parquet".removeprefix("s3://"), b"")
    code, found = _doctor(root)
    assert code == 1 and found["counts"]["damaged_derived_files"] == 1, found
    code, fixed = _doctor(root, "--repair")
    assert code == 0, fixed
    fs.invalidate_cache()
    assert fs.exists(f"{root}/.quarantine/scores/s/00000.parquet".removeprefix("s3://"))
    assert not fs.exists(f"{root}/scores/s/00000.parquet".removeprefix("s3://"))
