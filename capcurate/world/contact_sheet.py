"""A contact sheet: a PNG grid of world images with their true captions, for a person to check.

Each image is shown at the pixels the models get (the rendered size), scaled up by whole pixels
(nearest neighbour, no smoothing), so what the sheet shows is what a model can see and no more.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CELL_TEXT_LINES = 4  # a wrapped true caption fits in four lines at the default cell width


def contact_sheet(items: Sequence[dict[str, Any]], path: str | Path, *, columns: int = 8, cell: int = 192) -> Path:
    """Write ``items`` (dicts with ``image`` bytes and ``true_caption``) as a captioned grid PNG at ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    if not items:
        raise ValueError("a contact sheet needs at least one image")
    font = ImageFont.load_default()
    line_h = 12
    chars = max(12, cell // 6)  # the default bitmap font is 6 px per character
    text_h = CELL_TEXT_LINES * line_h + 6
    rows = (len(items) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (cell + 8) + 8, rows * (cell + text_h + 8) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, item in enumerate(items):
        with Image.open(io.BytesIO(item["image"])) as img:
            scale = max(1, cell // img.width)
            shown = img.convert("RGB").resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        x = 8 + (i % columns) * (cell + 8)
        y = 8 + (i // columns) * (cell + text_h + 8)
        sheet.paste(shown, (x, y))
        lines = textwrap.wrap(item["true_caption"], chars)[:CELL_TEXT_LINES]
        for j, line in enumerate(lines):
            draw.text((x, y + shown.height + 3 + j * line_h), line, fill=(0, 0, 0), font=font)
    out = Path(path)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    out.write_bytes(buf.getvalue())
    return out
