"""Perceptual hashes of every image (imagehash's pHash) and the pairs of near-identical images.

Two pHashes per image: the usual 64-bit one (8 x 8 low DCT frequencies) finds candidate pairs within
``--hamming`` bits, and a 256-bit one (16 x 16) confirms them: a pair is kept when the long hashes differ
in at most ``CONFIRM_BITS``. Low-detail images (a logo, a plain product shot, CapWorld's shapes) often
share a 64-bit hash with a different image; resized and re-encoded copies stay within about 40 of 256
bits, while different images of the same layout can come as close.

pHash sees luminance only, so the same layout in other colours (a red square top left on blue, a green
one on grey) passes both. A third check compares colour: the mean colour of a 4 x 4 grid of cells, which
resizing and re-encoding move by a few levels, must agree within ``COLOUR_LEVELS`` in every cell and
channel. On a CapWorld pool of look-alike layouts (tests/test_dedup.py) it kept all 218 planted copies
found by the two pHashes and dropped all 22 recoloured look-alikes; imagehash's own ``colorhash`` (hue
fractions) dropped 2-9 of them while losing 1-40% of the copies, depending on its settings.

Images are read with one seek per image from the shard's tar index (a tar in object storage is first
downloaded whole to a temp file by the worker hashing it) and decoded by the shared decoder
(``capcurate.inputs.decode_cpu``) in ``--workers`` processes, one shard per task. Pairs come from faiss's
multi-index hashing (``IndexBinaryMultiHash``): the 64 bits are cut into ``threshold + 1`` pieces, so two
hashes within ``threshold`` bits agree exactly on at least one piece (pigeonhole) and the search is exact
without comparing every pair.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable

import numpy as np

HASH_BITS = 64
LONG_BYTES = 32        # the confirming 256-bit pHash
CONFIRM_BITS = 48      # most differing bits of the 256 for a confirmed pair
COLOUR_GRID = 4        # mean colour of COLOUR_GRID x COLOUR_GRID cells ...
COLOUR_BYTES = 3 * COLOUR_GRID * COLOUR_GRID
COLOUR_LEVELS = 32     # ... may differ by at most this much (of 255) in any cell and channel
ROW_BYTES = HASH_BITS // 8 + LONG_BYTES + COLOUR_BYTES


def split(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(64-bit pHash, 256-bit pHash, colour grid) columns of the hash rows."""
    a, b = HASH_BITS // 8, HASH_BITS // 8 + LONG_BYTES
    return hashes[:, :a], hashes[:, a:b], hashes[:, b:]


def _phash_bytes(data: bytes) -> np.ndarray | None:
    import imagehash
    from PIL import Image

    from ...images import ImageDecodeError
    from ...inputs import decode_cpu

    try:
        pixels = decode_cpu(data)
    except ImageDecodeError:
        return None
    import torch

    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    grid = torch.nn.functional.adaptive_avg_pool2d(pixels[None].float(), COLOUR_GRID).round().to(torch.uint8)
    return np.concatenate([np.packbits(imagehash.phash(img).hash.reshape(-1)),
                           np.packbits(imagehash.phash(img, hash_size=16).hash.reshape(-1)),
                           grid.reshape(-1).numpy()])


def hash_shard(task: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint8[n, ROW_BYTES]: the 64-bit pHash, the 256-bit pHash, the colour grid; ok bool[n]) for
    the keys of one tar."""
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
            h = _phash_bytes(index.read(key, ext, fh))
            if h is not None:
                out[i], ok[i] = h, True
    return out, ok


def _one_torch_thread() -> None:
    """Pool initializer: a forked child whose parent already ran torch's OpenMP pool (score, then dedup, in
    one Python process) hangs in its first parallel op unless it keeps to one thread."""
    import torch

    torch.set_num_threads(1)


def hash_shards(tasks: list[tuple[str, list[str]]], workers: int,
                advance: Callable[[int], None] = lambda n: None) -> list[tuple[np.ndarray, np.ndarray]]:
    """``hash_shard`` over every task, in order, on ``workers`` processes (0: in this process)."""
    if workers <= 0 or len(tasks) <= 1:
        results = []
        for t in tasks:
            results.append(hash_shard(t))
            advance(len(t[1]))
        return results
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    results = []
    with ctx.Pool(min(workers, len(tasks)), initializer=_one_torch_thread) as pool:
        for task, res in zip(tasks, pool.imap(hash_shard, tasks), strict=True):
            results.append(res)
            advance(len(task[1]))
    return results


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of each row pair of two uint8 arrays."""
    return np.unpackbits(a ^ b, axis=1).sum(axis=1)


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, long-hash distance) for the pairs within ``threshold`` of 64 bits, confirmed by the long hash
    and by the colour grid."""
    short, long, colour = split(hashes)
    i, j, _ = close_pairs(short, threshold)
    d = hamming(long[i], long[j])
    shift = np.abs(colour[i].astype(np.int16) - colour[j].astype(np.int16)).max(axis=1, initial=0)
    ok = (d <= CONFIRM_BITS) & (shift <= COLOUR_LEVELS)
    return i[ok], j[ok], d[ok]


def close_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) for every i < j whose 64-bit hashes differ in at most ``threshold`` bits."""
    import faiss

    if not len(hashes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int32)
    pieces = threshold + 1
    if pieces <= HASH_BITS // 2:
        index = faiss.IndexBinaryMultiHash(HASH_BITS, pieces, HASH_BITS // pieces)
    else:  # so loose that every piece would be a bit or two: compare all pairs
        index = faiss.IndexBinaryFlat(HASH_BITS)
    index.add(np.ascontiguousarray(hashes))
    lims, dist, nbr = index.range_search(np.ascontiguousarray(hashes), threshold + 1)  # radius is exclusive
    src = np.repeat(np.arange(len(hashes)), np.diff(lims).astype(np.int64))
    keep = src < nbr
    return src[keep].astype(np.int64), nbr[keep].astype(np.int64), dist[keep].astype(np.int32)
