"""What every stage returns: counts a script can read (``--json``) and a person can scan (a table)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Summary:
    stage: str
    ok: bool = True
    counts: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    message: str | None = None  # one line for a person, e.g. "kept 3,021 of 10,000"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)

    def render(self, console: Any) -> None:
        from rich.table import Table

        if self.message:
            console.print(self.message)
        table = Table(title=f"capcurate {self.stage}", show_header=True, header_style="bold")
        table.add_column("item")
        table.add_column("value", justify="right")
        for k, v in self.counts.items():
            table.add_row(str(k), _fmt(v))
        for k, v in self.details.items():
            if isinstance(v, (dict, list)):
                v = json.dumps(v, default=str)
                if len(v) > 120:
                    v = v[:117] + "..."
            table.add_row(str(k), _fmt(v))
        table.add_row("seconds", f"{self.seconds:.1f}")
        console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}"
    return str(v)
