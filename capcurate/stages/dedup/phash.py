"""Near-duplicate images: crop-tolerant perceptual hashes, confirmed in the matched window by a longer
hash and by brightness-compensated colour.

Per image (``image_row``: one row of ``ROW_BYTES`` = 1,168 bytes, kept in a temp file by the caller):

- for the whole frame and for each 95% window at offsets 0, 2.5% and 5% of the width and height (3 x 3
  windows): a 64-bit pHash (DCT-II of a 32 x 32 grey thumbnail, the 8 x 8 lowest frequencies against
  their median, as imagehash's ``phash``) and a 256-bit one (16 x 16 of a 64 x 64 thumbnail). A copy
  cropped by up to 5% of each side is within a few bits of the window it was cut from (on
  tests/dedup_fixtures.py's set: at most 8 of 64, where the whole-frame hashes differ by up to 24);
- a 16 x 16 colour thumbnail of the whole frame.

Candidates: a copy's whole-frame 64-bit hash within ``--hamming`` bits of any of another image's ten
(faiss multi-index hashing, ``IndexBinaryMultiHash``: the 64 bits are cut into ``threshold + 1`` pieces,
so two hashes within ``threshold`` bits agree exactly on at least one piece and the search is exact
without comparing every pair). The window that matched says how the copy lies on the original; the
``WINDOWS_TRIED`` closest windows of a pair are tried.

Confirmation, in that window:

- layout: the copy's 256-bit hash within ``CONFIRM_BITS`` of the original's for the window (low-detail
  images, a logo or CapWorld's shapes, often share a 64-bit hash with a different image);
- colour: pHash sees luminance only, so the same layout in other colours (a red square on blue, a green
  one on grey) passes it. The original's colour thumbnail is resampled to the window, both are pooled to
  8 x 8 cells, and the original is scaled by the pair's brightness gain (least squares over unclipped
  cells). A brightened cell may have lost part of its gain where its pixels clipped at white, so the copy
  may lie anywhere between the original times the gain and ``CLIP_SLACK`` of the way back. Beyond that,
  the largest cell may differ by ``COLOUR_LEVELS`` (a crop moves edges through a few cells) and the
  median cell by ``MEDIAN_LEVELS`` (a uniform tint, grey vs slate, moves every cell a little).

On tests/dedup_fixtures.py's set at ``--hamming 8`` every edit (resized 0.5-1.5x, JPEG 60/75, 5% crops,
brightness x0.7-1.3) is found for >= 95% of copies as dedup groups them, with no false pair, recoloured
look-alikes included; imagehash's and imagededup's pHash at 10 bits pair 12% false (benchmarks/dedup.py).
What it does not tell apart: a small object recoloured on an unchanged frame (one cell of 64 or less
within 40 levels), and crops beyond 5% a side.

Decoding: ``capcurate.images.decode_image`` with a JPEG draft (the decoder scales down by up to 8 while
decoding), PIL's box filter for every thumbnail and DCT matrix products in numpy: no torch in the
workers (~5 ms an image on one core; the previous torch and imagehash path took ~33 ms in one process,
~99 ms an image on 2 workers with torch's thread pools competing).
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections.abc import Callable, Iterator

import numpy as np

CHUNK = 65536                  # candidate pairs confirmed at once
HASH_BITS = 64
OFFSETS = (0.0, 0.025, 0.05)   # window offsets, as fractions of the side
WINDOW = 0.95                  # window side, as a fraction of the image side
BOXES = ((0.0, 0.0, 1.0, 1.0),) + tuple((x, y, x + WINDOW, y + WINDOW) for y in OFFSETS for x in OFFSETS)
N_HASHES = len(BOXES)
WINDOWS_TRIED = 3              # a candidate pair is confirmed in at most this many of its closest windows
LONG_BITS = 256                # the confirming pHash of each window
CONFIRM_BITS = 48              # most differing bits of the 256 for a confirmed pair (in the matched window)
COLOUR = 16                    # colour thumbnail side; compared at COLOUR // 2 after resampling
COLOUR_LEVELS = 40             # most difference of any compared cell and channel, after brightness gain
MEDIAN_LEVELS = 8              # most difference of the median cell (its worst channel), after the gain
CLIP_SLACK = 1.0               # of the brightening a clipped cell may have lost (see colour_gap)
CLIPPED = 240                  # a cell channel this bright may be clipped (cells average several pixels)
HASH_BYTES = N_HASHES * HASH_BITS // 8
LONG_BYTES = N_HASHES * LONG_BITS // 8
ROW_BYTES = HASH_BYTES + LONG_BYTES + COLOUR * COLOUR * 3
_SIDE = 64                     # grey thumbnail of each window: 16 x 16 DCT for the long hash ...
_SHORT_SIDE = 32               # ... and, pooled 2 x 2, 8 x 8 DCT for the short one (imagehash's sizes)


def _dct_rows(side: int, k: int) -> np.ndarray:
    """The k lowest-frequency rows of the orthonormal DCT-II matrix of ``side``."""
    n = np.arange(side)
    m = np.cos(np.pi * (2 * n[None, :] + 1) * np.arange(k)[:, None] / (2 * side)) * np.sqrt(2 / side)
    m[0] /= np.sqrt(2)
    return m.astype(np.float32)


_DCT_SHORT, _DCT_LONG = _dct_rows(_SHORT_SIDE, 8), _dct_rows(_SIDE, 16)


def _bits(coefficients: np.ndarray) -> np.ndarray:
    return np.packbits((coefficients > np.median(coefficients)).reshape(-1))


def image_row(data: bytes) -> np.ndarray | None:
    """The hash row of one encoded image (module docstring), or None when it does not decode."""
    from PIL import Image

    from ...images import ImageDecodeError, decode_image

    try:
        img = decode_image(data, draft=(2 * _SIDE, 2 * _SIDE))
    except ImageDecodeError:
        return None
    w, h = img.size
    grey = img.convert("L")
    out = np.empty(ROW_BYTES, np.uint8)
    for b, (x0, y0, x1, y1) in enumerate(BOXES):
        g = np.asarray(grey.resize((_SIDE, _SIDE), Image.BOX, box=(x0 * w, y0 * h, x1 * w, y1 * h)), np.float32)
        small = g.reshape(_SHORT_SIDE, 2, _SHORT_SIDE, 2).mean(axis=(1, 3))
        out[8 * b:8 * b + 8] = _bits(_DCT_SHORT @ small @ _DCT_SHORT.T)
        out[HASH_BYTES + 32 * b:HASH_BYTES + 32 * b + 32] = _bits(_DCT_LONG @ g @ _DCT_LONG.T)
    out[HASH_BYTES + LONG_BYTES:] = np.asarray(img.resize((COLOUR, COLOUR), Image.BOX)).reshape(-1)
    return out


def hash_shard(task: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows uint8[n, ROW_BYTES], ok bool[n]) for the keys of one tar."""
    from ... import storage
    from ...shards import index_tar

    tar, keys = task
    out = np.zeros((len(keys), ROW_BYTES), np.uint8)
    ok = np.zeros(len(keys), bool)
    # a tar in object storage is downloaded once into a temp file (one GET, made in this worker process)
    with storage.local_copy(tar) as local, open(local, "rb") as fh:
        index = index_tar(local)
        for i, key in enumerate(keys):
            ext = index.image_ext(key)
            if ext is None:
                continue
            row = image_row(index.read(key, ext, fh))
            if row is not None:
                out[i], ok[i] = row, True
    return out, ok


def _one_thread() -> None:
    """Pool initializer: a forked child whose parent already ran torch's OpenMP pool (score, then dedup, in
    one Python process) hangs in its first parallel op unless it keeps to one thread."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def hash_shards(tasks: list[tuple[str, list[str]]], workers: int,
                advance: Callable[[int], None] = lambda n: None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``hash_shard`` of every task, yielded in order, on ``workers`` processes (0: in this process)."""
    if workers <= 0 or len(tasks) <= 1:
        for t in tasks:
            res = hash_shard(t)
            advance(len(t[1]))
            yield res
        return
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(min(workers, len(tasks)), initializer=_one_thread) as pool:
        for task, res in zip(tasks, pool.imap(hash_shard, tasks), strict=True):
            advance(len(task[1]))
            yield res


def near_pairs(rows: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity) for each confirmed pair i < j of hash rows: the whole-frame hash of one within
    ``threshold`` bits of one of the other's ten hashes, confirmed in the window that matched (module
    docstring). Similarity: 1 - differing bits / 256 of the long hashes in the best confirmed window."""
    q, t = close_pairs(rows, threshold)
    d = np.full(len(q), LONG_BITS, np.int64)
    ok = np.zeros(len(q), bool)
    for s in range(0, len(q), CHUNK):
        part = slice(s, s + CHUNK)
        ok[part], d[part] = confirm(rows, q[part], t[part])
    q, j, d = q[ok], t[ok] // N_HASHES, d[ok]
    a, b = np.minimum(q, j), np.maximum(q, j)
    if not len(a):
        return a, b, np.zeros(0, np.float32)
    order = np.lexsort((d, b, a))          # per pair, its smallest distance first
    a, b, d = a[order], b[order], d[order]
    first = np.r_[True, (a[1:] != a[:-1]) | (b[1:] != b[:-1])]
    return a[first], b[first], (1 - d[first] / LONG_BITS).astype(np.float32)


def close_pairs(rows: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """(image i, hash t = N_HASHES * j + window) for every whole-frame hash of i within ``threshold`` bits
    of a hash of another image j: of j's windows within reach, the ``WINDOWS_TRIED`` closest."""
    import faiss

    n = len(rows)
    if not n:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    hashes = np.ascontiguousarray(rows[:, :HASH_BYTES]).reshape(n * N_HASHES, HASH_BITS // 8)
    pieces = threshold + 1
    if pieces <= HASH_BITS // 2:
        index = faiss.IndexBinaryMultiHash(HASH_BITS, pieces, HASH_BITS // pieces)
    else:  # so loose that every piece would be a bit or two: compare all pairs
        index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(hashes)
    lims, dist, nbr = index.range_search(np.ascontiguousarray(hashes[::N_HASHES]), threshold + 1)  # exclusive
    del index, hashes
    src = np.repeat(np.arange(n), np.diff(lims).astype(np.int64))
    keep = src != nbr // N_HASHES
    src, nbr, dist = src[keep].astype(np.int64), nbr[keep].astype(np.int64), dist[keep]
    # per (i, j), the WINDOWS_TRIED closest of j's windows (the best aligned; ties: the whole frame first)
    order = np.lexsort((nbr, dist, nbr // N_HASHES, src))
    src, nbr = src[order], nbr[order]
    first = np.r_[True, (src[1:] != src[:-1]) | (nbr[1:] // N_HASHES != nbr[:-1] // N_HASHES)]
    starts = np.flatnonzero(first)
    rank = np.arange(len(src)) - np.repeat(starts, np.diff(np.r_[starts, len(src)]))
    return src[rank < WINDOWS_TRIED], nbr[rank < WINDOWS_TRIED]


def _resampling(box: tuple[float, float, float, float], n: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) matrices [out, n] such that ``rows @ image @ cols.T`` is an n x n image sampled
    bilinearly on an n x n grid over ``box`` (fractions of the side), then averaged down to out x out."""
    c = (np.arange(n) + 0.5) / n
    mats = []
    for lo, hi in ((box[1], box[3]), (box[0], box[2])):
        pos = np.clip((lo + c * (hi - lo)) * n - 0.5, 0, n - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        m = np.zeros((n, n), np.float32)
        np.add.at(m, (np.arange(n), i0), 1 - (pos - i0))
        np.add.at(m, (np.arange(n), i1), pos - i0)
        mats.append(m.reshape(out, n // out, n).mean(axis=1))
    return mats[0], mats[1]


def confirm(rows: np.ndarray, q: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confirmed, long-hash distance) of candidates (copy q, hash t of original t // N_HASHES): the copy's
    whole-frame long hash within ``CONFIRM_BITS`` of the original's in window t % N_HASHES, and every
    colour cell within ``COLOUR_LEVELS`` of the original's resampled to that window after a brightness gain.
    ``rows`` may be a memory map: only the candidates' rows are read."""
    order = np.argsort(q, kind="stable")             # read the rows in file order
    q, t = q[order], t[order]
    j, b = t // N_HASHES, t % N_HASHES
    uj = np.unique(j)
    copy, orig = np.asarray(rows[q]), np.asarray(rows[uj])[np.searchsorted(uj, j)]
    long_q = copy[:, HASH_BYTES:HASH_BYTES + 32]
    long_j = orig[:, HASH_BYTES:HASH_BYTES + LONG_BYTES].reshape(len(j), N_HASHES, 32)[np.arange(len(j)), b]
    d = np.unpackbits(long_q ^ long_j, axis=1).sum(axis=1).astype(np.int64)
    gap = np.full(len(q), np.inf)
    for w, box in enumerate(BOXES):
        sel = np.flatnonzero(b == w)
        if len(sel):
            gap[sel] = colour_gap(copy[sel], orig[sel], box)
    ok = (d <= CONFIRM_BITS) & (gap <= COLOUR_LEVELS)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return ok[back], d[back]


def _colour(rows: np.ndarray) -> np.ndarray:
    """Colour thumbnails of hash rows as float32 [m, 3, COLOUR, COLOUR]."""
    return rows[:, HASH_BYTES + LONG_BYTES:].reshape(len(rows), COLOUR, COLOUR, 3).transpose(0, 3, 1, 2) \
        .astype(np.float32)


def colour_gap(copies: np.ndarray, originals: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Per pair: the largest difference of any cell and channel (levels of 255) between the copy's colour
    thumbnail and the original's resampled to ``box``, both pooled to COLOUR // 2 a side, after scaling the
    original by their brightness gain (clipped at 255, as an overexposed copy is; see the comments)."""
    half = COLOUR // 2
    pool = np.eye(COLOUR, dtype=np.float32).reshape(half, 2, COLOUR).mean(axis=1)
    rows, cols = _resampling(box, COLOUR, half)
    a = pool @ _colour(copies) @ pool.T
    o = rows @ _colour(originals) @ cols.T
    # the gain: least squares over the cells neither image has clipped (a brightened copy's saturated
    # channels would pull a plain ratio of means down)
    free = (a < CLIPPED) & (o < CLIPPED)
    gain = (a * o * free).sum(axis=(1, 2, 3)) / np.maximum((o * o * free).sum(axis=(1, 2, 3)), 1.0)
    gain = np.where(free.any(axis=(1, 2, 3)), gain, 1.0)[:, None, None, None]
    # what the copy's cell may show: a pixel brightened by gain g > 1 and clipped at 255 ends between its
    # old value and g times it, and so does the mean of a cell, whatever part of it clipped (g < 1: the
    # original may be the brightened one, so between g times the value and the value)
    lo = np.minimum(o * (gain - CLIP_SLACK * np.maximum(gain - 1.0, 0.0)), 255.0)
    hi = np.minimum(o * (gain + CLIP_SLACK * np.maximum(1.0 - gain, 0.0)), 255.0)
    diff = np.maximum(np.maximum(lo - a, a - hi), 0.0)
    cells = diff.max(axis=1).reshape(len(a), -1)   # per cell, its worst channel
    # a uniform tint (grey vs slate) moves every cell a little: the median; a recoloured object moves a few
    # cells a lot: the largest. Each is scaled to its bound, so one number says whether both hold.
    return np.maximum(np.median(cells, axis=1) / MEDIAN_LEVELS, cells.max(axis=1) / COLOUR_LEVELS) * COLOUR_LEVELS
