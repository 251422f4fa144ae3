"""What a benchmark prints beside its figures: the commit it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path


def commit() -> str:
    """The short hash of HEAD of this checkout, or "unknown" outside git."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"
