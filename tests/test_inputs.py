"""The shared image input pipeline: each family's preprocessing replayed within a stated tolerance, and a
stream across shards that delivers every row exactly once, counting bad images with their reason."""

from __future__ import annotations

import io

import pytest
import torch
from conftest import build_dataset, make_image_bytes
from PIL import Image

from capcurate.images import ImageDecodeError
from capcurate.inputs import (
    ImageStream,
    Preprocess,
    ShardWork,
    decode_cpu,
    decode_jpegs_gpu,
    from_hf,
    from_openclip,
    gpu_decodable,
    read_header,
)

SIZES = [(512, 384), (300, 500), (1024, 700), (97, 61)]
# one uint8 level over the smallest std of the CLIP/BLIP normalisations (0.2613): 1 / 255 / 0.2613
ONE_LEVEL = 0.0151


def _photo(seed: int, size: tuple[int, int]) -> bytes:
    import numpy as np
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(size[1] // 16, 2), max(size[0] // 16, 2), 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _max_diff(spec, reference) -> float:
    worst = 0.0
    for i, size in enumerate(SIZES):
        data = _photo(i, size)
        ours = spec.normalize(spec.resize_crop(decode_cpu(data))[None])[0]
        theirs = reference(Image.open(io.BytesIO(data)).convert("RGB"))
        assert ours.shape == theirs.shape
        worst = max(worst, (ours - theirs).abs().max().item())
    return worst


def _hf(processor):
    return lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("name,kwargs", [
    ("blip", {"size": {"height": 384, "width": 384}}),
    ("blip2", {"size": {"height": 224, "width": 224}}),
    ("clip", {}),
    ("siglip", {}),
])
def test_hf_processors_are_replayed_exactly(name, kwargs):
    import transformers

    cls = {"blip": transformers.BlipImageProcessor, "blip2": transformers.BlipImageProcessor,
           "clip": transformers.CLIPImageProcessor, "siglip": transformers.SiglipImageProcessor}[name]
    processor = cls(**kwargs)
    spec = from_hf(processor)
    assert spec is not None
    # transformers 5's default processors resize tensors with torchvision, as the spec does: equal up to
    # float rounding. (Its PIL processors differ by about one uint8 level: the next test.)
    assert _max_diff(spec, _hf(processor)) < 1e-5


@pytest.mark.parametrize("cls_name", ["BlipImageProcessorPil", "CLIPImageProcessorPil"])
def test_pil_processors_within_two_uint8_levels(cls_name):
    import transformers

    cls = getattr(transformers, cls_name, None)
    if cls is None:
        pytest.skip(f"this transformers has no {cls_name}")
    processor = cls(size={"height": 384, "width": 384}) if "Blip" in cls_name else cls()
    assert _max_diff(from_hf(processor), _hf(processor)) <= 2 * ONE_LEVEL + 1e-4


def test_open_clip_transform_within_two_uint8_levels():
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    spec = from_openclip(open_clip.get_model_preprocess_cfg(model))
    assert spec.crop == (224, 224) and spec.interpolation == "bicubic"
    assert _max_diff(spec, preprocess) <= 2 * ONE_LEVEL + 1e-4  # PIL vs torchvision bicubic rounding


def test_specs_refuse_what_they_cannot_replay():
    import transformers

    assert from_openclip({"size": 224, "resize_mode": "longest", "mean": (0, 0, 0), "std": (1, 1, 1)}) is None
    assert from_hf(transformers.CLIPImageProcessor(resample=1)) is None  # lanczos
    qwen = getattr(transformers, "Qwen2VLImageProcessor", None)
    if qwen is not None:
        assert from_hf(qwen()) is None  # dynamic resolution: the processor runs per image


def test_header_check_refuses_bombs_and_non_images():
    big = make_image_bytes(0, size=(300, 300), fmt="PNG")
    with pytest.raises(ImageDecodeError, match="too large"):
        read_header(big, max_pixels=300 * 299)
    with pytest.raises(ImageDecodeError, match="not an image"):
        read_header(b"hello world")
    with pytest.raises(ImageDecodeError, match="empty"):
        read_header(b"")


def test_decode_falls_back_to_pil_and_words_failures():
    cmyk = io.BytesIO()
    Image.new("CMYK", (20, 10), (10, 20, 30, 40)).save(cmyk, "JPEG")
    x = decode_cpu(cmyk.getvalue())
    assert x.shape == (3, 10, 20) and x.dtype == torch.uint8
    assert tuple(x[:, 0, 0].tolist()) == Image.open(io.BytesIO(cmyk.getvalue())).convert("RGB").getpixel((0, 0))
    bmp = io.BytesIO()
    Image.new("RGB", (7, 5), (1, 2, 3)).save(bmp, "BMP")
    assert tuple(decode_cpu(bmp.getvalue())[:, 0, 0].tolist()) == (1, 2, 3)
    jpeg = make_image_bytes(1, size=(64, 48))
    with pytest.raises(ImageDecodeError, match="corrupt"):
        decode_cpu(jpeg[:300])


def test_only_complete_rgb_jpegs_go_to_nvjpeg():
    jpeg = make_image_bytes(1, size=(64, 48))
    fmt, mode, _, _ = read_header(jpeg)
    assert gpu_decodable(jpeg, fmt, mode)
    assert not gpu_decodable(jpeg[:-200], fmt, mode)  # truncated: no end-of-image marker
    png = make_image_bytes(1, fmt="PNG")
    assert not gpu_decodable(png, *read_header(png)[:2])


def test_batch_decode_isolates_a_bad_file():
    good = [torch.frombuffer(bytearray(make_image_bytes(i, size=(40, 30))), dtype=torch.uint8) for i in range(3)]
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 64 + b"\xff\xd9"), dtype=torch.uint8)
    out = decode_jpegs_gpu([good[0], bad, good[1], good[2]], torch.device("cpu"))  # same code path on CPU
    assert [isinstance(o, str) for o in out] == [False, True, False, False]
    assert all(o.shape == (3, 30, 40) for o in out if not isinstance(o, str))


# -- the stream ---------------------------------------------------------------------------------------
@pytest.fixture
def mixed_dataset(tmp_path):
    samples = []
    for i in range(22):
        samples.append({"caption": f"p{i}", "image": make_image_bytes(i, size=(48 + i % 3, 40))})  # sizes repeat
    samples[3]["image"] = b"not an image at all"
    samples[9]["image"] = make_image_bytes(9, size=(64, 48))[:250]      # truncated JPEG
    samples[15]["image"] = make_image_bytes(15, size=(30, 20), fmt="PNG")
    return build_dataset(tmp_path / "ds", samples, per_shard=8)  # 8 + 8 + 6


def _works(root):
    import pyarrow.parquet as pq

    works = []
    for sid in ("00000", "00001", "00002"):
        rows = pq.read_table(root / "samples" / f"{sid}.parquet").to_pylist()
        works.append(ShardWork(sid, root / "shards" / f"{sid}.tar", [(str(i), r["key"]) for i, r in enumerate(rows)]))
    return works


def _spec():
    import transformers

    return from_hf(transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


@pytest.mark.parametrize("workers,decode,batch", [(0, "cpu", 5), (2, "cpu", 3), (1, "gpu", 7), (0, "draft", 16)])
def test_stream_delivers_every_row_once_across_shards(mixed_dataset, workers, decode, batch):
    works = _works(mixed_dataset)
    seen, failed, completed = [], {}, []
    for b in ImageStream(works, Preprocess(_spec()), batch_size=batch, workers=workers, decode=decode):
        assert b.pixels is None or (b.pixels.shape[0] == len(b.items) and b.pixels.dtype == torch.float32)
        seen += b.items
        failed.update({(p, r): reason for p, r, reason in b.failed})
        for p in b.completed:  # a shard is complete only once all its rows were delivered
            assert sum(1 for q, _ in seen if q == p) + sum(1 for q, _ in failed if q == p) == len(works[p].entries)
        completed += b.completed
    assert completed == [0, 1, 2]
    everything = sorted(seen + list(failed))
    assert everything == sorted((p, r) for p, w in enumerate(works) for r, _ in w.entries)
    assert set(failed) == {(0, "3"), (1, "1")}
    assert "not an image" in failed[(0, "3")] and "corrupt" in failed[(1, "1")]


def test_stream_gpu_path_equals_cpu_path(mixed_dataset):
    """Bytes shipped to the main process and batch-decoded give the pixels CPU workers give."""
    works = _works(mixed_dataset)

    def run(decode):
        out = {}
        for b in ImageStream(works, Preprocess(_spec()), batch_size=6, workers=0, decode=decode):
            out.update({item: b.pixels[i] for i, item in enumerate(b.items)})
        return out

    cpu, gpu = run("cpu"), run("gpu")
    assert cpu.keys() == gpu.keys() and len(cpu) == 20
    assert max((cpu[k] - gpu[k]).abs().max().item() for k in cpu) < 1e-6


def test_stream_falls_back_to_the_models_own_processor(mixed_dataset):
    import torchvision.transforms.functional as F

    def processor(img):
        return F.to_tensor(img.resize((16, 16)))

    works = _works(mixed_dataset)
    n = sum(len(b.items) for b in ImageStream(works, Preprocess(None, processor), batch_size=4, workers=0))
    assert n == 20
