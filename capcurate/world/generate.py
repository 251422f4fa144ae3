"""One CapWorld item from (seed, split, index): its scene, captions and image bytes.

Each item has its own random stream, seeded by the string ``"{seed}:{split}:{index}"`` (Python seeds
``random.Random`` from a string through SHA-512), so items can be made in any order, on any number
of processes, and come out byte-identical.

With a ``duplicate_rate``, a pool item is, with that probability, a copy of an earlier original item
(its own stream ``"{seed}:{split}:dup:{index}"`` decides whether, of which and how): ``exact`` (the same
bytes), ``near`` (the same pixels resized and re-encoded at another JPEG quality) or ``semantic`` (the
same scene drawn again: new positions, jitter and noise). The copy gets its own alt-text.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from typing import Any

from .captions import eval_caption, true_caption
from .noise import NoiseRates, alt_text
from .render import render_scene
from .scene import sample_scene


@dataclass(frozen=True)
class ItemSpec:
    split: str                 # "pool" | "seed" | "eval"
    seed: int
    image_size: int
    rates: NoiseRates | None   # pool only: the alt-text noise model
    n_classes: int = 0         # eval only: balance classes by cycling through them
    duplicate_rate: float = 0.0  # pool only: share of items that copy an earlier item


DUPLICATE_KINDS = ("exact", "near", "semantic")


def duplicate_source(spec: ItemSpec, index: int) -> tuple[int, str] | None:
    """(index of the original, kind) when item ``index`` is a planted duplicate; originals are never copies."""
    if spec.duplicate_rate <= 0 or index == 0:
        return None
    rng = random.Random(f"{spec.seed}:{spec.split}:dup:{index}")
    if rng.random() >= spec.duplicate_rate:
        return None
    j = rng.randrange(index)
    src = duplicate_source(spec, j)
    return (src[0] if src else j), rng.choice(DUPLICATE_KINDS)


def _resized_copy(data: bytes, rng: random.Random) -> bytes:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        side = max(16, round(img.width * rng.choice((0.75, 1.25, 1.5))))
        out = img.convert("RGB").resize((side, side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=rng.randint(60, 85))
    return buf.getvalue()


def make_item(spec: ItemSpec, index: int) -> dict[str, Any]:
    dup = duplicate_source(spec, index)
    if dup is not None:
        return _duplicate_item(spec, index, *dup)
    rng = random.Random(f"{spec.seed}:{spec.split}:{index}")
    scene = sample_scene(rng, class_index=index % spec.n_classes if spec.n_classes else None)
    item: dict[str, Any] = {"index": index, "scene": scene, "true_caption": true_caption(scene, rng)}
    if spec.split == "eval":
        item["true_caption"] = eval_caption(scene)
    if spec.rates is not None:
        item["alt_text"], item["noise_kind"] = alt_text(scene, spec.rates, rng)
    item["image"] = render_scene(scene, spec.image_size, rng)
    return item


def _duplicate_item(spec: ItemSpec, index: int, original: int, kind: str) -> dict[str, Any]:
    orig = make_item(spec, original)
    rng = random.Random(f"{spec.seed}:{spec.split}:{index}")
    scene = orig["scene"]
    item: dict[str, Any] = {"index": index, "scene": scene, "true_caption": orig["true_caption"],
                            "duplicate_of": original, "duplicate_kind": kind}
    if spec.rates is not None:
        item["alt_text"], item["noise_kind"] = alt_text(scene, spec.rates, rng)
    if kind == "exact":
        item["image"] = orig["image"]
    elif kind == "near":
        item["image"] = _resized_copy(orig["image"], rng)
    else:
        item["image"] = render_scene(scene, spec.image_size, rng)
    return item


def make_items(args: tuple[ItemSpec, int, int]) -> list[dict[str, Any]]:
    """Items ``start..stop-1``: the unit of work a worker process gets."""
    spec, start, stop = args
    return [make_item(spec, i) for i in range(start, stop)]
