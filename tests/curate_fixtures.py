"""A dataset with captions and scores of known values, written directly (no recaption/score code needed).

Ten images u00..u09 in two shards plus one failed download (u10):
  raw caption "raw i" (u09: empty), blip caption "blip i" (u08: NULL, the captioner failed),
  syn: two captions "syn i a" / "syn i b", the scorer prefers index i % 2,
  scores under scorer l14: RAW_SCORES, BLIP_SCORES, SYN_SCORES below.
"""

from __future__ import annotations

from pathlib import Path

from conftest import build_dataset, make_image_bytes

UIDS = [f"u{i:02d}" for i in range(10)]
RAW_SCORES = [0.31, 0.12, 0.28, 0.05, 0.22, 0.35, 0.18, 0.09, 0.26, None]
BLIP_SCORES = [0.20, 0.30, 0.15, 0.27, 0.24, 0.10, 0.29, 0.21, None, 0.33]
SYN_SCORES = [[0.10 + 0.01 * i, 0.40 - 0.01 * i] for i in range(10)]
SYN_BEST = [i % 2 for i in range(10)]


def raw_caption(i: int) -> str:
    return "" if i == 9 else f"raw {i}"


def build_scored_dataset(root: Path, *, image_size: tuple[int, int] = (32, 32)) -> Path:
    import pyarrow as pa

    from capcurate import atomic
    from capcurate.dataset import Dataset

    samples = [{"uid": UIDS[i], "caption": raw_caption(i), "image": make_image_bytes(i, image_size)}
               for i in range(10)]
    samples.append({"uid": "u10", "caption": "dead link", "status": "failed_to_download"})
    build_dataset(root, samples, per_shard=6)
    ds = Dataset(root)
    f32 = pa.float32()
    for shard, idx in (("00000", range(0, 6)), ("00001", range(6, 10))):
        blip = [None if i == 8 else f"blip {i}" for i in idx]
        atomic.write_parquet(ds.family_dir("captions", "blip") / f"{shard}.parquet", pa.table({
            "uid": [UIDS[i] for i in idx], "caption": blip,
            "captions": [[c] if c else [] for c in blip],
            "error": [None if c else "generation failed" for c in blip],
        }))
        atomic.write_parquet(ds.family_dir("captions", "syn") / f"{shard}.parquet", pa.table({
            "uid": [UIDS[i] for i in idx], "caption": [f"syn {i} a" for i in idx],
            "captions": [[f"syn {i} a", f"syn {i} b"] for i in idx],
            "error": pa.array([None] * len(idx), pa.string()),
        }))
        atomic.write_parquet(ds.family_dir("scores", "l14") / f"{shard}.parquet", pa.table({
            "uid": [UIDS[i] for i in idx],
            "score_l14_raw": pa.array([RAW_SCORES[i] for i in idx], f32),
            "score_l14_blip": pa.array([BLIP_SCORES[i] for i in idx], f32),
            "score_l14_syn": pa.array([SYN_SCORES[i][0] for i in idx], f32),
            "scores_l14_syn": pa.array([SYN_SCORES[i] for i in idx], pa.list_(f32)),
            "best_l14_syn": pa.array([SYN_BEST[i] for i in idx], pa.int32()),
            "error_l14": pa.array([None] * len(idx), pa.string()),
        }))
    return root
