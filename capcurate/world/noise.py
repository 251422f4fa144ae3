"""The web alt-text noise model: how a raw caption is made from a scene's truth.

Each image's alt-text is drawn from one of five kinds, with rates that sum to 1:

- ``correct``: a true caption (every attribute right);
- ``partial``: true but incomplete ("red circles", "two stars", "a small shape on the left");
- ``wrong_attribute``: the right object with one wrong attribute (colour, size, position or count);
- ``wrong_object``: the wrong shape (the rest right), as when alt-text describes another picture;
- ``boilerplate``: nothing about the image: file names ("IMG_4021.jpg"), "click to enlarge", shop text.

Independently, a non-boilerplate alt-text is ``decorated`` with probability ``decorate``: a file name
or shop text is put before or after it ("red circle - free shipping"), as web pages do.
Rates are fixed per profile (``PROFILES``); options override single rates and the profile's other
rates are rescaled to fill what is left, so they still sum to 1.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, fields, replace

from ..errors import InputError
from .captions import POSITION_PHRASES, render_template, true_caption
from .scene import COLOURS, COUNTS, POSITIONS, SHAPES, SIZES, Scene

KINDS = ("correct", "partial", "wrong_attribute", "wrong_object", "boilerplate")

PARTIAL_TEMPLATES = (
    "{colour} {obj}", "{n} {obj}", "{size} {obj} {where}", "{colour} shapes", "{obj}",
    "{n} {colour} {obj}", "{obj} on a {bg} background", "{size} {colour} shape",
)
BOILERPLATE_PHRASES = (
    "click to enlarge", "click here to view full size", "thumbnail", "image not available",
    "buy now free shipping", "add to cart", "best price guaranteed", "new arrivals", "in stock",
    "sale up to 50 % off", "untitled", "no description", "stock photo", "logo", "banner",
    "home page header", "see more photos", "product image", "view gallery", "share on social media",
)
SHOP_SUFFIXES = ("free shipping", "buy now", "best price", "on sale", "shop online", "click to enlarge")
FILE_PREFIXES = ("IMG_", "DSC", "image", "photo-", "pic_", "scan")
FILE_EXTS = ("jpg", "JPG", "jpeg", "png", "webp")


@dataclass(frozen=True)
class NoiseRates:
    correct: float
    partial: float
    wrong_attribute: float
    wrong_object: float
    boilerplate: float
    decorate: float = 0.0

    def kind_rates(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KINDS}

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


PROFILES: dict[str, NoiseRates] = {
    # roughly what LAION/DataComp-style pools look like: a minority of alt-texts describe the image
    "web": NoiseRates(correct=0.15, partial=0.25, wrong_attribute=0.15, wrong_object=0.1, boilerplate=0.35,
                      decorate=0.3),
    "noisy": NoiseRates(correct=0.05, partial=0.15, wrong_attribute=0.2, wrong_object=0.15, boilerplate=0.45,
                        decorate=0.4),
    "mild": NoiseRates(correct=0.5, partial=0.3, wrong_attribute=0.05, wrong_object=0.05, boilerplate=0.1,
                       decorate=0.1),
    "clean": NoiseRates(correct=1.0, partial=0.0, wrong_attribute=0.0, wrong_object=0.0, boilerplate=0.0),
}


def resolve_rates(profile: str, overrides: dict[str, float | None] | None = None) -> NoiseRates:
    """The profile's rates with ``overrides`` applied; unset kinds are rescaled so all sum to 1."""
    if profile not in PROFILES:
        raise InputError(f"unknown noise profile {profile!r}; expected one of {', '.join(PROFILES)}")
    base = PROFILES[profile]
    given = {k: float(v) for k, v in (overrides or {}).items() if v is not None}
    valid = {f.name for f in fields(NoiseRates)}
    for k, v in given.items():
        if k not in valid:
            raise InputError(f"unknown noise rate {k!r}; expected one of {', '.join(sorted(valid))}")
        if not 0.0 <= v <= 1.0:
            raise InputError(f"noise rate {k} must be between 0 and 1, got {v}")
    rates = replace(base, **given)
    fixed = sum(v for k, v in given.items() if k in KINDS)
    if fixed > 1.0 + 1e-9:
        listed = ", ".join(f"{k}={v:g}" for k, v in given.items() if k in KINDS)
        raise InputError(f"noise rates {listed} sum to {fixed:g}, more than 1")
    free = [k for k in KINDS if k not in given]
    free_total = sum(getattr(base, k) for k in free)
    if free:
        # keep the profile's proportions among the kinds the user did not set
        share = {k: getattr(base, k) / free_total if free_total > 0 else 1.0 / len(free) for k in free}
        rates = replace(rates, **{k: (1.0 - fixed) * share[k] for k in free})
    total = sum(rates.kind_rates().values())
    if abs(total - 1.0) > 1e-6:
        raise InputError(f"noise rates must sum to 1, got {total:g} ({rates.kind_rates()})")
    return rates


def file_name(rng: random.Random) -> str:
    return f"{rng.choice(FILE_PREFIXES)}{rng.randrange(10000):04d}.{rng.choice(FILE_EXTS)}"


def boilerplate(rng: random.Random) -> str:
    return file_name(rng) if rng.random() < 0.4 else rng.choice(BOILERPLATE_PHRASES)


def _other(values: tuple, current: object, rng: random.Random) -> object:
    return rng.choice([v for v in values if v != current])


def wrong_attribute(scene: Scene, rng: random.Random) -> Scene:
    attr = rng.choice(("colour", "size", "position", "count"))
    values = {"colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS, "count": COUNTS}[attr]
    return replace(scene, **{attr: _other(values, getattr(scene, attr), rng)})


def alt_text(scene: Scene, rates: NoiseRates, rng: random.Random) -> tuple[str, str]:
    """A web alt-text for ``scene`` and the noise kind it was drawn from."""
    kind = rng.choices(KINDS, weights=[rates.kind_rates()[k] for k in KINDS])[0]
    if kind == "boilerplate":
        return boilerplate(rng), kind
    if kind == "correct":
        text = true_caption(scene, rng)
    elif kind == "partial":
        text = render_template(rng.choice(PARTIAL_TEMPLATES), scene)
    elif kind == "wrong_attribute":
        text = true_caption(wrong_attribute(scene, rng), rng)
    else:
        text = true_caption(replace(scene, shape=_other(SHAPES, scene.shape, rng)), rng)
    if rng.random() < rates.decorate:
        extra = file_name(rng) if rng.random() < 0.4 else rng.choice(SHOP_SUFFIXES)
        text = f"{extra} {text}" if rng.random() < 0.3 else f"{text} - {extra}"
    return text, kind


__all__ = ["KINDS", "PROFILES", "NoiseRates", "POSITION_PHRASES", "alt_text", "resolve_rates"]
