"""The bundled CLIP trainer (``capcurate train``) and evaluator (``capcurate eval``).

Built on open_clip's models and losses; depends on ``capcurate.models``, never the other way round.
Heavy imports happen inside the functions so ``import capcurate.train`` stays cheap.

``capcurate.train(...)`` is both this package and the library function behind the CLI command: the
package module is callable, so the name works whether or not the subpackage was imported first.
"""

from __future__ import annotations

import sys
import types
from typing import Any


def train(data: Any, output: str | None = None, **options: Any) -> Any:
    """Train; ``data`` is a shard spec (with ``output`` and options) or a ready TrainConfig."""
    from .trainer import train as _train

    return _train(data, output, **options)


def evaluate(*args: Any, **kwargs: Any) -> Any:
    """Zero-shot classification and retrieval of any CLIP reference on an eval set."""
    from .evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["train", "evaluate"]
