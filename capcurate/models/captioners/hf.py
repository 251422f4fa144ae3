"""transformers captioners from pixels: BLIP, BLIP-2 and GIT (``AutoModelForImageTextToText``).

transformers' own ``generate`` does the decoding (KV cache, beam search, sampling); this module maps
capcurate's ``DecodingConfig`` onto it (``generation.py``), builds the prompt tokens once (the prompt of
these models is text the caption starts from, with a fixed number of image tokens), and cleans the output
text. Chat-template VLMs, whose inputs depend on each image, are ``vlm.VLMCaptioner``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import ModelLoadError
from ..openclip_loader import input_dtype
from ..ref import ModelRef
from .base import Captioner, DecodingConfig, clean_caption
from .generation import (
    answer_lengths,
    can_use_static_cache,
    generate_kwargs,
    group_captions,
    recordable,
    stop_token_ids,
)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class HFImageTransform:
    """PIL image -> pixel tensor with the model's image processor (runs in DataLoader workers)."""

    def __init__(self, image_processor: Any):
        self.image_processor = image_processor

    def __call__(self, img: Any) -> torch.Tensor:
        return self.image_processor(images=img, return_tensors="pt")["pixel_values"][0]


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# model types that caption from pixels with a fixed prompt layout; every other image-text-to-text model
# is a VLM whose processor builds its inputs per batch (vlm.py)
PIXEL_CAPTIONERS = ("blip", "blip-2", "git")


def load_hf_parts(name: str, *, dtype: str, trust_remote_code: bool) -> tuple[Any, Any, Any]:
    """(config, model, processor) or a one-line ModelLoadError saying which and why."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    where = f"hf:{name}"
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        msg = _first_line(e)
        if "trust_remote_code" in msg or "custom code" in msg:
            raise ModelLoadError(f"{where} ships its own code; pass --trust-remote-code if you trust it") from None
        raise ModelLoadError(f"cannot load {where}: unknown architecture ({msg})") from None
    except OSError as e:
        msg = _first_line(e)
        offline = " (offline: no download possible; pass a local directory)" \
            if not Path(name).exists() else ""
        raise ModelLoadError(f"cannot load {where}: not found{offline}: {msg}") from None
    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[dtype], "trust_remote_code": trust_remote_code}
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(name, attn_implementation="sdpa", **kwargs)
        except ValueError as e:
            if "sdpa" not in str(e).lower() and "attn_implementation" not in str(e):
                raise
            model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)  # class without SDPA
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelLoadError(
            f"cannot load {where}: model_type {getattr(config, 'model_type', '?')!r} is not an image-to-text "
            f"captioner ({_first_line(e)})"
        ) from None
    except OSError as e:
        raise ModelLoadError(f"cannot load {where}: {_first_line(e)}") from None
    except ImportError as e:  # a processor that needs a package capcurate does not depend on (num2words)
        raise ModelLoadError(f"cannot load {where}: {_first_line(e)} (pip install 'capcurate[vlm]' brings "
                             "what the VLM processors need)") from None
    if not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
        raise ModelLoadError(f"cannot load {where}: its processor has no image processor and tokenizer")
    return config, model, processor


class HFCaptioner(Captioner):
    backend = "transformers"

    def __init__(self, ref: ModelRef, *, device: str = "cpu", dtype: str = "fp32",
                 trust_remote_code: bool = False, compile: bool = False, parts: tuple[Any, Any, Any] | None = None):
        from ..attention import use_sdpa
        from ..compiling import compile_image_tower

        self.ref = ref
        self.config, model, self.processor = parts or load_hf_parts(ref.name, dtype=dtype,
                                                                    trust_remote_code=trust_remote_code)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = input_dtype(self.model)  # the patch embedding's (fp32-kept modules can come first)
        # BLIP's classes have no SDPA: its ViT gets a fused-attention forward (identical results)
        self.fused_attention = 0
        if getattr(self.model.config, "_attn_implementation", None) != "sdpa":
            self.fused_attention = use_sdpa(self.model)
        self.compiled = compile_image_tower(self.model) if compile else None
        # --compile also gives decoders that support it (BLIP-2's OPT/T5, not BLIP's BERT) a static KV cache
        self.static_cache = compile and can_use_static_cache(self.model)
        self.model_type = getattr(self.config, "model_type", "")
        self.tokenizer = self.processor.tokenizer
        self._transform = HFImageTransform(self.processor.image_processor)
        self._prompt_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._stop_ids = stop_token_ids(self.model, self.tokenizer)

    @property
    def preprocess(self) -> Any:
        return self._transform

    @property
    def image_spec(self) -> Any:
        from ...inputs.spec import from_hf

        return from_hf(self.processor.image_processor)

    def prompt_inputs(self, prompt: str | None) -> dict[str, torch.Tensor]:
        """Token inputs for one image (repeated per batch); empty when the model starts on its own."""
        if not prompt:
            return {}
        if prompt not in self._prompt_cache:
            from PIL import Image

            if self.model_type == "git":
                # GIT starts from [CLS] and continues the text; the processor would append [SEP]
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                enc = {"input_ids": torch.tensor([[self.tokenizer.cls_token_id, *ids]])}
            else:
                # BLIP/BLIP-2/VLMs: the processor inserts the image placeholder tokens the model expects
                dummy = Image.new("RGB", (32, 32))
                out = self.processor(images=dummy, text=prompt, return_tensors="pt")
                enc = {k: out[k] for k in ("input_ids", "attention_mask") if k in out}
            self._prompt_cache[prompt] = enc
        return self._prompt_cache[prompt]

    def generate_kwargs(self, config: DecodingConfig, seeds: list[int] | None = None) -> dict[str, Any]:
        return generate_kwargs(config, seeds, static_cache=self.static_cache)

    @torch.no_grad()
    def generate_ids(self, pixels: torch.Tensor, config: DecodingConfig,
                     seeds: list[int] | None = None) -> tuple[torch.Tensor, int]:
        """Raw ``generate`` output and how many leading prompt tokens it echoes."""
        n = pixels.shape[0]
        inputs: dict[str, Any] = {"pixel_values": pixels.to(self.device, self.dtype, non_blocking=True)}
        for k, v in self.prompt_inputs(config.prompt).items():
            inputs[k] = v.to(self.device).repeat(n, 1)
        out = self.model.generate(**inputs, **self.generate_kwargs(config, seeds))
        echoed = 0
        ids = inputs.get("input_ids")
        if ids is not None and out.shape[1] >= ids.shape[1]:
            rep = ids.repeat_interleave(config.num_captions, dim=0)
            if bool((out[:, :ids.shape[1]] == rep).all()):
                echoed = ids.shape[1]
        return out, echoed

    def caption(self, pixels: torch.Tensor, config: DecodingConfig,
                seeds: list[int] | None = None) -> list[list[str]]:
        out, echoed = self.generate_ids(pixels, config, seeds)
        texts = self.tokenizer.batch_decode(out[:, echoed:], skip_special_tokens=True)
        texts = [clean_caption(t, config.prompt) for t in texts]
        new = out[:, echoed:]
        # BLIP and GIT start their output with the start token they were given, not a generated one
        start = {self.tokenizer.bos_token_id, self.tokenizer.cls_token_id} - {None}
        skip = int(new.shape[1] > 0 and bool(torch.isin(new[:, 0], torch.tensor(sorted(start))).all())) \
            if start else 0
        return group_captions(texts, answer_lengths(new, self._stop_ids, skip=skip), config.num_captions)

    def describe_request(self, config: DecodingConfig) -> dict[str, Any]:
        return {"generate_kwargs": recordable(self.generate_kwargs(config, [0] if config.sampling else None))}

    def describe(self) -> dict[str, Any]:
        local = Path(self.ref.name)
        return {
            "backend": self.backend,
            "class": type(self.model).__name__,
            "model_type": self.model_type,
            "resolved_weights": str(local.resolve()) if local.exists() else self.ref.name,
            "revision": getattr(self.config, "_commit_hash", None),
            "attn_implementation": "sdpa (capcurate)" if self.fused_attention
            else getattr(self.model.config, "_attn_implementation", None),
            "compiled": self.compiled,
            "kv_cache": "static" if self.static_cache else "dynamic",
        }
