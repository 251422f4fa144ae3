"""dedup --near on varied images (scikit-image's photographs and drawn look-alikes, tests/dedup_fixtures.py):
recall on resized, re-encoded, 5%-cropped and +-30%-brightened copies, precision with recoloured look-alikes,
a --hamming that trades the two, and hashing without torch."""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from dedup_fixtures import EDITS, near_duplicate_set, score_pairs
from PIL import Image

from capcurate.stages.dedup import DEFAULT_HAMMING
from capcurate.stages.dedup.phash import image_row, near_pairs


@pytest.fixture(scope="module")
def hashed():
    items = near_duplicate_set(seed=0)
    t = time.perf_counter()
    rows = np.stack([image_row(it.data) for it in items])
    return items, rows, (time.perf_counter() - t) / len(items)


def test_near_pairs_find_resized_reencoded_cropped_and_brightened_copies(hashed):
    items, rows, _ = hashed
    i, j, sim = near_pairs(rows, DEFAULT_HAMMING)
    s = score_pairs(items, i, j)
    assert {f"recall {e}" for e in EDITS} <= set(s)
    assert all(s[f"recall {e}"] >= 0.95 for e in EDITS), s     # crops: 0.30 before, brightness 0.38
    assert s["precision"] >= 0.98, s
    assert ((sim > 0.8) & (sim <= 1)).all()
    # as dedup groups them: each group keeps its largest image (often the 1.5x upscaled copy) and removes
    # the images paired with that one, so a copy must match the keeper itself, edits compounding
    from capcurate.stages.dedup.groups import keep_largest_stars

    pixels = np.array([np.prod(Image.open(io.BytesIO(it.data)).size) for it in items])
    found = keep_largest_stars("near", np.arange(len(items)), i, j, pixels.__getitem__)
    removed = score_pairs(items, found.rows, found.of)
    assert all(removed[f"recall {e}"] >= 0.95 for e in EDITS) and removed["precision"] >= 0.98, removed


def test_recoloured_lookalikes_are_never_paired(hashed):
    items, rows, _ = hashed
    i, j, _ = near_pairs(rows, 12)   # even at a looser --hamming: the colour check decides
    drawn = [(items[a].source, items[b].source) for a, b in zip(i, j, strict=True)
             if items[a].source.startswith("drawn") and items[a].source != items[b].source]
    assert drawn == []
    # they do share a layout: the grey hashes alone would pair them
    from capcurate.stages.dedup.phash import close_pairs

    q, t = close_pairs(rows, DEFAULT_HAMMING)
    assert any(items[a].source.split("_")[0] == items[b].source.split("_")[0] and items[a].source != items[b].source
               for a, b in zip(q, t // 10, strict=True))


def test_higher_hamming_finds_more_crops(hashed):
    """--hamming is the candidate radius of the 64-bit hashes: raising it finds more of the cropped copies
    (docs/dedup.md's knob table)."""
    items, rows, _ = hashed
    crops = {h: score_pairs(items, *near_pairs(rows, h)[:2]) for h in (0, 2, DEFAULT_HAMMING)}
    recall = [min(crops[h]["recall crop5a"], crops[h]["recall crop5b"]) for h in (0, 2, DEFAULT_HAMMING)]
    assert recall[0] < recall[1] < recall[2], recall
    assert crops[0]["pairs"] < crops[DEFAULT_HAMMING]["pairs"]


def test_hashing_is_fast_and_needs_no_torch(hashed, tmp_path):
    _, _, seconds = hashed
    assert seconds < 0.02, seconds   # 4.6-9 ms an image on one core here; the torch + imagehash path took 33 ms
    # a hashing worker never imports torch (whose thread pools made 2 workers take ~99 ms an image)
    code = ("import sys; from capcurate.stages.dedup.phash import image_row; import io; from PIL import Image; "
            "b = io.BytesIO(); Image.new('RGB', (64, 48), (200, 30, 30)).save(b, 'JPEG'); "
            "assert image_row(b.getvalue()) is not None; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
