"""SIGTERM in forked children: the default disposition, so Pool.terminate never waits on a survivor."""

from __future__ import annotations

import multiprocessing as mp
import signal

from capcurate.cli.interrupts import sigterm_as_interrupt


def _child_sigterm() -> object:
    return signal.getsignal(signal.SIGTERM)


def test_a_forked_pool_worker_has_the_default_sigterm_while_the_command_handles_it() -> None:
    with sigterm_as_interrupt():
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the command's own handler
        with mp.get_context("fork").Pool(1) as pool:
            assert pool.apply(_child_sigterm) == signal.SIG_DFL
