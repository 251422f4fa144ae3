"""capcurate launch slurm / launch finalize, against a fake Slurm on PATH.

The fake ``sbatch`` runs the script it is given on this machine, as Slurm would on a node: every array
task in turn with SLURM_ARRAY_JOB_ID / SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT set and its log where
``#SBATCH --output`` says; a job with ``--dependency=afterok:ID`` only if every task of ID exited 0.
``srun`` runs its command, ``scontrol`` records what it was asked. The scripts run unchanged.
"""

from __future__ import annotations

import io
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import make_image_bytes
from curate_fixtures import build_scored_dataset
from typer.testing import CliRunner

from capcurate.card import Card
from capcurate.cli import app
from capcurate.launch.slurm import SlurmOptions, time_limit_seconds, write_scripts
from capcurate.launch.stage_args import stage_call

FAKE_SBATCH = r"""#!/bin/bash
# fake sbatch: --parsable [--dependency=afterok:ID] SCRIPT -> runs SCRIPT here, prints a job id
[ -n "${FAKE_SBATCH_FAIL:-}" ] && { echo "sbatch: error: $FAKE_SBATCH_FAIL" >&2; exit 1; }
dep=""; script=""
for a in "$@"; do
  case "$a" in --parsable) ;; --dependency=afterok:*) dep="${a#--dependency=afterok:}" ;; -*) ;; *) script="$a" ;; esac
done
echo "sbatch $*" >> "$FAKE_SLURM/calls"
job=$(( $(ls "$FAKE_SLURM" | grep -c '^job-') + 1000 )); : > "$FAKE_SLURM/job-$job"
out=$(sed -n 's/^#SBATCH --output=//p' "$script"); name=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
range=$(sed -n 's/^#SBATCH --array=//p' "$script")
if [ -n "$dep" ] && [ -e "$FAKE_SLURM/failed-$dep" ]; then echo "$job"; exit 0; fi  # DependencyNeverSatisfied
if [ -n "$range" ]; then
  first=${range%-*}; last=${range#*-}
  for ((i = first; i <= last; i++)); do
    log=${out//%A/$job}; log=${log//%a/$i}; log=${log//%x/$name}
    SLURM_JOB_ID=$job SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$i SLURM_ARRAY_TASK_COUNT=$((last - first + 1)) \
      bash "$script" >> "$log" 2>&1 || : > "$FAKE_SLURM/failed-$job"
  done
else
  log=${out//%j/$job}; log=${log//%x/$name}
  SLURM_JOB_ID=$job bash "$script" >> "$log" 2>&1 || : > "$FAKE_SLURM/failed-$job"
fi
echo "$job"
"""
FAKE_SRUN = """#!/bin/bash
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM/calls"
"""


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A folder holding fake sbatch/srun/scontrol, first on PATH; its ``calls`` file logs them."""
    folder = tmp_path / "fake-slurm"
    folder.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    monkeypatch.setenv("CAPCURATE_PROGRESS", "0")
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    from capcurate.stages.mix import mix

    root = build_scored_dataset(tmp_path_factory.mktemp("launch") / "ds")
    mix(root, "both", synthetic="blip", name="both")  # 18 rows
    return root


def group():
    import typer.main

    return typer.main.get_command(app)


def invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def read_tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_slurm_array_of_shard_equals_one_process_run(mixed, tmp_path, fake_slurm, monkeypatch):
    from capcurate.stages.shard import shard

    shard(mixed, "both", tmp_path / "one", samples_per_shard=5)
    monkeypatch.chdir(tmp_path)  # relative paths in, absolute paths in the scripts
    res = invoke(["launch", "slurm", "shard", os.path.relpath(mixed), "--selection", "both", "-o", "out",
                  "--samples-per-shard", "5", "--array", "3", "--output-dir", "sl", "--submit", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["details"]
    array = Path(info["array_script"]).read_text()
    assert f"shard {mixed} --selection both --output {tmp_path / 'out'} --samples-per-shard 5" in array
    assert '--part "${SLURM_ARRAY_TASK_ID}/3"' in array and "#SBATCH --array=0-2" in array
    assert "#SBATCH --signal=B:USR1@120" in array and "#SBATCH --requeue" in array
    calls = (fake_slurm / "calls").read_text().splitlines()
    assert calls == [f"sbatch --parsable {info['array_script']}",
                     f"sbatch --parsable --dependency=afterok:{info['array_job']} {info['finalize_script']}"]
    logs = sorted(p.name for p in (tmp_path / "sl" / "logs").iterdir())
    assert logs == [f"capcurate-shard-{info['array_job']}_{i}.out" for i in range(3)] + [
        f"capcurate-shard-finalize-{info['finalize_job']}.out"]
    again = invoke(["launch", "finalize", "shard", str(mixed), "--selection", "both", "-o", "out",
                    "--samples-per-shard", "5", "--json"])  # by hand, as after a failed part: nothing to do
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["counts"] == {"shards_computed_here": 0} and summary["details"]["completion"]["details"]["complete"]
    final_log = (tmp_path / "sl" / "logs" / logs[-1]).read_text()
    assert "4 shard(s) already written" in final_log and "lineage" not in final_log and "manifest.json written" in " ".join(final_log.split())
    got, want = read_tree(tmp_path / "out"), read_tree(tmp_path / "one")
    assert sorted(got) == sorted(want) and len([n for n in got if n.endswith(".tar")]) == 4
    for name in want:
        if name == "manifest.json":  # names its own folder in train_data
            g, w = json.loads(got[name]), json.loads(want[name])
            assert g.pop("train_data").startswith(str(tmp_path / "out")) and w.pop("train_data")
            assert g == w
        else:
            assert got[name] == want[name], name


def _webdataset_inputs(folder: Path) -> Path:
    folder.mkdir()
    for t in range(3):
        with tarfile.open(folder / f"part{t}.tar", "w") as tf:
            for j in range(2):
                members = {"jpg": make_image_bytes(10 * t + j), "txt": f"picture {t} {j}".encode(),
                           "json": json.dumps({"url": f"http://h/{t}/{j}.jpg"}).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"s{t}{j}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def test_finalize_closes_the_lineage_of_a_preempted_try(tmp_path, fake_slurm):
    from capcurate.stages.ingest import ingest

    web = _webdataset_inputs(tmp_path / "web")
    ingest(web, tmp_path / "one", kind="webdataset")
    call = stage_call(group(), "ingest", [str(web), "-o", str(tmp_path / "ds"), "--kind", "webdataset"])
    scripts = write_scripts(call, SlurmOptions(array=2, output_dir=str(tmp_path / "sl")))
    sub = lambda *a: subprocess.run(["sbatch", "--parsable", *a], capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout.strip()
    job = sub(str(scripts.array))
    # what a try on another node that was preempted leaves: an entry nobody finished, a host nobody can ask
    card = Card(tmp_path / "ds")
    with card.editing() as data:
        done = [e for e in data["lineage"] if e["stage"] == "ingest"]
        assert len(done) == 2 and all(e["finished"] and "--part" in e["command"] for e in done)
        tried = {**done[0], "finished": None, "counts": {},
                 "command": done[0]["command"].replace("--part 0/2", "--part 1/2")}
        data["lineage"][:0] = [
            {**tried, "id": "ingest-preempted-1-x", "host": "node-7"},
            # provably still at work, so left open: a live process on this host, a lease that has not run out
            {**tried, "id": f"ingest-live-{os.getpid()}-abcd", "host": platform.node()},
            {**tried, "id": "ingest-leased-1-y", "host": "node-9", "lease_until": "2999-01-01T00:00:00+00:00"},
        ]
    sub(f"--dependency=afterok:{job}", str(scripts.finalize))
    log = " ".join((scripts.logs / f"capcurate-ingest-finalize-{int(job) + 1}.out").read_text().split())
    assert "5 part tries, 1 unfinished one(s) closed, 2 still running (left open)" in log, log
    lineage = {e["id"]: e for e in Card(tmp_path / "ds").read()["lineage"]}
    preempted = lineage["ingest-preempted-1-x"]
    assert preempted["finished"] and preempted["closed_by"] == "launch finalize"
    assert lineage[f"ingest-live-{os.getpid()}-abcd"]["finished"] is None
    assert lineage["ingest-leased-1-y"]["finished"] is None
    final = list(lineage.values())[-1]
    assert final["finished"] and "--part" not in final["command"].split()
    assert len(final["parts"]) == 5 and {e["id"] for e in done} < set(final["parts"])
    assert final["part_counts"]["shards_processed"] == 3 and final["counts"]["shards_skipped"] == 3
    for sub_dir in ("shards", "samples"):
        assert read_tree(tmp_path / "ds" / sub_dir).keys() == read_tree(tmp_path / "one" / sub_dir).keys()
    assert (pq.read_table(tmp_path / "ds" / "samples").sort_by("uid").to_pylist()
            == pq.read_table(tmp_path / "one" / "samples").sort_by("uid").to_pylist())


def test_sigusr1_requeues_the_array_task_and_stops_the_stage(tmp_path, fake_slurm):
    marks = tmp_path / "marks"
    stage = tmp_path / "fake-python"  # stands in for the stage: says it started, records how it was stopped
    stage.write_text(f'#!/bin/bash\necho "started $*" >> {marks}\n'
                     f'trap \'kill $!; echo terminated >> {marks}; exit 143\' TERM\n'
                     'sleep 60 >/dev/null 2>&1 & wait\n')
    stage.chmod(0o755)
    call = stage_call(group(), "shard", [str(tmp_path), "--selection", "s", "-o", str(tmp_path / "out")])
    scripts = write_scripts(call, SlurmOptions(array=4, time="10", output_dir=str(tmp_path / "sl")),
                            python=str(stage))
    env = {**os.environ, "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "SLURM_JOB_ID": "80"}
    proc = subprocess.Popen(["bash", str(scripts.array)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 20
    while not (marks.exists() and "started" in marks.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    assert "--part 3/4" in marks.read_text()
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends to the batch shell
    _, err = proc.communicate(timeout=20)
    assert "requeueing 77_3" in err
    assert "scontrol requeue 77_3" in (fake_slurm / "calls").read_text()
    assert marks.read_text().splitlines()[-1] == "terminated" and proc.returncode == 143


def test_every_resource_option_reaches_the_scripts_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blip").mkdir()
    res = invoke(["launch", "slurm", "recaption", "ds", "--model", "hf:blip", "--name", "b", "--decoding", "greedy",
                  "--scratch", "scr", "--array", "8", "--partition", "gpu", "--gpus-per-task", "1",
                  "--cpus-per-task", "6", "--mem", "48G", "--time", "1-02:00:00", "--account", "proj",
                  "--qos", "high", "--output-dir", "sl", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)["details"]
    array, final = Path(info["array_script"]).read_text(), Path(info["finalize_script"]).read_text()
    want = ["--partition=gpu", "--account=proj", "--qos=high", "--time=1-02:00:00", "--mem=48G",
            "--cpus-per-task=6"]
    for line in want:
        assert f"#SBATCH {line}\n" in array and f"#SBATCH {line}\n" in final
    assert "#SBATCH --gpus-per-task=1\n" in array and "gpus-per-task" not in final
    args = f"recaption {tmp_path / 'ds'} --model hf:{tmp_path / 'blip'} --name b --decoding greedy --scratch {tmp_path / 'scr'}"
    assert f"srun --ntasks=1 --cpus-per-task=6 {sys.executable} -m capcurate {args} --part" in array
    assert " -m capcurate launch finalize --since " in final and final.rstrip().endswith(args)
    assert "AWS_*" in array and "--export=ALL" in array
    assert "jid=$(sbatch --parsable" in json.loads(res.stdout)["message"]
    # URLs, hub ids and shuffle's off switch pass through as given
    call = stage_call(group(), "shard", ["s3://b/ds", "--selection", "x", "-o", "s3://b/out", "--no-shuffle"])
    assert call.argv == ["s3://b/ds", "--selection", "x", "--output", "s3://b/out", "--no-shuffle"]
    call = stage_call(group(), "score", ["ds", "--model", "openclip:ViT-B-32/laion2b", "--name", "s"])
    assert "openclip:ViT-B-32/laion2b" in call.argv and time_limit_seconds("90") == 5400


@pytest.mark.parametrize("args, says", [
    (["mix", "ds", "--strategy", "raw"], "mix does not take --part"),
    (["nope", "ds"], "unknown stage 'nope'"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--array", "0"], "--array must be 1 or more"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--overwrite"], "--overwrite cannot run as an array"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--part", "0/2"], "leave --part out"),
    (["shard", "ds", "-o", "o"], "Missing option"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--time", "2:00"], "must be longer than 120 s"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--time", "soon"], "expected a Slurm time"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--mem", "lots"], "expected a size"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--partition", "gpu; rm -rf /"], "not a Slurm name"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--cpus-per-task", "0"], "--cpus-per-task must be 1"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--output-dir", "s3://b/sl"], "not a URL"),
    (["shard", "ds", "--selection", "x", "-o", "o", "--submit"], "sbatch is not on PATH"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch
    if "--array" not in args:
        args = [*args, "--array", "2"]
    res = invoke(["launch", "slurm", *args])
    assert res.exit_code == 2, res.output
    assert says in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert list(tmp_path.iterdir()) == []


def test_sbatch_refusing_the_job_is_one_line_exit_1(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("FAKE_SBATCH_FAIL", "invalid partition specified: gpu")
    res = invoke(["launch", "slurm", "shard", str(tmp_path), "--selection", "x", "-o", str(tmp_path / "o"),
                  "--array", "2", "--output-dir", str(tmp_path / "sl"), "--submit"])
    assert res.exit_code == 1 and "invalid partition specified: gpu" in res.stderr, res.output


def test_finalize_refuses_a_bad_since_and_passes_on_the_stage_exit_code(mixed, tmp_path):
    res = invoke(["launch", "finalize", "--since", "yesterday", "shard", str(mixed), "--selection", "both",
                  "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--since 'yesterday'" in res.stderr
    res = invoke(["launch", "finalize", "shard", str(mixed), "--selection", "nope", "-o", str(tmp_path / "o")])
    assert res.exit_code == 2 and "no selection named 'nope'" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_cost_table_is_computed_from_the_measured_rows():
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("cost_table", root / "benchmarks" / "cost_table.py")
    cost = importlib.util.module_from_spec(spec)
    sys.modules["cost_table"] = cost  # dataclasses look their module up there
    spec.loader.exec_module(cost)
    card, rows = cost.read_rows(root / "docs" / "benchmarks.md")
    assert card and {r.key for r in rows} == {"recaption", "VLM", "score", "train"}
    recaption = next(r for r in rows if r.key == "recaption")
    assert cost.gpu_hours(recaption, 1_280_000_000, 0) == pytest.approx(1_280_000_000 / recaption.per_second / 3600)
    assert cost.gpu_hours(recaption, 0, 10) == pytest.approx(10 * recaption.startup_s / 3600)
    text = cost.table(card, rows, tasks=0, usd=2.0)
    assert f"{1_280_000_000 / recaption.per_second / 3600:,.1f}" in text and "USD 1.28B" in text
