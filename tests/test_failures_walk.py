"""Every failure a user can cause is one line with the README's exit code, and bad input writes nothing.

Walks the commands in process (typer's CliRunner) with a bad --part, a read-only output, a full disk
(writes that raise ENOSPC), a corrupt card, and SIGTERM; each asserts exit code, one line, no traceback.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcurate.cli import app

runner = CliRunner()


def one_line(result, code: int) -> str:
    """The result failed with ``code``, printing one line and no traceback; returns that line."""
    out = result.output.strip()
    assert result.exit_code == code, (result.exit_code, out, result.exception)
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    return out


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_bad_part_is_refused_before_any_work_or_write(tiny_dataset, tmp_path):
    before = tree(tmp_path)
    card = (tiny_dataset / "capcurate.json").read_bytes()
    cases = [
        ["score", str(tiny_dataset), "--model", "openclip:does-not-exist.json", "--name", "s", "--part", "3/2"],
        ["recaption", str(tiny_dataset), "--model", "hf:nowhere", "--name", "c", "--part", "3/2"],
        ["shard", str(tiny_dataset), "--selection", "top", "-o", str(tmp_path / "out"), "--part", "3/2"],
        ["ingest", str(tiny_dataset / "shards"), "-o", str(tmp_path / "new"), "--part", "3/2"],
        ["ingest", str(tiny_dataset / "shards"), "-o", str(tmp_path / "new"), "--part", "x"],
    ]
    for args in cases:
        line = one_line(runner.invoke(app, args), 2)
        assert "--part" in line, line
    assert tree(tmp_path) == before  # no -o, no dataset, no card, no lineage entry
    assert (tiny_dataset / "capcurate.json").read_bytes() == card


def test_bad_part_in_the_python_api_stops_before_the_model_loads(tiny_dataset, tmp_path):
    from capcurate.errors import InputError
    from capcurate.stages.score import score
    from capcurate.stages.shard import shard

    card = (tiny_dataset / "capcurate.json").read_bytes()
    with pytest.raises(InputError, match="--part"):
        score(tiny_dataset, "openclip:does-not-exist.json", "s", part="3/2")
    with pytest.raises(InputError, match="--part"):
        shard(tiny_dataset, "top", tmp_path / "out", part="3/2")
    assert not (tmp_path / "out").exists() and (tiny_dataset / "capcurate.json").read_bytes() == card


def test_sigterm_exits_143_keeps_finished_shards_and_closes_the_lineage_entry(tiny_dataset, tmp_path, monkeypatch):
    """Slurm preemption sends SIGTERM: it must unwind like Ctrl-C (not die on the spot), say so in one line,
    and leave the card saying the run is over; the same command then resumes."""
    import signal

    from capcurate.dataset import Dataset
    from capcurate.stages import ingest as stage

    real = stage.IngestJob.process

    def preempted_on_second_shard(self, shard_id):
        if shard_id == "00001":
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, delivered to this process
        return real(self, shard_id)

    monkeypatch.setattr(stage.IngestJob, "process", preempted_on_second_shard)
    out = tmp_path / "adopted"
    args = ["ingest", str(tiny_dataset / "shards"), "-o", str(out)]
    line = one_line(runner.invoke(app, args), 143)
    assert "SIGTERM" in line and "resume" in line
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is only there while a command runs
    (entry,) = Dataset(out).card.lineage()
    assert entry["finished"] is not None and entry["interrupted"] == "SIGTERM"
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.parquet"]
    monkeypatch.setattr(stage.IngestJob, "process", real)
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    assert len(list((out / "samples").iterdir())) == 3


def test_disk_full_is_one_line_exit_1_and_wrapped_errors_are_found(tiny_dataset, monkeypatch):
    """ENOSPC from pyarrow (no errno, the C library's message), from DuckDB's COPY and from Python (errno,
    wrapped in another exception) -> exit 1, one line."""
    import duckdb
    import pyarrow.parquet as pq

    from capcurate.stages import filter as filter_stage

    def full(*a, **k):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    line = one_line(runner.invoke(app, ["ingest", str(tiny_dataset / "shards"), "-o", str(tiny_dataset / "x")]), 1)
    assert "no space left" in line and "re-run" in line

    class FullConnection:
        def __init__(self, con):
            self.con = con

        def execute(self, sql, *a):
            if sql.lstrip().startswith("COPY"):
                raise duckdb.IOException('IO Error: Could not write file "t.parquet": No space left on device')
            return self.con.execute(sql, *a)

        def __getattr__(self, name):
            return getattr(self.con, name)

    real_connect = filter_stage.Dataset.connect
    monkeypatch.setattr(filter_stage.Dataset, "connect", lambda self, **k: FullConnection(real_connect(self, **k)))
    line = one_line(runner.invoke(app, ["filter", str(tiny_dataset), "--where", "true", "--name", "all"]), 1)
    assert "no space left" in line

    def full_errno(*a, **k):
        raise RuntimeError("shard 00000 failed") from OSError(errno.ENOSPC, "No space left on device", "x.parquet")

    monkeypatch.setattr(pq, "write_table", full_errno)
    line = one_line(runner.invoke(app, ["ingest", str(tiny_dataset / "shards"), "-o", str(tiny_dataset / "y")]), 1)
    assert "no space left on the device: x.parquet" in line
