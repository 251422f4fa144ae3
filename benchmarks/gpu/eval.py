"""Eval row: ``capcurate.evaluate`` (zero-shot classification + retrieval) against a plain open_clip loop
(PIL + open_clip's transform, a DataLoader with cores - 1 workers) computing the same zero-shot top-1 on the
same eval set. Gate: every image evaluated and top-1 equal to the loop's within 2% of the images (one
image on a tiny set: near-ties of a random model may flip under a different resize kernel)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from .bound import count_flops
from .config import Cfg, stage_options
from .runner import Measure, Row, timed, timed_stage

CLASSES = ["red", "green", "blue", "yellow", "purple", "white", "black", "orange"]
TEMPLATES = ["a photo of a {c}.", "a {c} thing."]
FLOP_BATCH = 8  # images per FLOP count (counted with autograd on: a batch of 256 would hold its graph)


def write_eval_set(folder: Path, jpegs: list[bytes]) -> list[int]:
    """clip_benchmark's webdataset layout; returns the labels."""
    from capcurate.shards import TarShardWriter

    (folder / "test").mkdir(parents=True, exist_ok=True)
    labels = [i % len(CLASSES) for i in range(len(jpegs))]
    with TarShardWriter(folder / "test" / "0.tar") as w:
        for i, (j, c) in enumerate(zip(jpegs, labels, strict=True)):
            w.write(f"s{i:06d}", {"jpg": j, "cls": str(c).encode(), "txt": f"a {CLASSES[c]} thing".encode()})
    (folder / "test" / "nshards.txt").write_text("1\n")
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return labels


class _Pixels:
    def __init__(self, jpegs: list[bytes], preprocess: Any):
        self.jpegs, self.preprocess = jpegs, preprocess

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image

        return self.preprocess(Image.open(io.BytesIO(self.jpegs[i])).convert("RGB"))


def rows(cfg: Cfg, work: Path, jpegs: list[bytes], cfg_path: Path, weights: Path) -> list[Row]:
    import open_clip
    import torch

    import capcurate

    folder = work / "evalset"
    labels = write_eval_set(folder, jpegs)
    options = {"batch_size": cfg.stage_batch, **stage_options(cfg)}
    dtype = torch.bfloat16 if cfg.device.startswith("cuda") else torch.float32
    model, _, preprocess = open_clip.create_model_and_transforms(
        cfg_path.stem, pretrained=str(weights), device=cfg.device
    )
    model = model.to(dtype).eval()
    tok = open_clip.get_tokenizer(cfg_path.stem)
    loop_acc: dict[int, float] = {}

    def ours(rep: int) -> Measure:
        summary, seconds, clock = timed_stage(
            lambda: capcurate.evaluate(
                f"openclip:{cfg_path}", str(folder), pretrained=str(weights), **options
            ),
            cfg.device,
        )
        if not summary.ok:
            raise RuntimeError(f"eval failed: {summary.message}")
        return Measure(summary.counts["images"], seconds, summary.counts, clock.steady_per_s())

    def loop(rep: int) -> Measure:
        loader = torch.utils.data.DataLoader(
            _Pixels(jpegs, preprocess), batch_size=cfg.gen_batch, num_workers=0 if cfg.smoke else cfg.workers
        )
        preds: list[Any] = []

        def run() -> None:
            with torch.inference_mode():
                cls = []
                for c in CLASSES:
                    t = model.encode_text(
                        tok([t.format(c=c) for t in TEMPLATES]).to(cfg.device), normalize=True
                    )
                    cls.append(torch.nn.functional.normalize(t.float().mean(0), dim=-1))
                classifier = torch.stack(cls)
                for px in loader:
                    e = model.encode_image(px.to(cfg.device, dtype), normalize=True).float()
                    preds.append((e @ classifier.T).argmax(-1).cpu())

        _, seconds = timed(run, cfg.device)
        got = torch.cat(preds)
        loop_acc[rep] = float((got == torch.tensor(labels)).float().mean())
        return Measure(len(got), seconds)

    def gate(counts: dict[str, Any]) -> list[str]:
        bad = (
            []
            if counts.get("images") == len(jpegs)
            else [f"{counts.get('images')} of {len(jpegs)} images evaluated"]
        )
        acc = counts.get("zeroshot_classification/acc1")
        if acc is None:
            return bad + ["no zeroshot_classification/acc1"]
        if loop_acc:
            ref = list(loop_acc.values())[-1]
            if abs(acc - ref) > max(0.02, 1.0 / len(jpegs)) + 1e-9:
                bad.append(f"top-1 {acc:.4f} vs the open_clip loop's {ref:.4f}")
        return bad

    def flops() -> dict[str, Any]:
        """The image tower on one real batch (the per-image work; the class prompts are encoded once)."""
        n = min(len(jpegs), FLOP_BATCH)
        data = _Pixels(jpegs, preprocess)
        px = torch.stack([data[i] for i in range(n)]).to(cfg.device, dtype)
        image, _, _ = count_flops(lambda: model.encode_image(px))
        prompts = tok([t.format(c=c) for c in CLASSES for t in TEMPLATES]).to(cfg.device)
        classifier, _, _ = count_flops(lambda: model.encode_text(prompts))
        return {
            "per_item": image / n,
            "classifier_once": classifier,
            "how": f"FlopCounterMode: encode_image on the first {n} images; the classifier's "
            f"{len(CLASSES) * len(TEMPLATES)} prompts, once per run, and retrieval's captions not included",
        }

    return [
        Row(
            family="eval",
            name="eval_zeroshot",
            unit="images",
            what=f"{cfg_path.stem}, {len(jpegs)} JPEGs of mixed sizes, {len(CLASSES)} classes, "
            "zero-shot + retrieval",
            capcurate=ours,
            baselines={"open_clip_loop_pil_workers": loop},
            gate=gate,
            target="equal top-1; images/s side by side (clip_benchmark row: issue 23 item 5)",
            device=cfg.device,
            precision="bf16" if cfg.device.startswith("cuda") else "fp32",
            flops=flops,
        )
    ]
