"""Whether a stage's read of a shard's tar showed the tar damaged (missing, zeroed, cut off).

The image stream reports a per-image reason; a tar that lacks images its manifest counts as successes is
not a property of those images but of the tar, so the shard fails (exit 1, as docs/score.md says) instead
of being written with NULL rows that would look finished.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import StageFailed

# the reasons capcurate.inputs.stream gives when the tar, not the image, is the problem
DAMAGE_PREFIXES = ("shard unreadable", "no image member in shard")


def check_tar_read(tar: str, reasons: Iterable[str | None]) -> None:
    """Raise StageFailed when any image of the shard failed because its tar is damaged."""
    damaged = [r for r in reasons if r and r.startswith(DAMAGE_PREFIXES)]
    if damaged:
        raise StageFailed(f"{tar} is damaged ({len(damaged)} image(s): {damaged[0]}); "
                          "run capcurate doctor --repair and re-fetch the shard, then run again")
