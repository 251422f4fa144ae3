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
    """Embed the eval set once, serially in this process, and compute every task it supports.

    The reference the streamed path (``evaluate_streamed``, what ``eval`` and the trainer's in-training
    eval call) is tested against. With ``spec`` (a ``capcurate.inputs.ImageSpec``) each image is decoded by
    libjpeg-turbo and resized as uint8, and batches are normalised (``encode_images`` gets the normalised
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

    img_embs, labels, texts = [], [], []
    pending: list[torch.Tensor] = []
    bad = 0
    for s in eval_set.samples():
        try:
            pending.append(prepare(s.image))
        except Exception:
            bad += 1  # an undecodable eval image is left out and counted
            continue
        labels.append(-1 if s.label is None else s.label)
        texts.append(s.texts)
        if len(pending) == batch_size:
            img_embs.append(encode(pending))
            pending = []
    if pending:
        img_embs.append(encode(pending))
    if not labels:
        raise InputError(f"eval set {eval_set.root} holds no decodable images")
    return task_results(eval_set, torch.cat(img_embs), labels, texts, encode_texts, skipped=bad,
                        batch_size=batch_size, model_name=model_name)


@torch.no_grad()
def evaluate_streamed(eval_set: EvalSet, pre: Any, encode_images: Callable[[torch.Tensor], torch.Tensor],
                      encode_texts: Callable[[Sequence[str]], torch.Tensor], *, batch_size: int = 64,
                      workers: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      decode: str = "cpu", model_name: str = "", scratch: str | None = None,
                      timing: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """``evaluate_encoders`` through the one image input pipeline: ``workers`` processes decode and resize
    (``decode`` cpu, draft, or gpu: nvJPEG batches), batches are normalised on ``device`` in ``dtype`` and
    handed to ``encode_images``; ``pre`` is a ``capcurate.inputs.Preprocess``. ``timing``, when given, gets
    ``image_seconds`` (first batch asked for to last image embedded) and ``images``."""
    from .. import events
    from ..inputs import ImageStream
    from .eval_inputs import eval_works

    with eval_works(eval_set, scratch) as ew:
        rows: list[int] = []
        embs: list[torch.Tensor] = []
        bad = 0
        t0 = time.perf_counter()
        stream = ImageStream(ew.works, pre, batch_size=batch_size, workers=workers, device=device, dtype=dtype,
                             decode=decode)
        for batch in stream:
            bad += len(batch.failed)  # an undecodable eval image is left out and counted
            if batch.items:
                # left where the model made them: a copy to the host per batch would wait for the GPU
                embs.append(encode_images(batch.pixels).float())
                rows.extend(int(rid) for _, rid in batch.items)
                events.emit("batch", len(batch.items))  # batch boundary for observers, as score's
        if not rows:
            raise InputError(f"eval set {eval_set.root} holds no decodable images")
        all_embs = torch.cat(embs).cpu()  # waits for the last batch: the clock stops after it
        if timing is not None:
            timing.update(image_seconds=time.perf_counter() - t0, images=len(rows))
        # back in the serial reader's order: equal inputs give equal metrics, ties included
        order = torch.tensor(rows).argsort()
        images = all_embs[order]
        kept = [rows[i] for i in order.tolist()]
        return task_results(eval_set, images, [ew.labels[r] for r in kept], [ew.texts[r] for r in kept],
                            encode_texts, skipped=bad, batch_size=batch_size, model_name=model_name)


def task_results(eval_set: EvalSet, image_emb: torch.Tensor, labels: list[int], texts: list[list[str]],
                 encode_texts: Callable[[Sequence[str]], torch.Tensor], *, skipped: int, batch_size: int,
                 model_name: str) -> list[dict[str, Any]]:
    """clip_benchmark-shaped records of every task the eval set supports, from the embeddings of its
    decodable images (row i: ``labels[i]``, -1 when unlabelled, and the texts ``texts[i]``)."""
    images = torch.nn.functional.normalize(image_emb, dim=-1)
    flat = [t for ts in texts for t in ts]
    text_img = [i for i, ts in enumerate(texts) for _ in ts]
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
    if flat:
        t_emb = torch.cat([encode_texts(flat[i:i + batch_size]).float() for i in range(0, len(flat), batch_size)])
        m = retrieval_metrics(images, torch.nn.functional.normalize(t_emb, dim=-1), torch.tensor(text_img))
        results.append({**base, "task": "zeroshot_retrieval", "metrics": m,
                        "num_samples": len(texts), "num_texts": len(flat)})
    if not results:
        raise InputError(f"eval set {eval_set.root} has neither labels with classnames.txt nor captions (.txt)")
    for r in results:
        r["skipped_images"] = skipped
    return results


def evaluate(model: str, data: str, *, pretrained: str | None = None, batch_size: int | str = "auto",
             workers: int | str = "auto", device: str = "auto", precision: str = "auto", decode: str = "auto",
             output: str | None = None) -> Summary:
    """``capcurate eval``: load any CLIP-style reference (open_clip, run dir, hf:, or one of those in a bucket)
    and evaluate it; ``data`` and ``output`` may be URLs too. Images go through the image input pipeline
    that score uses: ``workers`` decode processes, ``decode`` cpu/gpu/draft, batches of ``batch_size``."""
    from .. import atomic
    from ..devices import (
        model_threads,
        parse_batch_size,
        resolve_decode,
        resolve_device,
        resolve_precision,
        resolve_workers,
    )
    from ..inputs import Preprocess
    from ..models.scorers import load_scorer

    t0 = time.time()
    device = resolve_device(device)
    precision = resolve_precision(precision, device)
    batch_size = parse_batch_size(batch_size)
    if batch_size == "auto":
        batch_size = 256 if device.startswith("cuda") else 64
    workers = resolve_workers(workers)
    decode = resolve_decode(decode, device)
    if output:  # a read-only scheme or a missing bucket: one line before the model loads
        from .. import storage

        storage.check_writable(output)
        storage.check_container(output)
    eval_set = open_eval_set(data)
    scorer = load_scorer(model, pretrained=pretrained, device=device, precision=precision)
    # bf16/fp16 models keep some parameters fp32: the stream hands pixels over in the dtype of the layer
    # that takes them
    timing: dict[str, float] = {}
    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        return scorer.encode_images(pixels, to_cpu=False)

    with model_threads(device, workers):
        results = evaluate_streamed(eval_set, Preprocess(scorer.spec, scorer.preprocess), encode_images,
                                    scorer.encode_texts, batch_size=batch_size, workers=workers, device=device,
                                    dtype=scorer.input_dtype, decode=decode, model_name=model, timing=timing)
    if pretrained:
        for r in results:
            r["pretrained"] = pretrained
    if output:
        atomic.write_json(output, results if len(results) > 1 else results[0])
    flat = {f"{r['task']}/{k}": round(v, 6) for r in results for k, v in r["metrics"].items()}
    images_per_s = timing["images"] / timing["image_seconds"] if timing.get("image_seconds") else None
    return Summary("eval", counts={"images": results[0]["num_samples"], **flat},
                   details={"results": results, "output": output, "device": device, "precision": precision,
                            "batch_size": batch_size, "workers": workers, "decode": decode,
                            "images_per_s": images_per_s}, seconds=time.time() - t0,
                   message=f"evaluated {model} on {eval_set.name}")
