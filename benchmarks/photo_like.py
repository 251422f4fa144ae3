"""Photo-like JPEGs for the inference benchmarks: decoding cost matters, so no flat colours."""

from __future__ import annotations

import io


def make_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """Smooth noise: compresses and decodes like a photo, unlike a flat colour."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
