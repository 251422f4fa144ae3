"""``--compile``: torch.compile the image tower, the one part of a captioner or scorer with fixed shapes.

Generation loops and text encoders see a new sequence length at every step or batch, so compiling
them recompiles often; an image tower sees [batch, 3, H, W] for every full batch (one more graph for a
shorter last batch). Compilation costs tens of seconds up front, so it pays on large runs only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

# where each family keeps its image tower: open_clip, transformers BLIP/CLIP/SigLIP, BLIP-2/LLaVA-style
_TOWERS = ("visual", "vision_model", "vision_tower", "vision_encoder")


def _towers(model: torch.nn.Module | None) -> Iterator[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(owner, attribute, module) of each image-tower slot that holds a module; transformers wrappers may
    keep the tower one level down (model.model.vision_tower)."""
    for owner in (model, getattr(model, "model", None)):
        if owner is None:
            continue
        for name in _TOWERS:
            tower = getattr(owner, name, None)
            if isinstance(tower, torch.nn.Module):
                yield owner, name, tower


def compile_image_tower(model: torch.nn.Module) -> str | None:
    """Replace the model's image tower by ``torch.compile(tower)``; returns its attribute name or None."""
    for owner, name, tower in _towers(model):
        setattr(owner, name, torch.compile(tower, dynamic=False))
        return name
    return None


@contextmanager
def eager(model: torch.nn.Module | None) -> Iterator[None]:
    """The compiled image tower swapped for its original module for a while: a batch-size search tries a
    dozen sizes, and each would compile again (past torch's recompile limit the real batch runs eager)."""
    swapped = []
    for owner, name, tower in list(_towers(model)):
        original = getattr(tower, "_orig_mod", None)
        if isinstance(original, torch.nn.Module):
            setattr(owner, name, original)
            swapped.append((owner, name, tower))
    try:
        yield
    finally:
        for owner, name, tower in swapped:
            setattr(owner, name, tower)
