"""Benchmark inputs: JPEGs of mixed sizes (some progressive), inference datasets and train shards."""

from __future__ import annotations

import io
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# web photos are not all 512x384: the score row mixes landscape, portrait, small and large images, and
# every third one is a progressive JPEG (decoded by another libjpeg path, and refused by nvJPEG's batch API)
MIXED_SIZES = [(512, 384), (640, 480), (384, 512), (1024, 768), (333, 250), (800, 600), (300, 300)]


def make_jpeg(seed: int, size: tuple[int, int], progressive: bool = False) -> bytes:
    """A smooth random photo-like image (gradients + blobs), so JPEG sizes are realistic."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4, 3)
        img[..., c] = 127 + 100 * np.sin(fx * x / w * 6.28 + ph) * np.cos(fy * y / h * 6.28)
    img += rng.normal(0, 12, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90, progressive=progressive)
    return buf.getvalue()


def _make(job: tuple[int, tuple[int, int], bool]) -> bytes:
    return make_jpeg(*job)


def make_jpegs(
    n: int, size: tuple[int, int] | None = None, *, scale: float = 1.0, seed0: int = 0
) -> list[bytes]:
    """``n`` JPEGs of ``size``, or of MIXED_SIZES (times ``scale``, every third progressive) when None.
    Thousands of them take a core about a minute: from 256 on, a forked pool makes them (call this
    before the process uses CUDA)."""
    import multiprocessing as mp

    jobs = []
    for i in range(n):
        w, h = size or MIXED_SIZES[i % len(MIXED_SIZES)]
        prog = size is None and i % 3 == 2
        jobs.append((seed0 + i, (w, h) if size else (max(8, int(w * scale)), max(8, int(h * scale))), prog))
    procs = min(os.cpu_count() or 1, 32)
    if n < 256 or procs == 1:
        return [_make(j) for j in jobs]
    with mp.get_context("fork").Pool(procs) as pool:
        return pool.map(_make, jobs, chunksize=max(1, n // (procs * 8)))


def _tests_on_path() -> None:
    """tests/conftest.py's dataset writer is the one the test suite trusts; import it without pytest's
    runner (the GPU machine may lack pytest, and the fixtures themselves are not used here)."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    try:
        import pytest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("pytest")
        stub.fixture = lambda *a, **k: a[0] if a and callable(a[0]) else (lambda f: f)  # type: ignore
        sys.modules["pytest"] = stub


def build_dataset(root: Path, jpegs: list[bytes], per_shard: int) -> Path:
    """A capcurate dataset directory (tar shards + manifest) holding ``jpegs`` with one caption each."""
    _tests_on_path()
    from conftest import build_dataset as write

    samples = [
        {"caption": f"a photo number {i} of a red car on the street", "image": b} for i, b in enumerate(jpegs)
    ]
    return write(root, samples, per_shard=per_shard)


TRAIN_WORDS = [
    "red",
    "blue",
    "green",
    "photo",
    "of",
    "a",
    "small",
    "big",
    "dog",
    "cat",
    "car",
    "tree",
    "on",
    "the",
    "table",
    "in",
    "street",
    "with",
    "light",
    "dark",
]


def train_caption(i: int) -> str:
    """Caption of train sample i: 3 to 11 words (the length distribution of the earlier GPU rows)."""
    return " ".join(TRAIN_WORDS[(i * 7 + k * 3) % len(TRAIN_WORDS)] for k in range(3 + i % 9))


def write_train_shards(folder: Path, jpegs: list[bytes], samples: int, per_shard: int) -> tuple[str, int]:
    """webdataset shards (KEY.jpg + KEY.txt) and open_clip's sizes.json; returns (brace pattern, shards)."""
    from capcurate.shards import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    n_shards = (samples + per_shard - 1) // per_shard
    sizes = {}
    for s in range(n_shards):
        name = f"{s:05d}.tar"
        count = min(per_shard, samples - s * per_shard)
        with TarShardWriter(folder / name) as w:
            for j in range(count):
                i = s * per_shard + j
                w.write(f"{s:05d}{j:05d}", {"jpg": jpegs[i % len(jpegs)], "txt": train_caption(i).encode()})
        sizes[name] = count
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return str(folder / f"{{00000..{n_shards - 1:05d}}}.tar"), n_shards
