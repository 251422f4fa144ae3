"""GPU-hours per stage for a pool of 12.8M / 128M / 1.28B images, from docs/benchmarks.md's measured rows.

    .venv/bin/python benchmarks/cost_table.py [--tasks 64] [--usd-per-gpu-hour 2.5] [--doc docs/benchmarks.md]

Nothing here is measured or assumed: the per-GPU throughput is read from the GPU table of
docs/benchmarks.md (written by benchmarks/gpu runs; the card is named in that section), the start-up
seconds of each stage from its "first batch came N s after start" note, and the commit that recorded each
number from git (``git log -S``). GPU-hours = images / (images/s per GPU) / 3600, plus, with ``--tasks``,
one start-up per task (an array task or Ray actor loads its model once). Prints a Markdown table for
docs/scale.md. It fails, rather than guess, when a row it needs is missing from the document.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))

from provenance import commit  # noqa: E402

POOLS = {"12.8M": 12_800_000, "128M": 128_000_000, "1.28B": 1_280_000_000}  # DataComp small / medium / large
# table row label in docs/benchmarks.md -> (stage shown, what one item is, start-up note name)
ROWS = {
    "recaption": ("recaption (BLIP-large shape, greedy 20 tokens)", "recaption's"),
    "VLM": ("recaption (Qwen2-VL-2B shape, greedy 20 tokens)", "the VLM's"),
    "score": ("score (ViT-L-14, raw + 1 caption)", "score's"),
    "train": ("train (ViT-B-32, samples seen = pool size)", None),
}


@dataclass
class Row:
    key: str
    stage: str
    per_second: float     # steady items/s on one GPU
    startup_s: float | None
    commit: str


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def read_rows(doc: Path) -> tuple[str, list[Row]]:
    """The card named above the GPU table and one Row per stage of ROWS."""
    text = doc.read_text()
    card = re.search(r"Measured on one \*\*(.+?)\*\*", text)
    if card is None:
        raise SystemExit(f"{doc}: no 'Measured on one **CARD**' line above the GPU table")
    startups = {m.group(1): float(m.group(2))
                for m in re.finditer(r"((?:recaption|score|the VLM)'s)(?: first batch came)? ([\d.]+) s", text)}
    rows = []
    for key, (stage, startup_name) in ROWS.items():
        m = re.search(rf"^\| {re.escape(key)} \([AB]\) \|[^|]*\| \*\*([\d,.]+) (?:images|samples)/s\*\*", text, re.M)
        if m is None:
            raise SystemExit(f"{doc}: no GPU table row for {key!r} with a bold '**N images/s**' figure")
        startup = startups.get(startup_name) if startup_name else None
        if startup_name and startup is None:
            raise SystemExit(f"{doc}: no start-up note ({startup_name} first batch came N s after start)")
        rows.append(Row(key, stage, _number(m.group(1)), startup, _commit_of(doc, m.group(1))))
    return card.group(1), rows


def _commit_of(doc: Path, figure: str) -> str:
    """The commit that first wrote ``figure`` into the document (the run that measured it)."""
    try:
        out = subprocess.run(["git", "log", "--reverse", "--format=%h %ad", "--date=short", f"-S{figure}", "--",
                              str(doc.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return "unknown"
    lines = out.stdout.strip().splitlines()
    return lines[0] if lines else "unknown"


def gpu_hours(row: Row, images: int, tasks: int) -> float:
    return images / row.per_second / 3600 + tasks * (row.startup_s or 0.0) / 3600


def table(card: str, rows: list[Row], *, tasks: int, usd: float | None) -> str:
    pools = list(POOLS)
    head = ["stage", "images/s per GPU", *[f"GPU-h {p}" for p in pools]]
    if usd is not None:
        head += [f"USD {p}" for p in pools]
    head.append("measured in")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        hours = [gpu_hours(r, POOLS[p], tasks) for p in pools]
        cells = [r.stage, f"{r.per_second:,.0f}", *[f"{h:,.1f}" for h in hours]]
        if usd is not None:
            cells += [f"{h * usd:,.0f}" for h in hours]
        cells.append(r.commit)
        out.append("| " + " | ".join(cells) + " |")
    note = (f"\nOne {card} per GPU; steady throughput from docs/benchmarks.md"
            + (f", plus {tasks} start-ups per stage (one per task)" if tasks else "")
            + f". Those rows predate HEAD ({commit()}): re-run python -m benchmarks.gpu on your card before a"
            " budget depends on them.")
    return "\n".join(out) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--tasks", type=int, default=0, help="array tasks / Ray actors: one model start-up each")
    ap.add_argument("--usd-per-gpu-hour", type=float, default=None, help="also print a cost column")
    args = ap.parse_args(argv)
    card, rows = read_rows(args.doc)
    print(table(card, rows, tasks=args.tasks, usd=args.usd_per_gpu_hour))
    return 0


if __name__ == "__main__":
    sys.exit(main())
