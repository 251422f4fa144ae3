"""capcurate: curate image-text datasets for CLIP-style pretraining.

Every CLI command is also a Python function of the same name, e.g. ``capcurate.download(...)``;
they are imported lazily so that ``import capcurate`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# function name -> module that defines it; stages register here as they land.
_API: dict[str, str] = {
    "Dataset": "capcurate.dataset",
    "download": "capcurate.stages.download",
    "ingest": "capcurate.stages.ingest",
    "query": "capcurate.stages.query",
    "stats": "capcurate.stages.query",
    "recaption": "capcurate.stages.recaption",
    "load_captioner": "capcurate.models.captioners",
    "synth": "capcurate.stages.synth",
    "mix": "capcurate.stages.mix",
    "shard": "capcurate.stages.shard",
    "report": "capcurate.stages.report",
    "score": "capcurate.stages.score",
    "filter": "capcurate.stages.filter",
    "dedup": "capcurate.stages.dedup",
    "load_scorer": "capcurate.models.scorers",
    "train": "capcurate.train",
    "evaluate": "capcurate.train",
}


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'capcurate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])
