"""The HTML of ``capcurate report``: one static page, no external resources (images are data: URIs).

Kept apart from the data gathering in ``report.py`` so the look can change without touching queries.
"""

from __future__ import annotations

from html import escape
from typing import Any

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; margin-bottom: .2rem; }
.meta { color: #555; font-size: .9rem; margin-bottom: 1rem; }
.hists { display: flex; flex-wrap: wrap; gap: 1rem; margin-bottom: 1.5rem; }
.hists img { border: 1px solid #ddd; background: white; max-width: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; }
.card img.thumb { display: block; margin: 0 auto .4rem; max-width: 100%; }
.noimg { color: #a00; font-size: .85rem; text-align: center; padding: 2rem 0; }
.uid { font-family: monospace; font-size: .75rem; color: #777; word-break: break-all; }
.note { font-size: .8rem; color: #a35; margin: .2rem 0; }
table.caps { width: 100%; border-collapse: collapse; font-size: .85rem; }
table.caps td { border-top: 1px solid #eee; padding: .2rem .3rem; vertical-align: top; }
td.src { font-weight: 600; white-space: nowrap; }
td.score { font-family: monospace; text-align: right; white-space: nowrap; }
tr.selected td { background: #e8f5e9; }
tr.best td.cap { text-decoration: underline dotted; }
.badge { display: inline-block; background: #2e7d32; color: white; border-radius: 3px; padding: 0 .3rem;
         font-size: .75rem; }
"""

# Counts the images the browser decoded, so a headless test can check they really render.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute('data-images-loaded', String(ok));
  document.body.setAttribute('data-images-total', String(imgs.length));
});
"""


def render_page(*, title: str, meta_lines: list[str], histograms: list[tuple[str, str]],
                cards: list[dict[str, Any]], scorers: list[str]) -> str:
    """The whole page; ``histograms`` are (title, base64 PNG), ``cards`` come from report.py."""
    hist_html = "".join(
        f'<figure><img alt="{escape(t)}" src="data:image/png;base64,{b64}"><figcaption>{escape(t)}'
        "</figcaption></figure>" for t, b64 in histograms
    )
    grid = "".join(_card(c, scorers) for c in cards)
    meta = "<br>".join(escape(m) for m in meta_lines)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>"
        f'<h1>{escape(title)}</h1><div class="meta">{meta}</div>'
        f'<h2>Score histograms</h2><div class="hists">{hist_html or "<p>no score columns</p>"}</div>'
        f'<h2>Samples</h2><div class="grid">{grid}</div></body></html>\n'
    )


def _card(card: dict[str, Any], scorers: list[str]) -> str:
    if card.get("thumb"):
        image = f'<img class="thumb" alt="{escape(card["uid"])}" src="data:image/jpeg;base64,{card["thumb"]}">'
    else:
        image = f'<div class="noimg">no image: {escape(card.get("image_error") or "unknown")}</div>'
    head = "".join(f"<td class=\"score\">{escape(s)}</td>" for s in scorers)
    rows = [f"<tr><td></td><td></td>{head}</tr>"] if scorers else []
    for r in card["rows"]:
        classes = " ".join(c for c, on in (("selected", r.get("selected")), ("best", r.get("best"))) if on)
        scores = "".join(f'<td class="score">{_fmt(r["scores"].get(s))}</td>' for s in scorers)
        badge = ' <span class="badge">selected</span>' if r.get("selected") else ""
        rows.append(
            f'<tr class="{classes}"><td class="src">{escape(r["source"])}{badge}</td>'
            f'<td class="cap">{escape(r["caption"]) if r["caption"] is not None else "<i>none</i>"}</td>'
            f"{scores}</tr>"
        )
    chosen = ""
    if card.get("selected_source") and not any(r.get("selected") for r in card["rows"]):
        # e.g. concat: the trained caption is none of the columns, show it as is
        chosen = (f'<tr class="selected"><td class="src">{escape(card["selected_source"])}'
                  f' <span class="badge">selected</span></td><td class="cap" colspan="{1 + len(scorers)}">'
                  f'{escape(card["selected_caption"] or "")}</td></tr>')
    note = f'<div class="note">{escape(card["note"])}</div>' if card.get("note") else ""
    return (f'<div class="card">{image}<div class="uid">{escape(card["uid"])}</div>{note}'
            f'<table class="caps">{"".join(rows)}{chosen}</table></div>')


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}"
