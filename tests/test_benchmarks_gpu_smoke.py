"""benchmarks/gpu: --smoke runs every row family through the real stage calls on the CPU, and the runner
fails a row (and the run) when a side crashes or capcurate's output fails its gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from capcurate import events

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: `pytest` run from elsewhere must find it
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import __main__ as bench  # noqa: E402
from benchmarks.gpu.runner import Measure, Row, run_row  # noqa: E402


def test_smoke_runs_every_row_family_gated_and_records_commit_card_and_repeats(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rc = bench.main(
        [
            "--smoke",
            "--repeats",
            "1",
            "--json-out",
            str(out),
            "--workdir",
            str(tmp_path / "w"),
            "--only",
            ",".join(bench.FAMILIES),
        ]
    )
    report = json.loads(out.read_text())
    assert rc == 0, [r["failures"] for r in report["rows"]]
    assert report["ok"] and report["complete"] and report["card"] == "cpu" and len(report["head"]) == 40
    assert isinstance(report["dirty"], bool)
    assert {r["family"] for r in report["rows"]} == set(bench.FAMILIES) - {
        "vlm"
    }  # the VLM row is recaption's
    assert "recaption_vlm" in {r["row"] for r in report["rows"]}
    for r in report["rows"]:
        assert r["ok"] and not r["failures"], r
        assert r["sides"]["capcurate"]["per_s"]["repeats"], r["row"]
        assert r["ratio_median"], f"{r['row']} compares with no baseline"
        s = r["sides"]["capcurate"]["per_s"]
        assert s["min"] <= s["median"] <= s["max"]
    stage_rows = [
        r
        for r in report["rows"]
        if r["row"] in ("recaption_greedy", "recaption_vlm", "score_mixed_sizes", "train_e2e")
    ]
    for r in stage_rows:  # the stages announced their batches/steps through capcurate.events
        assert r["sides"]["capcurate"]["steady_per_s"]["median"] > 0, r["row"]
    skipped = capsys.readouterr().out
    assert "skipped capcurate_gpu_nvjpeg_resize: nvJPEG needs CUDA" in skipped  # reasons are printed


def _row(gate, crash_baseline=False):
    calls = []

    def ours(rep):
        calls.append(("capcurate", rep))
        return Measure(10, 1.0, output=rep)

    def base(rep):
        calls.append(("baseline", rep))
        if crash_baseline:
            raise RuntimeError("child died")
        return Measure(10, 2.0)

    return Row("x", "x_row", "images", "test", ours, {"baseline": base}, gate), calls


def test_a_failed_gate_or_a_crashed_side_fails_the_row_and_repeats_alternate_the_order():
    row, calls = _row(lambda out: [])
    res = run_row(row, repeats=3)
    assert res["ok"] and res["ratio_median"] == {"baseline": 2.0}
    assert res["sides"]["capcurate"]["per_s"]["repeats"] == [10.0, 10.0, 10.0]
    assert [c[0] for c in calls] == [
        "capcurate",
        "baseline",
        "baseline",
        "capcurate",
        "capcurate",
        "baseline",
    ]
    row, _ = _row(lambda out: ["wrong scores"] if out == 1 else [])
    res = run_row(row, repeats=3)
    assert not res["ok"] and res["failures"] == ["gate, repeat 1: wrong scores"]
    row, _ = _row(lambda out: [], crash_baseline=True)
    assert not run_row(row, repeats=1)["ok"]


def test_a_failing_row_makes_the_run_exit_1(monkeypatch, tmp_path):
    row, _ = _row(lambda out: ["captioned nothing"])
    monkeypatch.setattr(bench, "build_rows", lambda cfg, only, work: [row])
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--only", "input", "--repeats", "1", "--json-out", str(out)]) == 1
    assert json.loads(out.read_text())["ok"] is False


def test_events_reach_listeners_only_while_subscribed_and_a_broken_listener_never_fails_the_stage():
    got = []

    def broken(kind, n):
        raise ValueError("observer bug")

    with events.listening(lambda kind, n: got.append((kind, n))), events.listening(broken):
        with pytest.warns(UserWarning, match="observer bug"):
            events.emit("batch", 4)
    events.emit("batch", 5)
    assert got == [("batch", 4)]


def test_only_selects_row_families_and_repeats_sets_the_repeat_count(tmp_path):
    out = tmp_path / "gpu.json"
    assert bench.main(["--smoke", "--only", "input", "--repeats", "2", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["family"] for r in report["rows"]] == ["input"] and report["families"] == ["input"]
    assert len(report["rows"][0]["sides"]["capcurate"]["per_s"]["repeats"]) == 2


@pytest.mark.parametrize("args", [["--only", "input,nope"], ["--repeats", "0"], ["--workdir", "NONEMPTY"]])
def test_bad_arguments_exit_2_before_any_work(args, tmp_path, capsys):
    if "NONEMPTY" in args:
        (tmp_path / "old.txt").write_text("an earlier run")
        args = ["--workdir", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        bench.main(["--smoke", *args])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()[-1]) > 0
