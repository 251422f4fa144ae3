"""--overwrite never races a live writer, and a run whose claim was voided stops (issue 22, item 2)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from conftest import build_dataset, make_image_bytes
from scorer_fixtures import save_tiny_openclip
from typer.testing import CliRunner

from capcurate import card as card_mod
from capcurate.card import Card
from capcurate.cli import app
from capcurate.errors import OutputExistsError

runner = CliRunner()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return save_tiny_openclip(tmp_path_factory.mktemp("clip"))


def _dataset(tmp_path):
    samples = [{"caption": f"thing {i}", "image": make_image_bytes(i)} for i in range(8)]
    return build_dataset(tmp_path / "ds", samples, per_shard=4)


def _live_entry(root, pid: int, **extra) -> dict:
    """An unfinished scores/s entry of another process (as a run writing right now leaves it)."""
    entry = {"id": f"score-2026-01-01T00:00:00+00:00-{pid}-abcd1234", "stage": "score", "family": "scores",
             "name": "s", "command": "capcurate score ds --name s", "parameters": {"batch_size": 1},
             "host": platform.node(), "started": "2026-01-01T00:00:00+00:00", "finished": None, **extra}
    with Card(root).editing() as c:
        c["lineage"].append(entry)
    return entry


def test_overwrite_while_another_run_of_that_name_is_writing_is_refused_naming_it(tmp_path, clip):
    root = _dataset(tmp_path)
    cfg, weights = clip
    (root / "scores" / "s").mkdir(parents=True)
    (root / "scores" / "s" / "00000.parquet").write_bytes(b"the live run's file")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _live_entry(root, live.pid)
        r = runner.invoke(app, ["score", str(root), "--model", f"openclip:{cfg}", "--pretrained", str(weights),
                                "--name", "s", "--workers", "0", "--overwrite"])
    finally:
        live.kill()
        live.wait()
    assert r.exit_code == 3, r.output
    assert f"pid {live.pid}" in r.output and platform.node() in r.output and "2026-01-01" in r.output
    assert (root / "scores" / "s" / "00000.parquet").read_bytes() == b"the live run's file"  # untouched
    assert "Traceback" not in r.output


def test_overwrite_on_a_bucket_is_refused_while_another_hosts_lease_runs(bucket):
    root = f"{bucket}/ds"
    Card(root).create()
    until = card_mod._lease_until(300)
    with Card(root).editing() as c:
        c["lineage"].append({"id": "score-2026-01-01T00:00:00+00:00-4242-abcd1234", "family": "scores",
                             "name": "s", "host": "node-7", "started": "2026-01-01T00:00:00+00:00",
                             "finished": None, "parameters": {}, "lease_until": until})
    with pytest.raises(OutputExistsError, match="host node-7, pid 4242"):
        Card(root).claim(stage="score", family="scores", name="s", params={"x": 1}, overwrite=True,
                         exists=True)


def test_a_run_whose_claim_was_voided_stops_at_its_next_commit_with_exit_1(tmp_path, clip, monkeypatch):
    root = _dataset(tmp_path)
    cfg, weights = clip
    claim = Card.claim

    def claimed_then_taken_over(self, **kw):
        mode, entry = claim(self, **kw)
        with Card(root).editing() as c:  # what another run's --overwrite does once this run's lease ran out
            c["lineage"] = [e for e in c["lineage"] if e["id"] != entry]
        return mode, entry

    monkeypatch.setattr(Card, "claim", claimed_then_taken_over)
    r = runner.invoke(app, ["score", str(root), "--model", f"openclip:{cfg}", "--pretrained", str(weights),
                            "--name", "s", "--workers", "0", "--json"])
    assert r.exit_code == 1, r.output
    assert "voided" in r.output and "Traceback" not in r.output
    assert not list((root / "scores" / "s").glob("*.parquet"))  # no file of a voided run was committed
    assert json.loads((root / "capcurate.json").read_text())["lineage"] == []


@pytest.mark.parametrize("expired", [False, True])
def test_on_a_shared_local_folder_another_hosts_run_holds_its_name_until_its_lease_runs_out(tmp_path, expired):
    """A Slurm array task on another node, preempted: its pid cannot be asked from here, its lease can."""
    root = tmp_path / "ds"
    Card(root).create()
    mode, mine = Card(root).claim(stage="score", family="scores", name="t", params={}, overwrite=False,
                                  exists=False)
    assert [e for e in Card(root).read()["lineage"] if e["id"] == mine][0]["lease_until"]  # local runs lease too
    Card(root).finish_entry(mine, {})
    until = card_mod._lease_until(-60 if expired else 300)
    with Card(root).editing() as c:
        c["lineage"].append({"id": "score-2026-01-01T00:00:00+00:00-4242-abcd1234", "family": "scores",
                             "name": "s", "host": "node-7", "started": "2026-01-01T00:00:00+00:00",
                             "finished": None, "parameters": {}, "lease_until": until})
    claim = lambda: Card(root).claim(stage="score", family="scores", name="s", params={"x": 1},  # noqa: E731
                                     overwrite=True, exists=True, remove=lambda: None)
    if not expired:
        with pytest.raises(OutputExistsError, match="host node-7, pid 4242"):
            claim()
    else:
        assert claim()[0] == "overwrite"
