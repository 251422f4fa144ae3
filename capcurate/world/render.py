"""Draw a CapWorld scene with PIL: a textured background, then the objects, then light augmentation.

Shapes are drawn at twice the output size and box-downsampled, which anti-aliases edges cheaply.
All randomness comes from the ``random.Random`` passed in, so one (seed, index) gives one image.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw

from .scene import BACKGROUND_TONES, COLOURS, Scene

# Layout, as fractions of the image side. Each position word is a line the object centres sit on: a
# column for left/right, a row for top/bottom/center. Sizes are chosen so that at 64 px a small object
# is 15 px across and a large one 26 px (the old 10 and 19 px left shape unreadable, even to a
# supervised CNN: 25% vs 12.5% chance), and two large objects still fit side by side in their region.
ANCHORS = {  # position -> (axis the objects line up along, the other coordinate)
    "left": ("y", 0.25), "right": ("y", 0.75), "top": ("x", 0.25), "bottom": ("x", 0.75), "center": ("x", 0.5),
}
RADIUS = {"small": 0.12, "large": 0.2}  # object radius as a fraction of the image side
PAIR_OFFSET = {"small": 0.19, "large": 0.24}  # distance of each of two objects from the line's middle
JITTER = 0.03  # random shift of every centre, both ways: small enough that regions never meet
# shapes that turn into another shape when rotated far get only a small tilt
MAX_TILT = {"square": 12, "cross": 12, "circle": 0, "ring": 0}


def render_scene(scene: Scene, size: int, rng: random.Random, *, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Encoded image bytes (JPEG by default) of ``scene`` at ``size`` x ``size`` pixels."""
    big = 2 * size
    canvas = Image.fromarray(_background(scene, big, rng))
    draw = ImageDraw.Draw(canvas)
    colour = _jitter(COLOURS[scene.colour], rng, 18)
    for cx, cy in _centres(scene, rng):
        _draw_shape(draw, scene.shape, cx * big, cy * big, RADIUS[scene.size] * big,
                    rng.uniform(-1, 1) * MAX_TILT.get(scene.shape, 20), colour)
    img = canvas.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.9, 1.1)  # light brightness change
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 3.0, arr.shape)
    out = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    out.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)  # type: ignore[return-value]


def _background(scene: Scene, side: int, rng: random.Random) -> np.ndarray:
    base = np.array(_jitter(BACKGROUND_TONES[scene.tone], rng, 15), dtype=np.float32)
    img = np.broadcast_to(base, (side, side, 3)).copy()
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    kind = scene.background
    if kind == "gradient":
        t = xx if rng.random() < 0.5 else yy
        img *= (0.7 + 0.5 * t)[..., None]
    elif kind == "striped":
        period = rng.uniform(0.1, 0.2)
        t = {0: xx, 1: yy, 2: (xx + yy) / 1.4}[rng.randrange(3)]
        img += (np.floor(t / period * 2) % 2 * rng.choice((-35, 35)))[..., None]
    elif kind == "dotted":
        period = rng.uniform(0.08, 0.14)
        d = np.hypot((xx % period) - period / 2, (yy % period) - period / 2)
        img += ((d < period * 0.22) * 40.0)[..., None]
    elif kind == "textured":
        img += np.random.default_rng(rng.getrandbits(32)).normal(0.0, 18.0, (side, side, 1))
    return np.clip(img, 0, 255).astype(np.uint8)


def _centres(scene: Scene, rng: random.Random) -> list[tuple[float, float]]:
    """Object centres on the scene's line: one in its middle, two either side of it (never overlapping)."""
    axis, other = ANCHORS[scene.position]
    along = [0.5] if scene.count == 1 else [0.5 - PAIR_OFFSET[scene.size], 0.5 + PAIR_OFFSET[scene.size]]
    centres = []
    for t in along[:scene.count]:
        a, o = t + rng.uniform(-JITTER, JITTER), other + rng.uniform(-JITTER, JITTER)
        centres.append((a, o) if axis == "x" else (o, a))
    return centres


def _polygon(cx: float, cy: float, radii: list[float], tilt_deg: float, start_deg: float) -> list[tuple[float, float]]:
    n = len(radii)
    pts = []
    for i, rad in enumerate(radii):
        a = math.radians(start_deg + tilt_deg + 360.0 * i / n)
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, tilt: float,
                colour: tuple[int, int, int]) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, [r * 0.95] * 4, tilt, 45), fill=colour)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, [r] * 3, tilt, -90), fill=colour)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, [r, r * 0.42] * 5, tilt, -90), fill=colour)
    elif shape == "cross":
        w = r * 0.36
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
        a = math.radians(tilt)
        ca, sa = math.cos(a), math.sin(a)
        draw.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts], fill=colour)
    else:  # pragma: no cover - SHAPES and this function change together
        raise ValueError(f"unknown shape {shape!r}")
