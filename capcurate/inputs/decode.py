"""Image bytes -> uint8 RGB tensors: libjpeg-turbo/libpng through torchvision.io, nvJPEG on the GPU in
batches, PIL as the fallback for everything else (CMYK, TIFF, BMP, palette images...).

Every failure becomes an ``ImageDecodeError`` whose message is the reason recorded for that row. The
pixel count is checked from the header before any decoding (decompression bombs never decode).
"""

from __future__ import annotations

import io
import warnings

import torch

from ..images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

# torchvision 0.29 warns that its decoders will move to torchcodec; they are still the fastest here
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

_TV_FORMATS = ("JPEG", "PNG", "WEBP")  # GIF and animated files go to PIL (first frame)


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str, int, int]:
    """(format, mode, width, height) from the header alone; refuses bombs and non-images."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageDecodeError("empty image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (w, h) = img.format or "", img.mode, img.size
    except UnidentifiedImageError:
        raise ImageDecodeError("not an image (unidentified format)") from None
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"corrupt image: {e}") from None
    if w * h > max_pixels:
        raise ImageDecodeError(f"image too large: {w}x{h} pixels exceeds {max_pixels}")
    if w < 1 or h < 1:
        raise ImageDecodeError(f"corrupt image: size {w}x{h}")
    return fmt, mode, w, h


def gpu_decodable(data: bytes, fmt: str, mode: str) -> bool:
    """A complete RGB or greyscale JPEG: what nvJPEG decodes exactly like libjpeg.

    The end-of-image marker must be there: in entropy-coded data 0xFF is always followed by 0x00 or a
    restart marker, so a missing FFD9 at the end means a truncated file (which PIL would refuse).
    """
    return fmt == "JPEG" and mode in ("RGB", "L") and b"\xff\xd9" in data[-64:]


def as_tensor(data: bytes) -> torch.Tensor:
    """Encoded bytes as a writable 1-D uint8 tensor (what torchvision's decoders take)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_cpu(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, header: tuple | None = None) -> torch.Tensor:
    """Decode to uint8 [3, H, W] on the CPU; raises ImageDecodeError with the reason."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    fmt, mode, _, _ = header or read_header(data, max_pixels)
    if fmt in _TV_FORMATS and mode not in ("CMYK", "P", "PA", "I", "I;16", "F"):
        try:
            out = tv_decode(as_tensor(data), mode=ImageReadMode.RGB)
            if out.ndim == 3 and out.dtype == torch.uint8:
                return out
        except RuntimeError:
            pass  # let PIL decide: it decodes what it can and words the reason for what it cannot
    return pil_to_tensor(decode_image(data, max_pixels=max_pixels))


def pil_to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def decode_jpegs_gpu(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """nvJPEG batch decode; a batch that fails is retried image by image so one bad file costs one row."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        out: list[torch.Tensor | str] = []
        for d in datas:
            try:
                out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:  # nvJPEG refuses some valid files (rare subsamplings): decode those on the CPU
                    out.append(decode_cpu(bytes(d.numpy())).to(device))
                except ImageDecodeError as e:
                    out.append(str(e))
        return out
