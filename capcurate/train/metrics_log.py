"""``RUN/metrics.jsonl``: one JSON line per logged step or evaluation, consistent with the checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import atomic


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """After a resume, drop the lines a killed run logged past its last checkpoint."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the kill
        atomic.write_bytes(self.path, ("\n".join(keep) + "\n" if keep else "").encode())
