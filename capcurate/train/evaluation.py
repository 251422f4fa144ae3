"""Zero-shot classification and image-text retrieval, reported the way clip_benchmark reports them.

Metric definitions follow clip_benchmark: ``acc1``/``acc5`` and ``mean_per_class_recall`` over the
class-name prompts (the mean of the normalised template embeddings per class);
``image_retrieval_recall@k``: per text, is its image among the k most similar images;
``text_retrieval_recall@k``: per image, is any of its texts among the k most similar texts.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import InputError
from ..summary import Summary
from .evalset import EvalSet, open_eval_set

RECALL_KS = (1, 5, 10)


def zeroshot_metrics(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1/top-5 accuracy and mean per-class recall from normalised embeddings."""
    logits = image_emb @ class_emb.T
    k5 = min(5, class_emb.shape[0])
    top = logits.topk(k5, dim=1).indices
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=1)
    recalls = [hit1[labels == c].float().mean().item() for c in labels.unique().tolist()]
    return {"acc1": hit1.float().mean().item(), "acc5": hit5.float().mean().item(),
            "mean_per_class_recall": sum(recalls) / len(recalls)}


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k both ways; ``text_to_image[j]`` is the index of the image text j describes."""
    sims = text_emb @ image_emb.T                                   # [texts, images]
    pos = torch.zeros_like(sims, dtype=torch.bool)
    pos[torch.arange(len(text_to_image)), text_to_image] = True
    out: dict[str, float] = {}
    for k in ks:
        ki, kt = min(k, sims.shape[1]), min(k, sims.shape[0])
        top_images = sims.topk(ki, dim=1).indices                   # per text
        img_hit = pos.gather(1, top_images).any(dim=1)
        top_texts = sims.T.topk(kt, dim=1).indices                  # per image
        txt_hit = pos.T.gather(1, top_texts).any(dim=1)
        out[f"image_retrieval_recall@{k}"] = img_hit.float().mean().item()
        out[f"text_retrieval_recall@{k}"] = txt_hit.float().mean().item()
    return out


def class_embeddings(encode_texts: Callable[[Sequence[str]], torch.Tensor], classnames: list[str],
                     templates: list[str]) -> torch.Tensor:
    rows = []
    for c in classnames:
        e = encode_texts([t.replace("{c}", c) for t in templates]).float()
        e = torch.nn.functional.normalize(e, dim=-1).mean(dim=0)
        rows.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def evaluate_encoders(eval_set: EvalSet, preprocess: Callable[[Any], torch.Tensor],
                      encode_images: Callable[[torch.Tensor], torch.Tensor],
                      encode_texts: Callable[[Sequence[str]], torch.Tensor],
                      *, batch_size: int = 64, model_name: str = "",
                      spec: Any = None) -> list[dict[str, Any]]:
    """Embed the eval set once and compute every task it supports; clip_benchmark-shaped records.

    With ``spec`` (a ``capcurate.inputs.ImageSpec``) images take the shared input path: libjpeg-turbo
    decode and uint8 resize per image, normalisation per batch (``encode_images`` gets the normalised
    float batch); without it, PIL and ``preprocess`` per image.
    """
    from PIL import Image

    from ..inputs import decode_cpu

    def prepare(data: bytes) -> torch.Tensor:
        if spec is not None:
            return spec.resize_crop(decode_cpu(data))
        with Image.open(io.BytesIO(data)) as im:
            return preprocess(im.convert("RGB"))

    def encode(batch: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(batch)
        return encode_images(spec.normalize(x) if spec is not None else x).float()

    img_embs, labels, texts, text_img = [], [], [], []
    pending: list[torch.Tensor] = []
    bad = 0
    n = 0
    for s in eval_set.samples():
        try:
            pending.append(prepare(s.image))
        except Exception:
            bad += 1  # an undecodable eval image is left out and counted
            continue
        labels.append(-1 if s.label is None else s.label)
        for t in s.texts:
            texts.append(t)
            text_img.append(n)
        n += 1
        if len(pending) == batch_size:
            img_embs.append(encode(pending))
            pending = []
    if pending:
        img_embs.append(encode(pending))
    if n == 0:
        raise InputError(f"eval set {eval_set.root} holds no decodable images")
    images = torch.nn.functional.normalize(torch.cat(img_embs), dim=-1)
    results = []
    lab = torch.tensor(labels)
    base = {"dataset": eval_set.name, "model": model_name, "language": "en"}
    if eval_set.classnames and (lab >= 0).any():
        keep = lab >= 0
        if int(lab[keep].max()) >= len(eval_set.classnames):
            raise InputError(f"eval label {int(lab.max())} has no class name ({len(eval_set.classnames)} in classnames.txt)")
        cls = class_embeddings(encode_texts, eval_set.classnames, eval_set.templates)
        m = zeroshot_metrics(images[keep], cls, lab[keep])
        results.append({**base, "task": "zeroshot_classification", "metrics": m,
                        "num_samples": int(keep.sum())})
    if texts:
        t_emb = torch.cat([encode_texts(texts[i:i + batch_size]).float() for i in range(0, len(texts), batch_size)])
        m = retrieval_metrics(images, torch.nn.functional.normalize(t_emb, dim=-1), torch.tensor(text_img))
        results.append({**base, "task": "zeroshot_retrieval", "metrics": m,
                        "num_samples": n, "num_texts": len(texts)})
    if not results:
        raise InputError(f"eval set {eval_set.root} has neither labels with classnames.txt nor captions (.txt)")
    for r in results:
        r["skipped_images"] = bad
    return results


def evaluate(model: str, data: str, *, pretrained: str | None = None, batch_size: int | str = "auto",
             device: str = "auto", precision: str = "auto", output: str | None = None) -> Summary:
    """``capcurate eval``: load any CLIP-style reference (open_clip, run dir, hf:, or one of those in a bucket)
    and evaluate it; ``data`` and ``output`` may be URLs too."""
    from .. import atomic
    from ..devices import parse_batch_size, resolve_device, resolve_precision
    from ..models.scorers import load_scorer

    t0 = time.time()
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    batch_size = parse_batch_size(batch_size)
    if batch_size == "auto":
        batch_size = 256 if device.startswith("cuda") else 64
    if output:  # a read-only scheme or a missing bucket: one line before the model loads
        from .. import storage

        storage.check_writable(output)
        storage.check_container(output)
    eval_set = open_eval_set(data)
    scorer = load_scorer(model, pretrained=pretrained, device=device, precision=precision)
    # bf16/fp16 models keep some parameters fp32: pixels go in the dtype of the layer that takes them
    pixel_dtype = getattr(scorer, "input_dtype", None)

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return scorer.encode_images(pixels if pixel_dtype is None else pixels.to(pixel_dtype))

    results = evaluate_encoders(eval_set, scorer.preprocess, encode_images, scorer.encode_texts,
                                batch_size=batch_size, model_name=model, spec=scorer.spec)
    if pretrained:
        for r in results:
            r["pretrained"] = pretrained
    if output:
        atomic.write_json(output, results if len(results) > 1 else results[0])
    flat = {f"{r['task']}/{k}": round(v, 6) for r in results for k, v in r["metrics"].items()}
    return Summary("eval", counts={"images": results[0]["num_samples"], **flat},
                   details={"results": results, "output": output, "device": device, "precision": precision,
                            "batch_size": batch_size}, seconds=time.time() - t0,
                   message=f"evaluated {model} on {eval_set.name}")
