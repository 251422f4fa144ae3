"""Float comparison for tests that check two runs give the same outputs.

Two runs of one model on the CPU may differ in the last bits (another batch split or thread count picks
another matmul kernel), so rounding both to N places and comparing flips when a value sits on a rounding
boundary. ``Near`` compares within a tolerance instead, and keeps ``==`` on whole trees working.
"""
from __future__ import annotations

import math
from typing import Any

# absolute 1e-5: training shards write scores to 6 decimals, so one run's value on the edge of a
# 6th-decimal step comes out one step (1e-6, plus float error) from the other's
REL, ABS = 1e-5, 1e-5


class Near(float):
    """A float equal to any number within ``REL``/``ABS`` of it."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (int, float)) and math.isclose(self, other, rel_tol=REL, abs_tol=ABS)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = float.__hash__

    def __repr__(self) -> str:
        return f"~{float(self)!r}"


def near(v: Any) -> Any:
    """``v`` with every float in it (lists and dicts walked) made a ``Near``."""
    if isinstance(v, float):
        return Near(v)
    if isinstance(v, list):
        return [near(x) for x in v]
    if isinstance(v, dict):
        return {k: near(x) for k, x in v.items()}
    return v
