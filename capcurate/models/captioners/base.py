"""The ``Captioner`` interface every backend implements, and the decoding settings they share.

A captioner is built once per worker (``load_captioner``) and turns a batch of images plus a request
(``DecodingConfig``: the prompt, decoding and length settings) into ``num_captions`` clean strings per
image (``caption``). What a batch holds depends on ``input_kind``:

- ``"pixels"`` (BLIP, BLIP-2, GIT, CoCa): a normalised float tensor ``[n, 3, h, w]`` made by the input
  stream, from the captioner's ``image_spec`` (fast tensor path) or its ``preprocess`` (PIL -> tensor, in
  the DataLoader workers, must pickle);
- ``"images"`` (chat-template VLMs): a list of decoded uint8 ``[3, h, w]`` tensors at their native size;
  the captioner's own processor builds the model inputs per batch, because the number of image tokens in
  the text depends on each image's size.

A new backend (an offline serving engine such as vLLM) is one more ``Captioner`` of kind ``"images"``:
the stage never looks inside it.
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
    system: str | None = None       # chat-template VLMs: the system turn
    style: str | None = None        # chat-template VLMs: which default instruction (STYLES) when no prompt
    max_pixels: int | None = None   # VLMs with dynamic resolution: the processor's pixel budget per image
    min_pixels: int | None = None

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

        if self.style is not None and self.style not in STYLES:
            raise InputError(f"--style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if self.style is not None and self.prompt:
            raise InputError("--style picks a default instruction; it cannot be combined with --prompt")
        for opt, v in (("--max-pixels", self.max_pixels), ("--min-pixels", self.min_pixels)):
            if v is not None and v < 1:
                raise InputError(f"{opt} must be a positive number of pixels, got {v}")
        if self.max_pixels and self.min_pixels and self.min_pixels > self.max_pixels:
            raise InputError(f"--min-pixels {self.min_pixels} is larger than --max-pixels {self.max_pixels}")

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
        for k in ("system", "style", "max_pixels", "min_pixels"):  # absent unless used: older runs resume
            if d[k] is None:
                d.pop(k)
        return d


# --style: what a chat-template VLM is asked when no --prompt is given. CLIP trains on short alt-text
# (DataComp/LAION captions are ~10 words), while dense captions help long-text retrieval and distillation
# (DCI, DreamLIP, Recap-DataComp's long captions); families without a chat template have their own words.
STYLES = ("short", "dense")
DEFAULT_INSTRUCTIONS = {
    "short": "Write a short caption for this image, like good alt-text: one sentence naming the main "
             "subject, its key attributes and the setting. Answer with the caption only.",
    "dense": "Describe this image in detail in one paragraph: every main subject with its colour, size "
             "and position, the background, and any visible text. Answer with the description only.",
}


def image_seed(seed: int, uid: str) -> int:
    """The sampling seed of one image: a hash of (--seed, uid), so its captions do not depend on the batch
    size, the order images arrive in, or which other images share its batch."""
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{uid}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageCaptions(list):
    """The ``num_captions`` strings of one image (a plain ``list`` to every caller), plus what generation
    cost: ``tokens`` generated per caption, and how many of them stopped at ``--max-new-tokens``."""

    def __init__(self, captions: list[str], tokens: list[int] | None = None, truncated: int = 0):
        super().__init__(captions)
        self.tokens = tokens
        self.truncated = truncated


class ImageRejected(Exception):
    """The model's processor refuses this image (e.g. an aspect ratio beyond its limit): the image gets a
    row with this reason, its batch is captioned without it."""


class Captioner(ABC):
    """One loaded captioning model. Subclasses: ``HFCaptioner`` (transformers), ``CocaCaptioner``."""

    backend: str = ""
    device: Any
    dtype: Any

    input_kind: str = "pixels"   # "pixels" (preprocessed tensors) or "images" (decoded uint8, native size)

    @property
    def preprocess(self) -> Any:
        """PIL image -> tensor; runs in DataLoader workers, so it must be picklable (kind "pixels")."""
        return None

    @property
    def image_spec(self) -> Any:
        """The preprocessing as a ``capcurate.inputs.ImageSpec`` (fast tensor path), or None to run
        ``preprocess`` on each PIL image."""
        return None

    @abstractmethod
    def caption(self, batch: Any, config: DecodingConfig, seeds: list[int] | None = None) -> list[list[str]]:
        """``num_captions`` clean captions for each image of ``batch`` (see the module docstring).

        ``seeds`` (one per image, see ``image_seed``) make sampled captions a function of the image alone;
        without them sampling draws from torch's global generator.
        """

    def prepare(self, config: DecodingConfig) -> DecodingConfig:
        """The request this model will run: checks options it cannot honour, fills default prompts.

        Captioners without an instruction-following chat template take none of the VLM options.
        """
        for opt, v in (("--style", config.style), ("--system", config.system),
                       ("--max-pixels", config.max_pixels), ("--min-pixels", config.min_pixels)):
            if v is not None:
                raise InputError(f"{opt} needs a chat-template VLM (Qwen2-VL, LLaVA, SmolVLM...); this "
                                 f"{type(self).__name__} captions from pixels (use --prompt to start its text)")
        return config

    def describe_request(self, config: DecodingConfig) -> dict[str, Any]:
        """What lineage records about one request beyond its parameters (e.g. the exact template text)."""
        return {}

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
