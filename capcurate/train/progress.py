"""A rich progress bar for training: steps, samples/s and the current loss (stderr, rank 0 only)."""

from __future__ import annotations

from typing import Any

from ..progress import progress_enabled, stderr_console


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True):
        self.total, self.start = total_steps, start_step
        self.enabled = enabled and progress_enabled()
        self._p: Any = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
                TextColumn("{task.fields[rate]:,.0f} samples/s  loss {task.fields[loss]:.4f}"),
                TimeRemainingColumn(), console=stderr_console)
            self._p.__enter__()
            self._task = self._p.add_task("train", total=self.total, completed=self.start, rate=0.0,
                                          loss=float("nan"))
        return self

    def update(self, step: int, rate: float, loss: float) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=step, rate=rate, loss=loss)

    def __exit__(self, *exc: Any) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
