"""Chat-template VLM captioners through transformers: Qwen2-VL / Qwen2.5-VL, LLaVA, Idefics3 / SmolVLM,
PaliGemma, Florence-2 and other ``AutoModelForImageTextToText`` models with a processor.

A VLM's text holds as many image tokens as its vision tower makes features for *that* image (Qwen2-VL:
one per 28x28 pixels; LLaVA: one per patch), so the inputs of a batch are built by the model's own
processor from the decoded images and the instruction together, per batch, left-padded so every answer
starts at the same position. The instruction is the user turn of the model's chat template (after an
optional system turn); models without a chat template (PaliGemma, Florence-2) take it as their plain
task prompt. Only the generated answer is stored: decoder-only models echo the whole templated prompt,
which is cut off at the padded input length.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import InputError
from ..openclip_loader import input_dtype
from ..ref import ModelRef
from .base import DEFAULT_INSTRUCTIONS, Captioner, DecodingConfig, clean_caption
from .generation import can_use_static_cache, generate_kwargs, recordable

# families without a chat template have their own words for the two --style instructions
PLAIN_PROMPTS = {
    "paligemma": {"short": "caption en", "dense": "describe en"},
    "florence2": {"short": "<CAPTION>", "dense": "<MORE_DETAILED_CAPTION>"},
}
# processors that want one list of images per text (several images may share a sample)
NESTED_IMAGES = ("idefics", "smolvlm", "mllama")


def takes_device(image_processor: Any) -> bool:
    """Whether an image processor runs its tensor ops on a ``device=`` it is given (transformers 5's
    torchvision backend; the PIL/numpy ones have no such argument)."""
    valid = getattr(image_processor, "valid_kwargs", None)
    return "device" in (getattr(valid, "__annotations__", None) or {})


class VLMCaptioner(Captioner):
    backend = "transformers-vlm"
    input_kind = "images"

    def __init__(self, ref: ModelRef, parts: tuple[Any, Any, Any], *, device: str = "cpu", compile: bool = False):
        self.ref = ref
        self.config, model, self.processor = parts
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dtype = input_dtype(self.model)
        self.model_type = getattr(self.config, "model_type", "")
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # answers start at the same column for every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat_template = getattr(self.processor, "chat_template", None)
        self.encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self._nested = any(n in self.model_type for n in NESTED_IMAGES)
        self._budget: tuple[int | None, int | None] = (None, None)
        # a VLM's image tower sees a new shape per image size; --compile goes to its decoding step instead
        if compile and not can_use_static_cache(self.model):
            raise InputError(f"--compile: transformers cannot compile the decoding step of {type(self.model).__name__} "
                             f"({ref.text}); run without --compile")
        self.static_cache = compile
        # torchvision-backed image processors (transformers 5's default) resize, normalise and patchify on
        # the model's device: on a GPU that takes the processor off the CPU, where it cost as much time as
        # the 2B model's generate (Qwen2-VL, 512 images of 512x384: ~108 images/s per core)
        self._processor_kwargs = {"device": str(self.device)} if takes_device(self.processor.image_processor) else {}

    # -- the request -------------------------------------------------------------------------------
    def prepare(self, config: DecodingConfig) -> DecodingConfig:
        from dataclasses import replace

        if config.system and not self.chat_template:
            raise InputError(f"--system needs a chat template; {self.ref.text} ({self.model_type}) has none")
        if config.max_pixels is not None or config.min_pixels is not None:
            self._set_pixel_budget(config.min_pixels, config.max_pixels)
        if config.prompt:
            return config
        style = config.style or "short"  # the style is spent on the prompt: the request keeps the words
        if self.chat_template:
            prompt = DEFAULT_INSTRUCTIONS[style]
        elif self.model_type in PLAIN_PROMPTS:
            prompt = PLAIN_PROMPTS[self.model_type][style]
        else:
            raise InputError(f"{self.ref.text} ({self.model_type}) has no chat template and no known default "
                             "prompt: pass --prompt")
        return replace(config, prompt=prompt, style=None)

    def _set_pixel_budget(self, min_pixels: int | None, max_pixels: int | None) -> None:
        """Qwen2-VL-style processors resize each image to a pixel count within [min, max] (in their
        ``size`` as shortest_edge/longest_edge); other processors have no such budget."""
        ip = self.processor.image_processor
        size = getattr(ip, "size", None)
        keys = dict(size) if isinstance(size, dict) else {k: v for k, v in vars(size or object()).items()
                                                           if v is not None}
        if not (hasattr(ip, "merge_size") and keys.get("longest_edge") and keys.get("shortest_edge")):
            raise InputError(f"--max-pixels/--min-pixels: {type(ip).__name__} of {self.ref.text} has no pixel "
                             "budget (only dynamic-resolution processors such as Qwen2-VL's take one)")
        if min_pixels is not None:
            keys["shortest_edge"] = min_pixels
        if max_pixels is not None:
            keys["longest_edge"] = max_pixels
        if keys["shortest_edge"] > keys["longest_edge"]:
            raise InputError(f"--min-pixels {keys['shortest_edge']} exceeds the pixel budget "
                             f"{keys['longest_edge']}")
        ip.size = type(size)(**keys) if not isinstance(size, dict) else keys
        self._budget = (keys["shortest_edge"], keys["longest_edge"])

    def prompt_text(self, config: DecodingConfig) -> str:
        """The exact text of one sample before the processor expands its image placeholder."""
        if not self.chat_template:
            return config.prompt or ""
        messages: list[dict[str, Any]] = []
        if config.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": config.system}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def build_inputs(self, images: list[torch.Tensor], config: DecodingConfig) -> dict[str, Any]:
        """The processor's inputs for a batch: images at native size, one templated text each, left padding."""
        text = self.prompt_text(config)
        imgs: list[Any] = [[im] for im in images] if self._nested else list(images)
        out = self.processor(images=imgs, text=[text] * len(images), padding=True, return_tensors="pt",
                             **self._processor_kwargs)
        out.pop("labels", None)  # PaliGemma adds labels when it builds a training suffix
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in out.items() if isinstance(v, torch.Tensor)}

    # -- generation --------------------------------------------------------------------------------
    def generate_kwargs(self, config: DecodingConfig, seeds: list[int] | None = None) -> dict[str, Any]:
        return generate_kwargs(config, seeds, static_cache=self.static_cache)

    @torch.no_grad()
    def generate_ids(self, images: list[torch.Tensor], config: DecodingConfig,
                     seeds: list[int] | None = None) -> torch.Tensor:
        """The generated answer tokens only, ``[n * num_captions, new]``."""
        inputs = self.build_inputs(images, config)
        out = self.model.generate(**inputs, **self.generate_kwargs(config, seeds))
        if self.encoder_decoder:
            return out
        return out[:, inputs["input_ids"].shape[1]:]

    def caption(self, images: list[torch.Tensor], config: DecodingConfig,
                seeds: list[int] | None = None) -> list[list[str]]:
        if not images:
            return []
        ids = self.generate_ids(images, config, seeds)
        texts = [clean_caption(t) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        k = config.num_captions
        return [texts[i * k:(i + 1) * k] for i in range(len(images))]

    # -- lineage -----------------------------------------------------------------------------------
    def describe_request(self, config: DecodingConfig) -> dict[str, Any]:
        return {
            "prompt": config.prompt,
            "template_text": self.prompt_text(config),
            "chat_template": "model's own" if self.chat_template else None,
            "pixel_budget": dict(zip(("min_pixels", "max_pixels"), self._budget, strict=True))
            if any(self._budget) else None,
            "generate_kwargs": recordable(self.generate_kwargs(config, [0] if config.sampling else None)),
        }

    def describe(self) -> dict[str, Any]:
        local = Path(self.ref.name)
        return {
            "backend": self.backend,
            "class": type(self.model).__name__,
            "processor": type(self.processor).__name__,
            "model_type": self.model_type,
            "resolved_weights": str(local.resolve()) if local.exists() else self.ref.name,
            "revision": getattr(self.config, "_commit_hash", None),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "kv_cache": "static" if self.static_cache else "dynamic",
        }
