"""The ``Captioner`` interface every backend implements, and the decoding settings they share.

A captioner is built once per worker (``load_captioner``), hands its per-image preprocessing to the
DataLoader workers (``preprocess``: PIL image -> tensor, must pickle), and turns a batch of
preprocessed images into ``num_captions`` clean strings per image (``caption``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from ...errors import InputError

DECODINGS = ("greedy", "beam", "nucleus", "topk")
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class DecodingConfig:
    """How captions are decoded; the same knobs for every backend (recorded in lineage)."""

    decoding: str = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    top_k: int = 50
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    max_new_tokens: int = 30
    num_captions: int = 1
    length_penalty: float = 1.0
    prompt: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.decoding not in DECODINGS:
            raise InputError(f"--decoding must be one of {', '.join(DECODINGS)}, got {self.decoding!r}")
        if self.num_captions < 1:
            raise InputError(f"--num-captions must be at least 1, got {self.num_captions}")
        if self.decoding == "greedy" and self.num_captions > 1:
            raise InputError(
                f"--num-captions {self.num_captions} with --decoding greedy would repeat one caption; "
                "use --decoding beam (with --num-beams >= N), nucleus or topk"
            )
        if self.decoding == "beam" and self.num_beams < max(2, self.num_captions):
            raise InputError(
                f"--decoding beam needs --num-beams >= max(2, --num-captions), got {self.num_beams} "
                f"beams for {self.num_captions} captions"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {self.top_k}")
        if self.temperature <= 0:
            raise InputError(f"--temperature must be > 0, got {self.temperature}")
        if self.repetition_penalty <= 0:
            raise InputError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0 or self.min_new_tokens > self.max_new_tokens:
            raise InputError(
                f"need 0 <= --min-new-tokens <= --max-new-tokens and --max-new-tokens >= 1, got "
                f"{self.min_new_tokens} and {self.max_new_tokens}"
            )

    @property
    def sampling(self) -> bool:
        return self.decoding in ("nucleus", "topk")

    def to_params(self) -> dict[str, Any]:
        """Only the knobs that affect the output of this decoding (what lineage compares)."""
        d = asdict(self)
        if self.decoding != "beam":
            d.pop("num_beams")
            d.pop("length_penalty")
        if self.decoding != "nucleus":
            d.pop("top_p")
        if self.decoding != "topk":
            d.pop("top_k")
        if not self.sampling:
            d.pop("temperature")
            d.pop("seed")
        return d


class Captioner(ABC):
    """One loaded captioning model. Subclasses: ``HFCaptioner`` (transformers), ``CocaCaptioner``."""

    backend: str = ""
    device: Any
    dtype: Any

    @property
    @abstractmethod
    def preprocess(self) -> Any:
        """PIL image -> tensor; runs in DataLoader workers, so it must be picklable."""

    @property
    def image_spec(self) -> Any:
        """The preprocessing as a ``capcurate.inputs.ImageSpec`` (fast tensor path), or None to run
        ``preprocess`` on each PIL image."""
        return None

    @abstractmethod
    def caption(self, pixels: Any, config: DecodingConfig) -> list[list[str]]:
        """``num_captions`` clean captions for each image of a preprocessed batch."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What lineage records about the loaded model (class, resolved weights path, revision)."""


_SPACES = re.compile(r"\s+")


def clean_caption(text: str, prompt: str | None = None) -> str:
    """Strip special-token debris, the prompt the model echoes, and surplus whitespace."""
    text = _SPACES.sub(" ", text).strip()
    if prompt:
        p = _SPACES.sub(" ", prompt).strip()
        if p and text.lower().startswith(p.lower()):
            text = text[len(p):].strip()
    return text
