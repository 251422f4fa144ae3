"""capcurate query and stats: SQL over the views in four formats, one-line SQL errors, dataset summary."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from capcurate import atomic
from capcurate.cli import app
from capcurate.dataset import Dataset
from capcurate.stages.query import query, stats

runner = CliRunner()
SQL = "SELECT status, count(*) AS n FROM samples GROUP BY 1 ORDER BY 1"


def test_query_returns_arrow_and_prints_a_table(tiny_dataset):
    t = query(tiny_dataset, SQL)
    assert t.to_pylist() == [{"status": "failed_to_download", "n": 1}, {"status": "success", "n": 23}]
    r = runner.invoke(app, ["query", str(tiny_dataset), SQL])
    assert r.exit_code == 0 and "failed_to_download" in r.stdout and "23" in r.stdout
    r = runner.invoke(app, ["query", str(tiny_dataset), "SELECT uid FROM samples", "--limit", "5"])
    assert r.exit_code == 0 and "first 5 rows" in r.stdout


def test_query_formats_csv_json_parquet(tiny_dataset, tmp_path):
    r = runner.invoke(app, ["query", str(tiny_dataset), SQL, "--format", "csv"])
    assert list(csv.DictReader(io.StringIO(r.stdout)))[1] == {"status": "success", "n": "23"}
    r = runner.invoke(app, ["query", str(tiny_dataset), SQL, "--json"])
    assert json.loads(r.stdout) == [{"status": "failed_to_download", "n": 1}, {"status": "success", "n": 23}]
    out = tmp_path / "res.parquet"
    r = runner.invoke(app, ["query", str(tiny_dataset), "SELECT * FROM samples", "-f", "parquet", "-o", str(out),
                            "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["counts"]["rows"] == 24
    assert pq.read_table(out).num_rows == 24
    r = runner.invoke(app, ["query", str(tiny_dataset), SQL, "-o", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())[1]["n"] == 23
    r = runner.invoke(app, ["query", str(tiny_dataset), SQL, "--format", "parquet"])
    assert r.exit_code == 2 and "-o" in r.output


def test_query_unknown_column_is_duckdb_message_without_traceback(tiny_dataset):
    r = runner.invoke(app, ["query", str(tiny_dataset), "SELECT no_such_column FROM samples"])
    assert r.exit_code == 2 and "no_such_column" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, ["query", str(tiny_dataset), "SELEC 1"])
    assert r.exit_code == 2 and "syntax error" in r.output.lower()


def test_query_on_a_folder_that_is_not_a_dataset(tmp_path):
    r = runner.invoke(app, ["query", str(tmp_path), "SELECT 1"])
    assert r.exit_code == 2 and "not a capcurate dataset" in r.output


def test_stats_counts_distributions_and_column_lineage(tiny_dataset):
    ds = Dataset(tiny_dataset)
    uids = [r[0] for r in ds.connect().execute("SELECT uid FROM manifest ORDER BY uid").fetchall()]
    entry = ds.card.start_entry(stage="recaption", family="captions", name="blip",
                                params={"decoding": "beam", "num_beams": 3}, model={"ref": "hf:tiny-blip"})
    ds.card.finish_entry(entry, {"ok": 2})
    atomic.write_parquet(ds.family_dir("captions", "blip") / "00000.parquet", pa.table({
        "uid": uids[:2], "caption": ["a red square", "a blue circle"], "captions": [["a red square"], ["x"]]}))
    atomic.write_parquet(ds.family_dir("scores", "b32") / "00000.parquet", pa.table({
        "uid": uids[:2], "score_b32_raw": pa.array([0.1, 0.3], pa.float32())}))

    s = stats(tiny_dataset)
    assert s.counts["samples"] == 24 and s.counts["success"] == 23 and s.counts["shards"] == 3
    assert s.counts["duplicate_uids"] == 0 and s.details["status"] == {"success": 23, "failed_to_download": 1}
    assert s.details["failed_by_reason"] == {"HTTP 404": 1}
    assert s.details["width"]["p50"] == 32 and s.details["caption_chars"]["max"] == len("a photo number 20")
    blip = s.details["caption_columns"]["cap_blip"]
    assert blip["non_null"] == 2 and blip["lineage"]["model"] == {"ref": "hf:tiny-blip"}
    assert blip["lineage"]["parameters"]["num_beams"] == 3
    assert abs(s.details["score_columns"]["score_b32_raw"]["mean"] - 0.2) < 1e-6
    assert s.details["score_columns"]["score_b32_raw"]["lineage"] is None

    r = runner.invoke(app, ["stats", str(tiny_dataset), "--json"])
    assert json.loads(r.stdout)["counts"]["samples"] == 24
    r = runner.invoke(app, ["stats", str(tiny_dataset)])
    assert r.exit_code == 0 and "cap_blip" in r.stdout and "hf:tiny-blip" in r.stdout and "p95" in r.stdout


def test_stats_of_an_empty_dataset(tmp_path):
    Dataset.create(tmp_path / "ds")
    s = stats(tmp_path / "ds")
    assert s.counts["samples"] == 0 and s.details["caption_chars"] is None
    assert runner.invoke(app, ["stats", str(tmp_path / "ds")]).exit_code == 0


def test_query_is_read_only_copy_attach_set_and_outside_files_refused(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for sql in ("COPY (SELECT 1) TO 'f.csv'", f"COPY (SELECT 1) TO '{tiny_dataset}/f.csv'", "ATTACH 'x.db'",
                "INSTALL httpfs", "CREATE TABLE t AS SELECT 1", "SELECT 1; COPY (SELECT 1) TO 'g.csv'",
                "SET enable_external_access = true", "PRAGMA enable_profiling"):
        r = runner.invoke(app, ["query", str(tiny_dataset), sql])
        assert r.exit_code == 2 and "read-only" in r.output and len(r.output.strip().splitlines()) == 1, sql
    # a SELECT cannot reach files outside the dataset either (DuckDB's external access is off)
    (tmp_path / "secret.csv").write_text("a\n1\n")
    r = runner.invoke(app, ["query", str(tiny_dataset), f"SELECT * FROM read_csv('{tmp_path}/secret.csv')"])
    assert r.exit_code == 2 and "disabled by configuration" in r.output
    r = runner.invoke(app, ["query", str(tiny_dataset), "SELECT 1 AS one", "-o", str(tmp_path / "o.csv")])
    assert r.exit_code == 0
    r = runner.invoke(app, ["query", str(tiny_dataset), "COPY (SELECT 1) TO 'h.csv'", "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p != tiny_dataset) == ["o.csv", "secret.csv"]
    assert not (tiny_dataset / "f.csv").exists()
    assert runner.invoke(app, ["query", str(tiny_dataset), "DESCRIBE samples"]).exit_code == 0
