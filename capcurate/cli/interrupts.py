"""SIGTERM handled like Ctrl-C: a scheduler's preemption (Slurm, Kubernetes, ``kill``) unwinds the command.

Python's default SIGTERM ends the process on the spot: no ``finally`` runs, so shards a download had
finished never enter the manifest and the lineage entry stays open. Here SIGTERM raises ``Terminated``
(a KeyboardInterrupt, so every path that keeps finished work on Ctrl-C does the same), and the command
exits 143 (128 + SIGTERM, what schedulers expect of a terminated job) after closing its lineage entries
as interrupted. Forked children (DataLoader, img2dataset and pool workers) get the default SIGTERM back right after the fork
(``os.register_at_fork``), so they end as they always did.
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

    handler._capcurate = True  # type: ignore[attr-defined]
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _default_sigterm_in_child() -> None:
    """Right after a fork, in the child: SIGTERM back to the default (die at once). Relying on the
    inherited Python handler to do it left pool workers alive: ``Pool.terminate`` then waited on one
    forever (seen with synth's and dedup's pools in the test suite)."""
    if getattr(signal.getsignal(signal.SIGTERM), "_capcurate", False):
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def close_lineage(signal_name: str) -> None:
    """Close this process's unfinished lineage entries as interrupted; a card that cannot be written (the
    disk that filled up, a lost bucket) leaves them open, which a later run treats the same way."""
    from ..card import close_interrupted

    with contextlib.suppress(Exception):
        close_interrupted(signal_name)
