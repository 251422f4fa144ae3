"""``capcurate synth``: render CapWorld, the offline demo world (DESIGN.md section 4).

Writes under ``OUT``:

    images/NNN/NNNNNN.jpg      the pool's images, to be served over HTTP (the "web")
    pool/                      with --pool-shards: the same pool as webdataset shards (jpg, alt-text, json with
                               uid and url), for ``capcurate ingest`` where img2dataset cannot run
    urls.parquet               url, caption (noisy alt-text), uid + truth columns (true_*, noise_kind;
                               duplicate_of, duplicate_kind with --duplicate-rate)
    seed/                      the clean "human-annotated" split with true captions, as training shards
    eval/                      the held-out labelled eval set in clip_benchmark's webdataset layout
    eval_retrieval/            the same eval tars (linked) as clip_benchmark's retrieval dataset
    tokenizer/                 the world's word-level tokenizer (Hugging Face format)
    models/                    {tiny,small}_{clip,coca}.json open_clip configs using that tokenizer
    synth.json                 the parameters and noise rates that made it
    contact_sheet.png          with --contact-sheet: the first seed images at model size with their true captions

The same arguments give byte-identical files (models/*.json name the tokenizer by absolute path).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import atomic
from ..errors import InputError, OutputExistsError
from ..progress import progress_bar
from ..summary import Summary
from ..world.generate import DUPLICATE_KINDS, ItemSpec, make_items
from ..world.noise import KINDS, resolve_rates

SYNTH_CARD = "synth.json"
CONTACT_SHEET = "contact_sheet.png"
OUTPUTS = ("images", "pool", "urls.parquet", "seed", "eval", "eval_retrieval", "tokenizer", "models", SYNTH_CARD,
           CONTACT_SHEET)
CONTACT_SHEET_IMAGES = 48
CHUNK = 100  # items per worker task: big enough to hide process overhead, small enough to balance


def world_uid(seed: int, index: int) -> str:
    """Stable uid of pool item ``index``: independent of the base URL the images are served from."""
    return hashlib.blake2b(f"capworld:{seed}:{index}".encode(), digest_size=16).hexdigest()


def image_relpath(index: int) -> str:
    return f"images/{index // 1000:03d}/{index:06d}.jpg"


def synth(
    out: str | Path,
    *,
    n_images: int = 20000,
    image_size: int = 64,
    noise_profile: str = "web",
    rates: dict[str, float | None] | None = None,
    seed: int = 0,
    base_url: str = "http://127.0.0.1:8000",
    seed_size: int = 2000,
    eval_size: int = 1000,
    shard_size: int = 1000,
    context_length: int = 32,
    workers: int | None = None,
    duplicate_rate: float = 0.0,
    contact_sheet: bool = False,
    pool_shards: bool = False,
    overwrite: bool = False,
) -> Summary:
    """Render a CapWorld pool, seed split and eval set into ``out``; see the module docstring."""
    t0 = time.time()
    if n_images < 1 or seed_size < 0 or eval_size < 0:
        raise InputError(f"--n-images must be >= 1 and split sizes >= 0, got {n_images}, {seed_size}, {eval_size}")
    if not 32 <= image_size <= 1024:  # the CLIP configs' ResNet downsamples 32x
        raise InputError(f"--image-size must be between 32 and 1024 pixels, got {image_size}")
    if not 0 <= duplicate_rate <= 0.5:
        raise InputError(f"--duplicate-rate must be between 0 and 0.5, got {duplicate_rate}")
    noise = resolve_rates(noise_profile, rates)
    from .. import storage

    if storage.is_remote(out):  # the world is served over local HTTP and read as model configs: a folder
        raise InputError(f"synth -o {out}: CapWorld is written to a local folder (its pool is served over "
                         "HTTP from it); use a local path, then ingest or download into a bucket")
    root = storage.path(out)
    _claim(root, overwrite)
    workers = max(1, workers or min(8, os.cpu_count() or 1))
    total = n_images + seed_size + eval_size

    from ..world.configs import write_model_configs
    from ..world.evalset import write_eval_set, write_retrieval_view, write_training_shards
    from ..world.scene import class_names
    from ..world.tokenizer import ZEROSHOT_TEMPLATES, true_caption_max_tokens, write_tokenizer

    vocab_size = write_tokenizer(root / "tokenizer", context_length)
    # the CoCas' context: the longest true caption, rounded up to a multiple of 8
    caption_context = min(context_length, -(-true_caption_max_tokens() // 8) * 8)
    write_model_configs(root / "models", vocab_size, root / "tokenizer", image_size=image_size,
                        context_length=context_length, caption_context_length=caption_context)

    base = base_url.rstrip("/")
    kinds: Counter[str] = Counter()
    dup_kinds: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(workers) if workers > 1 else _InProcess() as pool, \
            progress_bar(total, "synth", "images") as advance:
        def pool_items() -> Iterator[dict[str, Any]]:
            """Write each pool image and its urls.parquet row; yield it as a webdataset sample."""
            for item in _generate(pool, ItemSpec("pool", seed, image_size, noise, duplicate_rate=duplicate_rate),
                                  n_images, advance):
                i, scene = item["index"], item["scene"]
                img_path = root / image_relpath(i)
                if i % 1000 == 0:
                    img_path.parent.mkdir(parents=True, exist_ok=True)
                # plain writes: no fsync per image; synth.json, written last, marks a finished world
                img_path.write_bytes(item["image"])
                kinds[item["noise_kind"]] += 1
                row = {"url": f"{base}/{image_relpath(i)}", "caption": item["alt_text"], "uid": world_uid(seed, i)}
                rows.append({**row, "true_caption": item["true_caption"], "noise_kind": item["noise_kind"],
                             **{f"true_{k}": v for k, v in scene.to_dict().items()}})
                if duplicate_rate > 0:  # ground truth of the planted duplicates
                    dup = item.get("duplicate_of")
                    rows[-1]["duplicate_of"] = None if dup is None else world_uid(seed, dup)
                    rows[-1]["duplicate_kind"] = item.get("duplicate_kind")
                    dup_kinds[item.get("duplicate_kind") or "original"] += 1
                # only what a web crawl gives (uid, url, alt-text): the truth stays in urls.parquet
                yield {"key": f"pool{i:06d}", "image": item["image"], "caption": item["alt_text"], "meta": row}

        if pool_shards:
            write_training_shards(root / "pool", pool_items(), shard_size=shard_size,
                                  source="capcurate synth: the pool as webdataset shards, for capcurate ingest")
        else:
            for _ in pool_items():
                pass
        _write_urls(root / "urls.parquet", rows, duplicates=duplicate_rate > 0)
        write_training_shards(root / "seed", (
            {"key": f"seed{it['index']:06d}", "image": it["image"], "caption": it["true_caption"],
             "meta": {"uid": f"seed{it['index']:06d}", "caption_source": "true", **it["scene"].to_dict()}}
            for it in _generate(pool, ItemSpec("seed", seed, image_size, None), seed_size, advance)),
            shard_size=shard_size, source="capcurate synth: seed split with true captions")
        names = class_names()
        n_eval_shards = write_eval_set(root / "eval", (
            {"key": f"eval{it['index']:06d}", "image": it["image"], "caption": it["true_caption"],
             "cls": names.index(it["scene"].class_name)}
            for it in _generate(pool, ItemSpec("eval", seed, image_size, None, len(names)), eval_size, advance)),
            classnames=names, templates=ZEROSHOT_TEMPLATES, shard_size=shard_size)
        write_retrieval_view(root / "eval", root / "eval_retrieval")
    if contact_sheet:
        from ..world.contact_sheet import contact_sheet as write_sheet

        # the first seed-split images: exactly those in seed/ (each item is its own random stream)
        write_sheet(make_items((ItemSpec("seed", seed, image_size, None), 0, CONTACT_SHEET_IMAGES)),
                    root / CONTACT_SHEET)

    params = {"n_images": n_images, "image_size": image_size, "noise_profile": noise_profile,
              "noise_rates": noise.to_dict(), "seed": seed, "base_url": base, "seed_size": seed_size,
              "eval_size": eval_size, "shard_size": shard_size, "context_length": context_length}
    if duplicate_rate > 0:
        params["duplicate_rate"] = duplicate_rate
    atomic.write_json(root / SYNTH_CARD, {"format": "capworld/1", "parameters": params, "vocab_size": vocab_size,
                                          "noise_kind_counts": {k: kinds[k] for k in KINDS},
                                          "classes": len(names)})
    return Summary(
        stage="synth",
        counts={"pool images": n_images, "seed images": seed_size, "eval images": eval_size,
                "eval classes": len(names), "eval shards": n_eval_shards, "vocab size": vocab_size,
                **{f"alt-text {k}": kinds[k] for k in KINDS},
                **{f"duplicates {k}": dup_kinds[k] for k in DUPLICATE_KINDS if duplicate_rate > 0}},
        details={"out": str(root), "noise rates": noise.to_dict(), "urls": str(root / "urls.parquet"),
                 "tiny_clip": str(root / "models" / "tiny_clip.json"),
                 "tiny_coca": str(root / "models" / "tiny_coca.json"), "workers": workers,
                 **({"contact_sheet": str(root / CONTACT_SHEET)} if contact_sheet else {}),
                 **({"pool_shards": str(root / "pool")} if pool_shards else {})},
        seconds=time.time() - t0,
        message=f"CapWorld: {n_images:,} pool + {seed_size:,} seed + {eval_size:,} eval images in {root}",
    )


def _claim(root: Path, overwrite: bool) -> None:
    """Refuse to write over an earlier world (or anything else) unless asked to."""
    import shutil

    present = [p for p in OUTPUTS if (root / p).exists()]
    if present and not overwrite:
        raise OutputExistsError(f"{root} already holds a world ({', '.join(present)}); pass --overwrite to replace it")
    for p in present:
        target = root / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    root.mkdir(parents=True, exist_ok=True)


def _generate(pool: Any, spec: ItemSpec, n: int, advance: Any) -> Iterator[dict[str, Any]]:
    tasks = [(spec, s, min(n, s + CHUNK)) for s in range(0, n, CHUNK)]
    for items in pool.imap(make_items, tasks):  # imap keeps task order: output order is index order
        yield from items
        advance(len(items))


def _write_urls(path: Path, rows: list[dict[str, Any]], *, duplicates: bool = False) -> None:
    import pyarrow as pa

    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("uid", pa.string()),
                        ("true_caption", pa.string()), ("noise_kind", pa.string()),
                        ("true_shape", pa.string()), ("true_colour", pa.string()), ("true_size", pa.string()),
                        ("true_position", pa.string()), ("true_count", pa.int32()),
                        ("true_background", pa.string()), ("true_tone", pa.string())]
                       + ([("duplicate_of", pa.string()), ("duplicate_kind", pa.string())] if duplicates else []))
    atomic.write_parquet(path, pa.Table.from_pylist(rows, schema=schema))


class _InProcess:
    """A stand-in for a process pool when --workers 1 (also what the benchmark's baseline uses)."""

    def imap(self, fn: Any, tasks: list[Any]) -> Iterator[Any]:
        return map(fn, tasks)

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
