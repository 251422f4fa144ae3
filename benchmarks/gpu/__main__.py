"""``python -m benchmarks.gpu``: build the data and models, run the selected row families, write gpu.json."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FAMILIES = ("input", "recaption", "score", "train", "eval", "vlm")
DEFAULT = "input,recaption,score,train,eval"  # vlm: a 2B model to build and run, asked for by name


def _env() -> None:
    for k, v in {
        "CAPCURATE_PROGRESS": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }.items():
        os.environ.setdefault(k, v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    ap.add_argument(
        "--smoke", action="store_true", help="every row at tiny size on the CPU (checks the paths)"
    )
    ap.add_argument(
        "--only",
        default=DEFAULT,
        help=f"row families, comma-separated, of {','.join(FAMILIES)} (default {DEFAULT})",
    )
    ap.add_argument(
        "--json-out", type=Path, default=None, help="write every repeat, the commit and the card here"
    )
    ap.add_argument(
        "--repeats", type=int, default=3, help="repeats per side, alternating the order (default 3)"
    )
    ap.add_argument(
        "--workdir", type=Path, default=None, help="data and models here (default: a temporary dir)"
    )
    args = ap.parse_args(argv)
    bad = set(args.only.split(",")) - set(FAMILIES)
    if bad:
        ap.error(f"--only: unknown families {sorted(bad)}; choose from {','.join(FAMILIES)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        ap.error(
            f"--workdir {args.workdir} is not empty: outputs of an earlier run would be read as this run's"
        )
    return args


def build_rows(cfg: Any, only: set[str], work: Path) -> list[Any]:
    """The rows of the selected families, with their data and models built once."""
    from . import data, models
    from .runner import log

    # every JPEG first: make_jpegs forks a pool, which must happen before this process touches CUDA
    inputs = data.make_jpegs(cfg.input_images, cfg.image_size) if "input" in only else []
    photos = data.make_jpegs(cfg.images, cfg.image_size) if "recaption" in only else []
    vlm_photos = data.make_jpegs(cfg.vlm_images, scale=cfg.image_scale, seed0=20_000) if "vlm" in only else []
    mixed = data.make_jpegs(cfg.images, scale=cfg.image_scale) if "score" in only else []
    mixed_eval = data.make_jpegs(cfg.images, scale=cfg.image_scale, seed0=10_000) if "eval" in only else []
    train_jpegs = data.make_jpegs(cfg.train_unique, (cfg.train_size,) * 2) if "train" in only else []
    log("images made")

    rows: list[Any] = []
    blip = models.build_blip(work, cfg.blip, cfg.device) if only & {"input", "recaption"} else ""
    if "input" in only:
        from . import input as input_rows

        rows += input_rows.rows(cfg, inputs, blip)
    if "recaption" in only:
        from . import recaption

        beam = photos[: cfg.beam_images]
        rows += recaption.rows(
            cfg,
            data.build_dataset(work / "ds-recaption", photos, cfg.per_shard),
            photos,
            blip,
            data.build_dataset(work / "ds-beam", beam, cfg.per_shard),
            beam,
        )
    if "vlm" in only:
        from . import recaption

        rows.append(
            recaption.vlm_row(
                cfg,
                data.build_dataset(work / "ds-vlm", vlm_photos, cfg.per_shard),
                vlm_photos,
                models.build_vlm(work, cfg.vlm, cfg.device),
            )
        )
    if "score" in only or "eval" in only:
        clip_cfg = models.TINY_CLIP if cfg.smoke else models.openclip_config(cfg.clip_arch)
        cfg_path, weights = models.save_openclip(work / "clip", "bench-score-clip", clip_cfg, cfg.device)
    if "score" in only:
        from . import score

        rows += score.rows(
            cfg, data.build_dataset(work / "ds-score", mixed, cfg.per_shard), mixed, cfg_path, weights
        )
    if "eval" in only:
        from . import eval as eval_rows

        rows += eval_rows.rows(cfg, work, mixed_eval, cfg_path, weights)
    if "train" in only:
        from . import train

        if cfg.smoke:  # a registered tiny config; on the GPU open_clip's own architecture by name
            train_cfg, arch = (
                models.save_openclip(work / "clip", "bench-train-clip", models.TINY_TRAIN_CLIP, "cpu")[0],
                "",
            )
        else:
            train_cfg, arch = None, cfg.train_arch
        pattern, _ = data.write_train_shards(
            work / "train", train_jpegs, cfg.train_samples, cfg.train_per_shard
        )
        rows += [train.e2e_row(cfg, work, pattern, train_cfg, arch), train.step_row(cfg, train_cfg, arch)]
    log(f"{len(rows)} rows built")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every row ran and passed its gate, 1 otherwise, 2 on bad arguments."""
    _env()
    args = parse_args(argv)
    from .config import make_cfg
    from .runner import log, provenance, run_row, write_report

    cfg = make_cfg(args.smoke)
    if not cfg.smoke:
        import torch

        if not torch.cuda.is_available():
            print("python -m benchmarks.gpu: no CUDA device here; use --smoke on the CPU", file=sys.stderr)
            return 2
    only = set(args.only.split(","))
    t0 = time.time()
    prov = provenance()
    log(
        f"benchmarks.gpu at {prov['head'][:12]}{' (dirty tree)' if prov['dirty'] else ''} on {prov['card']}"
        f"{' --smoke' if cfg.smoke else ''}: {','.join(sorted(only))}"
    )
    with tempfile.TemporaryDirectory(prefix="capcurate-bench-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = build_rows(cfg, only, work)
        results: list[dict[str, Any]] = []
        for row in rows:
            results.append(run_row(row, args.repeats))
            if args.json_out:  # after every row: a run killed by its time limit keeps what it measured
                write_report(
                    args.json_out,
                    results,
                    {
                        "smoke": cfg.smoke,
                        "families": sorted(only),
                        "complete": len(results) == len(rows),
                        "seconds": time.time() - t0,
                        "config": vars(cfg),
                    },
                )
    failed = [r["row"] for r in results if not r["ok"]]
    log(
        f"{len(results)} rows, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}; "
        f"{time.time() - t0:.1f} s"
    )
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
