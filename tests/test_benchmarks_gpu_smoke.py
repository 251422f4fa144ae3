"""benchmarks/gpu: --smoke runs every row family through the real stage calls on the CPU, and the runner
fails a row (and the run) when a side crashes or capcurate's output fails its gate."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from capcurate import events

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is not installed: `pytest` run from elsewhere must find it
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import __main__ as bench  # noqa: E402
from benchmarks.gpu import bound, runner  # noqa: E402
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
    # FLOPs counted on the CPU with the tiny models; no peak for the CPU, so no fraction; no GPU, no busy
    by_row = {r["row"]: r for r in report["rows"]}
    for r in report["rows"]:
        if r["row"] in MODEL_ROWS:
            assert r["flops_per_item"] > 0 and r["flops"]["per_item"] == r["flops_per_item"], r["row"]
        else:
            assert r["flops_per_item"] is None, r["row"]
        assert r["peak_flops"] is None and r["fraction_of_bound"] is None, r["row"]
        assert r["gpu_busy_pct"] is None and r["gpu_busy_steady_pct"] is None, r["row"]
        assert [b["pct"] for b in r["gpu_busy_repeats"]] == [None], r["row"]
    assert set(by_row) >= MODEL_ROWS
    for name in ("train_e2e", "train_step"):  # the text tower's trimming/packing: less work than 77 tokens
        f = by_row[name]["flops"]
        assert 0 < f["per_item"] < f["per_item_dense_77"], f
    assert by_row["train_step"]["flops"]["text_tokens_dense"] == 77
    printed = capsys.readouterr().out
    assert "skipped capcurate_gpu_nvjpeg_resize: nvJPEG needs CUDA" in printed  # reasons are printed
    assert "fraction of bound n/a (no peak for the CPU); GPU busy n/a" in printed


MODEL_ROWS = {
    "recaption_greedy",
    "recaption_beam_default",
    "recaption_vlm",
    "score_mixed_sizes",
    "eval_zeroshot",
    "train_e2e",
    "train_step",
}


def test_fraction_of_bound_is_median_items_per_s_times_flops_per_item_over_the_cards_peak(monkeypatch):
    assert bound.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989.5e12)  # SXM5
    assert bound.peak_flops("NVIDIA H100 PCIe", "bf16") == ("H100 PCIe", 756.5e12)
    assert bound.peak_flops("NVIDIA H200 NVL", "fp16") == ("H200 NVL", 835.5e12)
    assert bound.peak_flops("NVIDIA A100-SXM4-80GB", "amp_bf16") == ("A100", 312e12)
    assert bound.peak_flops("cpu", "fp32") is None and bound.peak_flops("Tesla T4", "bf16") is None
    assert bound.fraction_of_bound(None, 1e9, 1e12) is None and bound.fraction_of_bound(5, 1e9, None) is None
    monkeypatch.setattr(runner, "card", lambda: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(runner, "BusySampler", lambda enabled: bound.BusySampler(False))
    row, _ = _row(lambda out: [])  # capcurate: 10 items in 1 s each repeat
    row.device, row.precision, row.flops = "cuda", "bf16", lambda: {"per_item": 2e12, "how": "fake"}
    res = run_row(row, repeats=3)
    assert res["ok"] and res["peak_card"] == "H100" and res["peak_flops"] == 989.5e12
    assert res["flops_per_item"] == 2e12
    assert res["fraction_of_bound"] == pytest.approx(10 * 2e12 / 989.5e12)
    assert res["fraction_of_bound_steady"] is None  # the fake side announced no batches
    row.flops = lambda: 1 / 0  # a counting bug loses the bound, not the row
    res = run_row(row, repeats=1)
    assert res["ok"] and res["flops_per_item"] is None and res["fraction_of_bound"] is None
    assert "ZeroDivisionError" in res["flops"]["error"]


def test_busy_sampler_gives_none_without_pynvml_or_nvidia_smi_and_reads_nvidia_smi_when_there(
    monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    monkeypatch.setenv("PATH", str(tmp_path))
    s = bound.BusySampler(True).start()
    assert s.stop() == [] and s.mean() is None and s.source is None
    off = bound.BusySampler(False).start()
    assert off.stop() == [] and off.mean() is None
    fake = tmp_path / "nvidia-smi"  # prints what --query-gpu=timestamp,utilization.gpu prints, every 20 ms
    fake.write_text(
        "#!/bin/sh\nwhile true; do echo \"$(date '+%Y/%m/%d %H:%M:%S.%N' | cut -c1-23), 87\"; "
        "sleep 0.02; done\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    s = bound.BusySampler(True).start()
    time.sleep(0.5)
    s.stop()
    assert s.source == "nvidia-smi" and s.samples and s.mean() == 87.0
    assert s.mean(0.0, 1.0) is None  # samples outside the window are left out


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
