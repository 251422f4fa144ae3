"""CPU timing of one text-tower training step (forward + backward) padded, trimmed and packed, on captions
with DataComp-like lengths (benchmarks/caption_lengths.py). A CPU figure only: it says nothing about a GPU.

    .venv/bin/python benchmarks/text_tower.py [--batch 128] [--width 256] [--layers 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption_lengths import datacomp_like_tokens  # noqa: E402

from capcurate.models.text_pack import enable_text_pack  # noqa: E402
from capcurate.models.text_trim import enable_text_trim, trim_tokens  # noqa: E402


def tiny_clip(width: int, layers: int, heads: int) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=width, vision_cfg={"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": width, "heads": heads,
                                    "layers": layers})


def step_seconds(model: torch.nn.Module, tokens: torch.Tensor, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        model.encode_text(tokens).square().sum().backward()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = tiny_clip(args.width, args.layers, args.heads)
    trimmed, packed = copy.deepcopy(base), copy.deepcopy(base)
    enable_text_trim(trimmed)
    enable_text_pack(packed)
    rows: dict[str, list] = {}
    for seed in range(3):  # three batches: lengths differ, each holds its tail
        tokens = datacomp_like_tokens(args.batch, seed=seed)
        lengths = tokens.argmax(dim=1) + 1
        runs = (("padded", base, tokens), ("trimmed", trimmed, trim_tokens(tokens)), ("packed", packed, tokens))
        for _name, model, toks in runs:
            step_seconds(model, toks, 1)  # warm-up
        for _ in range(args.repeats):  # interleaved, so a burst of load on a shared box hits all three alike
            for name, model, toks in runs:
                rows.setdefault(name, []).extend(step_seconds(model, toks, 1))
        rows.setdefault("tokens", []).append({"real": int(lengths.sum()), "longest": int(lengths.max()),
                                              "padded": tokens.numel()})
    med = {k: statistics.median(v) for k, v in rows.items() if k != "tokens"}
    print(json.dumps({"args": vars(args), "tokens_per_batch": rows["tokens"],
                      "median_ms": {k: round(v * 1e3, 1) for k, v in med.items()},
                      "min_ms": {k: round(min(rows[k]) * 1e3, 1) for k in med},
                      "max_ms": {k: round(max(rows[k]) * 1e3, 1) for k in med},
                      "speedup_vs_padded_median": {k: round(med["padded"] / v, 2) for k, v in med.items()},
                      "speedup_vs_padded_min": {k: round(min(rows["padded"]) / min(rows[k]), 2) for k in med}}, indent=1))


if __name__ == "__main__":
    main()
