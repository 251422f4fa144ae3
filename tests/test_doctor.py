"""capcurate doctor: each kind of crash damage is reported with a count, --repair fixes what is safe."""

from __future__ import annotations

import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import build_dataset, make_image_bytes
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.stages.doctor import doctor

runner = CliRunner()


def damaged(tmp_path):
    samples = [{"caption": f"thing {i}", "image": make_image_bytes(i)} for i in range(16)]
    root = build_dataset(tmp_path / "ds", samples, per_shard=4)  # shards 00000..00003
    sh, sa = root / "shards", root / "samples"
    host = atomic.host_name()
    (sa / f".00009.parquet~{host}~999999999~dead.tmp").write_bytes(b"x")        # its writer is gone
    (sa / f".00008.parquet~{host}~{os.getpid()}~live.tmp").write_bytes(b"x")     # a live writer's: kept
    (sa / "00000.parquet").unlink()                                              # shard without manifest
    (sh / "00001.tar").unlink()                                                  # manifest without shard
    tar = sh / "00002.tar"
    tar.write_bytes(tar.read_bytes()[:1200])                                     # truncated tar
    t3 = pq.read_table(sa / "00003.parquet")                                     # a uid repeated in 00004
    shutil.copy(sh / "00003.tar", sh / "00004.tar")
    pq.write_table(t3.set_column(t3.schema.get_field_index("shard"), "shard", pa.array(["00004"] * 4)).slice(0, 2),
                   sa / "00004.parquet")
    return root


def test_doctor_reports_each_kind_of_damage_with_counts_and_exits_1(tmp_path):
    root = damaged(tmp_path)
    r = runner.invoke(app, ["doctor", str(root), "--json"])
    assert r.exit_code == 1, r.output
    c = json.loads(r.stdout)["counts"]
    assert {k: c[k] for k in ("orphan_temp_files", "live_temp_files", "shards_without_manifest",
                              "manifests_without_shard", "truncated_shards", "duplicate_uids",
                              "duplicate_rows")} == {
        "orphan_temp_files": 1, "live_temp_files": 1, "shards_without_manifest": 1,
        "manifests_without_shard": 1, "truncated_shards": 1, "duplicate_uids": 2, "duplicate_rows": 2}
    assert (root / "shards" / "00002.tar").is_file()  # reporting changes nothing
    plain = runner.invoke(app, ["doctor", str(root)])
    assert plain.exit_code == 1 and "--repair" in plain.output


def test_doctor_repair_fixes_what_is_safe_and_leaves_a_sound_dataset(tmp_path):
    root = damaged(tmp_path)
    r = runner.invoke(app, ["doctor", str(root), "--repair", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["counts"]["remaining"] == 0 and s["details"]["repaired"]["duplicate_uids"] == 2
    names = sorted(p.name for p in (root / "samples").iterdir())
    assert [n for n in names if not n.startswith(".")] == ["00003.parquet", "00004.parquet"]
    assert [n for n in names if n.startswith(".")] == [n for n in names if "live" in n]  # live temp kept
    # the newest shard keeps the repeated uids; the older copies are gone
    assert pq.read_table(root / "samples" / "00003.parquet").num_rows == 2
    assert not (root / "shards" / "00002.tar").exists() and not (root / "shards" / "00000.tar").exists()
    assert doctor(root).ok


def test_doctor_on_a_missing_dataset_is_a_one_line_error(tmp_path):
    r = runner.invoke(app, ["doctor", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.output and "Traceback" not in r.output


def test_a_query_over_a_damaged_parquet_is_one_line_naming_the_file_and_doctor(tmp_path):
    """A 0-byte captions file (a disk that filled): stats and query exit 2 with one line that names the
    file and says how to repair; doctor --repair then quarantines it and stats works again."""
    ds = build_dataset(tmp_path / "ds", [{"caption": f"c {i}", "image": make_image_bytes(i)} for i in range(4)])
    (ds / "captions" / "x").mkdir(parents=True)
    (ds / "captions" / "x" / "00000.parquet").write_bytes(b"")
    for args in (["stats", str(ds)], ["query", str(ds), "SELECT count(*) AS n FROM manifest"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "captions/x/00000.parquet" in lines[0] and "doctor" in lines[0], res.output
    assert runner.invoke(app, ["doctor", str(ds), "--repair"]).exit_code == 0
    assert runner.invoke(app, ["stats", str(ds)]).exit_code == 0
    res = runner.invoke(app, ["query", str(ds), "SELEC 1"])   # a SQL mistake gets no doctor hint
    assert res.exit_code == 2 and "doctor" not in res.output
