"""A supervised perceptibility probe: can a small CNN read every caption attribute off the pixels?

The true caption names shape, colour, size, position, count, background and tone. If a small CNN,
trained with labels on seed-split images at the size the models see, cannot tell an attribute apart on
held-out images, no captioner trained on the same pixels can be expected to name it either. The probe
reports held-out accuracy per attribute next to chance (one over the number of values).

    python -m capcurate.world.probe --image-size 64 --train 3000 --test 600

Images come from the seed split's own random streams, the held-out ones from indices far past any seed
split a world uses (``HELD_OUT_START``), so the probe never tests on an image it trained on.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .generate import ItemSpec, make_items
from .scene import BACKGROUND_TONES, BACKGROUNDS, COLOURS, COUNTS, POSITIONS, SHAPES, SIZES

ATTRIBUTES: dict[str, tuple[Any, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES, "position": POSITIONS, "count": COUNTS,
    "background": BACKGROUNDS, "tone": tuple(BACKGROUND_TONES),
}
HELD_OUT_START = 10_000_000  # seed-split indices no world renders (seed splits are far smaller)


@dataclass
class ProbeData:
    images: np.ndarray             # uint8, N x H x W x 3, decoded from the JPEG bytes the pipeline ships
    labels: dict[str, np.ndarray]  # attribute -> int64 value index, N


def probe_data(seed: int, image_size: int, start: int, n: int) -> ProbeData:
    """Render seed-split items ``start..start+n-1`` and decode them as the models would see them."""
    from PIL import Image

    items = make_items((ItemSpec("seed", seed, image_size, None), start, start + n))
    images = np.stack([np.asarray(Image.open(io.BytesIO(it["image"])).convert("RGB")) for it in items])
    labels = {a: np.array([values.index(getattr(it["scene"], a)) for it in items], dtype=np.int64)
              for a, values in ATTRIBUTES.items()}
    return ProbeData(images, labels)


def _model(image_size: int):
    import torch.nn as nn

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # a 4x4 map at the end (not a global pool) keeps where things are: position needs it
            self.features = nn.Sequential(*block(3, 32, 1), *block(32, 32, 2), *block(32, 64, 2),
                                          *block(64, 64, 1), *block(64, 128, 2), nn.AdaptiveAvgPool2d(4),
                                          nn.Flatten())
            self.heads = nn.ModuleDict({a: nn.Linear(128 * 16, len(v)) for a, v in ATTRIBUTES.items()})

        def forward(self, x):  # noqa: ANN001, ANN202 - torch tensors
            f = self.features(x)
            return {a: h(f) for a, h in self.heads.items()}

    return Probe()


def _tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def run_probe(*, seed: int = 0, image_size: int = 64, n_train: int = 3000, n_test: int = 600, epochs: int = 6,
              batch_size: int = 64, lr: float = 2e-3, torch_seed: int = 0) -> dict[str, Any]:
    """Train the probe on ``n_train`` seed images, return held-out accuracy and chance per attribute."""
    import torch
    import torch.nn.functional as F

    t0 = time.time()
    torch.manual_seed(torch_seed)
    train, test = probe_data(seed, image_size, 0, n_train), probe_data(seed, image_size, HELD_OUT_START, n_test)
    x_train, x_test = _tensor(train.images), _tensor(test.images)
    y_train = {a: torch.from_numpy(v) for a, v in train.labels.items()}
    model = _model(image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((n_train + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    gen = torch.Generator().manual_seed(torch_seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=gen)
        for i in range(0, n_train, batch_size):
            idx = order[i:i + batch_size]
            out = model(x_train[idx])
            loss = sum(F.cross_entropy(out[a], y_train[a][idx]) for a in ATTRIBUTES)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        out = {a: torch.cat([model(x_test[i:i + 256])[a] for i in range(0, n_test, 256)]) for a in ATTRIBUTES}
    accuracy = {a: float((out[a].argmax(1).numpy() == test.labels[a]).mean()) for a in ATTRIBUTES}
    return {"accuracy": accuracy, "chance": {a: 1.0 / len(v) for a, v in ATTRIBUTES.items()},
            "n_train": n_train, "n_test": n_test, "image_size": image_size, "epochs": epochs,
            "seconds": round(time.time() - t0, 1)}


def format_report(result: dict[str, Any]) -> str:
    lines = [f"perceptibility probe: small CNN, {result['n_train']} seed images at {result['image_size']} px, "
             f"{result['n_test']} held out ({result['seconds']} s)",
             f"{'attribute':<11} {'held-out acc':>12} {'chance':>7}"]
    for a, acc in result["accuracy"].items():
        lines.append(f"{a:<11} {100 * acc:11.1f}% {100 * result['chance'][a]:6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--test", type=int, default=600)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    result = run_probe(seed=args.seed, image_size=args.image_size, n_train=args.train, n_test=args.test,
                       epochs=args.epochs)
    print(json.dumps(result, indent=2) if args.json else format_report(result))


if __name__ == "__main__":
    main()
