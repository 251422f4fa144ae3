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
    """The quickstart's environment: this venv first on PATH, and no GPU (a CPU test on any machine; the
    GPU scale is timed by hand, docs/demo.md)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
            "QUICKSTART_OUT": str(tmp_path / "demo"), "CUDA_VISIBLE_DEVICES": "", **extra}


def _port_closed(log: str) -> bool:
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", log).group(1))
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


QUICKSTART_COMMANDS = ("synth", "download", "train", "recaption", "score", "filter", "mix", "shard", "eval")


def help_failures(commands: tuple[str, ...] | list[str]) -> list[str]:
    """'command: exit N: last line' for each command whose --help does not exit 0 (in process: no
    interpreter start per command)."""
    from typer.testing import CliRunner

    from capcurate.cli import app

    failures = []
    for name in commands:
        r = CliRunner().invoke(app, [name, "--help"])
        if r.exit_code != 0:
            last = (r.output.strip().splitlines() or [repr(r.exception)])[-1]
            failures.append(f"{name}: exit {r.exit_code}: {last}")
    return failures


def test_every_quickstart_command_answers_help() -> None:
    """A command whose --help fails is a failure of the quickstart tests, never a reason to skip them."""
    assert help_failures(QUICKSTART_COMMANDS) == []
    assert [f.split(":")[0] for f in help_failures(["no-such-command"])] == ["no-such-command"]


TINY_STRATEGIES = "raw_top raw_top_synthetic"


@pytest.mark.slow
def test_tiny_quickstart_runs_every_step_and_writes_the_results_table(tiny_quickstart) -> None:
    out, res = tiny_quickstart
    results = json.loads((out / "results.json").read_text())
    trained = {r["name"]: r for r in results["rows"] if r["zeroshot_top1"] is not None}
    assert set(trained) == {"raw_top", "raw_top_synthetic"}
    assert all(r["samples_seen"] == 64 and 0 <= r["i2t_r1"] <= 1 for r in trained.values())
    assert all(r["eval_images"] == 96 and r["pm_kind"] == "se" for r in trained.values())
    # the premise is measured every run: raw alt-texts and CoCa captions over the same pool images
    pool = results["pool_caption_accuracy"]
    assert 0.1 < pool["raw"]["colour_and_shape"] < 0.6 and 0 <= pool["synthetic"]["colour_and_shape"] <= 1
    assert [c["mix"] for c in results["key_comparison"]] == ["raw_top_synthetic"]
    # each step's seconds are printed and kept
    steps = [line.split("\t") for line in (out / "timings.tsv").read_text().splitlines()[1:]]
    assert [name for name, _ in steps][:3] == ["1/9 synth", "2/9 download", "3/9 captioner"]
    assert steps[-1][0] == "total" and all(int(sec) >= 0 for _, sec in steps)
    assert "seconds per step:" in res.stderr
    assert (out / "world" / "contact_sheet.png").is_file()
    # all five selections were made, even those not trained
    made = {p.stem for p in (out / "dataset" / "selections").glob("*.parquet")}
    assert made >= {"raw", "raw_top", "synthetic", "raw_top_synthetic", "best_of"}
    md = (out / "results.md").read_text()
    assert "raw-top + synthetic" in md and "captions naming the object" in md and "pool: CoCa captions" in md
    assert (out / "results.png").stat().st_size > 1000
    # every step is echoed as a command a user can copy
    assert "+ capcurate recaption" in res.stderr and "+ capcurate mix" in res.stderr
    assert _port_closed(res.stderr)


def _failing_download(tmp_path: Path, env: dict[str, str], message: str) -> dict[str, str]:
    """``env`` with a capcurate in front of the real one on PATH that fails at ``download`` only."""
    shim = tmp_path / "bin"
    shim.mkdir()
    real = Path(sys.executable).parent / "capcurate"
    (shim / "capcurate").write_text(
        f'#!/bin/bash\nif [ "$1" = download ]; then echo "{message}" >&2; exit 1; fi\nexec {real} "$@"\n')
    (shim / "capcurate").chmod(0o755)
    return {**env, "PATH": f"{shim}:{env['PATH']}"}


def test_quickstart_stops_its_http_server_when_a_step_fails(tmp_path: Path) -> None:
    env = _failing_download(tmp_path, _env(tmp_path, QUICKSTART_SCALE="tiny"), "download failed")
    res = subprocess.run(["bash", str(QUICKSTART)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "download failed" in res.stderr
    assert _port_closed(res.stderr)


@pytest.mark.slow
def test_quickstart_ingest_mode_runs_without_http_or_img2dataset(tiny_quickstart_ingest) -> None:
    # QUICKSTART_FETCH=ingest is for machines without img2dataset: the fixture's download fails on purpose
    out, res = tiny_quickstart_ingest
    assert "+ capcurate ingest" in res.stderr and "http.server" not in res.stderr
    steps = [line.split("\t")[0] for line in (out / "timings.tsv").read_text().splitlines()[1:]]
    assert steps[:2] == ["1/9 synth", "2/9 ingest"]
    results = json.loads((out / "results.json").read_text())
    # the ingested dataset has the world's uids, so the truth is joined from world/urls.parquet
    pool = results["pool_caption_accuracy"]
    assert 0.1 < pool["raw"]["colour_and_shape"] < 0.6 and 0 <= pool["synthetic"]["colour_and_shape"] <= 1
    assert [r["name"] for r in results["rows"] if r["zeroshot_top1"] is not None] == TINY_STRATEGIES.split()


def test_quickstart_refuses_an_output_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "thesis.tex").write_text("precious")
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path), capture_output=True, text=True)
    assert res.returncode == 3 and "not made by this script" in res.stderr
    assert (tmp_path / "demo" / "thesis.tex").read_text() == "precious"
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path, QUICKSTART_SCALE="huge"),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "QUICKSTART_SCALE" in res.stderr
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path, QUICKSTART_OUT=str(tmp_path / "x"),
                                                             QUICKSTART_SEEDS="three"), capture_output=True, text=True)
    assert res.returncode == 2 and "QUICKSTART_SEEDS" in res.stderr
    res = subprocess.run(["bash", str(QUICKSTART)], env=_env(tmp_path, QUICKSTART_OUT=str(tmp_path / "x"),
                                                             QUICKSTART_FETCH="ftp"), capture_output=True, text=True)
    assert res.returncode == 2 and "QUICKSTART_FETCH" in res.stderr


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


def _fake_run(run: Path, top1: dict[str, float], n_eval: int = 1000) -> None:
    """A quickstart run folder holding only eval results (what results_table needs for the metrics)."""
    (run / "evals").mkdir(parents=True)
    for name, acc in top1.items():
        records = [{"task": "zeroshot_classification", "metrics": {"acc1": acc, "acc5": min(1.0, 3 * acc)},
                    "num_samples": n_eval},
                   {"task": "zeroshot_retrieval", "metrics": {"text_retrieval_recall@1": acc / 2,
                                                               "image_retrieval_recall@1": acc / 4}}]
        (run / "evals" / f"{name}.json").write_text(json.dumps(records))


def test_results_table_reports_mean_std_over_seed_runs_and_the_paired_key_difference(tmp_path: Path) -> None:
    seeds = [{"raw": 0.02, "raw_top": 0.10, "synthetic": 0.20, "raw_top_synthetic": 0.30, "best_of": 0.25},
             {"raw": 0.04, "raw_top": 0.20, "synthetic": 0.22, "raw_top_synthetic": 0.26, "best_of": 0.15},
             {"raw": 0.03, "raw_top": 0.15, "synthetic": 0.24, "raw_top_synthetic": 0.34, "best_of": 0.20}]
    for k, top1 in enumerate(seeds):
        _fake_run(tmp_path / f"seed_{k}", top1)
    res = subprocess.run([sys.executable, str(ROOT / "pipelines" / "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in out["rows"]}
    assert out["runs"] == 3 and rows["raw_top"]["zeroshot_top1"] == pytest.approx(0.15)
    assert rows["raw_top"]["zeroshot_top1_pm"] == pytest.approx(0.05) and rows["raw_top"]["pm_kind"] == "std"
    key = {c["mix"]: c for c in out["key_comparison"]}
    # paired per seed: +0.20, +0.06, +0.19 -> mean 0.15, std of the differences (not of either strategy)
    assert key["raw_top_synthetic"]["diffs"] == pytest.approx([0.20, 0.06, 0.19])
    assert key["raw_top_synthetic"]["diff"] == pytest.approx(0.15)
    assert key["raw_top_synthetic"]["pm"] == pytest.approx(0.0781, abs=1e-4)
    assert key["best_of"]["wins"] == 2 and key["best_of"]["runs"] == 3
    md = (tmp_path / "results.md").read_text()
    assert "15.0 ± 5.0" in md and "+15.0 ± 7.8 (std; 3 of 3 runs above" in md


def test_results_table_gives_one_run_the_eval_sets_standard_error(tmp_path: Path) -> None:
    _fake_run(tmp_path, {"raw_top": 0.2, "best_of": 0.3, "raw_top_synthetic": 0.1}, n_eval=400)
    res = subprocess.run([sys.executable, str(ROOT / "pipelines" / "results_table.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "results.json").read_text())
    rows = {r["name"]: r for r in out["rows"]}
    assert set(rows) == {"raw_top", "raw_top_synthetic", "best_of"}
    assert rows["raw_top"]["zeroshot_top1_pm"] == pytest.approx((0.2 * 0.8 / 400) ** 0.5)
    best = {c["mix"]: c for c in out["key_comparison"]}["best_of"]
    assert best["diff"] == pytest.approx(0.1) and best["pm_kind"] == "se"
    assert best["pm"] == pytest.approx((0.3 * 0.7 / 400 + 0.2 * 0.8 / 400) ** 0.5)


def test_the_premise_must_hold_in_every_run_not_only_on_average() -> None:
    sys.path.insert(0, str(ROOT / "pipelines"))
    try:
        from results_table import markdown, pool_summary
    finally:
        sys.path.remove(str(ROOT / "pipelines"))

    def pool(raw: float, syn: float) -> dict[str, dict[str, float]]:
        stats = {"colour": 0.5, "shape": 0.5, "exact": 0.0}
        return {"raw": {**stats, "colour_and_shape": raw}, "synthetic": {**stats, "colour_and_shape": syn}}

    both = pool_summary([pool(0.30, 0.90), pool(0.30, 0.55)])  # 3.0x and 1.83x: the mean ratio is 2.42x
    assert round(both["ratio"], 2) == 2.42 and [round(r, 2) for r in both["ratio_runs"]] == [3.0, 1.83]
    assert both["premise_holds"] is False
    rows = [{"strategy": "raw", "samples": 1, "samples_seen": 1, "zeroshot_top1": 0.1, "zeroshot_top5": 0.2,
             "i2t_r1": 0.0, "t2i_r1": 0.0, "captions_naming_object": 0.3}]
    assert "1 of 2 at least 2x" in markdown(rows, both, [], 2) and "does NOT hold" in markdown(rows, both, [], 2)
    assert pool_summary([pool(0.30, 0.90), pool(0.30, 0.61)])["premise_holds"] is True
