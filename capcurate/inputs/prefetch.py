"""Prepare the next batches in a background thread while the model works on this one.

Shared by the inference stream (``capcurate.inputs.stream``) and the trainer's batches: on CUDA the
thread runs on its own stream (decode, resize, normalise and host-to-device copies overlap the model),
and the consumer's stream waits on an event before it uses a result.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch


def prefetched(source: Iterable[Any], prepare: Callable[[Any], Any], device: torch.device, *,
               background: bool = True, depth: int = 2) -> Iterator[Any]:
    """``prepare(item)`` for each item of ``source``, done ``depth`` items ahead in a thread.

    ``source`` is turned into an iterator here, in the calling thread (a DataLoader forks its workers
    then: never from a second thread). Tensors in the result (or in a tuple/list result) made on the side
    stream are recorded on the consumer's stream, so the allocator does not reuse them early. With
    ``background=False`` everything runs inline (the trainer's ``--workers 0``, where decoding seeds the
    global RNG in this process).
    """
    if not background:
        for item in source:
            yield prepare(item)
        return
    source = iter(source)  # DataLoader workers start (fork) here, in the calling thread
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in source:
                if stop.is_set():
                    break
                if cuda:
                    with torch.cuda.stream(side):
                        ready = prepare(item)
                        event = torch.cuda.Event()
                        event.record(side)
                else:
                    ready, event = prepare(item), None
                q.put((ready, event))
            q.put(done)
        except BaseException as e:  # surfaced in the consumer
            q.put(e)

    t = threading.Thread(target=work, name="capcurate-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            ready, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for x in ready if isinstance(ready, (tuple, list)) else (ready,):
                    if isinstance(x, torch.Tensor) and x.is_cuda:  # made on the side stream, used on this one
                        x.record_stream(current)
            yield ready
    finally:
        stop.set()
        while t.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)
