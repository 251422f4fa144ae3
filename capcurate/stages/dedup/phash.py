"""Perceptual hashes of every image (imagehash's pHash) and the pairs of near-identical images.

Two pHashes per image: the usual 64-bit one (8 x 8 low DCT frequencies) finds candidate pairs within
``--hamming`` bits, and a 256-bit one (16 x 16) confirms them: a pair is kept when the long hashes differ
in at most ``CONFIRM_BITS``. Low-detail images (a logo, a plain product shot, CapWorld's shapes) often
share a 64-bit hash with a different image; resized and re-encoded copies stay within about 40 of 256
bits, different images rarely come closer than 70 (measured on CapWorld, tests/test_dedup.py).

Images are read with one seek per image from the shard's tar index and decoded by the shared decoder
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


def _phash_bytes(data: bytes) -> np.ndarray | None:
    import imagehash
    from PIL import Image

    from ...images import ImageDecodeError
    from ...inputs import decode_cpu

    try:
        pixels = decode_cpu(data)
    except ImageDecodeError:
        return None
    img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return np.concatenate([np.packbits(imagehash.phash(img).hash.reshape(-1)),
                           np.packbits(imagehash.phash(img, hash_size=16).hash.reshape(-1))])


def hash_shard(task: tuple[str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint8[n, 8 + 32]: the 64-bit then the 256-bit pHash, ok bool[n]) for the keys of one tar."""
    from ...shards import index_tar

    tar, keys = task
    index = index_tar(tar)
    out = np.zeros((len(keys), HASH_BITS // 8 + LONG_BYTES), np.uint8)
    ok = np.zeros(len(keys), bool)
    with open(tar, "rb") as fh:
        for i, key in enumerate(keys):
            ext = index.image_ext(key)
            if ext is None:
                continue
            h = _phash_bytes(index.read(key, ext, fh))
            if h is not None:
                out[i], ok[i] = h, True
    return out, ok


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
    with ctx.Pool(min(workers, len(tasks))) as pool:
        for task, res in zip(tasks, pool.imap(hash_shard, tasks), strict=True):
            results.append(res)
            advance(len(task[1]))
    return results


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits of each row pair of two uint8 arrays."""
    return np.unpackbits(a ^ b, axis=1).sum(axis=1)


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, long-hash distance) for the pairs within ``threshold`` of 64 bits, confirmed by the long hash."""
    short, long = hashes[:, :HASH_BITS // 8], hashes[:, HASH_BITS // 8:]
    i, j, _ = close_pairs(short, threshold)
    d = hamming(long[i], long[j])
    ok = d <= CONFIRM_BITS
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
