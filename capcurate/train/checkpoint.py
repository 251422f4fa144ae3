"""Checkpoints: model weights as safetensors, everything else as plain tensors/containers that
``torch.load(weights_only=True)`` accepts, in one directory per step renamed into place when complete.

    RUN/checkpoints/step_00000120/
        model.safetensors   weights
        state.pt            optimizer, grad scaler, lr scheduler, RNG states, data position
        meta.json           step, epoch, architecture name + config (checked on --resume)
        COMPLETE            object stores only: written last (see below)

A run directory may be a URL (``s3://bucket/runs/x``). A store has no rename, so there a checkpoint is
written into a local temp folder, each file is uploaded, and the ``COMPLETE`` marker object is uploaded
last: a checkpoint folder without its marker (an upload cut off by a kill) is not a checkpoint, and is
removed by the next save. The checkpoints of a run are found with one listing of ``checkpoints/``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import atomic, storage
from ..errors import InputError

PREFIX = "step_"
MARKER = "COMPLETE"  # object stores: the object that makes a checkpoint folder one, uploaded last
FILES = ("model.safetensors", "state.pt", "meta.json")


def _step_of(name: str) -> int | None:
    rest = name[len(PREFIX):]
    return int(rest) if name.startswith(PREFIX) and rest.isdigit() else None


def _remote_listing(run: Any) -> tuple[list[Any], list[Any]]:
    """(complete checkpoint folders sorted by step, folders without their marker): one listing."""
    root = storage.path(run) / "checkpoints"
    try:
        files = root.fs.find(root.path)
    except FileNotFoundError:
        return [], []
    prefix = root.path.rstrip("/") + "/"
    marked: set[str] = set()
    seen: set[str] = set()
    for f in files:
        if not f.startswith(prefix):
            continue
        folder, _, name = f[len(prefix):].partition("/")
        if _step_of(folder) is None:
            continue
        seen.add(folder)
        if name == MARKER:
            marked.add(folder)
    done = sorted(marked, key=lambda d: _step_of(d) or 0)
    return [root / d for d in done], [root / d for d in sorted(seen - marked)]


def checkpoint_dirs(run: Any) -> list[Any]:
    """The complete checkpoints of RUN (local or a URL), oldest first."""
    run = storage.path(run)
    if storage.is_remote(run):
        return _remote_listing(run)[0]
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and (d / "meta.json").is_file()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def latest_checkpoint(run: Any) -> Any | None:
    dirs = checkpoint_dirs(run)
    return dirs[-1] if dirs else None


def resolve_resume(run: Any, resume: str | None) -> Any | None:
    """``latest`` -> the newest complete checkpoint of RUN (None when there is none yet), or a path/URL."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(run)
    p = storage.path(resume)
    if storage.is_remote(p):
        if not storage.exists(p / MARKER):
            raise InputError(f"--resume {resume}: expected 'latest' or a complete checkpoint (meta.json and its "
                             f"{MARKER} marker)")
        return p
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


def save_checkpoint(run: Any, step: int, model: torch.nn.Module, state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Any:
    """Write a checkpoint directory atomically (temp dir + rename, or uploads + marker on a store); keep
    the newest ``keep``."""
    run = storage.path(run)
    if storage.is_remote(run):
        return _save_remote(run, step, model, state, meta, keep)
    root = run / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_files(tmp, step, model, state, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in checkpoint_dirs(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_files(folder: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"))
    torch.save(state, folder / "state.pt")
    (folder / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str))


def _save_remote(run: Any, step: int, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any],
                 keep: int) -> Any:
    root = run / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"capcurate-ckpt-{atomic.owner_tag()}-"))
    try:
        _write_files(tmp, step, model, state, meta)
        storage.remove(final / MARKER)  # a checkpoint of this step from before: no longer one while it changes
        for name in FILES:
            storage.upload(tmp / name, final / name)
        marker = {"step": step, "files": {n: (tmp / n).stat().st_size for n in FILES}}
        atomic.write_json(final / MARKER, marker)  # last: now it is a checkpoint
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    done, partial = _remote_listing(run)
    old = done[:-keep] if keep > 0 else []
    for d in old:
        storage.remove(d / MARKER)  # first: a half-deleted folder is never taken for a checkpoint
        storage.rmtree(d)
    for d in partial:  # uploads a kill cut off (one writer per run: rank 0)
        if d.name != final.name:
            storage.rmtree(d)
    return final


def load_checkpoint(ckpt: Any, model: torch.nn.Module, *, model_name: str,
                    model_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``model`` and return (state, meta); refuse a checkpoint of another architecture."""
    from safetensors.torch import load_file

    ckpt = storage.path(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    if meta.get("model_cfg") != json.loads(json.dumps(model_cfg)):
        raise InputError(
            f"checkpoint {ckpt} is architecture {meta.get('model_name')!r}, this run builds {model_name!r} "
            "with another config; resume with the same --model/--model-config or use a new -o"
        )
    with contextlib.ExitStack() as stack:  # a stored checkpoint is downloaded to scratch, then read as today
        weights_file = stack.enter_context(storage.local_copy(ckpt / "model.safetensors"))
        state_file = stack.enter_context(storage.local_copy(ckpt / "state.pt"))
        weights = load_file(str(weights_file))
        model.load_state_dict(weights, strict=True)
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    return state, meta
