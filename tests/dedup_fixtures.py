"""A near-duplicate test set: varied originals and their edited copies, with the truth of which is which.

Originals: the photographs scikit-image ships (``skimage.data``: faces, animals, text, textures, a star
field, medical images), tiles cut from its two largest, and drawn scenes in the style of CapWorld (a few
shapes on a plain background), each layout drawn in three colourings: the colourings are look-alikes
(same luminance layout, other colours), different images that a near-duplicate finder must keep apart.

Copies of every original: resized (0.5x, 0.8x, 1.5x), re-encoded (JPEG quality 60 and 75), cropped 5%
(5% of each side's length removed, split at random between the two edges; twice per original), and
brightness scaled by 0.7, 0.85, 1.15 and 1.3 (+-15% and +-30%), each saved as JPEG quality 90.

Used by tests/test_dedup_near.py and benchmarks/dedup.py.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

EDITS = ("resize0.5", "resize0.8", "resize1.5", "jpeg60", "jpeg75", "crop5a", "crop5b",
         "bright0.7", "bright0.85", "bright1.15", "bright1.3")
PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass", "gravel",
          "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text",
          "cell", "microaneurysms", "horse", "shepp_logan_phantom", "stereo_motorcycle")
MAX_SIDE = 512
PALETTES = (  # (background, shape colours...) per colouring; the three share no colour
    ((30, 60, 160), (220, 40, 40), (250, 220, 40), (240, 240, 240)),
    ((120, 120, 120), (40, 180, 60), (60, 200, 230), (20, 20, 20)),
    ((200, 170, 120), (120, 40, 160), (230, 120, 30), (40, 90, 40)),
)


@dataclass
class Item:
    name: str          # "<original>" or "<original>/<edit>"
    source: str        # the original it is made from; look-alikes have different sources
    edit: str | None
    data: bytes        # encoded image


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(img, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _as_rgb(x: np.ndarray) -> np.ndarray:
    if x.dtype == bool:
        x = x.astype(np.uint8) * 255
    elif x.dtype != np.uint8:
        x = (255 * (x - x.min()) / max(1e-9, float(x.max() - x.min()))).astype(np.uint8)
    if x.ndim == 2:
        x = np.repeat(x[:, :, None], 3, axis=2)
    return np.ascontiguousarray(x[:, :, :3])


def photos() -> dict[str, np.ndarray]:
    """skimage's photographs (RGB uint8), plus 2 x 2 tiles of the two largest (distinct images that share
    texture and exposure: hard negatives)."""
    import skimage.data as data
    from PIL import Image

    out = {}
    for name in PHOTOS:
        x = getattr(data, name)()
        out[name] = _as_rgb(x[0] if isinstance(x, tuple) else x)
    for name in ("retina", "hubble_deep_field"):
        x = out[name]
        h, w = x.shape[0] // 2, x.shape[1] // 2
        for i in range(2):
            for j in range(2):
                out[f"{name}_tile{i}{j}"] = np.ascontiguousarray(x[i * h:(i + 1) * h, j * w:(j + 1) * w])
    for name, x in out.items():  # at most MAX_SIDE pixels a side: the set is built in seconds
        if max(x.shape[:2]) > MAX_SIDE:
            f = MAX_SIDE / max(x.shape[:2])
            out[name] = np.asarray(Image.fromarray(x).resize((round(x.shape[1] * f), round(x.shape[0] * f)),
                                                             Image.LANCZOS))
    return out


def drawn(layouts: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """``layouts`` scenes of 2-4 large shapes, each in every colouring of ``PALETTES``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = {}
    for k in range(layouts):
        w, h = int(rng.integers(320, 640)), int(rng.integers(240, 480))
        shapes = []
        for _ in range(int(rng.integers(2, 5))):
            s = int(rng.integers(min(w, h) // 5, min(w, h) // 2))
            x, y = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
            shapes.append((int(rng.integers(0, 3)), (x, y, x + s, y + s)))
        for c, palette in enumerate(PALETTES):
            img = Image.new("RGB", (w, h), palette[0])
            d = ImageDraw.Draw(img)
            for n, (kind, box) in enumerate(shapes):
                colour = palette[1 + n % 3]
                if kind == 0:
                    d.rectangle(box, fill=colour)
                elif kind == 1:
                    d.ellipse(box, fill=colour)
                else:
                    d.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
            out[f"drawn{k}_c{c}"] = np.asarray(img)
    return out


def edit(rgb: np.ndarray, how: str, rng: np.random.Generator) -> bytes:
    """One edited copy of ``rgb`` (see the module docstring), encoded."""
    from PIL import Image, ImageEnhance

    img = Image.fromarray(rgb)
    w, h = img.size
    if how.startswith("resize"):
        f = float(how[6:])
        return _jpeg(img.resize((max(8, round(w * f)), max(8, round(h * f))), Image.LANCZOS))
    if how.startswith("jpeg"):
        return _jpeg(img, int(how[4:]))
    if how.startswith("crop"):
        dx, dy = round(0.05 * w), round(0.05 * h)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        return _jpeg(img.crop((left, top, w - (dx - left), h - (dy - top))))
    if how.startswith("bright"):
        return _jpeg(ImageEnhance.Brightness(img).enhance(float(how[6:])))
    raise ValueError(how)


def near_duplicate_set(seed: int = 0, edits: tuple[str, ...] = EDITS, layouts: int = 10) -> list[Item]:
    """Every original (PNG, as drawn or shipped) followed by its edited copies."""
    rng = np.random.default_rng(seed)
    items = []
    for name, rgb in {**photos(), **drawn(layouts, seed)}.items():
        items.append(Item(name, name, None, _png(rgb)))
        items += [Item(f"{name}/{e}", name, e, edit(rgb, e, rng)) for e in edits]
    return items


def score_pairs(items: list[Item], i: np.ndarray, j: np.ndarray) -> dict[str, float]:
    """Pair-level precision (found pairs of one source / found pairs) and recall per edit (of each copy,
    is it paired with its original or with another copy of it)."""
    i, j = np.asarray(i), np.asarray(j)
    same = np.array([items[a].source == items[b].source for a, b in zip(i, j, strict=True)], bool)
    out: dict[str, float] = {"pairs": float(len(i)), "precision": float(same.mean()) if len(i) else 1.0}
    linked = np.zeros(len(items), bool)
    linked[i[same]] = linked[j[same]] = True
    for e in sorted({it.edit for it in items if it.edit}):
        rows = [k for k, it in enumerate(items) if it.edit == e]
        out[f"recall {e}"] = float(linked[rows].mean())
    rows = [k for k, it in enumerate(items) if it.edit]
    out["recall"] = float(linked[rows].mean())
    return out
