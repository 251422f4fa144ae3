"""The command line as a newcomer meets it: every command's --help renders, docs/cli.md matches it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcurate.cli import COMMAND_ORDER, app

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_stage_in_pipeline_order():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    positions = [res.output.find(f"  {name} ") for name in COMMAND_ORDER]
    assert all(p >= 0 for p in positions), res.output
    assert positions == sorted(positions)


@pytest.mark.parametrize("command", COMMAND_ORDER)
def test_every_command_help_renders(command):
    # help text with brackets such as openclip:<arch>[/<tag>] once crashed the markup renderer
    res = CliRunner().invoke(app, [command, "--help"])
    assert res.exit_code == 0, res.output
    assert f"capcurate {command}" in res.output and "--help" in res.output


def test_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and "capcurate 0." in res.output


def test_docs_cli_md_matches_help():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_cli_docs.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
