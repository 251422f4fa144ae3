"""The stable sample id every stage joins on."""

from __future__ import annotations

import hashlib


def make_uid(url: str | None, caption: str | None) -> str:
    """Hash of (url, caption): stable across runs and machines, 32 hex characters.

    Used only when the input has no uid column of its own (DataComp pools do).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update((url or "").encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update((caption or "").encode("utf-8", "surrogatepass"))
    return h.hexdigest()
