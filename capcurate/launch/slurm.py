"""``capcurate launch slurm``: a stage as an sbatch array over ``--part``, plus a dependent finalize job.

Everything is checked before anything is written (the stage's arguments, the resources, ``sbatch`` on
PATH when submitting), so bad input leaves no files. The scripts are written atomically under
``--output-dir`` with names of their own (stage and time), so a second launch never replaces the first's.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .. import __version__, atomic
from ..errors import InputError, StageFailed
from ..summary import Summary
from .stage_args import StageCall
from .templates import ARRAY, FINALIZE, render

# seconds before the time limit at which Slurm signals the batch shell: time to requeue and stop cleanly
SIGNAL_SECONDS = 120
_NAME = re.compile(r"^[A-Za-z0-9_.,:+=-]+$")  # partition, account, qos: no spaces or shell characters
_MEM = re.compile(r"^\d+[KMGT]?$", re.IGNORECASE)
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmOptions:
    """Resources of each array task (the finalize job gets the same, without GPUs)."""

    array: int
    partition: str | None = None
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    output_dir: str = "slurm"

    def check(self) -> None:
        if self.array < 1:
            raise InputError(f"--array must be 1 or more (the number of tasks), got {self.array}")
        for flag, value in (("--gpus-per-task", self.gpus_per_task), ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise InputError(f"{flag} must be 1 or more, got {value}")
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            if value is not None and not _NAME.match(value):
                raise InputError(f"{flag} {value!r} is not a Slurm name (letters, digits and _.,:+=- only)")
        if self.mem is not None and not _MEM.match(self.mem):
            raise InputError(f"--mem {self.mem!r}: expected a size such as 64G or 32000M")
        if self.time is not None:
            limit = time_limit_seconds(self.time)
            if limit <= SIGNAL_SECONDS:
                raise InputError(f"--time {self.time} must be longer than {SIGNAL_SECONDS} s: the requeue signal "
                                 f"comes {SIGNAL_SECONDS} s before the limit")
        if "://" in self.output_dir:
            raise InputError(f"--output-dir {self.output_dir}: the scripts and logs need a folder every node can "
                             "see (a shared filesystem path), not a URL")

    def sbatch_lines(self, *, gpus: bool) -> list[str]:
        values = [("partition", self.partition), ("account", self.account), ("qos", self.qos),
                  ("time", self.time), ("mem", self.mem), ("cpus-per-task", self.cpus_per_task),
                  ("gpus-per-task", self.gpus_per_task if gpus else None)]
        return [f"#SBATCH --{k}={v}" for k, v in values if v is not None]


def time_limit_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: minutes, m:s, h:m:s, d-h, d-h:m, d-h:m:s."""
    m = _TIME.match(text)
    if not m:
        raise InputError(f"--time {text!r}: expected a Slurm time such as 4:00:00, 90 or 1-12:00:00")
    days, a, b, c = m.groups()
    if days is not None:  # d-h[:m[:s]]
        return int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    if b is None:  # minutes
        return int(a) * 60
    if c is None:  # m:s
        return int(a) * 60 + int(b)
    return int(a) * 3600 + int(b) * 60 + int(c)


@dataclass
class SlurmScripts:
    array: Path
    finalize: Path
    logs: Path
    since: str


def python_kind() -> str:
    """How the script's Python is described in its header."""
    return "this virtual environment's" if sys.prefix != sys.base_prefix else "the submitting host's"


def write_scripts(call: StageCall, options: SlurmOptions, *, python: str | None = None) -> SlurmScripts:
    """Render both scripts and write them (and the logs folder) under ``options.output_dir``."""
    options.check()
    # not resolved: a venv's python is a symlink, and resolving it would leave the venv
    python = python or sys.executable
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    folder = Path(os.path.abspath(os.path.expanduser(options.output_dir)))
    stem = f"{call.stage}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:4]}"
    array_path, finalize_path, logs = folder / f"{stem}.array.sbatch", folder / f"{stem}.finalize.sbatch", folder / "logs"
    common = {
        "VERSION": __version__, "HOST": platform.node(), "WHEN": when, "STAGE": call.stage,
        "PYTHON": shlex.quote(python), "ARGS": shlex.join(call.argv), "LOGS": str(logs),
    }
    array_text = render(
        ARRAY, **common, N=str(options.array), LAST=str(options.array - 1), SIGNAL_S=str(SIGNAL_SECONDS),
        PYTHON_KIND=python_kind() + " " + python, FINALIZE=finalize_path.name,
        SBATCH_LINES="\n".join(options.sbatch_lines(gpus=True)),
        SRUN_OPTIONS="--ntasks=1" + (f" --cpus-per-task={options.cpus_per_task}" if options.cpus_per_task else ""),
    )
    finalize_text = render(FINALIZE, **common, ARRAY=array_path.name, SELF=str(finalize_path),
                           SBATCH_LINES="\n".join(options.sbatch_lines(gpus=False)))
    logs.mkdir(parents=True, exist_ok=True)
    for path, text in ((array_path, array_text), (finalize_path, finalize_text)):
        atomic.write_bytes(path, text.encode("utf-8"))
        path.chmod(0o755)
    return SlurmScripts(array_path, finalize_path, logs, when)


def find_sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise InputError("--submit: sbatch is not on PATH (run this on a Slurm login node, or leave out "
                         "--submit and copy the scripts there)")
    return sbatch


def sbatch(sbatch_bin: str, *args: str) -> str:
    """Submit; returns the job id (``--parsable`` prints ``id`` or ``id;cluster``)."""
    res = subprocess.run([sbatch_bin, "--parsable", *args], capture_output=True, text=True)
    if res.returncode != 0:
        why = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
        raise StageFailed(f"sbatch {' '.join(args)}: {why}")
    job = res.stdout.strip().split(";")[0]
    if not job:
        raise StageFailed(f"sbatch {' '.join(args)} printed no job id")
    return job


def launch_slurm(call: StageCall, options: SlurmOptions, *, submit: bool = False,
                 python: str | None = None) -> Summary:
    """Write the array and finalize scripts for ``call``; with ``submit``, sbatch both (finalize afterok)."""
    t0 = time.time()
    options.check()
    sbatch_bin = find_sbatch() if submit else None  # before anything is written
    scripts = write_scripts(call, options, python=python)
    details: dict[str, object] = {
        "array_script": str(scripts.array), "finalize_script": str(scripts.finalize), "logs": str(scripts.logs),
        "task_command": f"capcurate {call.stage} {shlex.join(call.argv)} --part $SLURM_ARRAY_TASK_ID/{options.array}",
    }
    if sbatch_bin is None:
        message = (f"wrote {scripts.array} ({options.array} tasks) and {scripts.finalize}; submit with: "
                   f"jid=$(sbatch --parsable {scripts.array}) && "
                   f"sbatch --dependency=afterok:$jid {scripts.finalize}")
    else:
        array_job = sbatch(sbatch_bin, str(scripts.array))
        try:
            finalize_job = sbatch(sbatch_bin, f"--dependency=afterok:{array_job}", str(scripts.finalize))
        except StageFailed as e:
            raise StageFailed(f"array job {array_job} was submitted but its finalize job was not ({e}); submit it "
                              f"with: sbatch --dependency=afterok:{array_job} {scripts.finalize}") from None
        details.update(array_job=array_job, finalize_job=finalize_job)
        message = (f"submitted array job {array_job} ({options.array} tasks of capcurate {call.stage}) and finalize "
                   f"job {finalize_job} (after all tasks succeed); logs in {scripts.logs}")
    return Summary(stage="launch slurm", counts={"tasks": options.array}, details=details,
                   seconds=time.time() - t0, message=message)
