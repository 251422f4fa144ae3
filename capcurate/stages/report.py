"""``capcurate report``: one static HTML page to look at a dataset, a filter or a mix.

A grid of samples (thumbnail, raw caption, every synthetic caption, each with its score under every
scorer, the caption a selection chose highlighted) and histograms of every score column. Histograms
are binned in DuckDB over all matching images, so the page costs the same for 1,000 or 100 M rows;
only the ``--limit`` grid images are read and thumbnailed.
"""

from __future__ import annotations

import base64
import io
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from .. import atomic, storage
from ..dataset import Dataset, check_name
from ..errors import InputError
from ..images import ImageDecodeError, decode_image
from ..shards import index_tar
from ..summary import Summary
from ..views import ident
from .report_html import render_page

HIST_BINS = 40


def report(
    dataset: str | Path | Dataset,
    out: str | Path = "report.html",
    *,
    selection: str | None = None,
    where: str | None = None,
    limit: int = 200,
    order_by: str | None = None,
    thumb_size: int = 160,
    dedup: str | None = None,
) -> Summary:
    """Write the HTML report of ``dataset`` (restricted to ``selection`` and/or ``where``) to ``out``."""
    t0 = time.time()
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if limit < 0 or thumb_size < 8:
        raise InputError("--limit must be >= 0 and --thumb-size >= 8")
    con = ds.connect()
    try:
        described = con.execute("DESCRIBE samples").fetchall()
        columns = [r[0] for r in described]
        scorers = ds.names("scores")
        score_cols = [r[0] for r in described if r[0].startswith("score_") and r[1] in ("FLOAT", "DOUBLE")]
        images_sql = "SELECT * FROM samples WHERE status = 'success'"
        grid_sql = "SELECT *, NULL AS selected_caption, NULL AS selected_source FROM images"
        if selection:
            if selection not in ds.selection_names():
                raise InputError(f"no selection named {selection!r}; selections present: "
                                 f"{', '.join(ds.selection_names()) or '(none)'}")
            sel = ident("selection_" + check_name(selection, "selection name"))
            images_sql += f" AND uid IN (SELECT uid FROM {sel})"
            grid_sql = ("SELECT i.*, sel.caption AS selected_caption, sel.caption_source AS selected_source "
                        f"FROM images i JOIN {sel} sel USING (uid)")
        if where:
            images_sql += f" AND ({where})"
        if dedup:  # the groups of a dedup run, each kept image first, then what duplicates it
            groups = _dedup_groups(ds, dedup)
            images_sql += f" AND uid IN (SELECT uid FROM {groups})"
            grid_sql = (f"SELECT g.*, d.\"group\" AS dedup_group, d.kind AS dedup_kind, d.kept AS dedup_kept, "
                        f"d.duplicate_of AS dedup_of, d.similarity AS dedup_similarity "
                        f"FROM ({grid_sql}) g JOIN {groups} d USING (uid)")
            order_by = order_by or "dedup_group, dedup_kept DESC"
        with_images = f"WITH images AS ({images_sql}) "
        matching = con.execute(with_images + "SELECT count(*) FROM images").fetchone()[0]
        order = f"{order_by}, uid" if order_by else "uid"
        cur = con.execute(with_images + f"SELECT * FROM ({grid_sql}) ORDER BY {order} LIMIT {int(limit)}")
        names = [d[0] for d in cur.description]
        grid = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        histograms = [_histogram(con, with_images, scorer, [c for c in score_cols
                                                              if c.startswith(f"score_{scorer}_")])
                      for scorer in scorers]
        by_source = dict(con.execute(
            f"SELECT caption_source, count(*) FROM {sel} GROUP BY 1 ORDER BY 1").fetchall()) if selection else {}
    finally:
        con.close()

    thumbs = _thumbnails(ds, grid, thumb_size)
    captioners = ds.names("captions")
    cards = [_card(row, captioners, scorers, columns, thumbs.get((row["shard"], row["key"]), (None, "missing")))
             for row in grid]
    for card, row in zip(cards, grid, strict=True):
        if row.get("dedup_group") is not None:
            card["note"] = (f"{row['dedup_kind']} group {row['dedup_group']}: "
                            + ("kept" if row["dedup_kept"] else f"duplicate of {row['dedup_of']}"
                               + (f", similarity {row['dedup_similarity']:.3f}"
                                  if row.get("dedup_similarity") is not None else "")))
    meta = [f"dataset: {ds.root}", f"{matching:,} matching images"
            + (f" in selection {selection}" if selection else "") + (f" where {where}" if where else "")
            + (f" in the duplicate groups of dedup/{dedup}" if dedup else ""),
            f"showing {len(cards):,} ordered by {order}"]
    if by_source:
        meta.append("selection rows per caption source: "
                    + ", ".join(f"{k}: {v:,}" for k, v in by_source.items()))
    page = render_page(title=f"capcurate report: {ds.root.name}" + (f" / {selection}" if selection else ""),
                       meta_lines=meta, histograms=[h for h in histograms if h], cards=cards,
                       scorers=scorers)
    out = storage.path(out)
    storage.check_writable(out)
    atomic.write_bytes(out, page.encode("utf-8"))
    shown_ok = sum(1 for c in cards if c.get("thumb"))
    return Summary(
        stage="report",
        counts={"matching_images": matching, "shown": len(cards), "thumbnails": shown_ok,
                "bad_images": len(cards) - shown_ok, "histograms": sum(1 for h in histograms if h),
                "bytes": len(page)},
        details={"out": str(out), "selection": selection, "where": where, "dedup": dedup},
        seconds=time.time() - t0,
        message=f"report of {len(cards):,} of {matching:,} images -> {out}",
    )


def _dedup_groups(ds: Dataset, name: str) -> str:
    """SQL reading dedup/<name>.parquet, or a one-line error listing the dedup runs present."""
    from ..views import sql_string

    path = ds.root / "dedup" / f"{check_name(name, 'dedup name')}.parquet"
    if not path.exists():
        present = sorted(p.stem for p in (ds.root / "dedup").glob("*.parquet"))
        raise InputError(f"no dedup run named {name!r}; dedup runs present: {', '.join(present) or '(none)'}")
    return f"read_parquet({sql_string(path)})"


def _histogram(con: Any, with_images: str, scorer: str, cols: list[str]) -> tuple[str, str] | None:
    """One PNG per scorer, every source's score distribution overlaid on the same bins."""
    if not cols:
        return None
    lo, hi = con.execute(with_images + "SELECT " + ", ".join(
        [f"least({', '.join(f'min({ident(c)})' for c in cols)})",
         f"greatest({', '.join(f'max({ident(c)})' for c in cols)})"]) + " FROM images").fetchone()
    if lo is None:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; also keeps tests headless
    import matplotlib.pyplot as plt
    import numpy as np

    width = (hi - lo) / HIST_BINS or 1.0
    edges = lo + width * np.arange(HIST_BINS + 1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    for c in cols:
        counts = np.zeros(HIST_BINS)
        for b, n in con.execute(
            with_images + f"SELECT least(CAST(floor(({ident(c)} - ?) / ?) AS INTEGER), {HIST_BINS - 1}), "
            f"count(*) FROM images WHERE {ident(c)} IS NOT NULL GROUP BY 1", [lo, width]
        ).fetchall():
            counts[b] = n
        ax.stairs(counts, edges, label=c.removeprefix(f"score_{scorer}_"), linewidth=1.5)
    ax.set_xlabel(f"score under {scorer}")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return f"scores of {scorer}", base64.b64encode(buf.getvalue()).decode("ascii")


def _thumbnails(ds: Dataset, rows: list[dict], size: int) -> dict[tuple[str, str], tuple[str | None, str | None]]:
    """(shard, key) -> (base64 JPEG thumbnail, None) or (None, reason); each needed tar indexed once."""
    wanted: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        wanted[r["shard"]].add(r["key"])
    out: dict[tuple[str, str], tuple[str | None, str | None]] = {}
    for shard, keys in wanted.items():
        path = ds.shard_path(shard)
        if not path.is_file():
            out.update({(shard, k): (None, f"shard {shard}.tar missing") for k in keys})
            continue
        idx = index_tar(path)
        with storage.open_read(path) as fh:
            for key in keys:
                ext = idx.image_ext(key)
                if ext is None:
                    out[(shard, key)] = (None, "image not in shard")
                    continue
                try:
                    img = decode_image(idx.read(key, ext, fh))
                except ImageDecodeError as e:
                    out[(shard, key)] = (None, str(e))
                    continue
                img.thumbnail((size, size))
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=80)
                out[(shard, key)] = (base64.b64encode(buf.getvalue()).decode("ascii"), None)
    return out


def _card(row: dict, captioners: list[str], scorers: list[str], columns: list[str],
          thumb: tuple[str | None, str | None]) -> dict[str, Any]:
    """Caption rows of one sample: raw, then each captioner's caption(s), each with its scores."""
    sel_src, sel_cap = row.get("selected_source"), row.get("selected_caption")

    def entry(source: str, label: str, caption: Any, scores: dict, best: bool = False) -> dict:
        return {"source": label, "caption": caption, "scores": scores, "best": best,
                "selected": sel_src == source and sel_cap is not None and sel_cap == caption}

    rows = [entry("raw", "raw", row.get("caption"),
                  {s: row.get(f"score_{s}_raw") for s in scorers})]
    for name in captioners:
        caps = row.get(f"caps_{name}")
        if caps and len(caps) > 1:
            for i, cap in enumerate(caps):
                scores = {}
                best = False
                for s in scorers:
                    lst = row.get(f"scores_{s}_{name}")
                    scores[s] = lst[i] if lst and i < len(lst) else (row.get(f"score_{s}_{name}") if i == 0 else None)
                    best = best or row.get(f"best_{s}_{name}") == i
                rows.append(entry(name, f"{name}[{i}]", cap, scores, best))
        elif f"cap_{name}" in columns:
            rows.append(entry(name, name, row.get(f"cap_{name}"),
                              {s: row.get(f"score_{s}_{name}") for s in scorers}))
    return {"uid": row["uid"], "thumb": thumb[0], "image_error": thumb[1], "rows": rows,
            "selected_source": sel_src, "selected_caption": sel_cap}
