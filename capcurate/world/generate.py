"""One CapWorld item from (seed, split, index): its scene, captions and image bytes.

Each item has its own random stream, seeded by the string ``"{seed}:{split}:{index}"`` (Python seeds
``random.Random`` from a string through SHA-512), so items can be made in any order, on any number
of processes, and come out byte-identical.
"""

from __future__ import annotations

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


def make_item(spec: ItemSpec, index: int) -> dict[str, Any]:
    rng = random.Random(f"{spec.seed}:{spec.split}:{index}")
    scene = sample_scene(rng, class_index=index % spec.n_classes if spec.n_classes else None)
    item: dict[str, Any] = {"index": index, "scene": scene, "true_caption": true_caption(scene, rng)}
    if spec.split == "eval":
        item["true_caption"] = eval_caption(scene)
    if spec.rates is not None:
        item["alt_text"], item["noise_kind"] = alt_text(scene, spec.rates, rng)
    item["image"] = render_scene(scene, spec.image_size, rng)
    return item


def make_items(args: tuple[ItemSpec, int, int]) -> list[dict[str, Any]]:
    """Items ``start..stop-1``: the unit of work a worker process gets."""
    spec, start, stop = args
    return [make_item(spec, i) for i in range(start, stop)]
