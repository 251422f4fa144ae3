"""pipelines/: the quickstart runs end to end at tiny scale; the real-scale recipe parses and dry-runs."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "pipelines" / "quickstart.sh"
DATACOMP = ROOT / "pipelines" / "datacomp_small.sh"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
            "QUICKSTART_OUT": str(tmp_path / "demo"), **extra}


def _port_closed(log: str) -> bool:
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", log).group(1))
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _has_command(name: str) -> bool:
    exe = Path(sys.executable).parent / "capcurate"
    return subprocess.run([str(exe), name, "--help"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_tiny_quickstart_runs_every_step_and_writes_the_results_table(tmp_path: Path) -> None:
    missing = [c for c in ("synth", "download", "train", "recaption", "score", "filter", "mix", "shard", "eval")
               if not _has_command(c)]
    if missing:
        pytest.skip(f"stage commands not registered yet: {', '.join(missing)}")
    env = _env(tmp_path, QUICKSTART_SCALE="tiny", QUICKSTART_STRATEGIES="raw_top_synthetic")
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "demo"
    rows = json.loads((out / "results.json").read_text())["rows"]
    trained = {r["name"]: r for r in rows if r["zeroshot_top1"] is not None}
    assert set(trained) == {"raw_top_synthetic"}
    assert all(r["samples_seen"] == 64 and 0 <= r["i2t_r1"] <= 1 for r in trained.values())
    # all five selections were made, even those not trained
    made = {p.stem for p in (out / "dataset" / "selections").glob("*.parquet")}
    assert made >= {"raw", "raw_top", "synthetic", "raw_top_synthetic", "best_of"}
    md = (out / "results.md").read_text()
    assert "raw-top + synthetic" in md and "captions naming the object" in md
    assert (out / "results.png").stat().st_size > 1000
    # every step is echoed as a command a user can copy
    assert "+ capcurate recaption" in res.stderr and "+ capcurate mix" in res.stderr
    assert _port_closed(res.stderr)


def test_quickstart_stops_its_http_server_when_a_step_fails(tmp_path: Path) -> None:
    # a capcurate that works for synth but fails at download, in front of the real one on PATH
    shim = tmp_path / "bin"
    shim.mkdir()
    real = Path(sys.executable).parent / "capcurate"
    (shim / "capcurate").write_text(
        f'#!/bin/bash\nif [ "$1" = download ]; then echo "download failed" >&2; exit 1; fi\nexec {real} "$@"\n')
    (shim / "capcurate").chmod(0o755)
    env = _env(tmp_path, QUICKSTART_SCALE="tiny")
    env["PATH"] = f"{shim}:{env['PATH']}"
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "download failed" in res.stderr
    assert _port_closed(res.stderr)


def test_quickstart_refuses_an_output_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("precious")
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 3 and "not made by this script" in res.stderr
    assert (tmp_path / "demo" / "thesis.tex").read_text() == "precious"
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path, QUICKSTART_SCALE="huge"),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "QUICKSTART_SCALE" in res.stderr


def test_pipeline_scripts_parse_and_the_datacomp_recipe_dry_runs() -> None:
    for script in (QUICKSTART, DATACOMP):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    res = subprocess.run(["bash", str(DATACOMP), "--dry-run"], capture_output=True, text=True,
                         env={**os.environ, "WORK": "/nonexistent/work"})
    assert res.returncode == 0, res.stderr
    commands = [line[2:].split()[1] for line in res.stdout.splitlines() if line.startswith("+ capcurate")]
    assert commands == ["download", "filter", "recaption", "score", "mix", "shard", "train", "eval"]
    assert "hf:Salesforce/blip2-opt-2.7b" in res.stdout and "openclip:ViT-L-14/openai" in res.stdout
    assert "--model ViT-B-32" in res.stdout and not Path("/nonexistent/work").exists()
    assert subprocess.run(["bash", str(DATACOMP), "--bogus"], capture_output=True).returncode == 2


def test_results_table_reports_missing_runs_as_an_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, str(ROOT / "pipelines" / "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "no evals" in res.stderr
