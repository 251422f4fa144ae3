"""Which shards a training run reads: a directory, a brace pattern, or the manifest.json / sizes.json
that ``capcurate shard`` and open_clip write, with their sample counts and caption recipe."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..shards import IMAGE_EXTS, index_tar

TEXT_EXTS = ("txt", "text", "caption")


@dataclass
class ShardList:
    urls: list[str]
    num_samples: int | None  # from manifest.json / sizes.json, or counted, or None for remote URLs
    source: str              # how the list was found, for the run record
    caption_recipe: dict[str, Any] | None = None  # manifest.json's {"keys": [...], "probs": [...] | None}


def resolve_shards(spec: str) -> ShardList:
    """A brace pattern, a directory of .tar files, or a manifest.json / sizes.json from ``capcurate shard``."""
    import webdataset as wds

    p = Path(spec)
    if p.is_file() and p.suffix == ".json":
        return _from_json(p)
    if p.is_dir():
        for name in ("manifest.json", "sizes.json"):
            if (p / name).is_file():
                return _from_json(p / name)
        tars = sorted(str(t) for t in p.glob("*.tar"))
        if not tars:
            raise InputError(f"{p} holds no .tar shards (and no manifest.json or sizes.json)")
        return ShardList(tars, None, "directory")
    urls = wds.shardlists.expand_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise InputError(
            f"training data {spec!r}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]}); "
            "expected a shard directory, a manifest.json, or a brace pattern like 'shards/{00000..00009}.tar'"
        )
    return ShardList(list(urls), None, "pattern")


def _from_json(path: Path) -> ShardList:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    recipe = None
    if isinstance(obj, dict) and "shards" in obj:  # capcurate shard's manifest.json
        names = [(s["name"], int(s["samples"])) for s in obj["shards"]]
        recipe = obj.get("captions")
    elif isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):  # open_clip sizes.json
        names = list(obj.items())
    else:
        raise InputError(f"{path}: expected capcurate's manifest.json ({{'shards': [...]}}) or sizes.json")
    urls = [str(path.parent / n) for n, _ in names]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise InputError(f"{path} lists {len(missing)} shards that do not exist (first: {missing[0]})")
    return ShardList(urls, sum(n for _, n in names), path.name, recipe)


def count_samples(urls: list[str]) -> int:
    """Samples with an image, counted from tar headers (no decoding); local shards only."""
    total = 0
    for u in urls:
        idx = index_tar(u)
        total += sum(1 for k in idx.samples if idx.image_ext(k))
    return total


def check_members(url: str, probe: int = 16) -> None:
    """Fail early, with the members found, when a shard has no image or no text members."""
    if "://" in url or url.startswith("pipe:"):
        return
    idx = index_tar(url)
    keys = list(idx.samples)[:probe]
    found = sorted({e for k in keys for e in idx.samples[k]})
    if not keys:
        raise InputError(f"shard {url} holds no samples")
    if not any(e in found for e in IMAGE_EXTS):
        raise InputError(f"shard {url} has no image members ({'/'.join(IMAGE_EXTS)}); found extensions: "
                         f"{', '.join(found) or 'none'} (keys e.g. {', '.join(keys[:3])})")
    if not any(e in found for e in TEXT_EXTS):
        raise InputError(f"shard {url} has no text members (.txt); found extensions: {', '.join(found)} "
                         f"(keys e.g. {', '.join(keys[:3])}); training needs a caption per image")
