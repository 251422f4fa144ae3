"""``capcurate`` command line: a thin layer that parses options and calls library functions.

Each command lives in its own module that registers on ``app``; this list is the only place that
names them.
"""

from __future__ import annotations

import importlib

from .app import app

COMMAND_MODULES = [
    "capcurate.cli.data_commands",       # download, ingest, query, stats
    "capcurate.cli.recaption_commands",  # recaption
    "capcurate.cli.score_commands",      # score, filter
    "capcurate.cli.dedup_commands",      # dedup
    "capcurate.cli.curate_commands",     # mix, shard, report
    "capcurate.cli.train_commands",      # train, eval
    "capcurate.cli.synth_commands",      # synth
    "capcurate.cli.launch_commands",     # launch slurm, launch finalize
]

# --help lists commands in pipeline order, then the tools to look at a dataset, then the demo world.
COMMAND_ORDER = [
    "download", "ingest", "recaption", "score", "dedup", "filter", "mix", "shard", "train", "eval",
    "query", "stats", "doctor", "report", "synth", "launch",
]

for _mod in COMMAND_MODULES:
    importlib.import_module(_mod)


def _rank(cmd) -> int:
    name = cmd.name or cmd.callback.__name__.replace("_", "-")
    return COMMAND_ORDER.index(name) if name in COMMAND_ORDER else len(COMMAND_ORDER)


app.registered_commands.sort(key=_rank)


def main() -> None:
    app()


__all__ = ["app", "main"]
