"""uid de-duplication at scale: ingest's on-disk first-seen index, download's one-query drop plan."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
from http_fixtures import make_image

from capcurate.dataset import Dataset
from capcurate.stages.download.integrity import drop_duplicate_uids, duplicate_uids
from capcurate.stages.ingest import IngestJob, ingest
from capcurate.uid_index import FirstSeen, SeenBefore

# per tar: the uids of its samples; "a" and "c" come back in later tars, "d" twice within tar 2
TARS = [["a", "b"], ["c", "a"], ["d", "c", "d", "e"], ["a", "f"]]
KEPT = {"a": "00000", "b": "00000", "c": "00001", "d": "00002", "e": "00002", "f": "00003"}


def _write_tars(src) -> None:
    src.mkdir()
    img = make_image(1)
    for t, uids in enumerate(TARS):
        with tarfile.open(src / f"{t}.tar", "w") as tf:
            for r, uid in enumerate(uids):
                for ext, data in (("jpg", img), ("json", json.dumps({"uid": uid, "caption": f"{t}/{r}"}).encode())):
                    info = tarfile.TarInfo(f"s{r}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def _kept(ds_path) -> dict[str, str]:
    rows = Dataset(ds_path).query("SELECT uid, shard, caption FROM manifest").to_pylist()
    assert len(rows) == len({r["uid"] for r in rows}), rows
    return {r["uid"]: r["shard"] for r in rows}


def test_ingest_keeps_the_first_copy_of_a_uid_repeated_across_shards_in_any_part_split(tmp_path):
    _write_tars(tmp_path / "wds")
    whole = ingest(tmp_path / "wds", tmp_path / "one")
    assert whole.counts["duplicate_uids"] == 4 and _kept(tmp_path / "one") == KEPT
    # parts in reverse order: part 1 writes shards 1 and 3 before shard 0 or 2 exists in the dataset
    for part in ("1/2", "0/2"):
        ingest(tmp_path / "wds", tmp_path / "parts", part=part)
    assert _kept(tmp_path / "parts") == KEPT


def test_ingest_in_one_process_reads_no_input_twice(tmp_path, monkeypatch):
    """The shards a process wrote itself are in its uid index already: no input tar is re-read for uids
    (the old per-shard sets re-read every earlier shard's tar once more)."""
    _write_tars(tmp_path / "wds")
    reads: list[str] = []
    original = IngestJob._read_input_uids
    monkeypatch.setattr(IngestJob, "_read_input_uids", lambda self, sid: reads.append(sid) or original(self, sid))
    s = ingest(tmp_path / "wds", tmp_path / "ds")
    assert s.ok and reads == [] and _kept(tmp_path / "ds") == KEPT
    # a part that skips shards reads only those it did not write, once each
    ingest(tmp_path / "wds", tmp_path / "p", part="1/2")
    assert reads == ["00000", "00002"]


def test_first_seen_keeps_the_lowest_shard_whatever_the_order_of_adds(tmp_path):
    index = FirstSeen(tmp_path)
    index.add("00003", ["x", "y"])
    index.add("00001", ["y", "z", "z"])
    assert [index.first_shard(u) for u in ("x", "y", "z", "w")] == ["00003", "00001", "00001", None]
    seen = SeenBefore(index, "00002")
    assert "y" in seen and "x" not in seen and "w" not in seen
    seen.add("w")
    assert "w" in seen
    index.close()
    assert not list(tmp_path.iterdir())  # the scratch file is gone


def test_download_drop_plan_keeps_the_newest_shard_copy_across_shards(tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    shards = {"00000": ["a", "b", "a"], "00001": ["c", "b"], "00002": ["b", "d", "b", "c"]}
    for sid, uids in shards.items():
        pq.write_table(pa.table({"uid": uids, "row": [f"{sid}/{i}" for i in range(len(uids))]}),
                       samples / f"{sid}.parquet")
    plan, repeated = duplicate_uids(samples)
    assert repeated == 3 and plan == {"00000.parquet": 2, "00001.parquet": 2, "00002.parquet": 1}
    assert drop_duplicate_uids(samples) == 5
    kept = {sid: pq.read_table(samples / f"{sid}.parquet").column("row").to_pylist() for sid in shards}
    # a: the first copy within shard 0; b and c: their copies in shard 2 (the first of the two b's)
    assert kept == {"00000": ["00000/0"], "00001": [], "00002": ["00002/0", "00002/1", "00002/3"]}
    assert drop_duplicate_uids(samples) == 0 and duplicate_uids(samples) == ({}, 0)
