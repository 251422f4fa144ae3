"""Chat-template VLM captioners through transformers: Qwen2-VL / Qwen2.5-VL / Qwen3-VL, LLaVA / LLaVA-NeXT,
Idefics3 / SmolVLM, Gemma3, InternVL, Mistral3 (Pixtral), Llama 4, PaliGemma, Florence-2 and other
``AutoModelForImageTextToText`` models with a processor.

A VLM's text holds as many image tokens as its vision tower makes features for *that* image (Qwen2-VL:
one per 28x28 pixels; LLaVA: one per patch), so the inputs of a batch are built by the model's own
processor from the decoded images and the instruction together, per batch, left-padded so every answer
starts at the same position. The instruction is the user turn of the model's chat template (after an
optional system turn); models without a chat template (PaliGemma, Florence-2) take it as their plain
task prompt. Only the generated answer is stored: decoder-only models echo the whole templated prompt,
which is cut off at the padded input length. How many pixels each image keeps is ``pixel_budget.py``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ...errors import InputError
from ..openclip_loader import input_dtype
from ..ref import ModelRef
from .base import DEFAULT_INSTRUCTIONS, Captioner, DecodingConfig, ImageRejected, clean_caption
from .generation import (
    answer_lengths,
    can_use_static_cache,
    generate_kwargs,
    group_captions,
    recordable,
    stop_token_ids,
)
from .pixel_budget import PixelBudget, apply_pixel_budget, snapshot

# families without a chat template have their own words for the two --style instructions
PLAIN_PROMPTS = {
    "paligemma": {"short": "caption en", "dense": "describe en"},
    "florence2": {"short": "<CAPTION>", "dense": "<MORE_DETAILED_CAPTION>"},
}
# Florence-2's tasks that answer with a caption; the others (<OD>, <OCR_WITH_REGION>, grounding...) answer
# with boxes, polygons or OCR text, which are not captions
FLORENCE_CAPTION_TASKS = ("<CAPTION>", "<DETAILED_CAPTION>", "<MORE_DETAILED_CAPTION>")
# what --batch-size auto probes with when the processor has a fixed input size (it resizes anyway)
FIXED_PROBE_PIXELS = 1024 * 1024


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


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
        self._original_size = snapshot(self.processor.image_processor)
        self.pixel_budget: PixelBudget | None = None
        self._stop_ids = stop_token_ids(self.model, self.tokenizer)
        # a VLM's image tower sees a new shape per image size; --compile goes to its decoding step instead
        if compile and not can_use_static_cache(self.model):
            raise InputError(f"--compile: transformers cannot compile the decoding step of {type(self.model).__name__} "
                             f"({ref.text}); run without --compile")
        self.static_cache = compile
        # torchvision-backed image processors (transformers 5's default) resize, normalise and patchify on
        # the model's device: on a GPU that takes the processor off the CPU, where it cost as much time as
        # the 2B model's generate (Qwen2-VL, 512 images of 512x384: ~108 images/s per core)
        self._processor_kwargs = {"device": str(self.device)} if takes_device(self.processor.image_processor) else {}
        self._nested = self._images_nested()

    def _images_nested(self) -> bool:
        """Whether this processor takes one list of images per text (transformers' layout for several images
        per sample), asked of the processor itself on two small grey images rather than read off a list of
        names: processors that count images per sample (Gemma3, SmolVLM, Mllama) need it and the others
        tested accept it, so it is used unless only the flat list works."""
        grey = [torch.full((3, 64, 64), 127, dtype=torch.uint8)] * 2
        try:
            text = [self.prompt_text(self._default_request(DecodingConfig(decoding="greedy")))] * 2
        except InputError:  # no chat template and no default prompt: the layout does not depend on the text
            text = [""] * 2
        for nested in (True, False):
            try:
                self.processor(images=[[g] for g in grey] if nested else grey, text=text, padding=True,
                               return_tensors="pt")
                return nested
            except Exception:  # this layout is not the processor's: try the other
                continue
        return True

    # -- the request -------------------------------------------------------------------------------
    def prepare(self, config: DecodingConfig) -> DecodingConfig:
        if config.system and not self.chat_template:
            raise InputError(f"--system needs a chat template; {self.ref.text} ({self.model_type}) has none")
        # every request sets the processor's resolution: --max-pixels, else the default budget
        self.pixel_budget = apply_pixel_budget(self.processor.image_processor, self._original_size,
                                               config.max_pixels, config.min_pixels, where=self.ref.text)
        config = self._default_request(config)
        self._check_task(config.prompt or "")
        return config

    def _default_request(self, config: DecodingConfig) -> DecodingConfig:
        """The request with the default instruction of its --style when no --prompt is given."""
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

    def _check_task(self, prompt: str) -> None:
        """Florence-2-style processors map task tokens to tasks; only the captioning ones give captions."""
        tasks = {**getattr(self.processor, "task_prompts_without_inputs", {}),
                 **getattr(self.processor, "task_prompts_with_input", {})}
        other = [t for t in tasks if t in prompt and t not in FLORENCE_CAPTION_TASKS]
        if other:
            raise InputError(f"--prompt {other[0]} is a {self.model_type} task whose answer is not a caption "
                             f"(boxes, regions or OCR text); use one of {', '.join(FLORENCE_CAPTION_TASKS)}")

    @property
    def probe_pixels(self) -> int:
        """The image area --batch-size auto probes with: the most pixels the budget lets one image keep."""
        budget = self.pixel_budget.max_pixels if self.pixel_budget else None
        return budget or FIXED_PROBE_PIXELS

    def prompt_text(self, config: DecodingConfig) -> str:
        """The exact text of one sample before the processor expands its image placeholder."""
        if not self.chat_template:
            return config.prompt or ""
        messages: list[dict[str, Any]] = []
        if config.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": config.system}]})
        messages.append({"role": "user", "content": [{"type": "image"}, {"type": "text", "text": config.prompt}]})
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _process(self, images: list[torch.Tensor], config: DecodingConfig) -> Any:
        """The processor's output for ``images``; ImageRejected when it refuses one of them."""
        text = self.prompt_text(config)
        imgs: list[Any] = [[im] for im in images] if self._nested else list(images)
        try:
            return self.processor(images=imgs, text=[text] * len(images), padding=True, return_tensors="pt",
                                  **self._processor_kwargs)
        except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            # a processor validates and resizes each image: what it refuses is that image's, not the model's
            raise ImageRejected(f"rejected by {type(self.processor).__name__}: {_first_line(e)}") from e

    def build_inputs(self, images: list[torch.Tensor], config: DecodingConfig) -> dict[str, Any]:
        """The processor's inputs for a batch: images at native size, one templated text each, left padding."""
        out = self._process(images, config)
        out.pop("labels", None)  # PaliGemma adds labels when it builds a training suffix
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in out.items() if isinstance(v, torch.Tensor)}

    def screen(self, images: list[torch.Tensor], config: DecodingConfig) -> dict[int, str]:
        """Which images of a refused batch the processor refuses on their own, and why: one processor call
        per image (milliseconds) instead of halving the batch through ``generate``."""
        refused = {}
        for i, im in enumerate(images):
            try:
                self._process([im], config)
            except ImageRejected as e:
                refused[i] = str(e)
        return refused

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
        # an encoder-decoder's output starts with its decoder start token, which it did not generate
        lengths = answer_lengths(ids, self._stop_ids, skip=1 if self.encoder_decoder else 0)
        return group_captions(texts, lengths, config.num_captions)

    # -- lineage -----------------------------------------------------------------------------------
    def describe_request(self, config: DecodingConfig) -> dict[str, Any]:
        return {
            "prompt": config.prompt,
            "template_text": self.prompt_text(config),
            "chat_template": "model's own" if self.chat_template else None,
            "pixel_budget": self.pixel_budget.describe() if self.pixel_budget else None,
            "images_nested": self._nested,
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
