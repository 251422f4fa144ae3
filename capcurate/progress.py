"""Rich progress bars on stderr, so stdout stays clean for --json and query output."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr_console = Console(stderr=True)


def progress_enabled() -> bool:
    return os.environ.get("CAPCURATE_PROGRESS", "auto") != "0" and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, unit: str = "") -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; draws a bar only on an interactive terminal."""
    if not progress_enabled():
        yield lambda n=1: None
        return
    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
    ]
    with Progress(*columns, console=stderr_console, transient=False) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)
