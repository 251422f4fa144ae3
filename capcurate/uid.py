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


def keep_first(uids: list[str], seen: set[str]) -> list[bool]:
    """Which rows to keep so that every uid appears once: those whose uid is neither in ``seen`` (uids of
    earlier shards) nor on an earlier row. Kept uids are added to ``seen``."""
    mask = []
    for u in uids:
        mask.append(u not in seen)
        seen.add(u)
    return mask
