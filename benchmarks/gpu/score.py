"""Score row: ``capcurate.score`` on JPEGs of mixed sizes (a third progressive) against a plain open_clip
loop (PIL + open_clip's transform in a DataLoader with cores - 1 workers) and the image tower alone on
ready tensors. Gate: every image scored, and a sample within 2e-2 of open_clip in fp32."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .bound import count_flops
from .config import Cfg, stage_options
from .runner import Measure, Row, timed, timed_stage

CAPTION_COLUMN = "raw"
FLOP_BATCH = 8  # images per FLOP count (counted with autograd on: a batch of 256 would hold its graph)


def stage_scores(ds: Path, name: str) -> list[dict[str, Any]]:
    from capcurate.dataset import Dataset

    return (
        Dataset(ds)
        .query(
            f"SELECT m.uid, m.caption, s.score_{name}_{CAPTION_COLUMN} AS score FROM manifest m "
            f"JOIN scores_{name} s USING (uid) ORDER BY m.uid"
        )
        .to_pylist()
    )


class _Images:
    """(PIL decode + open_clip transform, caption) per sample: what a plain open_clip loop runs."""

    def __init__(self, jpegs: list[bytes], captions: list[str], preprocess: Any):
        self.jpegs, self.captions, self.preprocess = jpegs, captions, preprocess

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        from PIL import Image

        return self.preprocess(Image.open(io.BytesIO(self.jpegs[i])).convert("RGB")), self.captions[i]


def fp32_reference(
    cfg_path: Path, weights: Path, jpegs: dict[str, bytes], captions: dict[str, str], device: str
) -> dict[str, float]:
    """Cosine image-caption similarity as open_clip computes it in fp32, one image at a time."""
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg_path.stem, pretrained=str(weights), device=device
    )
    tok = open_clip.get_tokenizer(cfg_path.stem)
    model.eval()
    ds = _Images(list(jpegs.values()), [captions[u] for u in jpegs], preprocess)
    out = {}
    with torch.inference_mode():
        for uid, (px, cap) in zip(jpegs, (ds[i] for i in range(len(ds))), strict=True):
            i = model.encode_image(px[None].to(device), normalize=True)
            t = model.encode_text(tok([cap]).to(device), normalize=True)
            out[uid] = float((i * t).sum())
    return out


def rows(cfg: Cfg, ds: Path, jpegs: list[bytes], cfg_path: Path, weights: Path) -> list[Row]:
    import open_clip
    import torch

    import capcurate
    from capcurate.dataset import Dataset

    manifest = Dataset(ds).query("SELECT uid, shard, key, caption FROM manifest ORDER BY uid").to_pylist()
    by_key = {f"{r['shard']}/{r['key']}": r for r in manifest}
    # the JPEG of each uid, in the dataset's own order (build_dataset writes jpegs in order, shard by shard)
    keys = sorted(by_key)
    jpeg_of = {by_key[k]["uid"]: j for k, j in zip(keys, jpegs, strict=True)}
    caption_of = {r["uid"]: r["caption"] for r in manifest}
    step = max(1, len(manifest) // cfg.score_sample)
    sample = [r["uid"] for r in manifest[::step]][: cfg.score_sample]
    reference = fp32_reference(cfg_path, weights, {u: jpeg_of[u] for u in sample}, caption_of, cfg.device)
    ref = f"openclip:{cfg_path}"
    options = {"batch_size": cfg.stage_batch, **stage_options(cfg)}

    def ours(rep: int) -> Measure:
        summary, seconds, clock = timed_stage(
            lambda: capcurate.score(ds, ref, "bench", pretrained=str(weights), **options, overwrite=True),
            cfg.device,
        )
        if not summary.ok:
            raise RuntimeError(f"score failed: {summary.message}")
        got = stage_scores(ds, "bench")
        return Measure(sum(r["score"] is not None for r in got), seconds, got, clock.steady_per_s())

    def gate(got: list[dict[str, Any]]) -> list[str]:
        bad = []
        scored = {r["uid"]: r["score"] for r in got if r["score"] is not None}
        if len(scored) != len(jpegs):
            bad.append(f"{len(scored)} of {len(jpegs)} images scored")
        diffs = {u: abs(scored[u] - s) for u, s in reference.items() if u in scored}
        if len(diffs) != len(reference):
            bad.append(f"{len(reference) - len(diffs)} reference rows have no score")
        worst = max(diffs.values(), default=0.0)
        if worst > cfg.score_tol:
            bad.append(f"score differs from open_clip fp32 by {worst:.4f} (> {cfg.score_tol}) on the sample")
        return bad

    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg_path.stem, pretrained=str(weights), device=cfg.device
    )
    model = model.to(dtype).eval()
    tok = open_clip.get_tokenizer(cfg_path.stem)
    captions = [caption_of[by_key[k]["uid"]] for k in keys]
    batch = cfg.gen_batch

    def open_clip_loop(rep: int) -> Measure:
        loader = torch.utils.data.DataLoader(
            _Images(jpegs, captions, preprocess),
            batch_size=batch,
            num_workers=cfg.workers if not cfg.smoke else 0,
            pin_memory=cfg.device.startswith("cuda"),
        )
        sims = []

        def run() -> None:
            with torch.inference_mode():
                for px, caps in loader:
                    i = model.encode_image(px.to(cfg.device, dtype, non_blocking=True), normalize=True)
                    t = model.encode_text(tok(list(caps)).to(cfg.device), normalize=True)
                    sims.append((i * t).sum(-1))

        _, seconds = timed(run, cfg.device)
        return Measure(sum(len(s) for s in sims), seconds)

    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    ready = torch.randn(batch, 3, size, size, device=cfg.device, dtype=dtype)

    def tower_alone(rep: int) -> Measure:
        n = max(1, len(jpegs) // batch)

        def run() -> None:
            with torch.inference_mode():
                for _ in range(n):
                    model.encode_image(ready)

        _, seconds = timed(run, cfg.device)
        return Measure(n * batch, seconds)

    def flops() -> dict[str, Any]:
        """One real batch as the stage runs it: the images through the image tower, their captions through
        the text tower trimmed to the batch's longest (capcurate's scorer trims; the 77-token count too)."""
        from capcurate.models.text_trim import token_trimmer

        n = min(len(jpegs), FLOP_BATCH)
        data = _Images(jpegs, captions, preprocess)
        px = torch.stack([data[i][0] for i in range(n)]).to(cfg.device, dtype)
        tokens = tok(captions[:n])
        trimmed = token_trimmer(model, tok)(tokens)
        image, _, _ = count_flops(lambda: model.encode_image(px))
        text, _, _ = count_flops(lambda: model.encode_text(trimmed.to(cfg.device)))
        dense, _, _ = count_flops(lambda: model.encode_text(tokens.to(cfg.device)))
        return {
            "per_item": (image + text) / n,
            "image_per_item": image / n,
            "text_per_item": text / n,
            "text_tokens": int(trimmed.shape[1]),
            "per_item_text_dense": (image + dense) / n,
            "text_tokens_dense": int(tokens.shape[1]),
            "how": f"FlopCounterMode: encode_image + encode_text (trimmed) on the first {n} images/captions",
        }

    return [
        Row(
            family="score",
            name="score_mixed_sizes",
            unit="images",
            what=f"{cfg_path.stem}, {len(jpegs)} JPEGs of 7 shapes (every third progressive), "
            "one caption each, capcurate defaults",
            capcurate=ours,
            baselines={
                "open_clip_loop_pil_workers": open_clip_loop,
                "image_tower_alone_ready_tensors": tower_alone,
            },
            gate=gate,
            target="> the open_clip loop; >= 70% of the tower alone",
            device=cfg.device,
            precision="bf16" if cfg.device.startswith("cuda") else "fp32",
            flops=flops,
        )
    ]
