"""The dataset contract every stage stands on: card, atomic writes, views, shards, engines."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pyarrow as pa
import pytest

from capcurate import atomic
from capcurate.dataset import Dataset
from capcurate.engines import parse_part, run_job, select_part
from capcurate.errors import InputError, OutputExistsError
from capcurate.shards import index_tar, iter_samples, split_member_name


def test_create_refuses_foreign_nonempty_dir(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "mine.txt").write_text("hello")
    with pytest.raises(OutputExistsError, match="--force"):
        Dataset.create(d)
    Dataset.create(d, force=True)
    assert (d / "capcurate.json").exists()


def test_views_join_families_on_uid(tiny_dataset):
    ds = Dataset(tiny_dataset)
    uids = [r[0] for r in ds.connect().execute("SELECT uid FROM manifest ORDER BY uid").fetchall()]
    assert len(uids) == 24 and len(set(uids)) == 24
    atomic.write_parquet(ds.family_dir("captions", "blip") / "00000.parquet", pa.table({
        "uid": uids[:3], "caption": ["c0", "c1", "c2"], "captions": [["c0", "x"], ["c1"], ["c2"]]}))
    atomic.write_parquet(ds.family_dir("scores", "b32") / "00000.parquet", pa.table({
        "uid": uids[:2], "score_b32_raw": [0.1, 0.2], "score_b32_blip": [0.3, 0.4]}))
    con = ds.connect()
    cols = [r[0] for r in con.execute("DESCRIBE samples").fetchall()]
    assert {"cap_blip", "caps_blip", "score_b32_raw", "score_b32_blip"} <= set(cols)
    n, with_cap, with_score = con.execute(
        "SELECT count(*), count(cap_blip), count(score_b32_blip) FROM samples").fetchone()
    assert (n, with_cap, with_score) == (24, 3, 2)


def test_claim_output_refuses_other_parameters(tiny_dataset):
    ds = Dataset(tiny_dataset)
    assert ds.card.claim_output("captions", "blip", {"a": 1}, overwrite=False, exists=False) == "new"
    ds.card.start_entry(stage="recaption", family="captions", name="blip", params={"a": 1})
    assert ds.card.claim_output("captions", "blip", {"a": 1}, overwrite=False, exists=True) == "resume"
    with pytest.raises(OutputExistsError, match="differs in: a"):
        ds.card.claim_output("captions", "blip", {"a": 2}, overwrite=False, exists=True)
    assert ds.card.claim_output("captions", "blip", {"a": 2}, overwrite=True, exists=True) == "overwrite"


def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_truncated_tar_yields_readable_prefix(tiny_dataset, tmp_path):
    src = Dataset(tiny_dataset).shard_path("00000")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    idx = index_tar(cut)
    assert idx.truncated and 0 < len(idx.samples) < 8
    assert 0 < len(list(iter_samples(cut))) < 8


def test_split_member_name_follows_webdataset():
    assert split_member_name("a/b/000.jpg") == ("a/b/000", "jpg")
    assert split_member_name("k.seg.PNG") == ("k", "seg.png")


class _CountJob:
    def __init__(self, out: Path):
        self.out = out
        self.calls: list[str] = []

    def output_path(self, sid):
        return self.out / f"{sid}.done"

    def setup(self):
        pass

    def process(self, sid):
        if sid == "bad":
            raise ValueError("boom")
        self.calls.append(sid)
        atomic.write_bytes(self.output_path(sid), b"x")
        return {"items": 2}


def test_engine_resumes_and_isolates_failures(tmp_path):
    job = _CountJob(tmp_path)
    res = run_job(job, ["a", "b", "bad"])
    assert res.processed == ["a", "b"] and "bad" in res.failed and res.counts["items"] == 4
    res2 = run_job(job, ["a", "b", "c"])
    assert res2.skipped == ["a", "b"] and res2.processed == ["c"]


def test_part_selection_is_a_partition():
    ids = [f"{i:05d}" for i in range(10)]
    parts = [select_part(ids, parse_part(f"{i}/3")) for i in range(3)]
    assert sorted(sum(parts, [])) == ids
    with pytest.raises(InputError):
        parse_part("3/3")


def test_tar_writer_is_reproducible(tmp_path):
    from capcurate.shards import TarShardWriter

    for name in ("a.tar", "b.tar"):
        with TarShardWriter(tmp_path / name) as w:
            w.write("k1", {"jpg": b"123", "txt": b"hi"})
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert tarfile.open(tmp_path / "a.tar").getnames() == ["k1.jpg", "k1.txt"]


# -- temp files: removed only when their writer is provably gone ------------------------------------

def _dead_pid() -> int:
    import subprocess
    import sys

    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_clean_stale_temps_removes_only_temps_of_dead_writers_on_this_host(tmp_path):
    import os

    host = atomic.host_name()
    dead = tmp_path / f".00000.parquet~{host}~{_dead_pid()}~aaaaaaaa.tmp"
    live = tmp_path / f".00001.parquet~{host}~{os.getppid()}~bbbbbbbb.tmp"  # another --part writing now
    mine = atomic.temp_path_for(tmp_path / "00002.parquet")
    other_host = tmp_path / f".00003.parquet~{host}-elsewhere~{_dead_pid()}~cccccccc.tmp"
    legacy = tmp_path / ".00004.parquet.123.deadbeef.tmp"  # no host in the name: cannot be judged
    for p in (dead, live, mine, other_host, legacy):
        p.write_bytes(b"partial")
    assert atomic.clean_stale_temps(tmp_path) == 1
    assert not dead.exists() and live.exists() and mine.exists() and other_host.exists() and legacy.exists()


def test_a_vanished_temp_file_is_an_error_not_a_success(tmp_path):
    from capcurate.errors import StageFailed

    final = tmp_path / "00000.parquet"
    with pytest.raises(StageFailed, match="vanished"), atomic.atomic_path(final) as tmp:
        tmp.write_bytes(b"data")
        tmp.unlink()  # what a cleaner of another part once did
    assert not final.exists()


def test_claim_and_entry_are_one_locked_step_and_an_empty_run_frees_the_name(tiny_dataset):
    card = Dataset(tiny_dataset).card
    mode, entry = card.claim(stage="score", family="scores", name="z", params={"p": 1}, overwrite=False,
                             exists=False)
    assert mode == "new" and [e["id"] for e in card.lineage("scores", "z")] == [entry]
    mode2, _ = card.claim(stage="score", family="scores", name="z", params={"p": 1}, overwrite=False,
                          exists=False)
    assert mode2 == "resume"  # a second --part of the same run
    with pytest.raises(OutputExistsError, match="differs in: p"):  # other parameters, outputs exist
        card.claim(stage="score", family="scores", name="z", params={"p": 2}, overwrite=False, exists=True)
    for e in card.lineage("scores", "z"):
        card.abandon_entry(e["id"])  # the model did not load: nothing was written
    mode3, _ = card.claim(stage="score", family="scores", name="z", params={"p": 2}, overwrite=False,
                          exists=False)
    assert mode3 == "new" and [e["parameters"] for e in card.lineage("scores", "z")] == [{"p": 2}]
    removed = []
    mode4, _ = card.claim(stage="score", family="scores", name="z", params={"p": 3}, overwrite=True,
                          exists=True, remove=lambda: removed.append(True))
    assert mode4 == "overwrite" and removed and [e["parameters"] for e in card.lineage("scores", "z")] == [{"p": 3}]


def test_parts_create_one_dataset_concurrently(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "ds"
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: Dataset.create(root, sources=[{"part": i}]), range(4)))
    assert sorted(s["part"] for s in Dataset(root).card.read()["sources"]) == [0, 1, 2, 3]


def test_stale_outputs_are_found_from_the_inputs_they_recorded(tmp_path):
    from capcurate import lineage

    src = tmp_path / "samples.parquet"
    atomic.write_parquet(src, pa.table({"uid": ["a"]}))
    table, fp = lineage.read_parquet(src)
    out = tmp_path / "captions.parquet"
    atomic.write_parquet(out, lineage.stamp(pa.table({"uid": ["a"]}), {lineage.SAMPLES: fp}))
    assert lineage.is_fresh(out, {lineage.SAMPLES: src})
    atomic.write_parquet(src, pa.table({"uid": ["b"]}))
    assert not lineage.is_fresh(out, {lineage.SAMPLES: src})
    legacy = tmp_path / "legacy.parquet"  # written before lineage was recorded: not judged
    atomic.write_parquet(legacy, pa.table({"uid": ["a"]}))
    assert lineage.is_fresh(legacy, {lineage.SAMPLES: src}) and lineage.recorded_inputs(legacy) == {}
