"""``capcurate launch``: run a per-shard stage beyond one machine (``launch slurm``, ``launch finalize``)."""

from __future__ import annotations

import datetime as _dt

import typer

from ..errors import InputError
from .app import JSON_HELP, app, run_command

launch_app = typer.Typer(
    name="launch",
    help=("Run a per-shard stage (ingest, recaption, score, shard) on many machines by splitting it with "
          "--part. See docs/scale.md."),
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(launch_app, name="launch")

# the stage's own options pass through untouched; launch's options may stand anywhere on the line
STAGE_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
STAGE_HELP = "The stage to split into tasks: one that takes --part (ingest, recaption, score, shard)."
ARGS_HELP = ("The stage's own arguments and options, as typed after `capcurate STAGE`, without --part (each "
             "task adds --part i/N) and without --overwrite. Relative paths are made absolute here.")


def _stage_call(stage: str, args: list[str] | None):
    import typer.main

    from ..launch.stage_args import stage_call

    return stage_call(typer.main.get_command(app), stage, list(args or []))


@launch_app.command("slurm", context_settings=STAGE_ARGS)
def slurm(
    stage: str = typer.Argument(..., help=STAGE_HELP),
    args: list[str] = typer.Argument(None, help=ARGS_HELP),
    array: int = typer.Option(..., "--array", help="Number of array tasks N: task i runs --part i/N."),
    partition: str = typer.Option(None, "--partition", help="Slurm partition of every task (#SBATCH --partition)."),
    gpus_per_task: int = typer.Option(None, "--gpus-per-task", help="GPUs per array task (the finalize job gets "
                                      "none: it only checks and writes small files)."),
    cpus_per_task: int = typer.Option(None, "--cpus-per-task", help="CPU cores per task; --workers auto decodes "
                                      "with one process per core Slurm gives the task, minus one."),
    mem: str = typer.Option(None, "--mem", help="Memory per task, e.g. 64G."),
    time: str = typer.Option(None, "--time", help="Time limit per task, e.g. 4:00:00 (longer than 120 s: the "
                             "requeue signal comes 120 s before it)."),
    account: str = typer.Option(None, "--account", help="Slurm account to charge."),
    qos: str = typer.Option(None, "--qos", help="Slurm quality of service."),
    output_dir: str = typer.Option("slurm", "--output-dir", help="Folder for the two scripts and logs/ (on a "
                                   "filesystem every node sees); each launch writes new files named by stage "
                                   "and time."),
    submit: bool = typer.Option(False, "--submit", help="Submit with sbatch: the array, then the finalize job "
                                "with --dependency=afterok on it. Without it, the scripts are written and the "
                                "commands to submit them printed."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Write an sbatch array running `capcurate STAGE ARGS --part $SLURM_ARRAY_TASK_ID/N`, and a finalize job.

    Each task requeues itself on SIGUSR1 (sent 120 s before the time limit, or on preemption) and the
    requeued task resumes, skipping shards already written. The finalize job runs after every task
    succeeded: it runs the stage over all shards (nothing left to compute; shard writes manifest.json)
    and closes the lineage of the array's tries. Example:

    capcurate launch slurm recaption /shared/pool --model hf:/shared/blip --name blip --array 64
    --partition gpu --gpus-per-task 1 --cpus-per-task 8 --time 4:00:00 --submit
    """
    from ..launch.slurm import SlurmOptions, launch_slurm

    options = SlurmOptions(array=array, partition=partition, gpus_per_task=gpus_per_task,
                           cpus_per_task=cpus_per_task, mem=mem, time=time, account=account, qos=qos,
                           output_dir=output_dir)

    def go():
        options.check()  # --array 0 is refused before the stage's arguments are even looked at
        return launch_slurm(_stage_call(stage, args), options, submit=submit)

    run_command(go, json_out=json)


@launch_app.command("finalize", context_settings=STAGE_ARGS)
def finalize(
    stage: str = typer.Argument(..., help=STAGE_HELP),
    args: list[str] = typer.Argument(None, help=ARGS_HELP),
    since: str = typer.Option(None, "--since", help="Close only tries started at or after this time (ISO 8601, "
                              "e.g. 2026-01-31T12:00:00+00:00; the script passes the time it was written). "
                              "Default: every unfinished --part try of that stage and name."),
    json: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Finish a run split with --part: the stage once more over every shard (only checks what is written;
    shard writes manifest.json), then close the lineage of its --part tries. The finalize job of
    `launch slurm` runs this; run it by hand after finishing a failed part yourself."""
    from ..launch.finalize import finalize as finalize_fn

    def go():
        if since is not None:
            try:
                _dt.datetime.fromisoformat(since)
            except ValueError:
                raise InputError(f"--since {since!r}: expected an ISO 8601 time such as "
                                 "2026-01-31T12:00:00+00:00") from None
        return finalize_fn(_stage_call(stage, args), since=since)

    run_command(go, json_out=json)
