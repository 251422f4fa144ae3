"""Benchmark: ``capcurate eval`` against clip_benchmark on the same eval set, metrics gated.

One eval set in clip_benchmark's webdataset layout (``test/{0..S-1}.tar`` with .jpg/.cls/.txt,
classnames.txt, zeroshot_classification_templates.txt): photo-like JPEGs of web sizes, a class and one or
two captions each. One tiny random open_clip CLIP with a 224 px input (so every image is decoded and
resized as for a real model; the model itself is cheap, the input path is what is compared), fp32.

- capcurate: ``capcurate.train.evaluation.evaluate`` (what ``capcurate eval`` calls): one pass over the
  images through the shared input pipeline (``--workers`` decode processes, libjpeg-turbo + uint8 resize,
  batches normalised once), both tasks from it.
- clip_benchmark: its public functions as its CLI calls them for a ``wds/`` dataset (``load_clip``,
  ``build_dataset``, a DataLoader over ``dataset.batched(bs)`` with the same workers,
  ``zeroshot_classification.evaluate`` and ``zeroshot_retrieval.evaluate``, amp off): PIL decode and
  open_clip's PIL transform per image, one pass per task. Its dataset builder reads a local folder
  without the network; retrieval needs ``dataset_type.txt`` = retrieval, so that task reads a second
  folder of links to the same tars.

Gates (a failed gate prints FAIL and exits 1): every metric of capcurate's run within ``--tolerance``
(absolute) of clip_benchmark's (its uint8 resize is within two levels of PIL's, which can turn over a near
tie of this random model), and a second capcurate pass given the model's own PIL transform (the same
pixels as clip_benchmark) within one query of it (text batches differ, so float rounding may turn over an
exact tie). images/s: whole runs (model load, both tasks) and the image pass alone (capcurate's
``images_per_s``; clip_benchmark's ``run_classification``, timed on its own).

clip_benchmark is not a dependency of capcurate: ``pip install clip_benchmark --no-deps`` plus
scikit-learn (its metrics import it) and webdataset (already there) into the venv.

    .venv/bin/python benchmarks/eval.py [--images 1000] [--classes 100] [--workers auto] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("CAPCURATE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
SIZES = [(500, 375), (375, 500), (640, 480), (500, 333), (800, 600), (333, 500)]  # ImageNet-val-like
WORDS = ["red", "blue", "cube", "ball", "dog", "cat", "on", "a", "table", "grass", "small", "big", "two"]


def build_eval_set(root: Path, n: int, classes: int, per_tar: int) -> Path:
    from photo_like import make_jpeg

    from capcurate.shards import TarShardWriter

    rnd = random.Random(0)
    (root / "test").mkdir(parents=True)
    tars = 0
    for start in range(0, n, per_tar):
        with TarShardWriter(root / "test" / f"{tars}.tar") as w:
            for i in range(start, min(n, start + per_tar)):
                caps = [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 9))) for _ in range(1 + i % 2)]
                w.write(f"{i:08d}", {"jpg": make_jpeg(i, SIZES[i % len(SIZES)]), "cls": str(i % classes).encode(),
                                     "txt": "\n".join(caps).encode()})
        tars += 1
    (root / "test" / "nshards.txt").write_text(f"{tars}\n")
    (root / "classnames.txt").write_text("\n".join(f"thing {c}" for c in range(classes)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    return root


def retrieval_view(evalset: Path, folder: Path) -> Path:
    """The same tars, typed ``retrieval`` for clip_benchmark's wds builder (it reads dataset_type.txt)."""
    folder.mkdir()
    (folder / "test").symlink_to(evalset / "test", target_is_directory=True)
    (folder / "dataset_type.txt").write_text("retrieval\n")
    return folder


def save_model(root: Path) -> tuple[Path, Path]:
    import open_clip
    import torch

    cfg = root / "bench-eval-clip.json"
    cfg.write_text(json.dumps(BENCH_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    weights = root / "bench-eval-clip.pt"
    torch.save({"state_dict": open_clip.create_model(cfg.stem).state_dict()}, weights)
    return cfg, weights


def run_clip_benchmark(evalset: Path, retrieval: Path, cfg: Path, weights: Path, batch_size: int,
                       workers: int) -> tuple[dict[str, dict[str, float]], float, float]:
    """(metrics per task, whole-run seconds, image-pass images/s) through clip_benchmark's public functions."""
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    from clip_benchmark.models import load_clip

    def loader(ds):
        return torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False, num_workers=workers)

    t0 = time.perf_counter()
    model, transform, tokenizer = load_clip(model_type="open_clip", model_name=cfg.stem, pretrained=str(weights),
                                            cache_dir=None, device="cpu")
    model.eval()
    cls_ds = build_dataset(dataset_name="wds/bench", root=str(evalset), transform=transform, split="test",
                           download=False, task="zeroshot_classification")
    cls = classification_metrics(model, loader(cls_ds), tokenizer, cls_ds.classes, cls_ds.templates)
    ret_ds = build_dataset(dataset_name="wds/bench", root=str(retrieval), transform=transform, split="test",
                           download=False, task="zeroshot_retrieval")
    ret = zeroshot_retrieval.evaluate(model, loader(ret_ds), tokenizer, device="cpu", amp=False,
                                      recall_k_list=[1, 5, 10])
    whole = time.perf_counter() - t0
    # the image pass alone: the classifier is built first, then only images go through the loader and model
    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, cls_ds.classes, cls_ds.templates,
                                                              "cpu", amp=False)
    t0 = time.perf_counter()
    logits, _ = zeroshot_classification.run_classification(model, classifier, loader(cls_ds), "cpu", amp=False)
    rate = len(logits) / (time.perf_counter() - t0)
    metrics = {"zeroshot_classification": {k: float(v) for k, v in cls.items()},
               "zeroshot_retrieval": {k: float(v) for k, v in ret.items()}}
    return metrics, whole, rate


def classification_metrics(model, dataloader, tokenizer, classnames, templates) -> dict[str, float]:
    """``zeroshot_classification.evaluate`` step by step: clip_benchmark 1.6.2's ``accuracy`` calls
    ``float()`` on a one-element array, which NumPy 2 refuses, so its classifier and logits are used as it
    uses them and acc1/acc5 are its top-k count in torch; mean_per_class_recall is sklearn's
    ``balanced_accuracy_score``, as in clip_benchmark."""
    from clip_benchmark.metrics import zeroshot_classification
    from sklearn.metrics import balanced_accuracy_score

    classifier = zeroshot_classification.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu",
                                                              amp=False)
    logits, target = zeroshot_classification.run_classification(model, classifier, dataloader, "cpu", amp=False)
    top5 = logits.topk(5, dim=1).indices
    return {"acc1": (top5[:, 0] == target).float().mean().item(),
            "acc5": (top5 == target[:, None]).any(dim=1).float().mean().item(),
            "mean_per_class_recall": float(balanced_accuracy_score(target, logits.argmax(dim=1)))}


def run_capcurate(evalset: Path, cfg: Path, weights: Path, batch_size: int, workers: int
                  ) -> tuple[dict[str, dict[str, float]], float, float, int]:
    from capcurate.train.evaluation import evaluate

    t0 = time.perf_counter()
    s = evaluate(f"openclip:{cfg}", str(evalset), pretrained=str(weights), batch_size=batch_size, workers=workers,
                 device="cpu", precision="fp32", decode="cpu")
    whole = time.perf_counter() - t0
    metrics = {r["task"]: r["metrics"] for r in s.details["results"]}
    queries = max(r.get("num_texts", r["num_samples"]) for r in s.details["results"])
    return metrics, whole, s.details["images_per_s"], queries


def run_capcurate_same_pixels(evalset: Path, cfg: Path, weights: Path, batch_size: int,
                              workers: int) -> dict[str, dict[str, float]]:
    """capcurate's streamed eval given the model's own PIL transform: clip_benchmark's pixels exactly."""
    from capcurate.inputs import Preprocess
    from capcurate.models.scorers import load_scorer
    from capcurate.train.evalset import open_eval_set
    from capcurate.train.evaluation import evaluate_streamed

    sc = load_scorer(f"openclip:{cfg}", pretrained=str(weights), device="cpu", precision="fp32")
    results = evaluate_streamed(open_eval_set(evalset), Preprocess(fallback=sc.preprocess), sc.encode_images,
                                sc.encode_texts, batch_size=batch_size, workers=workers)
    return {r["task"]: r["metrics"] for r in results}


def compare(name: str, ours: dict, theirs: dict, tolerance: float) -> list[str]:
    """Lines of metrics side by side; a line starting with FAIL for each metric outside ``tolerance``."""
    lines = []
    for task, metrics in theirs.items():
        for k, v in metrics.items():
            mine = ours.get(task, {}).get(k)
            bad = mine is None or abs(mine - v) > tolerance
            lines.append(f"{'FAIL ' if bad else '     '}{task}/{k}: capcurate {mine if mine is None else f'{mine:.4f}'}"
                         f"  clip_benchmark {v:.4f}  ({name}, tolerance {tolerance:g})")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-tar", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", default="auto", help="decode processes for both tools (auto: cores - 1)")
    ap.add_argument("--tolerance", type=float, default=0.01,
                    help="largest |capcurate - clip_benchmark| allowed per metric on capcurate's fast path")
    args = ap.parse_args()
    from capcurate.devices import available_cpus, resolve_workers

    workers = resolve_workers(args.workers)
    tmp = Path(tempfile.mkdtemp(prefix="capcurate-bench-eval-"))
    try:
        evalset = build_eval_set(tmp / "eval", args.images, args.classes, args.per_tar)
        retrieval = retrieval_view(evalset, tmp / "eval_retrieval")
        cfg, weights = save_model(tmp)
        run_capcurate(evalset, cfg, weights, args.batch_size, workers)  # warm imports and the page cache
        ours, our_s, our_rate, queries = run_capcurate(evalset, cfg, weights, args.batch_size, workers)
        theirs, their_s, their_rate = run_clip_benchmark(evalset, retrieval, cfg, weights, args.batch_size, workers)
        same = run_capcurate_same_pixels(evalset, cfg, weights, args.batch_size, workers)
        print(f"eval set: {args.images} JPEGs of {len(SIZES)} web sizes, {args.classes} classes, "
              f"{queries} captions; model 224 px tiny CLIP fp32; batch {args.batch_size}, {workers} workers, "
              f"{available_cpus()} cores")
        print(f"{'':16}{'whole run s':>12}{'images/s (run)':>16}{'image pass images/s':>22}")
        print(f"{'capcurate':16}{our_s:12.2f}{args.images / our_s:16.1f}{our_rate:22.1f}")
        print(f"{'clip_benchmark':16}{their_s:12.2f}{args.images / their_s:16.1f}{their_rate:22.1f}")
        print(f"ratio capcurate/clip_benchmark: whole run {their_s / our_s:.2f}x, image pass {our_rate / their_rate:.2f}x")
        lines = compare("fast path", ours, theirs, args.tolerance)
        lines += compare("same pixels", same, theirs, 1 / queries + 1e-9)
        print("\n".join(lines))
        failed = [x for x in lines if x.startswith("FAIL")]
        if failed:
            print(f"FAIL: {len(failed)} metric(s) differ from clip_benchmark beyond their tolerance")
            return 1
        print("metrics: equal within tolerance")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
