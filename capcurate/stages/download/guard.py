"""A header check in front of img2dataset's resizer: refuse bombs and broken files before decoding.

img2dataset decodes every download with OpenCV. A PNG that declares 30000x30000 pixels would make
it allocate 2.7 GB per worker thread, and a truncated JPEG may decode into a grey-padded image that
counts as a success. Reading the header with PIL costs microseconds and names the reason instead.
"""

from __future__ import annotations

from img2dataset.resizer import Resizer

from ...images import DEFAULT_MAX_PIXELS
from .header import header_problem

# Set by the runner in the parent process before img2dataset builds its Resizer; the value then
# travels to the worker processes inside the pickled instance.
MAX_PIXELS = DEFAULT_MAX_PIXELS

class GuardedResizer(Resizer):
    """img2dataset's Resizer, preceded by ``header_problem``; same call signature and return tuple."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_pixels = MAX_PIXELS

    def __call__(self, img_stream, blurring_bbox_list=None):
        img_stream.seek(0)
        problem = header_problem(img_stream.read(), self.max_pixels)
        img_stream.seek(0)
        if problem is not None:
            return None, None, None, None, None, problem
        return super().__call__(img_stream, blurring_bbox_list)
