"""The image input pipeline shared by recaption, score, eval and train: decode, preprocess, batch."""

from .decode import decode_cpu, decode_jpegs_gpu, gpu_decodable, read_header
from .spec import ImageSpec, from_hf, from_openclip
from .stream import Batch, ImageStream, Preprocess, ShardWork, success_entries

__all__ = ["Batch", "ImageSpec", "ImageStream", "Preprocess", "ShardWork", "decode_cpu", "decode_jpegs_gpu",
           "from_hf", "from_openclip", "gpu_decodable", "read_header", "success_entries"]
