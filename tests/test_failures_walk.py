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
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or what an earlier test's library installed (Ray)
    line = one_line(runner.invoke(app, args), 143)
    assert "SIGTERM" in line and "resume" in line
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there while a command runs
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


# -- the walk: every command against a read-only location, a full disk and a corrupt card ----------

@pytest.fixture(scope="module")
def walk(tmp_path_factory):
    """A dataset with a selection, training shards, an eval set, tiny model configs and a URL list, in a
    folder other users may enter (so an unprivileged user can read it when the walk drops root)."""
    import shutil
    import tempfile

    from conftest import build_dataset, make_image_bytes
    from train_fixtures import tiny_clip_config, tiny_coca_config, write_eval_set, write_shards

    base = Path(tempfile.mkdtemp(prefix="capcurate-walk-"))
    os.chmod(base, 0o755)
    ds = build_dataset(base / "ds", [{"caption": f"a photo {i}", "image": make_image_bytes(i)} for i in range(6)],
                       per_shard=3)
    assert runner.invoke(app, ["filter", str(ds), "--where", "true", "--name", "sel"]).exit_code == 0
    write_shards(base / "train", 1, 4)
    write_eval_set(base / "eval", per_class=1)
    (base / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,x\n")
    paths = {"ds": ds, "base": base, "clip": tiny_clip_config(base), "coca": tiny_coca_config(base)}
    yield paths
    _chmod_tree(base, writable=True)
    shutil.rmtree(base, ignore_errors=True)


def _commands(p: dict, out: Path) -> dict[str, list[str]]:
    """Each command that writes, with input that is otherwise good; outputs go under ``out``."""
    ds, base = str(p["ds"]), p["base"]
    fast = ["--workers", "0", "--device", "cpu", "--batch-size", "4"]
    return {
        "download": ["download", str(base / "urls.csv"), "-o", str(out / "dl")],
        "download-into": ["download", str(base / "urls.csv"), "-o", ds, "--force"],
        "ingest": ["ingest", str(p["ds"] / "shards"), "-o", str(out / "ingested")],
        "recaption": ["recaption", ds, "--model", f"openclip:{p['coca']}", "--pretrained", "random", "--name", "c",
                      "--max-new-tokens", "3", *fast],
        "score": ["score", ds, "--model", f"openclip:{p['clip']}", "--pretrained", "random", "--name", "s", *fast],
        "dedup": ["dedup", ds, "--exact", "--name", "d"],
        "filter": ["filter", ds, "--where", "true", "--name", "f"],
        "mix": ["mix", ds, "--strategy", "raw", "--name", "m"],
        "shard": ["shard", ds, "--selection", "sel", "-o", str(out / "shards")],
        "train": ["train", str(base / "train"), "-o", str(out / "run"), "--model-config", str(p["clip"]),
                  "--epochs", "1", "--batch-size", "2", "--workers", "0", "--device", "cpu"],
        "eval": ["eval", f"openclip:{p['clip']}", "--pretrained", "random", "--data", str(base / "eval"),
                 "-o", str(out / "eval.json"), *fast],
        "query": ["query", ds, "SELECT uid FROM samples", "-o", str(out / "q.csv")],
        "report": ["report", ds, "-o", str(out / "r.html")],
        "synth": ["synth", "-o", str(out / "world"), "--n-images", "4", "--image-size", "32"],
    }


def _chmod_tree(root: Path, *, writable: bool) -> None:
    for p in [root, *root.rglob("*")]:
        if p.is_dir():
            os.chmod(p, 0o755 if writable else 0o555)
        else:
            os.chmod(p, 0o644 if writable else 0o444)


def test_every_command_on_a_read_only_location_is_one_line_exit_2(walk):
    """Permissions as an unprivileged user meets them (the walk drops root's euid, which ignores modes)."""
    base = walk["base"]
    out = base / "out"
    out.mkdir(exist_ok=True)
    root = os.geteuid() == 0
    if root:  # the interpreter's own lazy imports must not be what fails as the other user
        import importlib

        for mod in ("sqlite3", "modulefinder", "encodings.ascii", "encodings.idna", "encodings.latin_1", "html.parser"):
            importlib.import_module(mod)
        warm = _commands(walk, base / "warm")["eval"]  # eval imports much of torch lazily: once, as root
        assert runner.invoke(app, warm).exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()}
    _chmod_tree(base, writable=False)
    failures = {}
    try:
        if root:
            os.seteuid(65534)
        for name, args in _commands(walk, out).items():
            r = runner.invoke(app, args)
            out_text = r.output.strip()
            if os.environ.get("CAPWALK_DEBUG"):
                print(name, r.exit_code, out_text[:200])
            if r.exit_code != 2 or len(out_text.splitlines()) != 1 or "Traceback" in out_text:
                failures[name] = (r.exit_code, out_text[-300:], repr(r.exception))
    finally:
        if root:
            os.seteuid(0)
        _chmod_tree(base, writable=True)
    assert not failures, failures
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*") if p.is_file()} == before
    assert not list(out.iterdir())


def test_every_command_on_a_full_disk_is_one_line_exit_1(walk, tmp_path):
    """RLIMIT_FSIZE 0 (SIGXFSZ ignored): the kernel refuses every byte written to any file, as a full disk
    does (EFBIG rather than ENOSPC; both are the same one line, exit 1)."""
    import resource
    import signal

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    failures = {}
    try:
        for name, args in _commands(walk, tmp_path).items():
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))
            try:
                r = runner.invoke(app, args)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            out_text = r.output.strip()
            if os.environ.get("CAPWALK_DEBUG"):
                print(name, r.exit_code, out_text[:200])
            if r.exit_code != 1 or len(out_text.splitlines()) != 1 or "Traceback" in out_text:
                failures[name] = (r.exit_code, out_text[-300:], repr(r.exception))
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    assert not failures, failures


@pytest.mark.parametrize("card", [b"\xff\xfe\x00garbage", b"{not json", b"[]", b""], ids=["not_utf8", "not_json",
                                                                                         "not_object", "empty"])
def test_every_command_on_a_corrupt_card_is_one_line_exit_2(walk, tmp_path, card):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(walk["ds"], ds)
    (ds / "capcurate.json").write_bytes(card)
    p = {**walk, "ds": ds}
    names = ["download-into", "recaption", "score", "dedup", "filter", "mix", "shard", "query",
             "report"]
    commands = _commands(p, tmp_path / "out")
    commands = {n: commands[n] for n in names}
    commands.update(retry=["download", "-o", str(ds), "--retry-failed"], stats=["stats", str(ds)],
                    doctor=["doctor", str(ds), "--repair"],
                    query_table=["query", str(ds), "SELECT 1"])
    failures = {}
    for name, args in commands.items():
        r = runner.invoke(app, args)
        out_text = r.output.strip()
        if os.environ.get("CAPWALK_DEBUG"):
            print(name, r.exit_code, out_text[:200])
        if r.exit_code != 2 or len(out_text.splitlines()) != 1 or "Traceback" in out_text:
            failures[name] = (r.exit_code, out_text[-300:], repr(r.exception))
    assert not failures, failures
    assert (ds / "capcurate.json").read_bytes() == card  # never "repaired" by overwriting


def test_train_on_missing_data_leaves_no_output(tmp_path):
    for data in (tmp_path / "nothing", tmp_path):  # a path that does not exist; a folder without shards
        line = one_line(runner.invoke(app, ["train", str(data), "-o", str(tmp_path / "run")]), 2)
        assert str(data.name) in line
    assert not (tmp_path / "run").exists()
