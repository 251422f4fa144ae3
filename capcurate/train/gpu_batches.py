"""Training images as uint8 crops: the augmentation drawn in the workers, the pixels made where it pays.

open_clip's training transform is ``RandomResizedCrop(size, scale, ratio, bicubic) -> RGB -> ToTensor ->
Normalize``. ``CropAug`` is that transform as data (read off the model's own Compose), split in two:

- the crop box is drawn on the CPU, in the worker, from the per-sample seed and the image size read off
  the header, by torchvision's own ``RandomResizedCrop.get_params`` under the same seeding the PIL
  transform ran under: the box is exactly the one open_clip's transform would cut (tested);
- the pixels: ``--decode cpu`` decodes in the worker (libjpeg-turbo through torchvision), crops and
  resizes the uint8 tensor there and ships uint8 (4x less than float across the process boundary);
  ``--decode gpu`` ships the JPEG bytes and the boxes, and the training process decodes the whole batch
  with nvJPEG, crops and resizes each image on the GPU. Either way normalisation runs once per batch,
  on the device, in float32, with the same arithmetic as ToTensor + Normalize.

Tolerance against open_clip's PIL transform: the box is the same; the resize is torchvision's antialiased
bicubic on the uint8 tensor (CPU or GPU) instead of PIL's, which differs by about one uint8 level
on some pixels when the crop is scaled down (a few levels when scaled up: PIL's cubic has a = -0.5,
torch's a = -0.75); everything else is the same arithmetic. nvJPEG itself differs from libjpeg-turbo
(IDCT, chroma upsampling): about 2 levels on average on 4:2:0 JPEGs, more on single pixels at sharp
colour edges.

A transform with more steps (colour jitter, grayscale, timm's) has no ``CropAug``: the workers then run
the model's own PIL transform and ship float, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Box = tuple[int, int, int, int]  # top, left, height, width (torchvision's order)


@dataclass(frozen=True)
class CropAug:
    size: tuple[int, int]                    # (h, w) of every training image
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: str                       # bicubic | bilinear
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_transform(cls, transform: Any) -> CropAug | None:
        """The CropAug of open_clip's train Compose, or None when it does more than crop + normalise."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", []))
        if len(steps) < 3 or not isinstance(steps[0], T.RandomResizedCrop) or not isinstance(steps[-1], T.Normalize):
            return None
        rrc, norm = steps[0], steps[-1]
        for t in steps[1:-1]:  # only mode conversion to RGB and ToTensor may sit in between
            name = type(t).__name__
            if name in ("MaybeToTensor", "ToTensor"):
                continue
            if name == "MaybeConvertMode" and getattr(t, "mode", "RGB") == "RGB":
                continue
            if name == "Lambda" and "convert_to_rgb" in repr(getattr(t, "lambd", "")):
                continue
            return None
        interp = getattr(rrc.interpolation, "value", str(rrc.interpolation))
        if interp not in ("bicubic", "bilinear"):
            return None
        mean, std = tuple(float(x) for x in norm.mean), tuple(float(x) for x in norm.std)
        if len(mean) != 3 or len(std) != 3:
            return None
        size = rrc.size if isinstance(rrc.size, (tuple, list)) else (rrc.size, rrc.size)
        return cls((int(size[0]), int(size[-1])), tuple(rrc.scale), tuple(rrc.ratio), interp,
                   bool(rrc.antialias if rrc.antialias is not None else True), mean, std)

    def draw_box(self, height: int, width: int, seed: int) -> Box:
        """The box open_clip's transform cuts from an image of this size when the sample's seed is set."""
        from torchvision.transforms import RandomResizedCrop

        stand_in = torch.zeros(1).expand(1, height, width)  # get_params reads the size only
        state = torch.get_rng_state()
        try:
            torch.default_generator.manual_seed(seed)  # as torch.manual_seed, leaving CUDA's RNG alone
            top, left, h, w = RandomResizedCrop.get_params(stand_in, list(self.scale), list(self.ratio))
        finally:
            torch.set_rng_state(state)
        return int(top), int(left), int(h), int(w)

    def crop(self, img: torch.Tensor, box: Box) -> torch.Tensor:
        """uint8 [3, H, W] (any device) -> uint8 [3, *size]: the box, resized with antialiasing."""
        from torchvision.transforms.v2 import functional as F

        mode = F.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else F.InterpolationMode.BILINEAR
        top, left, h, w = box
        return F.resized_crop(img, top, left, h, w, list(self.size), interpolation=mode, antialias=self.antialias)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [n, 3, h, w] -> float32, as ToTensor (x / 255) then Normalize ((x - mean) / std)."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        return batch.float().div_(255).sub_(mean).div_(std)


# -- what a worker ships ---------------------------------------------------------------------------
def pack_batch(items: list[tuple[str, Any]], size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """A worker's batch as plain tensors: ``("u8", uint8 [3, h, w])`` or ``("jpeg", (bytes, box))`` items.

    Keys: u8 [k, 3, h, w] with u8_pos [k] (their rows in the batch); jpeg (every JPEG's bytes, one
    after the other), jpeg_len [m], boxes [m, 4] and jpeg_pos [m].
    """
    u8_pos = [i for i, (kind, _) in enumerate(items) if kind == "u8"]
    jpeg_pos = [i for i, (kind, _) in enumerate(items) if kind == "jpeg"]
    h, w = size
    u8 = torch.stack([items[i][1] for i in u8_pos]) if u8_pos else torch.empty((0, 3, h, w), dtype=torch.uint8)
    datas = [items[i][1][0] for i in jpeg_pos]
    return {
        "u8": u8, "u8_pos": torch.tensor(u8_pos, dtype=torch.long),
        "jpeg": torch.frombuffer(bytearray(b"".join(datas)), dtype=torch.uint8) if datas
        else torch.empty(0, dtype=torch.uint8),
        "jpeg_len": torch.tensor([len(d) for d in datas], dtype=torch.long),
        "boxes": torch.tensor([items[i][1][1] for i in jpeg_pos], dtype=torch.long).view(-1, 4),
        "jpeg_pos": torch.tensor(jpeg_pos, dtype=torch.long),
    }


# -- what the training process makes of it ---------------------------------------------------------
def assemble_batch(packed: dict[str, torch.Tensor], aug: CropAug,
                   device: torch.device | str) -> tuple[torch.Tensor, int]:
    """A packed batch -> (normalised float32 [n, 3, h, w] on ``device``, images that failed to decode).

    JPEG bytes are decoded on ``device`` (nvJPEG in batches on CUDA; libjpeg-turbo on the CPU, which is
    what tests compare with the worker-side path), each cropped to its box and resized there. An image
    that no decoder can read (rare: the worker checked its header and end marker) becomes a black
    image so every rank keeps the same batch size; it is counted with the skipped samples.
    """
    from ..inputs.decode import decode_jpegs_gpu

    device = torch.device(device)
    n_u8, n_jpeg = len(packed["u8_pos"]), len(packed["jpeg_pos"])
    if not n_jpeg:  # --decode cpu: the batch is already uint8 in order
        return aug.normalize(packed["u8"].to(device, non_blocking=True)), 0
    failed = 0
    lens = packed["jpeg_len"].tolist()
    datas = list(torch.split(packed["jpeg"], lens))
    decoded = decode_jpegs_gpu(datas, device)
    crops = []
    for img, box in zip(decoded, packed["boxes"].tolist(), strict=True):
        if isinstance(img, str):
            failed += 1
            crops.append(torch.zeros((3, *aug.size), dtype=torch.uint8, device=device))
        else:
            crops.append(aug.crop(img, tuple(box)))
    jpegs = torch.stack(crops)
    if not n_u8:
        return aug.normalize(jpegs), failed
    out = torch.empty((n_u8 + n_jpeg, 3, *aug.size), dtype=torch.uint8, device=device)
    out[packed["jpeg_pos"].to(device, non_blocking=True)] = jpegs
    out[packed["u8_pos"].to(device, non_blocking=True)] = packed["u8"].to(device, non_blocking=True)
    return aug.normalize(out), failed
