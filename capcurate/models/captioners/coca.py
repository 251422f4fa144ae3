"""open_clip CoCa captioner: loaded through ``load_openclip``, decoded by ``capcurate.models.coca_decode``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError
from ..ref import ModelRef
from .base import Captioner, DecodingConfig, clean_caption

PRECISIONS = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


def _special_tokens(tokenizer: Any, pad_id: int):
    """SOT/EOT ids for open_clip's own BPE tokenizer or an HF tokenizer (e.g. CapWorld's WordLevel)."""
    from ..coca_decode import SpecialTokens

    sot, eot = getattr(tokenizer, "sot_token_id", None), getattr(tokenizer, "eot_token_id", None)
    if sot is None or eot is None:
        # tokenizing "" gives [SOT, EOT, PAD...] for every tokenizer open_clip wraps
        ids = tokenizer([""])[0].tolist()
        sot, eot = ids[0], ids[1]
    return SpecialTokens(int(sot), int(eot), int(pad_id))


class CocaCaptioner(Captioner):
    backend = "openclip-coca"

    def __init__(self, ref: ModelRef, *, device: str = "cpu", dtype: str = "fp32", use_cache: bool = True,
                 compile: bool = False):
        from ..openclip_loader import input_dtype, load_openclip

        bundle = load_openclip(ref, device=device, precision=PRECISIONS[dtype])
        if not hasattr(bundle.model, "text_decoder"):
            raise ModelLoadError(
                f"{ref.text} is an open_clip {type(bundle.model).__name__}, not a CoCa: it cannot caption "
                "(use a coca_* architecture or config)"
            )
        self.ref = ref
        self.bundle = bundle
        self.model = bundle.model
        self.device = torch.device(device)
        self.dtype = input_dtype(self.model.visual)  # the patch conv's: low precision keeps some fp32
        self.tokenizer = bundle.tokenizer
        self.special = _special_tokens(self.tokenizer, getattr(self.model, "pad_id", 0))
        self.use_cache = use_cache
        if compile:
            from ..compiling import compile_image_tower

            compile_image_tower(self.model)
        self.compiled = compile

    @property
    def preprocess(self) -> Any:
        return self.bundle.preprocess

    @property
    def image_spec(self) -> Any:
        from ...inputs.spec import from_openclip
        from ..openclip_loader import open_clip_preprocess_cfg

        return from_openclip(open_clip_preprocess_cfg(self.model))

    def prompt_ids(self, prompt: str | None) -> list[int]:
        if not prompt:
            return []
        ids = self.tokenizer([prompt])[0].tolist()
        body = ids[1:]
        return body[:body.index(self.special.eot)] if self.special.eot in body else body

    def decode(self, ids: list[int]) -> str:
        ids = [i for i in ids if i not in (self.special.sot, self.special.eot, self.special.pad)]
        hf = getattr(self.tokenizer, "tokenizer", None)
        if hf is not None and hasattr(hf, "decode"):
            return hf.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids)

    def generate_ids(self, pixels: torch.Tensor, config: DecodingConfig,
                     generator: torch.Generator | None = None) -> list[list[list[int]]]:
        from ..coca_decode import coca_generate

        pixels = pixels.to(self.device, self.dtype, non_blocking=True)
        return coca_generate(self.model, pixels, config, self.special, prompt_ids=self.prompt_ids(config.prompt),
                             generator=generator, use_cache=self.use_cache)

    def caption(self, pixels: torch.Tensor, config: DecodingConfig,
                seeds: list[int] | None = None) -> list[list[str]]:
        if config.sampling and seeds is not None:
            # one generator per image: its captions do not depend on the batch it came in (greedy and beam
            # stay batched; sampling pays one decoder pass per image)
            ids = []
            for i, seed in enumerate(seeds):
                generator = torch.Generator(device=self.device).manual_seed(seed)
                ids.extend(self.generate_ids(pixels[i:i + 1], config, generator))
        else:
            generator = None
            if config.sampling:  # no seeds: draw the decoder's generator from torch's global one
                generator = torch.Generator(device=self.device)
                generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
            ids = self.generate_ids(pixels, config, generator)
        return [[clean_caption(self.decode(seq), config.prompt) for seq in per_image] for per_image in ids]

    def describe(self) -> dict[str, Any]:
        pretrained = self.ref.pretrained
        resolved = str(Path(pretrained).resolve()) if pretrained and Path(pretrained).is_file() else pretrained
        return {
            "backend": self.backend,
            "class": type(self.model).__name__,
            "architecture": self.bundle.model_name,
            "resolved_weights": resolved or (str(self.ref.local_dir.resolve()) if self.ref.local_dir else None),
            "kv_cache": self.use_cache,
        }
