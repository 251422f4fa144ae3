"""``RUN/metrics.jsonl``: one JSON line per logged step or evaluation, consistent with the checkpoints.

Locally lines are appended to the file. An object store cannot append: a run in a bucket keeps the file
in a local scratch folder (started from the stored one, so a resumed run continues it) and uploads it
whole, one PUT that becomes visible complete, before every checkpoint, after every evaluation, at the end,
and at a logged step when ``FLUSH_SECONDS`` passed since the last upload. So the stored file always holds
every line up to the newest checkpoint; lines past it that a kill lost are the ones a resume drops anyway.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import atomic, storage


class MetricsLog:
    FLUSH_SECONDS = 30.0  # object stores: the longest a logged line waits for its upload

    def __init__(self, path: Any):
        self.path = storage.path(path)
        self.remote = storage.is_remote(self.path)
        self._local: Path | None = None   # the scratch copy of a stored file
        self._dirty = False
        self._uploaded_at = float("-inf")

    def _mirror(self) -> Path:
        if self._local is None:
            folder = Path(tempfile.mkdtemp(prefix=f"capcurate-metrics-{atomic.owner_tag()}-"))
            self._local = folder / "metrics.jsonl"
            try:
                self._local.write_bytes(self.path.read_bytes())
            except FileNotFoundError:
                self._local.write_bytes(b"")
        return self._local

    def append(self, row: dict[str, Any], flush: bool = False) -> None:
        target = self._mirror() if self.remote else self.path
        with open(target, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.remote:
            self._dirty = True
            if flush or time.monotonic() - self._uploaded_at >= self.FLUSH_SECONDS:
                self.flush()

    def flush(self) -> None:
        """Upload the scratch copy (object stores; a no-op locally and when nothing changed)."""
        if self.remote and self._dirty and self._local is not None:
            storage.upload(self._local, self.path)
            self._dirty = False
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        """Upload what is pending and remove the scratch copy."""
        if self._local is not None:
            try:
                self.flush()
            finally:
                shutil.rmtree(self._local.parent, ignore_errors=True)
                self._local = None

    def truncate_after(self, step: int) -> None:
        """After a resume, drop the lines a killed run logged past its last checkpoint."""
        if self.remote:
            if not storage.exists(self.path):
                return
            text = self._mirror().read_text(encoding="utf-8")
        else:
            if not self.path.is_file():
                return
            text = self.path.read_text(encoding="utf-8")
        keep = []
        for line in text.splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut off by the kill
        data = ("\n".join(keep) + "\n" if keep else "").encode()
        if self.remote:
            self._mirror().write_bytes(data)
            self._dirty = True
            self.flush()
            return
        atomic.write_bytes(self.path, data)
