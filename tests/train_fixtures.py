"""Tiny open_clip configs and generated webdataset shards for the train/eval tests (CPU, seconds)."""

from __future__ import annotations

import io
import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30),
           "purple": (150, 30, 160), "white": (250, 250, 250), "black": (5, 5, 5), "orange": (250, 140, 0)}

TINY_VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TINY_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}


def tiny_clip_config(folder: Path, name: str = "tiny_clip") -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}))
    return path


def tiny_coca_config(folder: Path, name: str = "tiny_coca") -> Path:
    path = folder / f"{name}.json"
    cfg = {
        "embed_dim": 64,  # CoCa feeds the pooled image tokens (embed_dim) to a decoder of text width
        "vision_cfg": {**TINY_VISION, "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
        "text_cfg": {**TINY_TEXT, "embed_cls": True, "output_tokens": True},
        "multimodal_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1,
                           "attn_pooler_heads": 2},
        "custom_text": True,
    }
    path.write_text(json.dumps(cfg))
    return path


def colour_image(name: str, jitter: int = 0, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    r, g, b = COLOURS[name]
    img = Image.new("RGB", (32, 32), (min(255, r + jitter), g, b))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shards(folder: Path, n_shards: int, per_shard: int, *, text: bool = True,
                 corrupt_every: int = 0) -> list[Path]:
    """Shards of solid-colour images captioned with their colour (an easy, learnable task)."""
    from capcurate.shards import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    paths = []
    i = 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with TarShardWriter(path) as w:
            for j in range(per_shard):
                colour = names[i % len(names)]
                img = colour_image(colour, jitter=(i * 7) % 30)
                if corrupt_every and i % corrupt_every == corrupt_every - 1:
                    img = b"not an image at all"
                members = {"jpg": img}
                if text:
                    members["txt"] = f"a {colour} square".encode()
                else:
                    members["json"] = json.dumps({"i": i}).encode()
                w.write(f"{s:05d}{j:04d}", members)
                i += 1
        paths.append(path)
    manifest = {"shards": [{"name": p.name, "samples": per_shard} for p in paths],
                "total_samples": n_shards * per_shard}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return paths


def write_eval_set(folder: Path, per_class: int = 2) -> Path:
    """clip_benchmark webdataset layout: test/0.tar with .jpg/.cls/.txt, classnames, templates."""
    from capcurate.shards import TarShardWriter

    names = list(COLOURS)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    with TarShardWriter(folder / "test" / "0.tar") as w:
        k = 0
        for c, colour in enumerate(names):
            for j in range(per_class):
                w.write(f"s{k:05d}", {"jpg": colour_image(colour, jitter=j * 11), "cls": str(c).encode(),
                                      "txt": f"a {colour} square".encode()})
                k += 1
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("\n".join(names) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("a {c} square\na photo of a {c} thing\n")
    return folder


def textured_image(seed: int, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A noisy two-way gradient: crops and resizes of it differ visibly (unlike the solid squares)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    x = x + rng.normal(0, 25, (height, width, 3))
    x[..., 1] = np.linspace(255, 0, height)[:, None]
    img = Image.fromarray(x.clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_textured_shards(folder: Path, n_shards: int, per_shard: int, *, png_every: int = 0,
                          corrupt_every: int = 0) -> list[Path]:
    """Shards of textured images of several sizes (some PNG, some corrupt when asked), captioned."""
    from capcurate.shards import TarShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(48, 40), (40, 56), (64, 64), (30, 36)]
    paths, i = [], 0
    for s in range(n_shards):
        path = folder / f"{s:05d}.tar"
        with TarShardWriter(path) as w:
            for j in range(per_shard):
                png = bool(png_every) and i % png_every == png_every - 1
                img = textured_image(i, *sizes[i % len(sizes)], fmt="PNG" if png else "JPEG")
                if corrupt_every and i % corrupt_every == corrupt_every - 1:
                    img = img[: len(img) // 2]
                ext = "png" if png else "jpg"
                w.write(f"{s:05d}{j:04d}", {ext: img, "txt": f"texture number {i}".encode()})
                i += 1
        paths.append(path)
    manifest = {"shards": [{"name": p.name, "samples": per_shard} for p in paths],
                "total_samples": n_shards * per_shard}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return paths
