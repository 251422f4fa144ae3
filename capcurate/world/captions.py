"""True captions: the scene's attributes written out by one of several templates.

These are what a careful human annotator would write; the seed split trains the captioner and the
scorer on them, and the eval set's retrieval texts use the fixed, complete ``EVAL_TEMPLATE``.
"""

from __future__ import annotations

import random

from .scene import COUNT_WORDS, Scene, plural

POSITION_PHRASES = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
    "center": "in the center",
}

# fields: {n} count words ("a"/"two"), {size}, {colour}, {obj} shape in singular/plural,
# {where} position phrase, {bg} background kind, {tone} background tone, {be} is/are
TEMPLATES = (
    "{n} {size} {colour} {obj} {where}",
    "{n} {size} {colour} {obj} {where} on a {bg} {tone} background",
    "a picture of {n} {size} {colour} {obj} {where}",
    "there {be} {n} {size} {colour} {obj} {where} of the image",
    "{n} {colour} {obj} {where} , {size} , on a {bg} background",
    "a {bg} {tone} background with {n} {size} {colour} {obj} {where}",
)
EVAL_TEMPLATE = TEMPLATES[1]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fields(scene: Scene) -> dict[str, str]:
    return {
        "n": "a" if scene.count == 1 else COUNT_WORDS[scene.count],
        "size": scene.size, "colour": scene.colour, "obj": plural(scene.shape, scene.count),
        "where": POSITION_PHRASES[scene.position], "bg": scene.background, "tone": scene.tone,
        "be": "is" if scene.count == 1 else "are",
    }


def render_template(template: str, scene: Scene) -> str:
    text = template.format(**fields(scene))
    # "a" before a vowel-initial word that a template put right after it ("a orange circle")
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an"):
            words[i] = _article(words[i + 1])
    return " ".join(words).replace(" ,", ",")


def true_caption(scene: Scene, rng: random.Random) -> str:
    """One true caption of ``scene`` from a template chosen with ``rng``."""
    return render_template(rng.choice(TEMPLATES), scene)


def eval_caption(scene: Scene) -> str:
    """The complete caption used as the eval set's retrieval text (every attribute, fixed wording)."""
    return render_template(EVAL_TEMPLATE, scene)
