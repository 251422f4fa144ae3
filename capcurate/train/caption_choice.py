"""Caption choice at train time: which ``.json`` caption a sample trains on, drawn with given
probabilities by a hash of (seed, epoch, shard, key), so every worker and rank draws the same."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .shard_list import ShardList, first_json_keys


@dataclass(frozen=True)
class CaptionChoice:
    """Which ``.json`` caption a sample trains on: ``keys`` drawn with probabilities ``probs``."""

    keys: tuple[str, ...]
    probs: tuple[float, ...]

    def pick(self, meta: dict[str, Any], u: float) -> tuple[str, str] | None:
        """(key, caption) for a uniform ``u`` in [0, 1), among the keys this sample has; None if none."""
        have = [(k, p) for k, p in zip(self.keys, self.probs, strict=True)
                if p > 0 and isinstance(meta.get(k), str) and meta[k].strip()]
        if not have:
            return None
        target = u * sum(p for _, p in have)
        for k, p in have:
            target -= p
            if target < 0:
                return k, meta[k].strip()
        k = have[-1][0]
        return k, meta[k].strip()

    def to_dict(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "probs": list(self.probs)}


def parse_caption_choice(keys: str | list[str] | None, probs: str | list[float] | None) -> CaptionChoice | None:
    """``"raw,blip"`` and ``"0.2,0.8"`` (default: equal) -> CaptionChoice; one-line InputErrors."""
    if keys is None or keys == "" or keys == []:
        if probs not in (None, "", []):
            raise InputError("--caption-probs needs --caption-keys (the .json keys they weigh)")
        return None
    names = [k.strip() for k in keys.split(",")] if isinstance(keys, str) else [str(k) for k in keys]
    if any(not k for k in names) or len(set(names)) != len(names):
        raise InputError(f"--caption-keys must be distinct non-empty names, got {keys!r}")
    if probs in (None, "", []):
        values = [1.0 / len(names)] * len(names)
    else:
        try:
            values = [float(x) for x in probs.split(",")] if isinstance(probs, str) else [float(x) for x in probs]
        except ValueError:
            raise InputError(f"--caption-probs must be comma-separated numbers, got {probs!r}") from None
    if len(values) != len(names):
        raise InputError(f"--caption-probs has {len(values)} values for {len(names)} --caption-keys")
    if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise InputError(f"--caption-probs must be non-negative and sum to 1, got {values}")
    return CaptionChoice(tuple(names), tuple(values))


def caption_choice(cfg: Any, shards: ShardList) -> CaptionChoice | None:
    """The run's choice: --caption-keys/--caption-probs, else the recipe the shards carry, else None (.txt)."""
    if cfg.caption_keys:
        choice = parse_caption_choice(cfg.caption_keys, cfg.caption_probs)
        check_keys_recorded(choice, shards)
        return choice
    if cfg.caption_probs:
        raise InputError("--caption-probs needs --caption-keys (the .json keys they weigh)")
    recipe = shards.caption_recipe
    if recipe and recipe.get("keys"):
        return parse_caption_choice(list(recipe["keys"]), recipe.get("probs"))
    return None


def check_keys_recorded(choice: CaptionChoice, shards: ShardList) -> None:
    """Refuse --caption-keys the shards do not hold (a typo would otherwise train on the other keys, or
    on .txt, while run.json records the typo): against manifest.json's recorded keys, or where nothing
    records them, against the first sample's .json."""
    recorded = shards.caption_keys
    where = "manifest.json records"
    if recorded is None:
        recorded = first_json_keys(shards.urls[0])
        where = f"the first sample's .json in {shards.urls[0].rstrip('/').rsplit('/', 1)[-1]} holds"
        if recorded is None:
            return  # an http(s)/pipe: stream or a damaged head: nothing to check against here
        if not recorded:
            raise InputError(f"--caption-keys {','.join(choice.keys)}: the shards hold no .json captions "
                             f"(first shard: {shards.urls[0]}); drop --caption-keys to train on .txt")
    if not recorded:
        raise InputError(f"--caption-keys {','.join(choice.keys)}: these shards were written without "
                         "`capcurate shard --captions`, so they hold no caption keys; drop --caption-keys to "
                         "train on .txt, or reshard with --captions")
    unknown = [k for k in choice.keys if k not in recorded]
    if unknown:
        raise InputError(f"--caption-keys {unknown[0]!r} is not a caption key of these shards; "
                         f"{where}: {', '.join(recorded)}")


def caption_uniform(*parts: Any) -> float:
    """A uniform number in [0, 1) from the parts alone (64 bits of BLAKE2b)."""
    import hashlib

    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64
