"""``capcurate`` command line: a thin layer that parses options and calls library functions.

Each command lives in its own module that registers on ``app``; this list is the only place that
names them.
"""

from __future__ import annotations

import importlib

from .app import app

COMMAND_MODULES = [
    # each stage adds its module here, e.g. "capcurate.cli.download_commands",
    "capcurate.cli.data_commands",
    "capcurate.cli.synth_commands",
    "capcurate.cli.recaption_commands",
    "capcurate.cli.curate_commands",
    "capcurate.cli.score_commands",
    "capcurate.cli.train_commands",
]

for _mod in COMMAND_MODULES:
    importlib.import_module(_mod)


def main() -> None:
    app()


__all__ = ["app", "main"]
