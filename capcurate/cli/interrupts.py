"""SIGTERM handled like Ctrl-C: a scheduler's preemption (Slurm, Kubernetes, ``kill``) unwinds the command.

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, so shards a download had
finished never enter the manifest and the lineage entry stays open. Here SIGTERM raises ``Terminated``
(a KeyboardInterrupt, so every path that keeps finished work on Ctrl-C does the same), and the command
exits 143 (128 + SIGTERM, what schedulers expect of a terminated job) after closing its lineage entries
as interrupted. Forked children (DataLoader and img2dataset workers) inherit the handler; in them it
restores the default and re-raises the signal, so they end as they always did.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises ``Terminated`` in this (main) thread; yields the list of signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received  # signal handlers can only be set from the main thread
        return
    owner = os.getpid()

    def handler(signum: int, frame: object) -> None:
        if os.getpid() != owner:  # a forked worker: die of the signal as before
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = not received
        received.append(signum)
        if first:  # a second SIGTERM during clean-up must not interrupt the clean-up itself
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def close_lineage(signal_name: str) -> None:
    """Close this process's unfinished lineage entries as interrupted; a card that cannot be written (the
    disk that filled up, a lost bucket) leaves them open, which a later run treats the same way."""
    from ..card import close_interrupted

    with contextlib.suppress(Exception):
        close_interrupted(signal_name)
