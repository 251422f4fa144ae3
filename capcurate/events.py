"""Process-wide progress events: stages announce batch boundaries, observers (benchmarks, monitors) listen.

A stage calls ``emit("batch", n_items)`` once per batch it has handed to the model, and the trainer once
per optimizer step. Listeners are plain callables ``(kind, n)``; with none registered, ``emit`` is one
empty-list check, so the stages pay nothing. A listener must be cheap and must not raise: an exception
in a listener is swallowed (with a warning), because an observer must never fail the stage it observes.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

Listener = Callable[[str, int], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def subscribe(listener: Listener) -> None:
    """Call ``listener(kind, n)`` on every event of this process from now on."""
    with _lock:
        _listeners.append(listener)


def unsubscribe(listener: Listener) -> None:
    """Stop calling ``listener``; unknown listeners are ignored."""
    with _lock:
        with contextlib.suppress(ValueError):
            _listeners.remove(listener)


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[Listener]:
    """``with listening(cb):`` subscribes ``cb`` for the block only."""
    subscribe(listener)
    try:
        yield listener
    finally:
        unsubscribe(listener)


def emit(kind: str, n: int = 0) -> None:
    """Tell every listener that ``n`` items of ``kind`` ("batch", "step", "shard") are done."""
    if not _listeners:
        return
    for listener in list(_listeners):
        try:
            listener(kind, n)
        except Exception as e:  # an observer's bug must not fail the stage
            warnings.warn(
                f"capcurate.events listener {listener!r} raised {type(e).__name__}: {e}", stacklevel=2
            )
