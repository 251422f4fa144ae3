"""The sbatch scripts ``launch slurm`` writes, as templates: ``@@NAME@@`` is replaced, everything else is
bash as a cluster runs it (``$`` and braces are bash's, which is why this is not str.format)."""

from __future__ import annotations

import re

ARRAY = """#!/bin/bash
# Written by capcurate @@VERSION@@ (`capcurate launch slurm`) on @@HOST@@ at @@WHEN@@.
# Array task i of @@N@@ runs: capcurate @@STAGE@@ ... --part i/@@N@@ (shards i, i+@@N@@, ... of the sorted list).
#
# Paths were made absolute on @@HOST@@, and the Python below is the one that wrote this script
# (@@PYTHON_KIND@@): every node must see both at the same paths (a shared filesystem), or the dataset is a
# URL (s3://...). The environment of the shell that ran sbatch (AWS_*, HF_HOME, HF_HUB_OFFLINE,
# CAPCURATE_*) reaches every task through Slurm's default --export=ALL: nothing secret is written here.
#
# Preemption and the time limit: Slurm sends SIGUSR1 to this shell @@SIGNAL_S@@ s before the limit
# (--signal=B:USR1@@@SIGNAL_S@@); the trap requeues this array task and stops the stage. The requeued task
# runs the same --part again and skips the shards already written (a written file is complete).
# The finalize job (@@FINALIZE@@), submitted with --dependency=afterok on this array, runs once every task
# has exited 0.
#SBATCH --job-name=capcurate-@@STAGE@@
#SBATCH --array=0-@@LAST@@
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@@@SIGNAL_S@@
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=@@LOGS@@/capcurate-@@STAGE@@-%A_%a.out
@@SBATCH_LINES@@
set -u
child=""

requeue() {
    echo "capcurate: SIGUSR1 before the time limit: requeueing ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}" >&2
    scontrol requeue "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    [ -n "$child" ] || exit 0
    # the stage stops between commits; what it wrote is complete and the requeued task skips it
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    exit $?
}
trap requeue USR1

# in the background, so that the trap runs while the stage works (bash runs traps between commands);
# --cpus-per-task is repeated because srun of some Slurm versions (22.05 on) does not take it from sbatch
srun @@SRUN_OPTIONS@@ @@PYTHON@@ -m capcurate @@STAGE@@ @@ARGS@@ --part "${SLURM_ARRAY_TASK_ID}/@@N@@" &
child=$!
wait "$child"
exit $?
"""

FINALIZE = """#!/bin/bash
# Written by capcurate @@VERSION@@ (`capcurate launch slurm`) on @@HOST@@ at @@WHEN@@.
# Runs after every task of the array (@@ARRAY@@) exited 0: submit it with
#   sbatch --dependency=afterok:<array job id> @@SELF@@
# It runs capcurate @@STAGE@@ once more over every shard: each is found written, so nothing is computed
# again; shard writes manifest.json and sizes.json. Then the lineage entries of the array's tries are
# closed (a try stopped by preemption never finished its own) and the run's entry sums their counts.
# Paths and environment: as in the array script.
#SBATCH --job-name=capcurate-@@STAGE@@-finalize
#SBATCH --ntasks=1
#SBATCH --output=@@LOGS@@/capcurate-@@STAGE@@-finalize-%j.out
@@SBATCH_LINES@@
set -u
exec @@PYTHON@@ -m capcurate launch finalize --since @@WHEN@@ @@STAGE@@ @@ARGS@@
"""


def render(template: str, **values: str) -> str:
    """Fill ``@@KEY@@`` placeholders; every one must be given (a leftover would reach the cluster)."""
    out = template
    for key, value in values.items():
        out = out.replace(f"@@{key}@@", value)
    left = re.findall(r"@@[A-Z_]+@@", out)
    if left:
        raise ValueError(f"template placeholders without a value: {sorted(set(left))}")
    return out
