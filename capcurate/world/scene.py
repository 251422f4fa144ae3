"""What a CapWorld image contains: the attributes and how one scene is drawn at random from them.

Every image shows ``count`` copies of one object (shape + colour) of one size, placed in one
region of the image, over a textured background. The attributes are the ground truth that the
true caption, the noisy alt-text and the eval labels are all derived from.

Every value must be perceptible at the size the models see (64 px by default; ``probe.py`` measures
it): six shapes that stay distinct at 15 px (hexagon and diamond were dropped: at the old sizes they
read as circle and square), and one or two objects (three did not fit into one region at a size
whose shape can be seen).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
PLURALS = {"cross": "crosses"}

# saturated object colours; backgrounds use muted tones so every object stays visible
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (35, 165, 50), "blue": (35, 70, 215), "yellow": (240, 215, 35),
    "purple": (140, 50, 185), "orange": (250, 135, 20), "white": (245, 245, 245), "black": (20, 20, 20),
}
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
COUNTS = (1, 2)
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}  # "three" stays in the vocabulary for users' prompts
BACKGROUNDS = ("plain", "gradient", "striped", "dotted", "textured")
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128), "beige": (205, 190, 160), "slate": (95, 105, 125),
    "olive": (125, 125, 85), "pink": (215, 170, 180), "sky": (150, 190, 220),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    position: str
    count: int
    background: str
    tone: str

    @property
    def class_name(self) -> str:
        """The zero-shot class: '<colour> <shape>'."""
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def plural(shape: str, count: int) -> str:
    if count == 1:
        return shape
    return PLURALS.get(shape, shape + "s")


def class_names() -> list[str]:
    """All zero-shot classes in a fixed order (the class index is the position in this list)."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def sample_scene(rng: random.Random, class_index: int | None = None) -> Scene:
    """Draw a scene uniformly; ``class_index`` pins colour and shape (balanced eval sets)."""
    if class_index is None:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    else:
        colour, shape = class_names()[class_index].split(" ")
    return Scene(
        shape=shape, colour=colour, size=rng.choice(SIZES), position=rng.choice(POSITIONS),
        count=rng.choice(COUNTS), background=rng.choice(BACKGROUNDS), tone=rng.choice(list(BACKGROUND_TONES)),
    )
