"""capcurate report: one self-contained HTML page with thumbnails, captions, scores and histograms."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from curate_fixtures import build_scored_dataset
from typer.testing import CliRunner

from capcurate.cli import app
from capcurate.errors import InputError
from capcurate.stages.mix import mix
from capcurate.stages.report import report


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = build_scored_dataset(tmp_path_factory.mktemp("report") / "ds", image_size=(48, 40))
    mix(root, "raw-top+synthetic", score="l14", top_fraction=0.3, synthetic="blip", name="mixA")
    return root


def test_report_is_one_self_contained_page(mixed, tmp_path):
    s = report(mixed, tmp_path / "r.html", limit=100)
    page = (tmp_path / "r.html").read_text()
    assert s.counts["matching_images"] == 10 and s.counts["thumbnails"] == 10
    assert s.counts["histograms"] == 1  # one figure for scorer l14, every source overlaid
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch: images are data: URIs
    assert page.count('src="data:image/jpeg;base64,') == 10
    assert page.count('src="data:image/png;base64,') == 1
    # raw caption, every synthetic caption (both of syn's) and their scores side by side
    for text in ("raw 4", "blip 4", "syn 4 a", "syn 4 b", "0.220", "0.240"):
        assert text in page


def test_report_filters_by_selection_and_sql(mixed, tmp_path):
    s = report(mixed, tmp_path / "sel.html", selection="mixA")
    page = (tmp_path / "sel.html").read_text()
    assert s.counts["matching_images"] == 9  # u08 got no caption in mixA
    assert page.count("selected</span>") == 9 and "blip: 6, raw: 3" in page
    s = report(mixed, tmp_path / "where.html", where="score_l14_raw >= 0.28", order_by="score_l14_raw DESC",
               limit=2)
    page = (tmp_path / "where.html").read_text()
    assert s.counts["matching_images"] == 3 and s.counts["shown"] == 2
    assert page.index(">u05<") < page.index(">u00<") and ">u02<" not in page
    with pytest.raises(InputError, match="selections present: mixA"):
        report(mixed, tmp_path / "x.html", selection="nope")


def test_report_shows_why_an_image_is_missing(tiny_dataset, tmp_path):
    s = report(tiny_dataset, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert s.counts["bad_images"] == 2 and "no image: not an image" in page and "corrupt image" in page
    assert s.counts["histograms"] == 0 and "no score columns" in page


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(find_chromium() is None,
                    reason="headless Chromium not installed (`make test` installs Debian's chromium when apt "
                           "can; else: apt-get install chromium)")
def test_report_renders_in_headless_chromium(mixed, tmp_path):
    out = tmp_path / "r.html"
    report(mixed, out, selection="mixA")
    cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
           "--dump-dom", out.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    # the page's own script counts images the browser decoded (naturalWidth > 0) after load
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total and int(total.group(1)) == 9 + 1  # thumbnails + one histogram
    assert loaded.group(1) == total.group(1)
    for text in ("raw 5", "blip 6", "syn 6 a"):
        assert text in dom


def test_report_cli(mixed, tmp_path):
    r = CliRunner().invoke(app, ["report", str(mixed), "--selection", "mixA", "-o", str(tmp_path / "r.html"),
                                 "--limit", "3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["counts"]["shown"] == 3
    r = CliRunner().invoke(app, ["report", str(mixed), "--where", "no_such_column > 1", "-o",
                                 str(tmp_path / "bad.html")])
    assert r.exit_code == 2 and "no_such_column" in r.output


def test_report_thumb_size_bounds_the_embedded_thumbnails(mixed, tmp_path):
    import base64
    import io

    from PIL import Image

    def sides(page: str) -> set[tuple[int, int]]:
        found = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
        return {Image.open(io.BytesIO(base64.b64decode(b))).size for b in found}

    r = CliRunner().invoke(app, ["report", str(mixed), "-o", str(tmp_path / "t.html"), "--thumb-size", "16"])
    assert r.exit_code == 0, r.output
    small = sides((tmp_path / "t.html").read_text())
    assert small and all(max(s) == 16 for s in small)  # 48x40 images, longest side to 16
    report(mixed, tmp_path / "d.html")
    assert all(max(s) == 48 for s in sides((tmp_path / "d.html").read_text()))  # never enlarged past 160
    r = CliRunner().invoke(app, ["report", str(mixed), "-o", str(tmp_path / "x.html"), "--thumb-size", "4"])
    assert r.exit_code == 2 and "--thumb-size >= 8" in r.output
