"""Paths a job carries to other processes: made absolute on the driver, URLs kept as they are.

A Ray actor does not run in the driver's working directory (on another node that directory may not
exist at all), so ``--model ./m`` or a relative dataset path would point nowhere there. The driver turns
every local path that exists here into an absolute one before the job is shipped; a URL (``s3://...``)
means the same everywhere and is left alone. A cluster of several machines still needs the absolute path
on a filesystem they share, or the dataset and models in object storage (docs/storage.md).
"""

from __future__ import annotations

import os
from typing import Any

from .. import storage

_MODEL_PREFIXES = ("hf:", "openclip:")


def cluster_path(p: Any) -> Any:
    """``p`` as every process can use it: a URL unchanged, a local path absolute (None stays None)."""
    if p is None or storage.is_remote(p):
        return p
    text = str(p)
    if "://" in text and not text.startswith("file://"):
        return p
    absolute = os.path.abspath(storage.path(text))
    return absolute if isinstance(p, str) else type(p)(absolute)


def cluster_model_ref(ref: str | None) -> str | None:
    """A model reference with its local folder or file made absolute: ``hf:./m`` -> ``hf:/abs/m``,
    ``openclip:cfg.json`` -> ``openclip:/abs/cfg.json``, ``./run`` -> ``/abs/run``. Hub ids, architecture
    names (``openclip:ViT-B-32/openai``) and URLs are not local paths and stay as typed."""
    if not ref:
        return ref
    prefix = next((p for p in _MODEL_PREFIXES if ref.startswith(p)), "")
    rest = ref[len(prefix):]
    if "://" in rest or not os.path.exists(rest):
        return ref
    return prefix + os.path.abspath(rest)


def cluster_file(p: str | None) -> str | None:
    """An optional file argument (``--pretrained weights.pt`` or a tag): absolute when it exists here."""
    if not p or "://" in p or not os.path.exists(p):
        return p
    return os.path.abspath(p)
