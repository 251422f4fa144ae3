"""Checkpoints: model weights as safetensors, everything else as plain tensors/containers that
``torch.load(weights_only=True)`` accepts, in one directory per step renamed into place when complete.

    RUN/checkpoints/step_00000120/
        model.safetensors   weights
        state.pt            optimizer, grad scaler, lr scheduler, RNG states, data position
        meta.json           step, epoch, architecture name + config (checked on --resume)
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError

PREFIX = "step_"


def checkpoint_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and (d / "meta.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def latest_checkpoint(run: Path) -> Path | None:
    dirs = checkpoint_dirs(run)
    return dirs[-1] if dirs else None


def resolve_resume(run: Path, resume: str | None) -> Path | None:
    """``latest`` -> the newest complete checkpoint of RUN (None when there is none yet), or a path."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run)
    p = Path(resume)
    if not (p / "meta.json").is_file():
        raise InputError(f"--resume {resume}: expected 'latest' or a checkpoint directory with meta.json")
    return p


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, arr, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, arr.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    """Write a checkpoint directory atomically (temp dir + rename); keep the newest ``keep``."""
    from safetensors.torch import save_file

    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, *, model_name: str,
                    model_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` and return (state, meta); refuse a checkpoint of another architecture."""
    from safetensors.torch import load_file

    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("model_cfg") != json.loads(json.dumps(model_cfg)):
        raise InputError(
            f"checkpoint {ckpt} is architecture {meta.get('model_name')!r}, this run builds {model_name!r} "
            "with another config; resume with the same --model/--model-config or use a new -o"
        )
    weights = load_file(str(ckpt / "model.safetensors"))
    model.load_state_dict(weights, strict=True)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    return state, meta
