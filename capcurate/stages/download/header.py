"""Judge an image by its header before anyone decodes it: bombs, non-images, truncated JPEGs.

Reading a header with PIL costs microseconds; decoding a PNG that declares 30000x30000 pixels costs
2.7 GB. Used in front of img2dataset's resizer (``guard``) and by ``ingest``.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def jpeg_is_complete(data: bytes) -> bool:
    """A JPEG ends with an EOI marker (FF D9) after its last scan (FF DA).

    Inside entropy-coded data FF is always followed by 00 or a restart marker, so an EOI found after
    the last SOS is the real end; an EOI before it belongs to an embedded EXIF thumbnail.
    """
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def inspect_header(data: bytes, max_pixels: int) -> tuple[str | None, str | None, int, int]:
    """(problem or None, PIL format, width, height) without decoding pixel data."""
    if not data:
        return "empty image bytes", None, 0, 0
    try:
        with Image.open(io.BytesIO(data)) as im:
            (w, h), fmt = im.size, im.format
    except Image.DecompressionBombError as e:
        return f"image too large, not decoded: {e}", None, 0, 0
    except UnidentifiedImageError:
        return "not an image (unidentified format)", None, 0, 0
    except Exception as e:  # PIL raises many types for broken headers
        return f"corrupt image header: {type(e).__name__}: {e}", None, 0, 0
    if w * h > max_pixels:
        return f"image too large, not decoded: {w}x{h} pixels exceeds {max_pixels}", fmt, w, h
    if fmt == "JPEG" and not jpeg_is_complete(data):
        return "truncated image (JPEG has no end-of-image marker)", fmt, w, h
    return None, fmt, w, h


def header_problem(data: bytes, max_pixels: int) -> str | None:
    """The reason this image must not be decoded, or None when its header looks sound."""
    return inspect_header(data, max_pixels)[0]
